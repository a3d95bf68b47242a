"""Sessions: closing detaches, attach conflicts, drop, garbage, bad frames, slow answers."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from bridge.protocol.errors import FrameError
from bridge.protocol.messages import Attached, AttachResult, Signaling, decode
from bridge.sim.faults import GARBAGE
from tests.sim.helpers import App, eventually


async def test_closing_the_session_detaches_and_calls_flow_directly(sim):
    app = await App.logged_in(sim.url)
    await app.attach(sim.hw(1), src="s")
    assert isinstance(await app.recv(), Attached)
    call = await sim.place_call(sim.hw(1), hold_s=0.05)
    setup = await app.recv()  # waiting for our forward, which never comes
    assert isinstance(setup, Signaling) and setup.call == call
    await app.close()
    await sim.wait_idle(3)  # the stall timeout is 5 s: the call completed without us
    s = sim.stats()
    assert (s["calls_completed"], s["calls_stalled"], s["messages_forwarded"]) == (1, 0, 0)
    assert (s["attached_devices"], s["sessions"]) == (0, 0)
    assert sim.device_info(sim.hw(1))["attached"] is False


async def test_attach_conflict_from_a_second_session(sim):
    hw = sim.hw(1)
    first = await App.logged_in(sim.url)
    await first.attach(hw, src="a")
    assert isinstance(await first.recv(), Attached)
    second = await App.logged_in(sim.url)
    res = await second.attach(hw, src="b")
    assert isinstance(res, AttachResult) and res.err == "already attached" and res.src == "b"
    assert sim.stats()["attach_conflicts"] == 1
    await first.close()
    await eventually(lambda: not sim.device_info(hw)["attached"])
    res = await second.attach(hw, src="b2")
    assert not res.failed and res.src == "b2"
    assert isinstance(await second.recv(), Attached)


async def test_drop_sessions_aborts_tcp(sim):
    apps = [await App.logged_in(sim.url) for _ in range(2)]
    await apps[0].attach(sim.hw(1), src="x")
    assert isinstance(await apps[0].recv(), Attached)
    assert await sim.drop_sessions() == 2
    for app in apps:
        with pytest.raises(ConnectionClosed) as e:
            await app.recv()
        assert e.value.rcvd is None  # no close frame: the connection was cut
    s = sim.stats()
    assert (s["sessions"], s["attached_devices"]) == (0, 0)
    assert await sim.drop_sessions() == 0


async def test_send_garbage(sim):
    a, b = await App.logged_in(sim.url), await App.logged_in(sim.url)
    n = len(GARBAGE) + 2
    assert await sim.send_garbage(n) == 2 * n
    for app in (a, b):
        frames = [await app.recv_raw() for _ in range(n)]
        assert frames[: len(GARBAGE)] == list(GARBAGE)
        for f in frames:
            with pytest.raises(FrameError):
                decode(f)
    # the sessions stay usable
    assert not (await a.attach(sim.hw(1), src="ok")).failed


async def test_bad_frames_from_the_app_are_counted(sim):
    app = await App.logged_in(sim.url)
    for bad in (b"not json", b"[1,2]", b'{"mt":"Nope"}', b'{"api":"EpSignal","mt":"Attach","hw":5}',
                b'{"api":"EpSignal","mt":"Attached"}'):
        await app.send_raw(bad)
    res = await app.attach(sim.hw(1), src="still")
    assert not res.failed and res.src == "still"
    assert sim.stats()["bad_frames"] == 5
    assert sim.stats()["sessions"] == 1


async def test_bad_frames_before_login_keep_the_session(sim):
    app = await App.open(sim.url)
    await app.send_raw(b"garbage")
    assert (await app.login("epsignal", "secret")).ok is True
    assert sim.stats()["bad_frames"] == 1


async def test_delay_fault(sim):
    app = await App.logged_in(sim.url)
    sim.faults.delay_ms = 150
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    res = await app.attach(sim.hw(1), src="slow")
    assert isinstance(res, AttachResult)
    assert loop.time() - t0 >= 0.15
    sim.faults.delay_ms = 0
    assert isinstance(await app.recv(), Attached)  # delayed frames keep their order


async def test_unregistered_device_calls_flow_directly(sim):
    app = await App.logged_in(sim.url)
    await app.attach(sim.hw(1), src="s")
    assert isinstance(await app.recv(), Attached)
    call = await sim.place_call(sim.hw(1), hold_s=0.05)
    assert (await app.recv()).call == call  # setup waits for us
    sim.unregister(sim.hw(1))  # the pending setup is delivered directly; Detached follows
    await sim.wait_idle(3)
    assert sim.stats()["calls_completed"] == 1
    m = await app.recv()
    assert type(m).__name__ == "Detached" and m.src == "s"
