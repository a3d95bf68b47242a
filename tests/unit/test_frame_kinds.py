"""FrameKinds: after each recv, the bridge's PBX connection knows whether the message came as a
text or a binary frame (so a forward goes out as the same kind), whatever the mix, however many
messages wait in the queue, fragmented or not, on both sides (client and server mode)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from bridge.pbx.session import FrameKinds, PbxClientConnection, PbxServerConnection

# (binary, fragmented) per message; a fragmented message goes as three frames
messages = st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=30)


def payload(i: int, binary: bool) -> bytes:
    return b'{"n":%d,"x":"\xff"}' % i if binary else b'{"n":%d}' % i  # binary: not UTF-8


async def send_all(ws, plan) -> None:
    for i, (binary, fragmented) in enumerate(plan):
        data = payload(i, binary)
        if fragmented:
            await ws.send([data[:3], data[3:6], data[6:]], text=not binary)
        else:
            await ws.send(data, text=not binary)


async def read_all(ws: FrameKinds, n: int, pause: bool) -> list[tuple[bytes, bool]]:
    if pause:  # let every message queue up before the first recv
        await asyncio.sleep(0.05)
    out = []
    for _ in range(n):
        data = await ws.recv(decode=False)
        out.append((data, ws.took_binary()))
    return out


@given(plan=messages, pause=st.booleans())
@settings(max_examples=40, deadline=None)
async def test_client_side_tells_each_message_kind(plan, pause):
    async def handler(ws):
        await send_all(ws, plan)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None,
                           create_connection=PbxClientConnection) as ws:
            got = await read_all(ws, len(plan), pause)
            assert ws._binary_at is None  # nothing kept once every binary message was read
    assert got == [(payload(i, b), b) for i, (b, _) in enumerate(plan)]


@given(plan=messages, pause=st.booleans())
@settings(max_examples=40, deadline=None)
async def test_server_side_tells_each_message_kind(plan, pause):
    result: asyncio.Future = asyncio.get_running_loop().create_future()

    async def handler(ws):
        try:
            result.set_result(await read_all(ws, len(plan), pause))
        except Exception as e:
            result.set_exception(e)

    async with serve(handler, "127.0.0.1", 0, compression=None,
                     create_connection=PbxServerConnection) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None) as ws:
            await send_all(ws, plan)
            got = await asyncio.wait_for(result, 5)
    assert got == [(payload(i, b), b) for i, (b, _) in enumerate(plan)]


async def test_a_cancelled_recv_does_not_shift_the_kinds():
    """A timed-out read (the login's wait_for) consumes no message: the kinds stay aligned."""
    go = asyncio.Event()

    async def handler(ws):
        await go.wait()
        await ws.send(b"bin", text=False)
        await ws.send(b"txt", text=True)
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", compression=None,
                           create_connection=PbxClientConnection) as ws:
            try:
                await asyncio.wait_for(ws.recv(decode=False), 0.05)
            except TimeoutError:
                pass
            go.set()
            assert (await ws.recv(decode=False), ws.took_binary()) == (b"bin", True)
            assert (await ws.recv(decode=False), ws.took_binary()) == (b"txt", False)
