"""``python -m bridge.bench.echo``: the floor of forwarding latency on this machine.

A process that does what the bridge's forward path does and nothing else: one WebSocket
session per device (``EPSIGNAL_DEVICES``) to ``EPSIGNAL_PBX_URL``, the same client login
(:func:`bridge.pbx.session.login_as_client`) and ``Attach``, then every Signaling frame is sent
straight back, undecoded, in the callback that read it, as the bridge forwards
(:mod:`bridge.pbx.connection`), on the bridge's event loop. The load generator measures its
round trips like the bridge's, so the difference between the two is what the bridge itself
adds (decoding, the events, the publisher sharing the event loop); the floor is the Python +
websockets + loopback cost.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from websockets.asyncio.client import connect

from bridge.main import loop_factory
from bridge.pbx.connection import PbxClientConnection
from bridge.pbx.session import login_as_client
from bridge.protocol import messages as m

SIGNALING = b'{"mt":"Signaling"'


async def _session(url: str, app: str, password: str, hw: str, gate: asyncio.Semaphore) -> None:
    async with gate:
        ws = await connect(url, compression=None, ping_interval=None, max_size=m.MAX_FRAME_BYTES,
                           proxy=None, create_connection=PbxClientConnection)
        assert isinstance(ws, PbxClientConnection)  # create_connection above
        await login_as_client(ws, app, password, 10, m.MAX_FRAME_BYTES)
        await ws.send(m.encode(m.Attach(hw=hw, src=hw)), text=True)

    def echo(data: bytes, binary: bool) -> None:  # as the bridge: in the callback that read it
        if data.startswith(SIGNALING):
            ws.forward(data, binary)  # the kind of frame that came

    ws.take(echo)
    await ws.wait_closed()


async def main() -> int:
    env = os.environ
    url = env["EPSIGNAL_PBX_URL"]
    app = env.get("EPSIGNAL_PBX_APP", "epsignal")
    password = env.get("EPSIGNAL_PBX_PASSWORD", "")
    devices = [d for d in env.get("EPSIGNAL_DEVICES", "").split(",") if d]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gate = asyncio.Semaphore(50)
    tasks = [asyncio.create_task(_session(url, app, password, hw, gate)) for hw in devices]
    await stop.wait()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return 0


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=loop_factory()) as runner:  # the bridge's loop (uvloop)
        sys.exit(runner.run(main()))
