"""Issue 14, root cause 3: a runner stopped while it logs in or attaches stops, within a bound,
and leaves no session attached behind (a hand-on waiting on it used to hang the lease round)."""

from __future__ import annotations

import asyncio
import random

import pytest

from bridge.config import Settings
from bridge.device import Device
from bridge.events import EventFactory
from bridge.pbx.client import DeviceRunner
from bridge.sim import hw_id

pytestmark = pytest.mark.asyncio

PASSWORD = "pw-runner-stop"
RUNNERS = 50


async def test_runners_stopped_while_logging_in_or_attaching_stop_in_time_and_leave_nothing_attached(make_sim):
    sim = await make_sim(devices=RUNNERS, password=PASSWORD)
    sim.delay_ms = 40  # every frame the PBX sends (challenge, login result, AttachResult) is late
    s = Settings.from_env({}, pbx_url=sim.url, pbx_password=PASSWORD, attach_timeout_s=5.0,
                          reconnect_min_s=0.05, reconnect_max_s=0.5, devices="")
    factory = EventFactory("t")
    gate = asyncio.Semaphore(RUNNERS)
    rng = random.Random(14)
    loop = asyncio.get_running_loop()
    for rnd in range(4):
        runners = [DeviceRunner(s, Device(hw_id(i), factory), lambda ev: None, gate, refusals=3)
                   for i in range(1, RUNNERS + 1)]
        for r in runners:
            r.start()

        async def stop_later(r: DeviceRunner) -> float:
            await asyncio.sleep(rng.uniform(0.0, 0.2))  # somewhere in connect, login or Attach
            t0 = loop.time()
            ended = await r.stop(timeout=3.0)
            assert ended, f"runner {r.hw} still running after stop()"
            return loop.time() - t0

        took = await asyncio.gather(*(stop_later(r) for r in runners))
        assert max(took) < 3.0, f"round {rnd}: a stop took {max(took):.2f}s"
        assert all(r.task.done() for r in runners)
        # whatever the PBX attached meanwhile is let go: no session of a stopped runner stays
        for _ in range(100):
            if sim.stats()["attached_devices"] == 0:
                break
            await asyncio.sleep(0.02)
        assert sim.stats()["attached_devices"] == 0, f"round {rnd}: a stopped runner left a device attached"
