"""One AppWebsocket session between the simulated PBX and an application.

Frames to the application go through one writer task, in order, so that synchronous code (a
device registering, a call script) can post a frame without awaiting. The ``delay_ms`` fault
holds every frame back by that many milliseconds (latency, not a throughput limit).

Frames from the application are read as an RFC 6455 endpoint must: a text frame that is not
valid UTF-8 fails the connection with close code 1007 (websockets does that when it decodes a
text frame), so a bridge that sends one loses its session here as it would on a real PBX.
A binary frame is read like a text frame: the JSON message in it is handled the same way (its
strings are not checked for UTF-8, as the bridge does not check a sig's). AppWebsocket speaks text
frames and does not say what a PBX does with a binary one; parsing it is the lenient reading,
and a bridge only sends one when it forwards a binary frame the PBX sent first. They are counted
in ``binary_frames``; sessions failed for invalid UTF-8 in ``invalid_utf8``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from bridge.protocol.login import ServerLogin
from bridge.sim.devices import Device
from bridge.sim.dispatch import Switch, on_frame

if TYPE_CHECKING:
    from websockets.asyncio.connection import Connection

_CLOSE = object()


class SessionHost(Switch, Protocol):
    """What a session needs of the simulator (:class:`bridge.sim.pbx.PbxSimulator`): what the
    dispatch of its frames does, and to be told when it opens and closes."""

    def session_opened(self, s: Session) -> None: ...

    def session_closed(self, s: Session) -> None: ...


class Session:
    """One AppWebsocket session with an application (see the module docstring)."""

    __slots__ = (
        "_closing",
        "_queue",
        "_wake",
        "_writer",
        "by_src",
        "closed",
        "devices",
        "logged_in",
        "login",
        "outbound",
        "pbx",
        "ws",
    )

    def __init__(self, pbx: SessionHost, ws: Connection, *, outbound: bool) -> None:
        self.pbx = pbx
        self.ws = ws
        #: the simulator connected out (server mode of the application)
        self.outbound = outbound
        self.login = None if outbound else ServerLogin({pbx.config.app: pbx.config.password})
        self.logged_in = outbound
        #: devices attached on this session, by hw; and by the Attach's src
        self.devices: dict[str, Device] = {}
        self.by_src: dict[str, Device] = {}
        self.closed = asyncio.Event()
        self._queue: deque[tuple[float, Any]] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task | None = None
        self._closing = False

    # ------------------------------------------------------------------ sending
    def post(self, frame: bytes) -> None:
        """Queue one text frame for the application (dropped once the session is closing)."""
        if self._closing:
            return
        delay = self.pbx.faults.delay_ms
        due = asyncio.get_running_loop().time() + delay / 1000 if delay > 0 else 0.0
        self._queue.append((due, frame))
        self._wake.set()

    def close_after_flush(self, code: int = 1008, reason: str = "") -> None:
        """Send what is queued, then close the WebSocket."""
        if not self._closing:
            self._queue.append((0.0, (_CLOSE, code, reason)))
            self._wake.set()
            self._closing = True

    def abort(self) -> None:
        """Cut the TCP connection at once, without a close frame."""
        self._closing = True
        self.ws.transport.abort()

    async def _write(self) -> None:
        ws, queue, wake = self.ws, self._queue, self._wake
        loop = asyncio.get_running_loop()
        try:
            while True:
                while queue:
                    due, frame = queue.popleft()
                    if due:
                        wait = due - loop.time()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    if type(frame) is tuple:
                        _, code, reason = frame
                        await ws.close(code, reason)
                        return
                    await ws.send(frame, text=True)
                wake.clear()
                await wake.wait()
        except ConnectionClosed:
            pass

    # ------------------------------------------------------------------ receiving
    async def serve(self) -> None:
        """Run the session until the connection ends; then the PBX detaches its devices."""
        self._writer = asyncio.create_task(self._write())
        ws, pbx = self.ws, self.pbx
        pbx.session_opened(self)
        try:
            while True:
                data = await ws.recv()  # str for a text frame (valid UTF-8), bytes for binary
                if type(data) is bytes:
                    pbx.counters.binary_frames += 1
                on_frame(pbx, self, data)
        except ConnectionClosed as e:
            if e.sent is not None and e.sent.code == CloseCode.INVALID_DATA:
                pbx.counters.invalid_utf8 += 1
        finally:
            self._closing = True
            self._writer.cancel()
            self.pbx.session_closed(self)
            self.closed.set()
