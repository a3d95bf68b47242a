"""The bridge's PBX connections do not ping in step (no broker: a local WebSocket server).

Sessions opened together would each ping every ``ping_interval`` from their open, all in the
same turn of the event loop; :meth:`bridge.pbx.connection.PbxConnection.keepalive` puts each first
ping off by a random part of the interval."""

from __future__ import annotations

import asyncio
import time

from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from bridge.pbx.connection import PbxClientConnection

SESSIONS = 30
INTERVAL = 1.0


async def test_sessions_opened_together_ping_spread_over_the_interval_and_keep_pinging():
    pings: dict[int, list[float]] = {}

    class Recording(PbxClientConnection):
        async def ping(self, data=None):
            pings.setdefault(id(self), []).append(time.monotonic())
            return await super().ping(data)

    async def hold(ws):
        await ws.wait_closed()

    async with serve(hold, "127.0.0.1", 0, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        opened: dict[int, float] = {}

        async def open_one() -> Recording:
            ws = await connect(f"ws://127.0.0.1:{port}/", ping_interval=INTERVAL, ping_timeout=INTERVAL,
                               create_connection=Recording)
            opened[id(ws)] = time.monotonic()  # (its keepalive started just before)
            return ws

        conns = await asyncio.gather(*(open_one() for _ in range(SESSIONS)))
        await asyncio.sleep(3 * INTERVAL + 0.5)  # every first ping (1-2 intervals), and the next
        for c in conns:
            await c.close()
    assert len(pings) == SESSIONS  # every session pinged ...
    assert all(len(t) >= 2 for t in pings.values()), pings  # ... and kept pinging (pongs came)
    # each first ping after its own open: in step, one interval after it for all (within ms);
    # put off by a uniform part of the interval, 30 of them span less than half of it with p ~ 1e-7
    delays = sorted(t[0] - opened[c] for c, t in pings.items())
    assert delays[-1] - delays[0] > INTERVAL / 2, delays
    assert delays[0] >= INTERVAL - 0.1 and delays[-1] <= 2 * INTERVAL + 1, delays
