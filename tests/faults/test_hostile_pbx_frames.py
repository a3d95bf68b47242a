"""A hostile PBX at the WebSocket frame level, against the bridge's PbxConnection/PbxSession
(bridge/pbx/connection.py, bridge/pbx/session.py), in client and server mode.

The PBX side writes hand-built frames straight to its transport (``Frame.serialize``), so it can
send what websockets itself would not: fragments with pings between them, a close in the middle
of a fragmented message, thousands of fragments, invalid UTF-8 split across fragments, frames
at and over the size limits, messages in the same TCP segment as the login's last frame.

The promises checked: every Signaling message of a PBX call (call >= 0) comes back unchanged,
as the same kind of frame, in order; the session keeps serving, or (a protocol violation) is
closed cleanly and the bridge connects again; the bridge's buffers stay bounded; nothing hangs.

Three tests showed a promise broken when they were written (their docstrings say how); each
fails on the code before the fix that came with it.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.messages import MAX_FRAGMENTS
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode

import bridge.pbx.client as pbx_client
from bridge.protocol import messages as m
from bridge.protocol.login import ClientLogin, ServerLogin
from tests.faults.fakepbx import FakePbx, FakeSession, RecordingConnection, attached_session
from tests.faults.helpers import eventually

pytestmark = pytest.mark.broker

HW = "009033400001"
PASSWORD = "fake-pbx-pw"
TEXT, BINARY, CONT, PING, PONG, CLOSE = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING,
                                         Opcode.PONG, Opcode.CLOSE)


def sig(call: int, extra: bytes = b"", hw: str = HW) -> bytes:
    """A Signaling message of call ``call`` (``extra``: more bytes inside the sig's string)."""
    return (b'{"api":"EpSignal","mt":"Signaling","src":"%s","call":%d,"sig":{"type":"alert","x":"%s"}}'
            % (hw.encode(), call, extra))


def sig_of_size(call: int, size: int) -> bytes:
    """A Signaling message of exactly ``size`` bytes."""
    base = len(sig(call))
    out = sig(call, b"a" * (size - base))
    assert len(out) == size
    return out


def raw(*frames: Frame, mask: bool = False) -> bytes:
    """Frames as bytes on the wire (masked: from a WebSocket client, i.e. server mode)."""
    return b"".join(f.serialize(mask=mask, extensions=[]) for f in frames)


def fragments(data: bytes, n: int, binary: bool) -> list[Frame]:
    """``data`` as ``n`` frames (the first TEXT or BINARY, then CONT; empty ones if too few bytes)."""
    step = max(1, -(-len(data) // n))
    parts = [data[i * step:(i + 1) * step] for i in range(n)]
    assert b"".join(parts) == data
    first = BINARY if binary else TEXT
    return [Frame(first if i == 0 else CONT, p, fin=i == n - 1) for i, p in enumerate(parts)]


class PongRecording(RecordingConnection):
    """The fake PBX's connection, keeping the payload of every pong it reads."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pongs: list[bytes] = []

    def process_event(self, event) -> None:
        if getattr(event, "opcode", None) is PONG:
            self.pongs.append(bytes(event.data))
        super().process_event(event)


class HostilePbx(FakePbx):
    """The fuzz tests' fake PBX; its connections keep pongs, and ``with_login_result`` are
    written in the same transport write as the AppLoginResult (one TCP segment, before the
    bridge has sent anything else)."""

    connection = PongRecording

    def __init__(self, password: str) -> None:
        super().__init__(password)
        self.with_login_result: bytes = b""

    async def _handler(self, ws) -> None:
        if not self.with_login_result:
            return await super()._handler(ws)
        # the login, with Signaling messages glued to the AppLoginResult
        self.connections += 1
        login = ServerLogin(dict(self.passwords))
        extra, self.with_login_result = self.with_login_result, b""
        try:
            req = m.decode(await ws.recv(decode=False))
            await ws.send(m.encode(login.on_challenge_request(req)), text=True)
            result = login.on_login(m.decode(await ws.recv(decode=False)))
            ws.transport.write(raw(Frame(TEXT, m.encode(result))) + extra)
            s = FakeSession(ws, HW, HW)
            self.sessions.append(s)
            self.new_session.set()
            first = True
            read = 2  # messages read so far (AppChallenge, AppLogin): ws.opcodes' index
            try:
                while True:
                    data = await ws.recv(decode=False)
                    read += 1
                    if first and type(m.decode(data)) is m.Attach:  # answer the Attach
                        first = False
                        await ws.send(m.encode(m.AttachResult(src=HW)), text=True)
                        await ws.send(m.encode(m.Attached(src=HW)), text=True)
                        continue
                    s.binary.append(ws.opcodes[read - 1] is BINARY)
                    s.received.append(data)
                    s.got.set()
            except ConnectionClosed as e:
                s.close_code = e.rcvd.code if e.rcvd is not None else None
            finally:
                s.closed.set()
        except ConnectionClosed:
            pass


@pytest.fixture
async def pbx():
    fake = await HostilePbx(PASSWORD).start()
    yield fake
    await fake.stop()


async def client_session(pbx, settings_for, start_bridge, **kw):
    return await attached_session(pbx, settings_for, start_bridge, HW, **kw)


async def still_serving(pbx, sess: FakeSession, runner, call: int = 999) -> None:
    """The session is the one from the start and still forwards."""
    n = len(sess.received)
    await sess.send(sig(call))
    await sess.until_received(n + 1, timeout=5)
    assert sess.received[-1] == sig(call)
    assert pbx.connections == 1 and not sess.closed.is_set() and runner.reconnects == 0
    assert runner.session.ws.serving


async def reconnected_and_serving(pbx, sess: FakeSession, runner, n: int = 2) -> None:
    """The session was closed; the bridge connected again and the new session forwards."""
    again = await pbx.wait_session(n, timeout=15)
    await eventually(lambda: runner.device.attached and runner.session is not None
                     and runner.session.ws.serving, 10, "attached again")
    await again.send(sig(7))
    await again.until_received(1, timeout=5)
    assert again.received == [sig(7)]


# ------------------------------------------------------------------------------- client mode
async def test_fragments_with_pings_between_them_are_forwarded_whole_in_order(pbx, bus, settings_for,
                                                                               start_bridge):
    """RFC 6455 lets control frames come between the fragments of a message: each ping is
    answered, and each message comes back whole, in order, as the kind it came as."""
    _, sess, runner = await client_session(pbx, settings_for, start_bridge)
    ws = sess.ws
    msgs = [(sig(1, b"\xc3\xa9" * 50), False), (sig(2, b"\xff\xfe" * 50), True), (sig(3), False),
            (sig(4, b"z" * 300), True)]
    wire = b""
    for i, (data, binary) in enumerate(msgs):
        for j, f in enumerate(fragments(data, 5 + i, binary)):
            wire += raw(f) + raw(Frame(PING, b"p%d.%d" % (i, j)))
            if j == 1:
                wire += raw(Frame(PONG, b"unsolicited"))
    ws.transport.write(wire)  # one write: the bridge reads it in one go
    await sess.until_received(len(msgs), timeout=5)
    assert sess.received == [d for d, _ in msgs]
    assert sess.binary == [b for _, b in msgs]
    expected_pongs = [b"p%d.%d" % (i, j) for i in range(len(msgs)) for j in range(5 + i)]
    await eventually(lambda: len(ws.pongs) >= len(expected_pongs), 5, "every ping answered")
    assert ws.pongs == expected_pongs
    await still_serving(pbx, sess, runner)


async def test_fragments_one_per_write_with_pings_between_them(pbx, bus, settings_for, start_bridge):
    """The same, one frame a TCP write (each fragment read on its own)."""
    _, sess, runner = await client_session(pbx, settings_for, start_bridge)
    ws = sess.ws
    data = sig(5, b"q" * 1000)
    for j, f in enumerate(fragments(data, 8, True)):
        ws.transport.write(raw(f))
        ws.transport.write(raw(Frame(PING, b"%d" % j)))
        await eventually(lambda j=j: len(ws.pongs) > j, 5, "the ping answered")
        if j < 7:
            assert sess.received == []  # not before the last fragment
    await sess.until_received(1, timeout=5)
    assert sess.received == [data] and sess.binary == [True]
    await still_serving(pbx, sess, runner)


async def test_invalid_utf8_split_across_binary_fragments_comes_back_binary_and_unchanged(
        pbx, bus, settings_for, start_bridge):
    _, sess, runner = await client_session(pbx, settings_for, start_bridge)
    bad = sig(6, b"caf\xc3")  # a lead byte ...
    cut = len(bad) - 10
    frames = [Frame(BINARY, bad[:cut], fin=False), Frame(CONT, b"", fin=False), Frame(CONT, bad[cut:])]
    # ... and a text message whose valid two-byte character is split between two fragments
    good = sig(8, b"caf\xc3\xa9")
    split = good.index(b"\xa9")
    frames += [Frame(TEXT, good[:split], fin=False), Frame(CONT, good[split:])]
    sess.ws.transport.write(raw(*frames))
    await sess.until_received(2, timeout=5)
    assert sess.received == [bad, good] and sess.binary == [True, False]
    assert sess.invalid_text() == []
    await still_serving(pbx, sess, runner)


async def test_4096_fragments_are_forwarded_and_4097_close_with_1009_and_the_bridge_reconnects(
        pbx, bus, settings_for, start_bridge):
    _, sess, runner = await client_session(pbx, settings_for, start_bridge)
    data = sig(9, b"f" * 5000)
    sess.ws.transport.write(raw(*fragments(data, MAX_FRAGMENTS, False)))
    await sess.until_received(1, timeout=10)
    assert sess.received == [data] and sess.binary == [False]
    assert pbx.connections == 1 and runner.reconnects == 0
    # empty fragments: the count, not the size, is the bound
    sess.ws.transport.write(raw(*fragments(sig(10), MAX_FRAGMENTS + 1, True)))
    await asyncio.wait_for(sess.closed.wait(), 10)
    assert sess.close_code == 1009
    assert sess.received == [data]
    await reconnected_and_serving(pbx, sess, runner)


async def test_a_close_inside_a_fragmented_message_is_a_clean_close_and_the_bridge_reconnects(
        pbx, bus, settings_for, start_bridge):
    _, sess, runner = await client_session(pbx, settings_for, start_bridge)
    await sess.send(sig(11))
    await sess.until_received(1, timeout=5)
    data = sig(12, b"y" * 100)
    frames = fragments(data, 3, False)
    sess.ws.transport.write(raw(frames[0], frames[1], Frame(CLOSE, Close(1000, "bye").serialize())))
    await asyncio.wait_for(sess.closed.wait(), 10)
    assert sess.received == [sig(11)]  # the unfinished message is not forwarded, in part or whole
    assert sess.close_code == 1002  # websockets: "incomplete fragmented message"
    await reconnected_and_serving(pbx, sess, runner)


LIMIT = 16 * 1024


async def test_messages_at_and_over_the_size_limits(pbx, bus, settings_for, start_bridge):
    """max_frame_bytes: forwarded; one byte more: a bad frame, the session goes on; twice the
    limit (the WebSocket limit), even fragmented: a bad frame, the session goes on."""
    from bridge.metrics import FRAMES

    _, sess, runner = await client_session(pbx, settings_for, start_bridge, max_frame_bytes=LIMIT)
    bad0 = FRAMES.bad_frames
    at = sig_of_size(20, LIMIT)
    over = sig_of_size(21, LIMIT + 1)
    double = sig_of_size(22, 2 * LIMIT)
    sess.ws.transport.write(raw(Frame(TEXT, at)) + raw(Frame(BINARY, over))
                            + raw(*fragments(double, 7, False)) + raw(Frame(TEXT, sig(23))))
    await sess.until_received(2, timeout=5)
    assert sess.received == [at, sig(23)] and sess.binary == [False, False]
    assert FRAMES.bad_frames - bad0 == 2
    await still_serving(pbx, sess, runner)


@pytest.mark.parametrize("fragmented", [False, True])
async def test_a_message_over_twice_the_limit_closes_with_1009_and_the_bridge_reconnects(
        pbx, bus, settings_for, start_bridge, fragmented):
    _, sess, runner = await client_session(pbx, settings_for, start_bridge, max_frame_bytes=LIMIT)
    await sess.send(sig(24))
    await sess.until_received(1, timeout=5)
    big = sig_of_size(25, 2 * LIMIT + 1)
    sess.ws.transport.write(raw(*fragments(big, 9, True)) if fragmented else raw(Frame(BINARY, big)))
    await asyncio.wait_for(sess.closed.wait(), 10)
    assert sess.close_code == 1009 and sess.received == [sig(24)]
    await reconnected_and_serving(pbx, sess, runner)


async def test_messages_in_the_same_segment_as_the_login_result_are_forwarded_first(
        pbx, bus, settings_for, start_bridge):
    """Before the bridge has taken the connection (and before its Attach): more than
    websockets' queue holds before it stops reading (16), fragmented ones among them."""
    msgs = [(sig(100 + i, b"w" * (i * 37)), i % 3 == 0) for i in range(40)]
    wire = b""
    for i, (data, binary) in enumerate(msgs):
        wire += raw(*fragments(data, 3, binary)) if i % 4 == 1 else raw(Frame(BINARY if binary else TEXT, data))
    pbx.with_login_result = wire
    bridge = await start_bridge(settings_for(None, pbx_url=pbx.url, pbx_password=PASSWORD, devices=HW))
    sess = await pbx.wait_session()
    runner = bridge.pbx.runners[HW]
    await sess.until_received(len(msgs), timeout=10)
    assert sess.received == [d for d, _ in msgs]
    assert sess.binary == [b for _, b in msgs]
    await eventually(lambda: runner.device.attached, 5, "the device attached")
    await still_serving(pbx, sess, runner)


async def test_a_burst_to_a_pbx_that_reads_nothing_stays_bounded_and_comes_back_in_order(
        pbx, bus, settings_for, start_bridge):
    _, sess, runner = await client_session(pbx, settings_for, start_bridge)
    ws = sess.ws
    ws.transport.pause_reading()  # the PBX reads nothing from here on
    sent = 0
    stopped = False
    while sent < 3000:  # ~180 MB: more than the kernel's buffers on both sides
        try:
            await asyncio.wait_for(sess.send(sig(sent, b"b" * 60_000), text=False), 1.0)
        except TimeoutError:  # the bridge stopped reading: TCP holds the PBX
            stopped = True
            break
        sent += 1
    assert stopped, f"{sent} messages of 60 kB sent to a bridge whose PBX reads nothing"
    bridge_ws = runner.session.ws
    assert bridge_ws.transport.get_write_buffer_size() < 1024 * 1024
    ws.transport.resume_reading()
    await sess.until_received(sent, timeout=30)
    assert [json.loads(d)["call"] for d in sess.received[:sent]] == list(range(sent))
    assert all(sess.binary)


async def test_a_pbx_that_never_reads_is_dropped_and_the_device_reconnects(
        pbx, bus, settings_for, start_bridge, monkeypatch, caplog):
    """A PBX that sends a burst and then reads nothing (its TCP still open). The bridge stops
    reading from it (its buffers stay bounded), but the keepalive could never end the session:
    websockets' ``keepalive`` awaits ``ping()``, whose ``send_context`` awaits ``drain()`` with
    no timeout, and the buffer never drains (the ping timeout never even starts). The session
    stayed "attached", read nothing, forwarded nothing, and never reconnected. Now a write
    buffer that stays full for a ping timeout ends the connection, and the device reconnects.

    The keepalive here is 0.5 s + 0.5 s (the bridge's is 20 s + 20 s: the same, slower)."""
    real = pbx_client.connect

    def quick_keepalive(*a, **kw):
        kw.update(ping_interval=0.5, ping_timeout=0.5)
        return real(*a, **kw)

    monkeypatch.setattr(pbx_client, "connect", quick_keepalive)
    _, sess, runner = await client_session(pbx, settings_for, start_bridge)
    sess.ws.transport.pause_reading()
    try:
        for i in range(3000):
            await asyncio.wait_for(sess.send(sig(i, b"b" * 60_000), text=False), 1.0)
    except (TimeoutError, ConnectionClosed):  # blocked (the bridge reads no more), or dropped
        pass
    try:
        await asyncio.wait_for(sess.closed.wait(), 10)
        again = await pbx.wait_session(2, timeout=15)
        await again.send(sig(77))
        await again.until_received(1, timeout=5)
        assert again.received == [sig(77)]
    finally:
        sess.ws.transport.abort()
    assert "nothing could be written for 0.5 s" in caplog.text and runner.reconnects >= 1


async def test_signaling_read_with_a_close_is_published_though_not_forwarded(
        pbx, bus, settings_for, start_bridge):
    """Signaling messages that arrive in the same read as the PBX's close frame: websockets'
    ``data_received`` answers the close *before* the session takes the frames read with it, so
    they cannot be forwarded any more (the PBX closed: it takes no more data). They were dropped
    altogether, neither forwarded nor published: a PBX that sends a call's last messages and
    then closes (a restart, a shutdown) lost them. Now they are published (the PBX said them),
    not forwarded."""
    q = await bus.bind(f"device.{HW}.call.*.signaling")
    _, sess, _ = await client_session(pbx, settings_for, start_bridge)
    await sess.send(sig(29))  # the control: one read on its own, forwarded and published
    await sess.until_received(1, timeout=5)
    assert (await q.get(timeout=5)).body["call"] == 29
    sess.ws.transport.write(raw(Frame(TEXT, sig(30)), Frame(TEXT, sig(31)),
                                Frame(CLOSE, Close(1001, "going away").serialize())))
    await asyncio.wait_for(sess.closed.wait(), 10)
    got = []
    try:
        while True:
            got.append((await q.get(timeout=2)).body["call"])
    except TimeoutError:
        pass
    assert got == [30, 31], f"published calls {got}: Signaling read with the close was dropped"
    assert sess.received == [sig(29)]  # after its close the PBX takes nothing: not forwarded


# ------------------------------------------------------------------------------- server mode
class PbxClient:
    """The PBX's App object connecting to the bridge in server mode, at the frame level."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.got: list[tuple[bytes, bool]] = []  # what came after the attach: data, binary

    @classmethod
    async def open(cls, url: str, password: str, after_login: bytes = b"") -> PbxClient:
        ws = await connect(url, compression=None, max_size=None, ping_interval=None)
        lg = ClientLogin("epsignal", password)
        await ws.send(m.encode(lg.start()), text=True)
        challenge = m.decode(await ws.recv(decode=False))
        # the AppLogin and, glued to it, whatever the test wants (one write)
        ws.transport.write(raw(Frame(TEXT, m.encode(lg.on_challenge(challenge))), mask=True) + after_login)
        lg.on_result(m.decode(await ws.recv(decode=False)))
        return cls(ws)

    async def answer_attaches(self, n: int = 1) -> None:
        """Answer ``n`` Attach messages; what else comes meanwhile is kept."""
        while n:
            data, binary = await self.recv()
            msg = m.decode(data)
            if type(msg) is m.Attach:
                await self.ws.send(m.encode(m.AttachResult(src=msg.src)), text=True)
                await self.ws.send(m.encode(m.Attached(src=msg.src)), text=True)
                n -= 1
            else:
                self.got.append((data, binary))

    async def recv(self, timeout: float = 5) -> tuple[bytes, bool]:
        """One message: its bytes, and whether it came as a binary frame."""
        async with asyncio.timeout(timeout):
            data = await self.ws.recv(decode=None)  # str: a text frame, bytes: a binary one
        return (data.encode() if isinstance(data, str) else data), isinstance(data, bytes)

    async def until(self, n: int, timeout: float = 10) -> list[bytes]:
        async with asyncio.timeout(timeout):
            while len(self.got) < n:
                self.got.append(await self.recv(timeout))
        return [d for d, _ in self.got]

    def write(self, *frames: Frame) -> None:
        self.ws.transport.write(raw(*frames, mask=True))


async def server_bridge(settings_for, start_bridge, **kw):
    bridge = await start_bridge(settings_for(None, pbx_mode="server", pbx_listen="127.0.0.1:0",
                                             pbx_password=PASSWORD, devices=HW, **kw))
    return bridge, f"ws://127.0.0.1:{bridge.pbx.port}/"


async def test_server_mode_masked_fragments_with_pings_and_messages_glued_to_the_login(
        bus, settings_for, start_bridge):
    bridge, url = await server_bridge(settings_for, start_bridge)
    early = [(sig(40), False), (sig(41, b"\xff"), True), (sig(42, b"e" * 500), False)]
    glued = raw(Frame(TEXT, early[0][0]), *fragments(early[1][0], 4, True), Frame(PING, b"early"),
                Frame(TEXT, early[2][0]), mask=True)
    pbx = await PbxClient.open(url, PASSWORD, after_login=glued)
    try:
        # the early messages are forwarded (before the Attach or after it: in their order)
        await pbx.answer_attaches()
        await pbx.until(len(early))
        assert pbx.got == early
        # fragments with pings between them, masked, binary and text
        later = [(sig(43, b"\xc3"), True), (sig(44, b"\xc3\xa9" * 100), False)]
        frames = []
        for data, binary in later:
            for j, f in enumerate(fragments(data, 6, binary)):
                frames += [f, Frame(PING, b"s%d" % j)]
        pbx.write(*frames)
        await pbx.until(len(early) + len(later))
        assert pbx.got == early + later
        assert bridge.pbx.session is not None and bridge.pbx.session.ws.serving
    finally:
        await pbx.ws.close()


async def test_server_mode_4097_fragments_close_with_1009_and_the_pbx_can_log_in_again(
        bus, settings_for, start_bridge):
    _, url = await server_bridge(settings_for, start_bridge)
    pbx = await PbxClient.open(url, PASSWORD)
    await pbx.answer_attaches()
    pbx.write(*fragments(sig(50, b"f" * 100), MAX_FRAGMENTS, True))
    assert await pbx.until(1) == [sig(50, b"f" * 100)]
    pbx.write(*fragments(sig(51), MAX_FRAGMENTS + 1, False))
    await asyncio.wait_for(pbx.ws.wait_closed(), 10)
    assert pbx.ws.close_code == 1009
    again = await PbxClient.open(url, PASSWORD)
    try:
        await again.answer_attaches()
        await again.ws.send(sig(52), text=True)
        assert await again.until(1) == [sig(52)]
    finally:
        await again.ws.close()


async def test_server_mode_a_stuck_old_connection_does_not_block_the_pbx_s_new_one(
        bus, settings_for, start_bridge):
    """In server mode a PBX connection that stops reading (a burst sent, its TCP still open)
    blocked the PBX's next connection for good (now the close is bounded by the close timeout,
    2 s, then the old connection is aborted). ``PbxServer._handle`` does
    ``await old.close()`` before it makes the new session; ``close()`` awaits ``drain()`` (in
    websockets' ``send_context``) before its close timeout is armed, and the old transport's
    buffer never drains: the new connection logs in, gets no Attach, and its calls' Signaling
    is never forwarded. (``PbxConnection.fail`` on such a connection hangs the same way.)"""
    bridge, url = await server_bridge(settings_for, start_bridge)
    old = await PbxClient.open(url, PASSWORD)
    await old.answer_attaches()
    old.ws.transport.pause_reading()  # the old connection reads nothing from here on
    sent = 0
    while sent < 3000:
        try:
            await asyncio.wait_for(old.ws.send(sig(sent, b"b" * 60_000), text=False), 1.0)
        except TimeoutError:
            break
        sent += 1
    stuck = bridge.pbx.session.ws
    assert stuck._held  # the bridge stopped reading from it: bounded, as promised
    new = await PbxClient.open(url, PASSWORD)  # the PBX connects again
    try:
        # the bridge's close_timeout (websockets' default, 10 s) is the most the old may take
        await new.answer_attaches()
        await new.ws.send(sig(60), text=True)
        assert await new.until(1, timeout=20) == [sig(60)]
    except TimeoutError:
        pytest.fail(f"the PBX's new connection got no Attach / no forward in 20 s: the bridge "
                    f"waits on the old connection's close (write buffer "
                    f"{stuck.transport.get_write_buffer_size()} bytes, state {stuck.protocol.state!r})")
    finally:
        old.ws.transport.abort()
        await new.ws.close()
