"""A TCP proxy under the test's control, for fault tests between the bridge and the broker or
the PBX simulator.

Toxiproxy (the usual tool) is a Go server that is not installable from PyPI here, so this is a
small asyncio proxy with the three faults the tests need:

- ``cut()``: close every connection at once and refuse new ones (a broker or PBX that is gone);
- ``restore()``: accept connections again;
- ``stall()`` / ``unstall()``: keep connections open but stop moving bytes (a peer that hangs:
  only heartbeats or timeouts can notice).
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.host = host
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.accepting = True
        self.connections_total = 0

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.accepting:
            writer.transport.abort()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections_total += 1
        pair = (writer, up_w)
        self._conns.add(pair)
        t1 = asyncio.create_task(self._pipe(reader, up_w))
        t2 = asyncio.create_task(self._pipe(up_r, writer))
        self._tasks |= {t1, t2}
        try:
            await asyncio.wait({t1, t2}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (t1, t2):
                t.cancel()
            self._tasks -= {t1, t2}
            self._conns.discard(pair)
            for w in pair:
                w.transport.abort()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await r.read(65536):
                await self._flowing.wait()
                w.write(data)
                await w.drain()

    def cut(self) -> None:
        """Close every connection abruptly (RST) and refuse new ones."""
        self.accepting = False
        for a, b in list(self._conns):
            a.transport.abort()
            b.transport.abort()

    def restore(self) -> None:
        self.accepting = True
        self._flowing.set()

    def stall(self) -> None:
        self._flowing.clear()

    def unstall(self) -> None:
        self._flowing.set()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
