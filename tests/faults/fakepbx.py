"""A minimal PBX for the fuzz tests: a real WebSocket server that logs the bridge in with the
bridge's own :class:`~bridge.protocol.login.ServerLogin`, answers one ``Attach`` with
``AttachResult`` + ``Attached``, and then lets the test send any bytes it likes.

Everything the bridge sends after the attach (its forwards) is kept, in order, per connection,
with the kind of frame it came in (text or binary), so a test can compare what came back with
what it expected to come back. Text frames are not checked for UTF-8 here (a hostile PBX's own
invalid frames come back as they were sent); a test asks :meth:`FakeSession.invalid_text`.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Opcode

from bridge.protocol import messages as m
from bridge.protocol.login import ServerLogin

PATH = "/PBX0/APPS/websocket"


class RecordingConnection(ServerConnection):
    """Keeps the opcode of every message's first frame (TEXT or BINARY), in arrival order."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.opcodes: list[Opcode] = []

    def process_event(self, event) -> None:
        if getattr(event, "opcode", None) in (Opcode.TEXT, Opcode.BINARY):
            self.opcodes.append(event.opcode)
        super().process_event(event)


class FakeSession:
    def __init__(self, ws: ServerConnection, hw: str, src) -> None:
        self.ws = ws
        self.hw = hw
        self.src = src
        #: every frame the bridge sent after the attach, as bytes, in order
        self.received: list[bytes] = []
        #: for each of ``received``: it came as a binary frame (else as a text frame)
        self.binary: list[bool] = []
        self.got = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_code: int | None = None

    async def send(self, frame: bytes, text: bool = True) -> None:
        await self.ws.send(frame, text=text)

    def invalid_text(self) -> list[bytes]:
        """The text frames received that are not UTF-8 (an RFC 6455 PBX fails the connection)."""
        out = []
        for data, binary in zip(self.received, self.binary, strict=True):
            if not binary:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError:
                    out.append(data)
        return out

    async def until_received(self, n: int, timeout: float) -> None:
        """Until at least ``n`` frames came back (TimeoutError otherwise)."""
        async with asyncio.timeout(timeout):
            while len(self.received) < n:
                if self.closed.is_set():
                    raise ConnectionError(f"session closed (code {self.close_code}) after "
                                          f"{len(self.received)} of {n} frames came back")
                self.got.clear()
                waiter = asyncio.ensure_future(self.got.wait())
                closer = asyncio.ensure_future(self.closed.wait())
                await asyncio.wait({waiter, closer}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                closer.cancel()


class FakePbx:
    #: the PBX side's connection (a subclass may keep more of what it receives)
    connection: type[RecordingConnection] = RecordingConnection

    def __init__(self, password: str, app: str = "epsignal") -> None:
        self.passwords = {app: password}
        self.url: str | None = None
        self.sessions: list[FakeSession] = []
        self.connections = 0
        self.new_session = asyncio.Event()
        self._server = None

    async def start(self) -> FakePbx:
        # no size limit on our side: the test decides what is too large
        self._server = await serve(self._handler, "127.0.0.1", 0, compression=None, max_size=None,
                                   max_queue=None, ping_interval=None, create_connection=self.connection)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}{PATH}"
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            try:
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
            except TimeoutError:
                pass

    async def wait_session(self, n: int = 1, timeout: float = 10.0) -> FakeSession:
        async with asyncio.timeout(timeout):
            while len(self.sessions) < n:
                self.new_session.clear()
                await self.new_session.wait()
        return self.sessions[n - 1]

    async def _handler(self, ws: RecordingConnection) -> None:
        self.connections += 1
        login = ServerLogin(dict(self.passwords))
        try:
            req = m.decode(await ws.recv(decode=False))
            await ws.send(m.encode(login.on_challenge_request(req)), text=True)
            result = login.on_login(m.decode(await ws.recv(decode=False)))
            await ws.send(m.encode(result), text=True)
            if not result.ok:
                await ws.close(1008, "login failed")
                return
            attach = m.decode(await ws.recv(decode=False))
            assert type(attach) is m.Attach, attach
            await ws.send(m.encode(m.AttachResult(
                src=attach.src, stun="stun.example.net", turn="turn.example.net", turnUsr="u",
                turnPwd="fake-turn-pw", country="49")), text=True)
            await ws.send(m.encode(m.Attached(src=attach.src)), text=True)
            s = FakeSession(ws, attach.hw, attach.src)
            self.sessions.append(s)
            self.new_session.set()
            try:
                while True:
                    data = await ws.recv(decode=False)
                    # the messages read so far: AppChallenge, AppLogin, Attach, then these
                    s.binary.append(ws.opcodes[3 + len(s.received)] is Opcode.BINARY)
                    s.received.append(data)
                    s.got.set()
            except ConnectionClosed as e:
                s.close_code = e.rcvd.code if e.rcvd is not None else None
            finally:
                s.closed.set()
        except ConnectionClosed:
            pass


async def attached_session(fake: FakePbx, settings_for, start_bridge, hw: str, **settings):
    """A bridge with the one device ``hw`` on ``fake`` (``settings``: more of its settings); the
    bridge, the fake's first session and the device's runner, once the device is attached."""
    from tests.faults.helpers import eventually

    bridge = await start_bridge(settings_for(None, pbx_url=fake.url, pbx_password=next(iter(fake.passwords.values())),
                                             devices=hw, **settings))
    sess = await fake.wait_session()
    runner = bridge.pbx.runners[hw]
    await eventually(lambda: runner.device.attached, 5, "the device attached")
    return bridge, sess, runner

