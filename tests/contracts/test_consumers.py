"""Consumers in other languages, run against a live bridge and simulator: the Node.js example
(amqplib + ajv, validating every message against contracts/) and the Python example."""

from __future__ import annotations

import asyncio
import os
import re
import sys

import pytest

from .helpers import NODE_DIR, ROOT, node_ready

pytestmark = pytest.mark.broker
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def run(*cmd: str, env: dict, cwd, timeout: float = 30) -> tuple[int, list[str], str]:
    p = await asyncio.create_subprocess_exec(*cmd, cwd=cwd, env={**os.environ, **env},
                                             stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    return p.returncode, out.decode().splitlines(), err.decode()


def node_env(names: dict, **kw: str) -> dict:
    return dict(AMQP_URL=AMQP_URL, EVENTS_EXCHANGE=names["events_exchange"],
                COMMANDS_EXCHANGE=names["commands_exchange"], **kw)


async def test_node_consumer_validates_states_and_dials(sim, bus, settings_for, start_bridge,
                                                        names):
    hw = sim.hw(7)
    attached = await bus.bind(f"device.{hw}.attached")
    await start_bridge(settings_for(sim, devices=hw))
    await attached.get()
    seen = await bus.bind("device.*.call.*.state")  # what the Node program must see too
    env = node_env(names, HW=hw, DIAL="201", COUNT="4", TIMEOUT_S="15")
    code, lines, err = await run(node_ready(), "consumer.mjs", env=env, cwd=NODE_DIR)
    assert code == 0, (lines, err)
    assert lines[0] == f"dialled 201 from {hw}" and "reply ok=true" in lines
    assert not any("INVALID" in line for line in lines)
    states = [line for line in lines if line.startswith("state ")]
    expected = [f"state {hw} call -1 {e.body['state']} remote=201 ({e.message.message_id})"
                for e in [await seen.get() for _ in range(4)]]
    assert states == expected
    assert expected[0].startswith(f"state {hw} call -1 setup ")


async def test_node_consumer_gives_up_after_its_timeout(bus, names):
    # no bridge: nobody answers, so no reply and no states; the program gives up by itself
    env = node_env(names, HW="009033400001", COUNT="1", TIMEOUT_S="1")
    code, lines, err = await run(node_ready(), "consumer.mjs", env=env, cwd=NODE_DIR)
    assert code == 1 and lines[-1] == "timeout after 0 states", (lines, err)


async def test_python_consumer_validates_every_event_of_a_device(sim, bus, settings_for,
                                                                 start_bridge, names):
    hw = sim.hw(8)
    await start_bridge(settings_for(sim))
    env = dict(EPSIGNAL_AMQP_URL=AMQP_URL, EPSIGNAL_EVENTS_EXCHANGE=names["events_exchange"],
               COUNT="6")
    p = await asyncio.create_subprocess_exec(sys.executable, "examples/python/consumer.py", hw,
                                             cwd=ROOT, env={**os.environ, **env},
                                             stdout=asyncio.subprocess.PIPE)
    first = await asyncio.wait_for(p.stdout.readline(), 15)
    assert first.decode().strip() == f"listening on device.{hw}.#"
    assert (await bus.command(hw, "attach"))["ok"] is True
    await sim.place_call(hw, direction="in", answer=True, hold_s=0.1)
    out, _ = await asyncio.wait_for(p.communicate(), 15)
    lines = out.decode().splitlines()
    assert p.returncode == 0, lines
    assert lines[0] == f"valid: device.{hw}.attached seq=1"
    assert [int(re.search(r"seq=(\d+)", x)[1]) for x in lines] == [1, 2, 3, 4, 5, 6]
    assert all(x.startswith(f"valid: device.{hw}.call.") for x in lines[1:]), lines
    setup = rf"valid: device\.{hw}\.call\.\d+\.state seq=\d setup"
    assert any(re.fullmatch(setup, x) for x in lines), lines
