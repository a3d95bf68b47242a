"""Consumers in other languages, run against a live bridge and simulator: the Node.js example
(amqplib + ajv, validating every message against contracts/) and the Python example."""

from __future__ import annotations

import asyncio
import os
import sys

import pytest

from .helpers import NODE_DIR, ROOT, node_ready

pytestmark = pytest.mark.broker
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def attached_bridge(sim, bus, settings_for, start_bridge, hw):
    q = await bus.bind(f"device.{hw}.attached")
    await start_bridge(settings_for(sim, devices=hw))
    await q.get()


async def test_node_consumer_validates_states_and_dials(sim, bus, settings_for, start_bridge, names):
    hw = sim.hw(7)
    await attached_bridge(sim, bus, settings_for, start_bridge, hw)
    env = dict(os.environ, AMQP_URL=AMQP_URL, EVENTS_EXCHANGE=names["events_exchange"],
               COMMANDS_EXCHANGE=names["commands_exchange"], HW=hw, DIAL="201", COUNT="10", TIMEOUT_S="4")
    p = await asyncio.create_subprocess_exec(node_ready(), "consumer.mjs", cwd=NODE_DIR, env=env,
                                             stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 30)
    print(out.decode(), err.decode())
    assert 0
