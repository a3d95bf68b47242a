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

from collections.abc import Callable
from typing import cast

from bridge.config import Settings
from bridge.device import Device, bounded_result
from bridge.pbx.mode import AttachFailed, CannotDetach
from bridge.pbx.connection import PbxServerConnection, ws_max_size
from bridge.pbx.session import SETTLE_S, Emit, PbxSession, login_as_server
from bridge.protocol import messages as m
from bridge.protocol.errors import FrameError
from bridge.protocol.login import LoginFailed

log = logging.getLogger("bridge.pbx")


class PbxServer:
    """Server mode (:class:`bridge.pbx.mode.Pbx`): listens for the PBX's App object and attaches
    every device on the one session it opens."""

    def __init__(self, settings: Settings, make_device: Callable[[str], Device], emit: Emit,
                 ssl_context: ssl.SSLContext | None = None, intercept=None) -> None:
        """``intercept``: the intercept adapter the session holds messages for (None: off)."""
        self.s = settings
        self.intercept = intercept
        self.emit = emit
        self._make_device = make_device
        self._ssl = ssl_context
        #: the devices to attach on every PBX session
        self.devices: dict[str, Device] = {}
        self.session: PbxSession | None = None
        self._server: Server | None = None
        self.logins_failed = 0
        self._gate = asyncio.Semaphore(settings.attach_concurrency)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the PBX server is not started")
        return self._server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        for hw in self.s.device_list:
            self.devices[hw] = self._make_device(hw)
        if not self.s.pbx_password:
            raise ValueError("server mode needs EPSIGNAL_PBX_PASSWORD: it verifies the PBX's login with it")
        host, _, port = self.s.pbx_listen.rpartition(":")
        self._server = await serve(
            self._handle, host or None, int(port), compression=None,
            max_size=ws_max_size(self.s.max_frame_bytes), ssl=self._ssl, ping_interval=20, ping_timeout=20,
            close_timeout=2,  # as the client: a PBX that connects again waits for the old close
            create_connection=PbxServerConnection,
        )
        log.info("server mode: waiting for the PBX on %s", self.s.pbx_listen)

    async def _handle(self, conn: ServerConnection) -> None:
        ws = cast(PbxServerConnection, conn)  # create_connection makes it one
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
        session = PbxSession(ws, self.emit, s.max_frame_bytes, self.intercept)
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
                self._lost(d, "session-lost")
        log.warning("PBX session from %r ended", app)

    def _settle(self, session: PbxSession) -> None:
        for d in list(session.devices.values()):
            for ev in d.settle():
                self.emit(ev)

    def _lost(self, device: Device, reason: str) -> None:
        for ev in device.on_lost(reason):
            self.emit(ev)

    async def _attach_on(self, session: PbxSession, device: Device) -> m.AttachResult:
        async with self._gate:
            return await session.attach(device, self.s.attach_timeout_s)

    async def attach(self, hw: str, timeout: float) -> tuple[m.AttachResult, Device]:
        device = self.devices.get(hw)
        if device is None:
            device = self.devices[hw] = self._make_device(hw)
        session = self.session
        if session is None:
            raise AttachFailed("no PBX session: in server mode the bridge waits for the PBX to connect")
        if device.result is not None and hw in session.devices:
            return device.result, device
        try:
            result = await asyncio.wait_for(self._attach_on(session, device), timeout)
        except TimeoutError:
            raise AttachFailed(f"no AttachResult for {hw} within {timeout:g}s; the bridge keeps trying") from None
        except ConnectionError as e:
            raise AttachFailed(str(e)) from None
        if result.failed:
            self.devices.pop(hw, None)
            session.devices.pop(hw, None)
            raise AttachFailed(f"the PBX refused to attach {hw}: {bounded_result(result).err}", refused=True)
        return result, device

    async def attached(self, hw: str, timeout: float) -> bool:
        device, session = self.devices.get(hw), self.session
        if device is None or session is None:
            return False
        return await session.wait_attached(device, timeout)

    async def release(self, hw: str, reason: str) -> bool:
        raise CannotDetach(
            "detach is not possible in server mode: EpSignal has no Detach message and the "
            "PBX session carries every device")

    def target(self, hw: str) -> tuple[Device, PbxSession] | None:
        device, session = self.devices.get(hw), self.session
        if device is None or session is None:
            return None
        return device, session

    def devices_up(self) -> list[tuple[Device, bool]]:
        session = self.session
        return [(d, session is not None and d.hw in session.devices) for d in self.devices.values()]

    def problems(self) -> list[str]:
        return []  # listening is ready: the PBX connects when it will

    @property
    def reconnects(self) -> int:
        return 0  # the PBX reconnects; its logins are counted

    @property
    def login_failures(self) -> int:
        return self.logins_failed

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
