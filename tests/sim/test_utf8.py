"""The simulator reads frames as an RFC 6455 PBX must: a text frame that is not UTF-8 fails the
connection with close code 1007 (so the suite sees what a real PBX would do to a bridge that
sent one); a binary frame is read like a text frame and keeps the session."""

from __future__ import annotations

import asyncio

import pytest
from websockets.exceptions import ConnectionClosed

from bridge.protocol.messages import Attached, AttachResult, Signaling, decode
from tests.sim.helpers import App, eventually

#: the frame a bridge would have sent for the command of issue 13 (call 6, an info with "\xc3")
BAD_INFO = b'{"api":"EpSignal","mt":"Signaling","src":"s","call":6,"to":true,"sig":{"type":"info","dn":"\xc3"}}'


async def _closed_with(app: App) -> int | None:
    with pytest.raises(ConnectionClosed) as e:
        async with asyncio.timeout(3):
            while True:
                await app.ws.recv(decode=False)
    return e.value.rcvd.code if e.value.rcvd is not None else None


async def test_a_text_frame_with_invalid_utf8_fails_the_session_with_1007(sim):
    app = await App.logged_in(sim.url)
    assert not (await app.attach(sim.hw(1), src="s")).failed
    assert isinstance(await app.recv(), Attached)
    await app.ws.send(BAD_INFO, text=True)
    assert await _closed_with(app) == 1007
    await eventually(lambda: sim.stats()["sessions"] == 0)
    s = sim.stats()
    assert (s["invalid_utf8"], s["attached_devices"], s["bad_frames"]) == (1, 0, 0)
    assert sim.device_info(sim.hw(1))["attached"] is False  # the bridge is out of the path


async def test_invalid_utf8_before_login_fails_the_session_too(sim):
    app = await App.open(sim.url)
    await app.ws.send(b'{"mt":"AppChallenge","src":"\xff"}', text=True)
    assert await _closed_with(app) == 1007
    await eventually(lambda: sim.stats()["invalid_utf8"] == 1)


async def test_a_binary_frame_is_read_like_a_text_frame(sim):
    app = await App.logged_in(sim.url)
    await app.ws.send(b'{"api":"EpSignal","mt":"Attach","hw":"%s","src":"bin"}' % sim.hw(1).encode(), text=False)
    res = await app.recv()
    assert isinstance(res, AttachResult) and not res.failed and res.src == "bin"
    assert isinstance(await app.recv(), Attached)
    await app.ws.send(b"\xff not json", text=False)  # garbage in a binary frame: a bad frame
    assert not (await app.attach(sim.hw(2), src="after")).failed
    s = sim.stats()
    assert (s["binary_frames"], s["bad_frames"], s["invalid_utf8"], s["sessions"]) == (2, 1, 0, 1)


async def test_a_forward_in_a_binary_frame_with_invalid_utf8_in_the_sig_is_taken(sim):
    """What a bridge does with a binary frame from the PBX (forwards it as binary): the call goes on."""
    app = await App.logged_in(sim.url)
    await app.attach(sim.hw(1), src="s")
    assert isinstance(await app.recv(), Attached)
    await sim.place_call(sim.hw(1), hold_s=0.05)
    got = 0
    async with asyncio.timeout(5):
        while sim.stats()["calls_completed"] < 1:
            try:
                data = await app.recv_raw(timeout=0.2)
            except TimeoutError:
                continue
            msg = decode(data)
            if isinstance(msg, Signaling):
                got += 1
                # the same message back, with bytes that are not UTF-8 added in the sig
                bad = data.replace(b'"sig":{', b'"sig":{"x":"\xfe\xff",', 1)
                await app.ws.send(bad, text=False)
    s = sim.stats()
    assert got >= 2 and s["messages_forwarded"] == got and s["binary_frames"] == got
    assert (s["calls_stalled"], s["invalid_utf8"], s["sessions"]) == (0, 0, 1)
