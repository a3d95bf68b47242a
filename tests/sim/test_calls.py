"""The signaling path: forwarding, stalls, the scripted scenarios, application changes."""

from __future__ import annotations

import json

import pytest
from msgspec import Raw

from bridge.protocol.messages import Attached, AttachResult, CallState, Signaling
from tests.sim.helpers import App


async def attached_app(sim, index: int = 1, src: str = "s") -> App:
    app = await App.logged_in(sim.url)
    assert isinstance(await app.attach(sim.hw(index), src=src), AttachResult)
    assert isinstance(await app.recv(), Attached)
    return app


async def test_stall_without_forwarding(make_sim):
    sim = await make_sim(stall_timeout_s=0.2)
    app = await attached_app(sim)
    call = await sim.place_call(sim.hw(1), hold_s=0.05)
    setup = await app.recv()
    assert isinstance(setup, Signaling) and setup.call == call and setup.to is True
    assert setup.signal.type == "setup"
    rel = await app.recv()  # not forwarded: the PBX releases the call toward the device
    assert isinstance(rel, Signaling) and rel.call == call and rel.to is True and rel.src == "s"
    assert json.loads(bytes(rel.sig)) == {"type": "rel", "cau": {"num": 102, "loc": "pbx"}}
    await sim.wait_idle(2)
    s = sim.stats()
    assert (s["calls_started"], s["calls_stalled"], s["calls_completed"]) == (1, 1, 0)
    assert s["calls_active"] == 0
    assert s["messages_forwarded"] == 0
    # forwarding the rel afterwards is late, not bad
    await app.send(rel)
    await app.attach("000000000000", src="probe")  # a round trip: the forward was processed
    assert sim.stats()["late_signaling"] == 1 and sim.stats()["bad_signaling"] == 0


async def test_forwarding_completes_the_call(sim):
    app = await attached_app(sim)
    fwd = app.forwarding()
    call = await sim.place_call(sim.hw(1), hold_s=0.05)
    await sim.wait_idle(3)
    fwd.cancel()
    assert app.seen == [(call, ">", "setup"), (call, "<", "alert"), (call, "<", "conn"),
                        (call, ">", "disc"), (call, "<", "rel")]
    s = sim.stats()
    assert (s["calls_completed"], s["calls_stalled"], s["messages_forwarded"]) == (1, 0, 5)
    assert s["forward_rtt_us"]["count"] == 5
    assert 0 < s["forward_rtt_us"]["p50"] <= s["forward_rtt_us"]["p99"]
    assert s["bad_signaling"] == 0 and s["late_signaling"] == 0


async def test_realistic_setup(sim):
    app = await attached_app(sim, 3)
    await sim.place_call(sim.hw(3), direction="in", remote="201")
    setup = json.loads(bytes((await app.recv()).sig))
    assert setup == {
        "type": "setup", "bc": "8090a2",
        "cg": {"num": "201", "sip": "r201"}, "cd": {"num": "1003", "sip": "user0003"},
        "complete": True, "channel": -1,
        "fty": [{"type": "name_identification", "name": "Remote 201"}],
        "channels": {"source": "local",
                     "ch": [{"coder": "G711A", "addr": "127.0.0.1", "port": 5006}]},
    }


SCENARIOS = [
    (dict(direction="in"), ">setup <alert <conn >disc <rel"),
    (dict(direction="in", hangup="device"), ">setup <alert <conn <disc >rel"),
    (dict(direction="out"), "<setup >call_proc >alert >conn >disc <rel"),
    (dict(direction="out", hangup="device"), "<setup >call_proc >alert >conn <disc >rel"),
    (dict(direction="in", busy=True), ">setup <rel"),
    (dict(direction="out", busy=True), "<setup >rel"),
    (dict(direction="in", answer=False), ">setup <alert >rel"),
    (dict(direction="out", answer=False), "<setup >call_proc >alert <rel"),
    (dict(direction="in", hold=True), ">setup <alert <conn <facility <facility >disc <rel"),
    (dict(direction="out", transfer_to="300"), "<setup >call_proc >alert >conn <facility >rel"),
]


@pytest.mark.parametrize("kw, expected", SCENARIOS, ids=[e for _, e in SCENARIOS])
async def test_scenario_sequences(sim, kw, expected):
    app = await attached_app(sim)
    fwd = app.forwarding()
    call = await sim.place_call(sim.hw(1), hold_s=0.04, **kw)
    await sim.wait_idle(3)
    fwd.cancel()
    assert [d + t for c, d, t in app.seen] == expected.split()
    assert {c for c, _, _ in app.seen} == {call}
    s = sim.stats()
    assert (s["calls_completed"], s["calls_stalled"]) == (1, 0)
    sigs = [json.loads(bytes(m.sig)) for m in app.sigs]
    if kw.get("busy"):
        assert sigs[-1]["cau"] == {"num": 17, "loc": "user"}
    if kw.get("hold"):
        assert [s["fty"] for s in sigs if s["type"] == "facility"] == [
            [{"type": "hold_notify"}], [{"type": "retrieve_notify"}]]
    if kw.get("transfer_to"):
        assert sigs[-2]["fty"] == [{"type": "ct_initiate", "cd": {"num": "300"}}]
        assert sigs[-1]["cau"] == {"num": 16, "loc": "user"}
    if not kw.get("busy") and kw.get("answer", True):
        conn = next(s for s in sigs if s["type"] == "conn")
        assert conn["channels"]["ch"][0]["coder"] == "G711A"


async def test_modified_forward_is_delivered(sim):
    """The application may change a message; the call goes on with what it sent."""
    app = await attached_app(sim)
    call = await sim.place_call(sim.hw(1), hold_s=0.02)
    while True:
        msg = await app.recv()
        changed = json.loads(bytes(msg.sig))
        changed["fty"] = [{"type": "name_identification", "name": "Changed"}]
        changed["extra"] = {"kept": True}
        await app.send(Signaling(call=call, sig=Raw(json.dumps(changed).encode()), to=msg.to))
        if changed["type"] == "rel":
            break
    await sim.wait_idle(2)
    assert sim.stats()["calls_completed"] == 1 and sim.stats()["messages_forwarded"] == 5


async def test_forward_changed_into_rel_ends_the_call(sim):
    app = await attached_app(sim)
    call = await sim.place_call(sim.hw(1), hold_s=30)
    setup = await app.recv()
    await app.send(setup)
    alert = await app.recv()
    assert alert.signal.type == "alert"
    await app.signaling(call, {"type": "rel", "cau": {"num": 21, "loc": "user"}}, to=False)
    await sim.wait_idle(2)
    s = sim.stats()
    assert (s["calls_completed"], s["calls_stalled"], s["messages_forwarded"]) == (1, 0, 2)


async def test_injected_disc_toward_device(sim):
    """The application hangs up toward the device: the device answers rel (forwarded too)."""
    app = await attached_app(sim)
    fwd = app.forwarding()
    call = await sim.place_call(sim.hw(1), hold_s=30)
    await sim.wait_call_state(call, CallState.CONNECTED, 2)
    await app.signaling(call, {"type": "disc", "cau": {"num": 16, "loc": "user"}}, to=True)
    await sim.wait_idle(2)
    fwd.cancel()
    assert [d + t for _, d, t in app.seen] == [">setup", "<alert", "<conn", "<rel"]
    s = sim.stats()
    assert (s["messages_injected"], s["calls_completed"], s["calls_stalled"]) == (1, 1, 0)


async def test_injected_rel_ends_the_call(sim):
    app = await attached_app(sim)
    fwd = app.forwarding()
    call = await sim.place_call(sim.hw(1), direction="out", hold_s=30)
    await sim.wait_call_state(call, CallState.CONNECTED, 2)
    await app.signaling(call, {"type": "rel"}, to=False)
    await sim.wait_idle(2)
    fwd.cancel()
    assert sim.stats()["calls_completed"] == 1 and sim.stats()["messages_injected"] == 1


async def test_injected_other_message_is_counted(sim):
    app = await attached_app(sim)
    fwd = app.forwarding()
    call = await sim.place_call(sim.hw(1), hold_s=0.2)
    await sim.wait_call_state(call, CallState.CONNECTED, 2)
    await app.signaling(call, {"type": "facility", "fty": [{"type": "hold_notify"}]}, to=True)
    await sim.wait_idle(2)
    fwd.cancel()
    assert sim.stats()["messages_injected"] == 1 and sim.stats()["calls_completed"] == 1
    assert [d + t for _, d, t in app.seen] == [">setup", "<alert", "<conn", ">disc", "<rel"]


async def test_bad_signaling(sim):
    app = await attached_app(sim)
    await app.signaling(999, {"type": "alert"}, to=True)  # no such call, never was
    await app.signaling(-5, {"type": "alert"}, to=False)  # an app call must start with setup
    await app.send_raw(b'{"api":"EpSignal","mt":"Signaling","call":-6,"sig":{"notype":1}}')
    await app.attach("000000000000", src="probe")  # round trip: all processed
    s = sim.stats()
    assert (s["bad_signaling"], s["bad_frames"], s["messages_forwarded"]) == (3, 0, 0)


async def test_signaling_for_a_device_of_another_session_is_bad(sim):
    owner = await attached_app(sim, 1)
    other = await attached_app(sim, 2)
    call = await sim.place_call(sim.hw(1), hold_s=0.02)
    setup = await owner.recv()
    await other.send(Signaling(call=call, sig=setup.sig, to=True))
    await other.attach("000000000000", src="probe")
    assert sim.stats()["bad_signaling"] == 1
    fwd = owner.forwarding()
    await owner.send(setup)
    await sim.wait_idle(2)
    fwd.cancel()
    assert sim.stats()["calls_completed"] == 1


async def test_wait_idle_times_out(sim):
    await sim.place_call(sim.hw(1), hold_s=30)
    with pytest.raises(TimeoutError):
        await sim.wait_idle(0.05)


async def test_place_call_errors(make_sim):
    sim = await make_sim(devices=1, unregistered=1)
    with pytest.raises(KeyError):
        await sim.place_call("009033409999")
    with pytest.raises(ValueError, match="not registered"):
        await sim.place_call(sim.hw(2))
    with pytest.raises(ValueError, match="direction"):
        await sim.place_call(sim.hw(1), direction="sideways")
    with pytest.raises(ValueError, match="hold_s"):
        await sim.place_call(sim.hw(1), hold_s=-1)
    assert sim.stats()["calls_started"] == 0


async def test_many_calls_in_parallel(make_sim):
    sim = await make_sim(devices=50)
    app = await App.logged_in(sim.url)
    for i in range(1, 51):
        assert not (await app.attach(sim.hw(i), src=f"d{i}")).failed
        assert isinstance(await app.recv(), Attached)
    fwd = app.forwarding()
    ids = [await sim.place_call(sim.hw(i), direction="in" if i % 2 else "out", hold_s=0.05)
           for i in range(1, 51)]
    await sim.wait_idle(5)
    fwd.cancel()
    s = sim.stats()
    assert (s["calls_completed"], s["calls_stalled"]) == (50, 0)
    assert s["messages_forwarded"] == 25 * 5 + 25 * 6
    by_call = {}
    for m in app.sigs:
        by_call.setdefault(m.call, set()).add(m.src)
    assert set(by_call) == set(ids)
    assert all(len(v) == 1 for v in by_call.values())  # each call carries its device's src
