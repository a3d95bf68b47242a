"""Attach, AttachResult, late Attached, Detached, Sync."""

from __future__ import annotations

from bridge.protocol.messages import (
    Attached,
    AttachResult,
    CallState,
    Detached,
    Remote,
    Signaling,
    Sync,
)
from tests.sim.helpers import App


async def test_attach_result_and_src_echo(sim):
    app = await App.logged_in(sim.url)
    res = await app.attach(sim.hw(1), src="dev-1")
    assert isinstance(res, AttachResult) and not res.failed
    assert res.src == "dev-1"
    assert res.stun == "stun1.example.net;stun2.example.net"
    assert res.turn == "turn.example.net:3478"
    assert res.turnUsr == "sim" and isinstance(res.turnPwd, str) and len(res.turnPwd) >= 8
    assert (res.prefixIntl, res.prefixNtl, res.prefixSubs) == ("000", "00", "0")
    assert (res.area, res.country, res.maxIntern, res.tones) == ("7031", "49", 4, 1)
    att = await app.recv()
    assert isinstance(att, Attached) and att.src == "dev-1"
    await sim.place_call(sim.hw(1), hold_s=0.05)
    sig = await app.recv()
    assert isinstance(sig, Signaling) and sig.src == "dev-1" and sig.to is True
    assert sig.signal.type == "setup"
    assert sim.stats()["attached_devices"] == 1


async def test_unknown_device(sim):
    app = await App.logged_in(sim.url)
    res = await app.attach("001122334455", src="x")
    assert isinstance(res, AttachResult)
    assert res.err == "unknown device" and res.src == "x"
    assert sim.stats()["attached_devices"] == 0


async def _no_frame_queued(app: App) -> None:
    """Prove nothing was queued before now: a probe's answer is the next frame."""
    res = await app.attach("000000000000", src="probe")
    assert isinstance(res, AttachResult) and res.src == "probe" and res.failed


async def test_late_attached_on_register(make_sim):
    sim = await make_sim(devices=2, unregistered=1)
    hw = sim.hw(3)
    app = await App.logged_in(sim.url)
    res = await app.attach(hw, src="late")
    assert isinstance(res, AttachResult) and not res.failed and res.src == "late"
    await _no_frame_queued(app)
    sim.register(hw)
    att = await app.recv()
    assert isinstance(att, Attached) and att.src == "late"
    assert sim.stats()["registered_devices"] == 3


async def test_detached_on_unregister_and_attached_again(sim):
    hw = sim.hw(2)
    app = await App.logged_in(sim.url)
    await app.attach(hw, src="d2")
    assert isinstance(await app.recv(), Attached)
    sim.unregister(hw)
    det = await app.recv()
    assert isinstance(det, Detached) and det.src == "d2"
    assert sim.stats()["registered_devices"] == 4
    sim.register(hw)
    att = await app.recv()
    assert isinstance(att, Attached) and att.src == "d2"


async def test_sync_of_existing_calls(sim):
    hw = sim.hw(1)
    connected = await sim.place_call(hw, direction="in", remote="201", hold_s=30)
    ringing = await sim.place_call(hw, direction="out", remote="202", answer=False)
    await sim.wait_call_state(connected, CallState.CONNECTED, 2)
    await sim.wait_call_state(ringing, CallState.ALERT, 2)
    app = await App.logged_in(sim.url)
    assert isinstance(await app.attach(hw, src="s"), AttachResult)
    assert isinstance(await app.recv(), Attached)
    syncs = {}
    for _ in range(2):
        m = await app.recv()
        assert isinstance(m, Sync) and m.src == "s"
        syncs[m.call] = m.info
    a, b = syncs[connected], syncs[ringing]
    assert (a.state, a.in_, a.channel) == (CallState.CONNECTED, True, -1)
    assert a.remote == Remote(num="201", sip="r201", dn="Remote 201")
    assert (b.state, b.in_, b.channel) == (CallState.ALERT, False, -1)
    assert b.remote == Remote(num="202", sip="r202", dn="Remote 202")


async def test_same_session_attach_again_is_idempotent(sim):
    hw = sim.hw(1)
    call = await sim.place_call(hw, hold_s=30)
    await sim.wait_call_state(call, CallState.CONNECTED, 2)
    app = await App.logged_in(sim.url)
    for src in ("first", "second"):
        res = await app.attach(hw, src=src)
        assert isinstance(res, AttachResult) and not res.failed and res.src == src
        assert isinstance(await app.recv(), Attached)
        sync = await app.recv()
        assert isinstance(sync, Sync) and sync.call == call and sync.src == src
    assert sim.stats()["attach_conflicts"] == 0
    assert sim.stats()["attached_devices"] == 1
