from __future__ import annotations

import pytest

from bridge.sim import PbxSimulator, SimConfig


@pytest.fixture
async def make_sim():
    """Start simulators with a SimConfig's keyword arguments (short timings by default)."""
    started: list[PbxSimulator] = []

    async def make(control: bool = False, **kw) -> PbxSimulator:
        kw.setdefault("devices", 5)
        kw.setdefault("ring_s", 0.02)
        sim = PbxSimulator(SimConfig(**kw))
        await sim.start(control_port=0 if control else None)
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


@pytest.fixture
async def sim(make_sim) -> PbxSimulator:
    return await make_sim()
