"""A consumer that starts late replays the bridge's events from a RabbitMQ stream (issue 15,
docs/CONSUMERS.md "Replaying events from a stream"): examples/python/replay.py and
examples/node/replay.mjs, run as processes against a live bridge and the simulator, after the
calls, on the local RabbitMQ (3.10.8: streams are a core queue type there, no plugin over AMQP
0-9-1).

Each test has its own exchange and stream names; the stream is deleted afterwards."""

from __future__ import annotations

import asyncio
import math
import os
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import AMQP_URL, EventQueue, Received
from tests.contracts.helpers import NODE_DIR, node_ready

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"offset=(\d+) (device\.([^.]+)\.\S+) seq=(\d+)( \S+)?")


@pytest.fixture(params=["python", "node"])
def example(request) -> list[str]:
    """The command line of the example in one language (the same options and output)."""
    if request.param == "node":
        return [node_ready(), str(NODE_DIR / "replay.mjs")]
    return [sys.executable, str(ROOT / "examples" / "python" / "replay.py")]


@pytest.fixture
async def stream(names, amqp):
    name = f"{names['events_exchange']}.replay"
    yield name
    ch = await amqp.channel()
    await ch.queue_delete(name)
    await ch.close()


async def replay(example: list[str], names: dict, stream: str, *args: str,
                 timeout: float = 30) -> list[str]:
    """Run the example to its end; its stdout lines."""
    env = {**os.environ, "STREAM": stream,  # the Python example's variables, and the Node one's
           "EPSIGNAL_AMQP_URL": AMQP_URL, "EPSIGNAL_EVENTS_EXCHANGE": names["events_exchange"],
           "AMQP_URL": AMQP_URL, "EVENTS_EXCHANGE": names["events_exchange"]}
    p = await asyncio.create_subprocess_exec(
        *example, *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(p.communicate(), timeout)
    except TimeoutError:
        p.kill()
        out, err = await p.communicate()
        raise AssertionError(f"replay {args} did not end: {out.decode()} {err.decode()}") from None
    assert p.returncode == 0 and not err, (out.decode(), err.decode())
    return out.decode().splitlines()


async def calls(sim, seen: EventQueue, hws: list[str], per_device: int) -> list[Received]:
    """Calls on every device at once; every event the observer saw until each was released."""
    open_calls = {(hw, await sim.place_call(hw, direction=d, hold_s=0.05))
                  for hw in hws for d in ("in", "out")[:per_device]}
    events = []
    async with asyncio.timeout(20):
        while open_calls:
            e = await seen.get()
            events.append(e)
            if e.body["type"] == "call.state" and e.body["state"] == "released":
                open_calls.discard((e.body["hw"], e.body["call"]))
    await sim.wait_idle(5)
    return events


def by_device(pairs) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for hw, key, seq in pairs:
        out.setdefault(hw, []).append((key, seq))
    return out


def printed(lines: list[str]) -> dict[str, list[tuple[str, int]]]:
    """The example's event lines, per device: (routing key, seq), in the order printed."""
    assert lines[-1].startswith("end: "), lines
    parsed = [LINE.fullmatch(line) for line in lines[:-1]]
    assert all(parsed), lines
    offsets = [int(m[1]) for m in parsed]
    assert offsets == sorted(set(offsets)), offsets  # the stream's order, each offset once
    return by_device((m[3], m[2], int(m[4])) for m in parsed)


def observed(events: list[Received]) -> dict[str, list[tuple[str, int]]]:
    return by_device((e.body["hw"], e.key, e.body["seq"]) for e in events)


async def test_a_late_consumer_replays_every_event_of_earlier_calls(
        sim, bus, settings_for, start_bridge, names, stream, example):
    hws = [sim.hw(i) for i in (1, 2, 3)]
    # the stream exists before the events (deployed with the bridge); nobody consumes it yet
    assert await replay(example, names, stream, "--declare") == [
        f"stream {stream} bound to device.#, bridge.*.gap of {names['events_exchange']}"]
    seen = await bus.bind("device.#")  # what the bridge published, as a live consumer sees it
    await start_bridge(settings_for(sim, devices=",".join(hws)))
    events = await calls(sim, seen, hws, per_device=2)
    expected = observed(events)
    assert set(expected) == set(hws)
    for hw in hws:  # attached, then two calls' states and signaling: seq 1, 2, 3, ... no gap
        assert [seq for _, seq in expected[hw]] == list(range(1, len(expected[hw]) + 1))
        assert expected[hw][0] == (f"device.{hw}.attached", 1) and len(expected[hw]) > 10

    # a consumer that starts now replays all of it from the stream's start, in order per device
    lines = await replay(example, names, stream, "--from", "first", "--count", str(len(events)))
    assert printed(lines) == expected
    assert lines[-1] == f"end: {len(events)} events, 0 repeats skipped"

    # and resumes after the last offset it processed: the next call's events, nothing before
    last_offset = int(LINE.fullmatch(lines[-2])[1])
    more = await calls(sim, seen, hws[:1], per_device=1)
    lines = await replay(example, names, stream, "--from", str(last_offset + 1),
                         "--count", str(len(more)))
    assert printed(lines) == observed(more)
    assert observed(more)[hws[0]][0][1] == expected[hws[0]][-1][1] + 1


async def test_replay_from_a_time_skips_older_events(
        sim, bus, settings_for, start_bridge, names, stream, example):
    hws = [sim.hw(4), sim.hw(5)]
    await replay(example, names, stream, "--declare")
    seen = await bus.bind("device.#")
    await start_bridge(settings_for(sim, devices=",".join(hws)))
    older = await calls(sim, seen, hws, per_device=1)
    # AMQP 0-9-1 gives the time in whole seconds and the stream attaches at the chunk holding it:
    # a time at least a second after the last older event, and the newer ones after it
    since = math.floor(time.time()) + 2
    await asyncio.sleep(since + 0.2 - time.time())
    newer = await calls(sim, seen, hws, per_device=2)

    start = datetime.fromtimestamp(since, UTC).isoformat().replace("+00:00", "Z")
    lines = await replay(example, names, stream, "--from", start, "--count", str(len(newer)))
    got = printed(lines)  # an older event printed would have taken a newer one's place
    assert got == observed(newer), (start, lines)
    first_newer = {hw: observed(older)[hw][-1][1] + 1 for hw in hws}
    assert {hw: got[hw][0][1] for hw in hws} == first_newer  # right after the older ones
