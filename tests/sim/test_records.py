"""What each end of a call received (Call.delivered, the control API's call records)."""

from __future__ import annotations

import json

import aiohttp
import pytest

from bridge.protocol.messages import AttachResult, Signaling
from bridge.sim import sigs
from tests.sim.helpers import App, eventually
from tests.sim.test_calls import attached_app


async def test_forwarded_unchanged(sim):
    app = await attached_app(sim)
    fwd = app.forwarding()
    call = await sim.place_call(sim.hw(1), remote="201", hold_s=0.02)
    await sim.wait_idle(3)
    fwd.cancel()
    rec = sim.call_record(sim.hw(1), call)
    assert rec["order"] == [">setup", "<alert", "<conn", ">disc", "<rel"]
    assert (rec["active"], rec["outcome"], rec["in"], rec["app"]) == (False, "completed", True,
                                                                       False)
    sent = [json.loads(bytes(m.sig)) for m in app.sigs]
    assert rec["device"] == [s for s, m in zip(sent, app.sigs, strict=True) if m.to is True]
    assert rec["pbx"] == [s for s, m in zip(sent, app.sigs, strict=True) if m.to is not True]
    assert rec["device"][0]["fty"] == [{"type": "name_identification", "name": "Remote 201"}]


async def test_replacement_is_what_the_device_received(sim):
    """The application forwards a changed setup: the record holds the change, unknown fields
    included, and the call goes on."""
    app = await attached_app(sim)
    call = await sim.place_call(sim.hw(1), hold_s=0.02)
    setup = await app.recv()
    changed = json.loads(bytes(setup.sig))
    changed["fty"] = [{"type": "name_identification", "name": "ACME Corp"}]
    changed["x-extra"] = [1, {"k": None}]
    await app.signaling(call, changed, to=True)
    fwd = app.forwarding()
    await sim.wait_idle(3)
    fwd.cancel()
    rec = sim.call_record(sim.hw(1), call)
    assert rec["device"][0] == changed
    assert rec["order"] == [">setup", "<alert", "<conn", ">disc", "<rel"]
    assert rec["outcome"] == "completed"


async def test_rejected_setup_never_reached_the_device(sim):
    """The application answers an incoming setup with a rel toward the PBX instead of
    forwarding it: the phone never rang, the caller got the cause."""
    app = await attached_app(sim)
    call = await sim.place_call(sim.hw(1), hold_s=30)
    setup = await app.recv()
    assert setup.signal.type == "setup" and setup.to is True
    await app.signaling(call, sigs.rel(21), to=False)
    await sim.wait_idle(3)
    rec = sim.call_record(sim.hw(1), call)
    assert rec["device"] == []
    assert rec["pbx"] == [{"type": "rel", "cau": {"num": 21, "loc": "user"}}]
    assert rec["order"] == ["<rel"] and rec["outcome"] == "completed"
    assert sim.stats()["calls_stalled"] == 0


async def test_stalled_call_records_what_passed(make_sim):
    sim = await make_sim(stall_timeout_s=0.1)
    app = await attached_app(sim)
    call = await sim.place_call(sim.hw(1), hold_s=0.02)
    assert (await app.recv()).signal.type == "setup"
    await sim.wait_idle(3)
    rec = sim.call_record(sim.hw(1), call)
    assert (rec["outcome"], rec["device"], rec["pbx"]) == ("stalled", [], [])


async def test_without_application_delivered_directly(sim):
    call = await sim.place_call(sim.hw(2), direction="out", busy=True)
    await sim.wait_idle(3)
    rec = sim.call_record(sim.hw(2), call)
    assert rec["order"] == ["<setup", ">rel"]
    assert rec["device"] == [sigs.rel(sigs.BUSY)]


async def test_flushed_on_unregister(sim):
    app = await attached_app(sim)
    call = await sim.place_call(sim.hw(1), hold_s=0.02)
    assert (await app.recv()).signal.type == "setup"
    sim.unregister(sim.hw(1))  # the application leaves the path: the setup goes through
    await sim.wait_idle(3)
    rec = sim.call_record(sim.hw(1), call)
    assert rec["order"] == [">setup", "<alert", "<conn", ">disc", "<rel"]


async def test_running_call_and_injected_message(sim):
    app = await attached_app(sim)
    fwd = app.forwarding()
    call = await sim.place_call(sim.hw(1), hold_s=30)
    # the state changes when a message is sent, the record when it is delivered
    await eventually(lambda: sim.call_record(sim.hw(1), call)["order"][-1:] == ["<conn"])
    note = {"type": "facility", "fty": [{"type": "hold_notify"}]}
    await app.signaling(call, note, to=True)
    await eventually(lambda: len(sim.call_record(sim.hw(1), call)["order"]) == 4)
    rec = sim.call_record(sim.hw(1), call)
    assert (rec["active"], rec["outcome"], rec["state"]) == (True, None, "connected")
    assert rec["order"] == [">setup", "<alert", "<conn", ">facility"]
    assert rec["device"][-1] == note
    await app.signaling(call, sigs.rel(), to=True)
    await sim.wait_idle(3)
    fwd.cancel()
    assert sim.call_record(sim.hw(1), call)["order"][-1] == ">rel"


async def test_application_call(sim):
    app = await App.logged_in(sim.url)
    assert isinstance(await app.attach(sim.hw(1)), AttachResult)
    await app.recv()  # Attached
    setup = sigs.setup(sigs.party("300", "r300"), sigs.party("1001", "user0001"), "App", 5008)
    await app.signaling(-1, setup, to=True)
    assert (await app.recv()).signal.type == "alert"
    rec = sim.call_record(sim.hw(1), -1)
    assert (rec["app"], rec["device"], rec["active"]) == (True, [setup], True)


async def test_unknown_call(sim):
    with pytest.raises(KeyError, match="no call 7 of device"):
        sim.call_record(sim.hw(1), 7)
    with pytest.raises(KeyError, match="unknown device"):
        sim.call_record("nope", 1)


async def test_control_api(make_sim):
    sim = await make_sim(control=True, devices=2)
    app = await attached_app(sim)
    hw = sim.hw(1)
    async with aiohttp.ClientSession(base_url=sim.control_url) as http:
        async with http.post(f"/devices/{hw}/calls", json={"hold_s": 30}) as r:
            call = (await r.json())["call"]
        setup = await app.recv()
        assert isinstance(setup, Signaling)
        await app.signaling(call, sigs.rel(21), to=False)
        await sim.wait_idle(3)
        async with http.get(f"/devices/{hw}/calls/{call}") as r:
            assert r.status == 200
            rec = await r.json()
        assert (rec["call"], rec["hw"], rec["device"], rec["order"]) == (call, hw, [], ["<rel"])
        assert rec["pbx"][0]["cau"]["num"] == 21
        async with http.get(f"/devices/{hw}/calls") as r:
            assert [c["call"] for c in (await r.json())["calls"]] == [call]
        async with http.get(f"/devices/{hw}/calls/99") as r:
            assert r.status == 404 and "no call 99" in (await r.json())["error"]
        async with http.get(f"/devices/{hw}/calls/x") as r:
            assert r.status == 400 and "not a call id" in (await r.json())["error"]
        async with http.get("/devices/nope/calls/1") as r:
            assert r.status == 404 and "unknown device" in (await r.json())["error"]
