"""Consumers in other languages, run against a live bridge and simulator: the Node.js example
(amqplib + ajv, validating every message against contracts/, typed with contracts/ts/; it places
a call and hangs it up) and the Python example."""

from __future__ import annotations

import asyncio
import json
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


async def test_node_consumer_places_a_call_and_hangs_it_up(sim, bus, settings_for, start_bridge,
                                                           names):
    hw = sim.hw(7)
    attached = await bus.bind(f"device.{hw}.attached")
    await start_bridge(settings_for(sim, devices=hw))
    await attached.get()
    seen = await bus.bind(f"device.{hw}.call.*.state")  # what the Node program must see too
    env = node_env(names, HW=hw, DIAL="201", TIMEOUT_S="15")
    code, lines, err = await run(node_ready(), "consumer.mjs", env=env, cwd=NODE_DIR)
    assert code == 0, (lines, err)
    assert lines[0] == f"dialled 201 from {hw}", lines
    assert "reply dial ok=true" in lines and "reply hangup ok=true" in lines, lines
    assert not any("INVALID" in line for line in lines)
    states = [line for line in lines if line.startswith("state ")]
    got = [await seen.get() for _ in states]
    assert states == [f"state {hw} call -1 {e.body['state']} remote=201 ({e.message.message_id})"
                      for e in got]
    # it hung up once connected (a rel toward the PBX), and the call ended: released, cause 16
    assert [e.body["state"] for e in got] == ["setup", "call-proc", "alert", "connected",
                                              "released"], lines
    assert lines.index(f"hung up call -1 from {hw}") == lines.index(states[3]) + 1
    assert got[-1].body["cause"]["num"] == 16 and got[-1].body["app"] is True
    # and the PBX has no call left on the device
    for _ in range(50):
        if not sim.device_info(hw)["calls"]:
            break
        await asyncio.sleep(0.05)
    assert sim.device_info(hw)["calls"] == [] and sim.stats()["app_calls"] == 1


async def test_node_consumer_gives_up_after_its_timeout_and_hangs_up(bus, names):
    # no bridge: nobody answers, so no reply and no states; the program gives up by itself, and
    # does not leave the call it asked for behind: a rel for it follows the setup
    hw = "009033400001"
    sent = await bus.channel.declare_queue(exclusive=True, auto_delete=True)
    await sent.bind(bus.commands, f"device.{hw}.signaling")
    env = node_env(names, HW=hw, COUNT="1", TIMEOUT_S="1")
    code, lines, err = await run(node_ready(), "consumer.mjs", env=env, cwd=NODE_DIR)
    assert code == 1, (lines, err)
    assert lines == [f"dialled 201 from {hw}", "timeout after 0 states",
                     f"hung up call -1 from {hw}"], (lines, err)
    bodies = []
    for _ in range(2):
        msg = await sent.get(no_ack=True, fail=False)
        assert msg is not None, bodies
        bodies.append(json.loads(msg.body))
    assert bodies == [{"v": 1, "call": -1, "sig": {"type": "setup", "cd": {"num": "201"}}},
                      {"v": 1, "call": -1, "sig": {"type": "rel", "cau": {"num": 16}}}]


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
