"""PbxConnection (bridge/pbx/connection.py), on real sockets: once taken, every message reaches the
taker whole, in order, with its kind (text or binary), fragmented or not, those that queued for
``recv`` before the take first; on both sides (client and server mode); a forward goes out as
the kind asked for; a peer that stops reading stops the connection reading from it (its buffer
stays bounded); too many fragments close the connection (1009)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.messages import MAX_FRAGMENTS
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosed

from bridge.pbx.connection import PbxClientConnection, PbxConnection, PbxServerConnection

# (binary, fragmented) per message; a fragmented message goes as three frames
messages = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=30)


def payload(i: int, binary: bool) -> bytes:
    return b'{"n":%d,"x":"\xff"}' % i if binary else b'{"n":%d}' % i  # binary: not UTF-8


def expected(plan) -> list[tuple[bytes, bool]]:
    return [(payload(i, b), b) for i, (b, _) in enumerate(plan)]


async def send_all(ws, plan, start: int = 0) -> None:
    for i, (binary, fragmented) in enumerate(plan, start):
        data = payload(i, binary)
        if fragmented:
            await ws.send([data[:3], data[3:6], data[6:]], text=not binary)
        else:
            await ws.send(data, text=not binary)


class Taken:
    """A taker that keeps what it is given and says when it has ``n`` messages."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.got: list[tuple[bytes, bool]] = []
        self.all = asyncio.Event()

    def __call__(self, data: bytes, binary: bool) -> None:
        assert type(data) is bytes
        self.got.append((data, binary))
        if len(self.got) >= self.n:
            self.all.set()


async def until_queued(ws: PbxConnection, frames: int) -> None:
    """Until ``frames`` frames wait for recv, or as many as make the queue pause reading (16 by
    default: the take must then let it read again)."""
    queue = ws.recv_messages
    while len(queue.frames) < min(frames, queue.high + 1):
        await asyncio.sleep(0.002)


def frames_of(plan) -> int:
    return sum(3 if fragmented else 1 for _, fragmented in plan)


@given(plan=messages, split=st.integers(0, 30))
@settings(max_examples=40, deadline=None)
async def test_the_client_side_takes_every_message_whole_in_order_with_its_kind(plan, split):
    before = min(split, len(plan))
    go_on = asyncio.Event()

    async def handler(ws):
        await send_all(ws, plan[:before])
        await asyncio.wait_for(go_on.wait(), 10)  # bounded: a failing test must not hang the server's close
        await send_all(ws, plan[before:], before)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None,
                           create_connection=PbxClientConnection) as ws:
            await asyncio.wait_for(until_queued(ws, frames_of(plan[:before])), 5)
            taken = Taken(len(plan))
            ws.take(taken)
            go_on.set()
            await asyncio.wait_for(taken.all.wait(), 5)
    assert taken.got == expected(plan)


@given(plan=messages, split=st.integers(0, 30))
@settings(max_examples=40, deadline=None)
async def test_the_server_side_takes_every_message_whole_in_order_with_its_kind(plan, split):
    before = min(split, len(plan))
    result: asyncio.Future = asyncio.get_running_loop().create_future()
    taken = Taken(len(plan))
    took = asyncio.Event()

    async def handler(ws):
        try:
            await asyncio.wait_for(until_queued(ws, frames_of(plan[:before])), 5)
            ws.take(taken)
            took.set()
            await asyncio.wait_for(taken.all.wait(), 5)
            result.set_result(taken.got)
        except Exception as e:
            result.set_exception(e)

    async with serve(handler, "127.0.0.1", 0, compression=None,
                     create_connection=PbxServerConnection) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            await send_all(ws, plan[:before])
            await asyncio.wait_for(took.wait(), 5)
            await send_all(ws, plan[before:], before)
            got = await asyncio.wait_for(result, 5)
    assert got == expected(plan)


async def echo_server(**kw):
    """A server whose PbxServerConnection takes every message and forwards it back at once."""
    conns: list[PbxServerConnection] = []

    async def handler(ws):
        conns.append(ws)
        ws.take(lambda data, binary: ws.forward(data, binary))
        await ws.wait_closed()

    server = await serve(handler, "127.0.0.1", 0, compression=None,
                         create_connection=PbxServerConnection, **kw)
    return server, conns


async def test_a_forward_goes_out_as_the_kind_it_came_as():
    server, _ = await echo_server()
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            await ws.send(b"\xff\x00bin", text=False)
            await ws.send(b'{"t":1}', text=True)
            assert await ws.recv() == b"\xff\x00bin"  # bytes: a binary frame
            assert await ws.recv() == '{"t":1}'  # str: a text frame


async def test_a_forward_on_a_closed_connection_sends_nothing_and_says_so():
    async def handler(ws):
        await ws.close()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await connect(f"ws://127.0.0.1:{port}", compression=None,
                           create_connection=PbxClientConnection)
        await asyncio.wait_for(ws.wait_closed(), 5)
        assert ws.forward(b"{}", False) is False


async def test_a_peer_that_stops_reading_stops_the_connection_reading_from_it():
    """Forwards do not wait for the drain: while the peer reads nothing, the forwarding side's
    own buffer must stay bounded (it stops reading), the peer's sends must come to a stop, and
    once the peer reads again every message comes back, in order."""
    server, conns = await echo_server(write_limit=64 * 1024)
    body = b"x" * (64 * 1024)
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None,
                           write_limit=64 * 1024) as ws:
            ws.transport.pause_reading()  # the peer reads nothing from here on
            sent, stopped = 0, False
            while sent < 4096:  # 256 MiB: far more than the kernel's buffers on both sides
                try:
                    await asyncio.wait_for(ws.send(b"%08d" % sent + body, text=False), 1.0)
                except TimeoutError:  # the forwarding side stopped reading: TCP holds the sender
                    stopped = True
                    break
                sent += 1
            assert stopped, f"{sent} messages of 64 KiB sent to a side whose peer reads nothing"
            # bounded: the write limit, plus what one read had parsed when the limit was passed
            # (up to 256 KiB a read); without the pause it holds whatever the kernel took, MBs
            assert conns[0].transport.get_write_buffer_size() < 1024 * 1024
            ws.transport.resume_reading()
            got = [await asyncio.wait_for(ws.recv(), 10) for _ in range(sent)]
    assert [g[:8] for g in got] == [b"%08d" % i for i in range(sent)]


async def test_too_many_fragments_close_the_connection_as_too_big():
    server, _ = await echo_server(max_size=None)
    async with server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            # websockets sends n fragments as n frames and an empty final one: MAX_FRAGMENTS
            # frames, as many as websockets' own reader takes
            await ws.send([b"x"] * (MAX_FRAGMENTS - 1), text=False)
            assert await asyncio.wait_for(ws.recv(), 5) == b"x" * (MAX_FRAGMENTS - 1)
            try:
                await ws.send([b"x"] * MAX_FRAGMENTS, text=False)  # one frame more
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosed:
                pass
            await asyncio.wait_for(ws.wait_closed(), 5)
            assert ws.close_code == 1009


@pytest.mark.parametrize("writes_paused", [False, True])
async def test_a_failed_connection_still_reads_the_peer_s_close(writes_paused):
    """fail() (a bug while taking a message) closes the connection cleanly, with the close code
    given, when a burst of messages follows the failing one (more than websockets' queue holds
    before it stops reading), and when it comes while reading is paused for a full write buffer
    (a peer that reads nothing meanwhile): the peer's answering close frame must still be read,
    else the close ends only at its timeout, as an abort (1006)."""
    done: asyncio.Future = asyncio.get_running_loop().create_future()
    paused_at_fail: list[bool] = []

    async def handler(ws):
        def bug(data: bytes, binary: bool) -> None:
            if data == b"bug":
                if writes_paused:  # more than the kernel's buffers take: the transport keeps the rest
                    ws.forward(b"z" * (8 << 20), True)
                paused_at_fail.append(ws.paused)
                ws.fail(1011, "internal error")
            else:
                ws.forward(data, binary)

        ws.take(bug)
        await ws.wait_closed()
        done.set_result((ws.close_code, ws.protocol.close_rcvd is not None))

    async with serve(handler, "127.0.0.1", 0, compression=None, close_timeout=30,
                     create_connection=PbxServerConnection) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None,
                           create_connection=PbxClientConnection) as ws:
            if writes_paused:
                ws.transport.pause_reading()  # the peer reads nothing for a while
            ws.forward(b"bug", True)  # (forward: sent at once, no await)
            for i in range(100):  # a burst after the failing message
                ws.forward(b"after %d" % i, True)
            if writes_paused:
                await asyncio.sleep(0.5)
                ws.transport.resume_reading()
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 20)
            except ConnectionClosed:
                pass
            assert ws.close_code == 1011
        code, read_close = await asyncio.wait_for(done, 20)
    assert paused_at_fail == [writes_paused]
    assert (code, read_close) == (1011, True)
