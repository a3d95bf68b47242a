"""Device numbering, configuration checks, lifecycle."""

from __future__ import annotations

import pytest

from bridge.sim import PbxSimulator, SimConfig, hw_id, hw_index
from bridge.sim.stats import RttWindow


def test_hw_scheme():
    assert hw_id(1) == "009033400001" and hw_id(9999) == "009033409999"
    assert [hw_index(h) for h in ("009033400001", "009033400042", "009033400000", "x")] == [
        1, 42, None, None]
    with pytest.raises(ValueError):
        hw_id(0)
    sim = PbxSimulator(SimConfig(devices=2, unregistered=1))
    assert sim.hw(2) == "009033400002"
    d = sim.device(sim.hw(3))
    assert (d.ext, d.sip, d.dn, d.registered) == ("1003", "user0003", "User 3", False)
    with pytest.raises(KeyError, match="unknown device"):
        sim.register("009033400004")


@pytest.mark.parametrize("kw", [dict(devices=-1), dict(devices=9000, unregistered=1000),
                                dict(call_rate=-1), dict(stall_timeout_s=0)])
def test_bad_config(kw):
    with pytest.raises(ValueError):
        SimConfig(**kw)


def test_rtt_percentiles():
    w = RttWindow(size=100)
    assert w.summary() == {"p50": None, "p99": None, "count": 0}
    for v in range(1000, 0, -1):  # only the last 100 (100..1) stay
        w.add(v)
    assert w.summary() == {"p50": 50, "p99": 99, "count": 100}


async def test_stop_aborts_calls_and_is_idempotent(make_sim):
    sim = await make_sim()
    sim.refuse_logins = True
    sim.delay_ms = 5
    assert sim.faults.refuse_logins is True and sim.faults.delay_ms == 5
    await sim.place_call(sim.hw(1), hold_s=30)
    await sim.place_call(sim.hw(2), hold_s=30)
    await sim.stop()
    await sim.stop()
    s = sim.stats()
    assert (s["calls_aborted"], s["calls_active"], s["calls_completed"]) == (2, 0, 0)
    with pytest.raises(RuntimeError):
        await sim.place_call(sim.hw(1))


async def test_wait_call_state_fails_when_the_call_ends_first(sim):
    from bridge.protocol.messages import CallState

    call = await sim.place_call(sim.hw(1), busy=True)
    with pytest.raises(LookupError, match="ended"):
        await sim.wait_call_state(call, CallState.CONNECTED, 2)
    with pytest.raises(LookupError, match="no running call"):
        await sim.wait_call_state(call, CallState.CONNECTED, 2)
