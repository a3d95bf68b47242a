"""The publisher on an operator's bad day: a broker link that stalls (not cuts), a queue that
refuses publishes (nacks), a stop while the broker is away. Real broker, real simulator, the
faults through a TCP proxy or a queue's own limits."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import time

import aio_pika
import pytest

from bridge.service import Bridge
from tests.conftest import PASSWORD, attached
from tests.faults.helpers import AMQP_URL, BridgeProcess, bridge_env, eventually, http_get, http_port, metric
from tests.tcpproxy import TcpProxy
from tests.ports import free_port

pytestmark = pytest.mark.broker


def seqs_by_device(events) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for e in events:
        if e.body.get("type") != "gap":
            out.setdefault(e.body["hw"], []).append(e.body["seq"])
    return out


def gap_seqs(events) -> dict[str, set[int]]:
    out: dict[str, set[int]] = {}
    for e in events:
        if e.body.get("type") == "gap":
            for hw, rs in e.body["dropped"].items():
                out.setdefault(hw, set()).update(s for r in rs for s in range(r["first"], r["last"] + 1))
    return out


async def calls_until(sim, hws, stop: asyncio.Event) -> int:
    """Short calls on every device, one round after another, until ``stop``."""
    n = 0
    while not stop.is_set():
        for hw in hws:
            await sim.place_call(hw, direction="in", hold_s=0.02)
            n += 1
        await asyncio.sleep(0.05)
    return n


async def test_a_stalled_broker_link_never_wedges_the_publisher(sim, bus, proxy, settings_for, start_bridge):
    """Issue 13.1: the link stalls (socket open, no byte moves) while calls go on; the watchdog
    drops the connection. Before the fix the publisher stayed parked on the dead connection's
    writer queue and nothing was confirmed ever again. Now: readiness and the stall metric tell,
    the buffer drains on the next connection, and every event arrives."""
    hws = [sim.hw(i) for i in range(1, 5)]
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(
        sim, devices=",".join(hws), heartbeat_s=2, publish_window=64, publish_timeout_s=1.5,
        amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
    port = http_port(bridge)
    await q.until_all([attached(hw) for hw in hws])
    assert (await http_get(port, "/readyz"))[0] == 200

    stop = asyncio.Event()
    traffic = asyncio.create_task(calls_until(sim, hws, stop))
    proxy.stall()
    # the watchdog gives the stalled connection up; meanwhile events pile up
    await eventually(lambda: not bridge.link.ready, 10, "the watchdog dropping the stalled link")
    await asyncio.sleep(3)
    status, body = await http_get(port, "/readyz")
    assert status == 503 and ("broker not connected" in body or "confirms nothing" in body), body
    _, text = await http_get(port, "/metrics")
    assert metric(text, "epsignal_publish_stalled_seconds") > 1.5, text
    stop.set()
    calls = await traffic
    await sim.wait_idle(20)
    assert sim.stats()["calls_stalled"] == 0  # forwarding never waited on the broker

    proxy.unstall()
    assert await bridge.link.wait_ready(30)
    assert await bridge.publisher.flush(30), f"{len(bridge.publisher.buffer)} events never confirmed"
    assert (await http_get(port, "/readyz"))[0] == 200
    _, text = await http_get(port, "/metrics")
    assert metric(text, "epsignal_publish_stalled_seconds") == 0
    await asyncio.sleep(0.5)
    got = seqs_by_device(q.drain())
    for hw in hws:
        unique = sorted(set(got[hw]))
        assert unique == list(range(unique[0], unique[-1] + 1)), hw  # nothing lost
        # a stalled connection's bytes may still reach the broker after the bridge gave it up
        # and resent them: duplicates, but in the order a device's events first appear
        first_seen = list(dict.fromkeys(got[hw]))
        assert first_seen == sorted(first_seen), hw
    assert sum(len(set(v)) for v in got.values()) >= calls * 4  # every call's events arrived
    assert bridge.publisher.buffer.stats.dropped == 0
    assert bridge.link.reconnects >= 1
    n = sum(len(v) for v in got.values())
    print(f"\nFIGURES stall: calls={calls} events={sum(len(set(v)) for v in got.values())} received={n} "
          f"duplicates={n - sum(len(set(v)) for v in got.values())} lost=0 reconnects={bridge.link.reconnects} "
          f"confirm_timeouts={bridge.publisher.stats.timeouts} stalled=0")


async def test_a_queue_refusing_publishes_holds_back_only_its_device(sim, bus, settings_for, start_bridge, caplog):
    """Issue 13.2: a consumer's queue with x-max-length 5 and reject-publish, bound to one
    device's events: the broker nacks them. Other devices' events flow at once and only once; the
    refused device's events go again with a per-event backoff, a bounded number of times, then
    are dropped and announced in a gap event; per-device order is kept."""
    caplog.set_level(logging.WARNING, logger="bridge.publisher")
    bad, good = sim.hw(1), sim.hw(2)
    healthy = await bus.bind("device.#", "bridge.*.gap")
    full = await bus.channel.declare_queue(
        exclusive=True, arguments={"x-max-length": 5, "x-overflow": "reject-publish"})
    await full.bind(bus.events, f"device.{bad}.#")
    attempts = 3
    bridge = await start_bridge(settings_for(sim, devices=f"{bad},{good}", publish_max_attempts=attempts))
    # the full queue takes 5 events (attached ...), then refuses
    evs = await healthy.until(lambda e: e.body["type"] == "attached" and e.body["hw"] == good)
    for _ in range(3):
        await sim.place_call(bad, direction="in", hold_s=0.02)
        await sim.place_call(good, direction="in", hold_s=0.02)
    await sim.wait_idle(10)
    assert sim.stats()["calls_stalled"] == 0
    # the good device's events all arrive, each once, while the bad one's still wait
    good_last = bridge.factory._seq[good]

    async def good_all_in():
        evs.extend(healthy.drain())
        return {e.body["seq"] for e in evs if e.body.get("hw") == good} == set(range(1, good_last + 1))
    await eventually(good_all_in, 5, "the good device's events")
    assert bridge.publisher.buffer.held_devices == 1
    good_seqs = seqs_by_device(evs)[good]
    assert sorted(good_seqs) == good_seqs and len(good_seqs) == len(set(good_seqs)) == good_last
    # every refused event is tried `attempts` times, then dropped and announced
    assert await bridge.publisher.flush(30)
    await asyncio.sleep(0.5)
    evs += healthy.drain()
    got, gaps = seqs_by_device(evs), gap_seqs(evs)
    assert gaps and set(gaps) == {bad}, gaps
    reasons = {e.body["reason"] for e in evs if e.body.get("type") == "gap"}
    assert reasons == {"nacked"}
    bad_seqs = got[bad]
    counts = {s: bad_seqs.count(s) for s in set(bad_seqs)}
    assert max(counts.values()) <= attempts, counts  # bounded copies (was 35 per event)
    assert set(counts) == set(range(1, max(counts) + 1))  # every seq reached the healthy queue
    assert gaps[bad] <= set(counts)
    first_seen = list(dict.fromkeys(bad_seqs))
    assert first_seen == sorted(first_seen)  # per-device order kept
    st = bridge.publisher.buffer.stats
    assert st.dropped_nacked == len(gaps[bad]) and st.nacks == attempts * st.dropped_nacked
    assert bridge.publisher.buffer.held_devices == 0
    print(f"\nFIGURES nack: attempts={attempts} good_events={good_last} good_copies={len(good_seqs)} "
          f"bad_events={len(counts)} bad_max_copies={max(counts.values())} nacks={st.nacks} "
          f"dropped_nacked={st.dropped_nacked} all_in_gap_or_delivered=1")
    # one warning when nacks begin and one when they are over: not one per nack or drop
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("nack" in m for m in msgs) == 2, msgs
    assert f"{st.dropped_nacked} events dropped" in msgs[-1], msgs


async def test_a_stop_that_cannot_flush_reports_what_is_lost(sim, bus, proxy, settings_for, start_bridge, caplog):
    """Issue 13.3: the broker never comes back: the stop ends within its grace, counts the lost
    events in a metric and logs them as per-device seq ranges."""
    caplog.set_level(logging.ERROR, logger="bridge")
    hws = [sim.hw(i) for i in range(1, 3)]
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(sim, devices=",".join(hws), heartbeat_s=2,
                                             amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
    seen = await q.until_all([attached(hw) for hw in hws])
    await asyncio.sleep(0.3)
    confirmed = seqs_by_device(seen + q.drain())
    proxy.cut()
    await eventually(lambda: not bridge.link.ready, 10, "the link noticing the cut")
    for hw in hws:
        await sim.place_call(hw, direction="in", hold_s=0.02)
    await sim.wait_idle(10)
    buffered = len(bridge.publisher.buffer)
    t0 = time.monotonic()
    assert await bridge.stop(2.0) is False
    assert time.monotonic() - t0 < 2.0 + 1.0
    lost = buffered + len(hws)  # and the two detached(shutdown)
    assert bridge.publisher.unflushed == lost
    print(f"\nFIGURES stop-lost: grace_s=2 took_s={time.monotonic() - t0:.2f} unflushed={lost}")
    msgs = [r.getMessage() for r in caplog.records]
    assert any(f"{lost} events not confirmed" in m for m in msgs), msgs
    ranges = " ".join(m for m in msgs if "events lost:" in m)
    for hw in hws:
        first = max(confirmed.get(hw, [0])) + 1
        assert f"'{hw}': ['{first}-" in ranges, ranges


async def test_sigterm_while_the_broker_is_away_flushes_when_it_returns(sim, bus, names, tmp_path):
    """Issue 13.3: broker cut, events buffered, the backoff grown to 8 s, SIGTERM, broker back
    2 s later (inside the 5 s grace): the stop tries the broker at once and often, not at the
    backoff's pace, so every event and every detached(shutdown) arrives, and the exit is clean."""
    hws = [sim.hw(i) for i in range(1, 5)]
    q = await bus.bind("device.#")
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    port = free_port()
    proc = BridgeProcess(bridge_env(names, pbx_url=sim.url, pbx_password=PASSWORD, devices=",".join(hws),
                                    amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", http_port=port,
                                    reconnect_min_s=1.0, reconnect_max_s=32.0, heartbeat_s=4),
                         tmp_path, grace_s=5.0).start()
    try:
        await q.until_all([attached(hw) for hw in hws], timeout=20)
        proxy.cut()

        async def down():
            status, body = await http_get(port, "/readyz")
            return status == 503 and "broker not connected" in body
        await eventually(down, 10, "the bridge noticing the cut")
        for _ in range(3):
            for hw in hws:
                await sim.place_call(hw, direction="in", hold_s=0.02)
        await sim.wait_idle(10)

        def far_retry(r: dict) -> bool:  # the backoff has grown: the next try is 6 s or more away
            m = re.search(r"retry in ([0-9.]+)s$", r.get("msg", ""))
            return m is not None and float(m.group(1)) >= 6
        await proc.wait_log(far_retry, 30)
        proc.signal(signal.SIGTERM)
        await asyncio.sleep(2)
        proxy.restore()  # well before that try, within the 5 s grace
        rc = await proc.wait(15)
        assert rc == 0, proc.stderr()[-3000:]
        await asyncio.sleep(0.5)
        evs = q.drain()
        got = seqs_by_device(evs)
        for hw in hws:
            unique = sorted(set(got[hw]))
            assert unique[-1] >= 3 * 8, (hw, unique)
            assert unique == list(range(unique[0], unique[-1] + 1)), hw
            last = max((e.body for e in evs if e.body["hw"] == hw), key=lambda b: b["seq"])
            assert (last["type"], last["reason"]) == ("detached", "shutdown"), last
        logs = proc.logs()
        assert not [r for r in logs if "lost" in r.get("msg", "") and r.get("level") == "ERROR"]
        print(f"\nFIGURES sigterm-broker-back: exit={rc} events={sum(len(set(v)) for v in got.values())} lost=0")
    finally:
        await proc.stop()
        proc.close_files()
        await proxy.stop()


async def test_a_clean_stop_flushes_everything_and_reports_nothing_lost(sim, bus, settings_for, caplog):
    caplog.set_level(logging.ERROR, logger="bridge")
    hw = sim.hw(1)
    q = await bus.bind("device.#")
    bridge = Bridge(settings_for(sim, devices=hw))
    await bridge.start()
    await eventually(lambda: sim.stats()["attached_devices"] == 1, 10, "attached")
    await sim.place_call(hw, direction="in", hold_s=0.02)
    await sim.wait_idle(10)
    assert await bridge.stop(5) is True and bridge.publisher.unflushed == 0
    await asyncio.sleep(0.3)
    evs = [e.body for e in q.drain()]
    assert [e["seq"] for e in evs] == list(range(1, len(evs) + 1))
    assert (evs[-1]["type"], evs[-1]["reason"]) == ("detached", "shutdown")
    assert not [r for r in caplog.records if "lost" in r.getMessage()]


async def test_a_bound_queue_that_drains_again_stops_the_nacks(sim, bus, settings_for, start_bridge):
    """After the refusing queue is consumed again, the held device's events flow on their own."""
    hw = sim.hw(3)
    conn = await aio_pika.connect(AMQP_URL)
    try:
        ch = await conn.channel()
        full = await ch.declare_queue(exclusive=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"})
        await full.bind(bus.events, f"device.{hw}.#")
        bridge = await start_bridge(settings_for(sim, devices=hw, publish_max_attempts=50))
        await eventually(lambda: sim.stats()["attached_devices"] == 1, 10, "attached")
        await sim.place_call(hw, direction="in", hold_s=0.02)
        await eventually(lambda: bridge.publisher.buffer.held_devices == 1, 10, "the device held back")
        await full.purge()
        got = []

        async def on(msg):
            got.append(msg)
            await msg.ack()
        await full.consume(on)
        await eventually(lambda: bridge.publisher.buffer.held_devices == 0 and not bridge.publisher.buffer, 15,
                         "the held events delivered")
        assert bridge.publisher.buffer.stats.dropped_nacked == 0
        want = list(range(3, bridge.factory._seq[hw] + 1))  # 1 and 2 were purged
        await eventually(lambda: len(got) >= len(want), 10, "the held events consumed")
        assert [json.loads(m.body)["seq"] for m in got] == want
    finally:
        await conn.close()


async def test_a_flood_through_a_stalling_link_never_wedges_the_publisher(bus, proxy, settings_for, start_bridge):
    """Issue 13.1, the way it wedged: a flood of events (default window) while the link stalls
    and the watchdog drops it: slices written after the dead connection's writer stopped filled
    its writer queue, and the publisher waited on it for ever. Stalled three times in a row."""
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(None, heartbeat_s=2,
                                             amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
    hws = [f"flood{i}" for i in range(20)]
    made = 0

    async def flood(seconds: float) -> None:
        nonlocal made
        end = time.monotonic() + seconds
        while time.monotonic() < end:  # about 4,000 events a second
            for hw in hws:
                bridge.emit(bridge.factory.detached(hw, "command"))
                made += 1
            await asyncio.sleep(0.005)

    for _ in range(3):
        f = asyncio.create_task(flood(4.0))
        await asyncio.sleep(0.5)
        proxy.stall()
        await eventually(lambda: not bridge.link.ready, 10, "the watchdog dropping the stalled link")
        await f
        proxy.unstall()
        assert await bridge.link.wait_ready(30)
    assert await bridge.publisher.flush(60), f"{len(bridge.publisher.buffer)} of {made} events never confirmed"
    got: dict[str, set[int]] = {}

    async def all_in():
        for e in q.drain():
            got.setdefault(e.body["hw"], set()).add(e.body["seq"])
        return sum(len(v) for v in got.values()) == made
    await eventually(all_in, 30, "every event of the flood")
    assert all(v == set(range(1, len(v) + 1)) for v in got.values())
    print(f"\nFIGURES flood-stall: events={made} lost=0 reconnects={bridge.link.reconnects}")


async def test_a_slice_waiting_for_the_channel_lock_survives_a_lost_connection(sim, bus, proxy, settings_for,
                                                                               start_bridge):
    """The drain takes a slice from the buffer, then waits for the channel's lock (held meanwhile
    by another publish on the channel: a command's reply or dead-letter copy). The connection goes
    while it waits: the slice's events must go back to the buffer and out on the next connection,
    not stay counted in flight for ever (found in review: they did)."""
    hw = sim.hw(1)
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(sim, devices=hw, amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
    seen = await q.until(lambda e: e.body["type"] == "attached")
    raw = await bridge.link.channel.get_underlay_channel()
    holding, let_go = asyncio.Event(), asyncio.Event()

    async def hold_the_lock():  # what a reply being published on the channel does
        async with raw.lock:
            holding.set()
            await let_go.wait()

    holder = asyncio.create_task(hold_the_lock())
    await holding.wait()
    try:
        await sim.place_call(hw, direction="in", hold_s=0.02)
        await sim.wait_idle(10)
        buf = bridge.publisher.buffer
        # the drain took a slice of the call's events (no longer pending) and waits for the lock
        await eventually(lambda: len(buf) > buf.pending, 5, "a slice taken, waiting for the lock")
        proxy.cut()
        await eventually(lambda: not bridge.link.ready, 10, "the link noticing the cut")
    finally:
        let_go.set()
        await asyncio.gather(holder, return_exceptions=True)
    proxy.restore()
    assert await bridge.publisher.flush(20), f"{len(bridge.publisher.buffer)} events never confirmed"
    # confirmed by the broker is not yet delivered to the test's queue: wait for the last one made
    last = bridge.factory._seq[hw]
    assert last > 1, "the call made events, not only the attached one"
    seen += await q.until(lambda e: e.body.get("hw") == hw and e.body["seq"] == last, 10)
    seqs = [e.body["seq"] for e in [*seen, *q.drain()] if e.body.get("hw") == hw]
    assert sorted(set(seqs)) == list(range(1, last + 1))  # every event, none missing
