"""Server mode: the PBX's App object connects to the bridge and logs in; the bridge verifies the
digest and attaches its devices on that one session (told apart by ``src``).

EpSignal has no Detach message and the session carries every device, so a single device cannot
be detached in server mode: the detach command is refused with that reason. When the PBX's
session drops, the PBX reconnects (its side of the backoff) and the bridge attaches again.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

from websockets.asyncio.server import Server, ServerConnection, serve

from bridge.config import Settings
from bridge.device import Device
from bridge.pbx.client import SETTLE_S
from bridge.pbx.session import Emit, PbxServerConnection, PbxSession, login_as_server, ws_max_size
from bridge.protocol import messages as m
from bridge.protocol.errors import FrameError
from bridge.protocol.login import LoginFailed

log = logging.getLogger("bridge.pbx")


class NoPbxSession(Exception):
    pass


class PbxServer:
    def __init__(self, settings: Settings, emit: Emit, ssl_context: ssl.SSLContext | None = None) -> None:
        self.s = settings
        self.emit = emit
        self._ssl = ssl_context
        #: the devices to attach on every PBX session
        self.devices: dict[str, Device] = {}
        self.session: PbxSession | None = None
        self._server: Server | None = None
        self.logins_failed = 0
        self._gate = asyncio.Semaphore(settings.attach_concurrency)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        if not self.s.pbx_password:
            raise ValueError("server mode needs EPSIGNAL_PBX_PASSWORD: it verifies the PBX's login with it")
        host, _, port = self.s.pbx_listen.rpartition(":")
        self._server = await serve(
            self._handle, host or None, int(port), compression=None,
            max_size=ws_max_size(self.s.max_frame_bytes), ssl=self._ssl, ping_interval=20, ping_timeout=20,
            create_connection=PbxServerConnection,
        )
        log.info("server mode: waiting for the PBX on %s", self.s.pbx_listen)

    async def _handle(self, ws: ServerConnection) -> None:
        s = self.s
        try:
            app = await login_as_server(ws, s.pbx_app, s.pbx_password, s.attach_timeout_s, s.max_frame_bytes)
        except LoginFailed as e:
            self.logins_failed += 1
            log.error("%s (from %s)", e, ws.remote_address[0] if ws.remote_address else "?")
            await ws.close(1008, "login failed")
            return
        except (FrameError, TimeoutError) as e:
            log.warning("PBX connection without a valid login: %s", e)
            await ws.close(1002, "login expected")
            return
        log.info("PBX App object %r logged in from %s", app, ws.remote_address[0] if ws.remote_address else "?")
        old, self.session = self.session, None
        if old is not None:  # the PBX came back: the old session is dead or about to be
            await old.close()
            await old.closed
        session = PbxSession(ws, self.emit, s.max_frame_bytes)
        self.session = session
        session.reader = asyncio.create_task(session.run())
        await asyncio.gather(*(self._attach_on(session, d) for d in list(self.devices.values())),
                             return_exceptions=True)
        settle = asyncio.get_running_loop().call_later(SETTLE_S, self._settle, session)
        try:
            await session.closed
        finally:
            settle.cancel()
        if self.session is session:
            self.session = None
        newer = self.session.devices if self.session is not None else {}
        for d in list(session.devices.values()):
            if d.hw not in newer:  # a newer session holds it again: not lost
                for ev in d.on_lost("session-lost"):
                    self.emit(ev)
        log.warning("PBX session from %r ended", app)

    def _settle(self, session: PbxSession) -> None:
        for d in list(session.devices.values()):
            for ev in d.settle():
                self.emit(ev)

    async def _attach_on(self, session: PbxSession, device: Device) -> m.AttachResult:
        async with self._gate:
            return await session.attach(device, self.s.attach_timeout_s)

    async def attach(self, device: Device) -> m.AttachResult:
        self.devices.setdefault(device.hw, device)
        device = self.devices[device.hw]
        if self.session is None:
            raise NoPbxSession("no PBX session: in server mode the bridge waits for the PBX to connect")
        if device.result is not None and device.hw in self.session.devices:
            return device.result
        return await self._attach_on(self.session, device)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
