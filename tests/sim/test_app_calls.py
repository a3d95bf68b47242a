"""Calls the application starts (negative ids), toward the PBX and toward the device."""

from __future__ import annotations

import json

from msgspec import UNSET

from bridge.protocol.messages import Attached, Signaling
from tests.sim.helpers import App


async def attached(sim, *indexes: int) -> App:
    app = await App.logged_in(sim.url)
    for i in indexes:
        assert not (await app.attach(sim.hw(i), src=f"d{i}")).failed
        assert isinstance(await app.recv(), Attached)
    return app


def setup(cg: str, cd: str) -> dict:
    return {"type": "setup", "bc": "8090a2", "cg": {"num": cg, "sip": f"user{cg}"},
            "cd": {"num": cd, "sip": f"r{cd}"}, "complete": True, "channel": -1}


async def answers(app: App, n: int) -> list[Signaling]:
    out = []
    for _ in range(n):
        m = await app.recv()
        assert isinstance(m, Signaling)
        out.append(m)
    return out


async def test_app_call_toward_pbx(sim):
    app = await attached(sim, 1)
    await app.signaling(-1, setup("1001", "202"), to=False)
    got = await answers(app, 3)
    assert [(m.call, m.to, m.src, m.signal.type) for m in got] == [
        (-1, True, "d1", "call_proc"), (-1, True, "d1", "alert"), (-1, True, "d1", "conn")]
    name = [{"type": "name_identification", "name": "Remote 202"}]
    assert json.loads(bytes(got[2].sig))["fty"] == name
    info = sim.device_info(sim.hw(1))["calls"]
    assert info == [{"call": -1, "in": False, "state": "connected", "app": True,
                     "remote": {"num": "202", "sip": "r202", "dn": "Remote 202"}}]
    await app.signaling(-1, {"type": "disc", "cau": {"num": 16, "loc": "user"}}, to=False)
    (rel,) = await answers(app, 1)
    assert (rel.call, rel.to, rel.signal.type) == (-1, True, "rel")
    await sim.wait_idle(2)
    s = sim.stats()
    assert (s["app_calls"], s["calls_started"], s["calls_completed"]) == (1, 1, 1)
    assert s["messages_forwarded"] == 0


async def test_app_call_toward_device(sim):
    app = await attached(sim, 2)
    await app.signaling(-7, setup("300", "1002"), to=True)
    got = await answers(app, 2)
    assert [(m.call, m.to, m.signal.type) for m in got] == [
        (-7, UNSET, "alert"), (-7, UNSET, "conn")]
    assert [c["in"] for c in sim.device_info(sim.hw(2))["calls"]] == [True]
    assert json.loads(bytes(got[1].sig))["channels"]["ch"][0]["port"] == 5004
    await app.signaling(-7, {"type": "rel", "cau": {"num": 16, "loc": "user"}}, to=True)
    await sim.wait_idle(2)
    s = sim.stats()
    assert (s["app_calls"], s["calls_completed"], s["calls_active"]) == (1, 1, 0)


async def test_app_call_toward_device_disc_is_answered_with_rel(sim):
    app = await attached(sim, 2)
    await app.signaling(-1, setup("300", "1002"), to=True)
    await answers(app, 2)
    await app.signaling(-1, {"type": "disc"}, to=True)
    (rel,) = await answers(app, 1)
    assert (rel.call, rel.to is True, rel.signal.type) == (-1, False, "rel")
    await sim.wait_idle(2)


async def test_app_calls_pick_the_device_by_src(sim):
    app = await attached(sim, 1, 2)
    await app.send(Signaling(src="d2", call=-1, sig=_raw(setup("1002", "201")), to=False))
    got = await answers(app, 3)
    assert {m.src for m in got} == {"d2"}
    assert [c["call"] for c in sim.device_info(sim.hw(2))["calls"]] == [-1]
    assert sim.device_info(sim.hw(1))["calls"] == []
    # without a src that names one of several devices, the call cannot be placed
    await app.signaling(-2, setup("1001", "201"), to=False)
    await app.attach("000000000000", src="probe")
    assert sim.stats()["bad_signaling"] == 1


async def test_app_call_aborted_when_session_closes(sim):
    app = await attached(sim, 1)
    await app.signaling(-1, setup("1001", "202"), to=False)
    await answers(app, 3)
    await app.close()
    await sim.wait_idle(2)
    s = sim.stats()
    assert (s["calls_completed"], s["calls_aborted"], s["calls_active"]) == (0, 1, 0)


def _raw(sig: dict):
    from msgspec import Raw

    return Raw(json.dumps(sig).encode())
