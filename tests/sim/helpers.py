"""A minimal application client for driving the simulator in tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from msgspec import UNSET, Raw
from websockets.asyncio.client import ClientConnection, connect

from bridge.protocol.login import ClientLogin
from bridge.protocol.messages import (
    AppLoginResult,
    Attach,
    Message,
    Signaling,
    decode,
    encode,
)
from bridge.sim import sigs

TIMEOUT = 3.0


async def eventually(pred: Callable[[], bool], timeout: float = TIMEOUT) -> None:
    """For server-side state that has no event of its own (e.g. after a client-side close)."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.005)


class App:
    """One application session: login, attach, receive decoded frames, forward signaling."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        #: (call, direction ">" toward the device / "<" from it, sig type) of every Signaling seen
        self.seen: list[tuple[int, str, str]] = []
        self.sigs: list[Signaling] = []

    @classmethod
    async def open(cls, url: str) -> App:
        return cls(await connect(url, compression=None, open_timeout=TIMEOUT, close_timeout=1))

    @classmethod
    async def logged_in(cls, url: str, app: str = "epsignal", password: str = "secret") -> App:
        self = await cls.open(url)
        result = await self.login(app, password)
        assert result.ok is True
        return self

    async def close(self) -> None:
        await self.ws.close()

    async def send(self, msg: Message) -> None:
        await self.ws.send(encode(msg), text=True)

    async def send_raw(self, data: bytes) -> None:
        await self.ws.send(data, text=True)

    async def recv_raw(self, timeout: float = TIMEOUT) -> bytes:
        async with asyncio.timeout(timeout):
            return await self.ws.recv(decode=False)

    async def recv(self, timeout: float = TIMEOUT):
        return decode(await self.recv_raw(timeout))

    async def login(self, app: str, password: str) -> AppLoginResult:
        login = ClientLogin(app, password)
        await self.send(login.start())
        challenge = await self.recv()
        await self.send(login.on_challenge(challenge))
        result = await self.recv()
        assert isinstance(result, AppLoginResult)
        return result

    async def attach(self, hw: str, src: str | None = None):
        await self.send(Attach(hw=hw, src=src if src is not None else UNSET))
        return await self.recv()

    async def signaling(self, call: int, sig: dict, to: bool) -> None:
        raw = Raw(sigs.encode_sig(sig))
        await self.send(Signaling(call=call, sig=raw, to=True if to else UNSET))

    def record(self, msg: Signaling) -> None:
        self.sigs.append(msg)
        self.seen.append((msg.call, ">" if msg.to is True else "<", msg.signal.type))

    async def forward_all(self) -> None:
        """Forward every Signaling back unchanged (byte for byte) until the connection ends."""
        try:
            while True:
                data = await self.ws.recv(decode=False)
                msg = decode(data)
                if isinstance(msg, Signaling):
                    self.record(msg)
                    await self.ws.send(data, text=True)
        except Exception:  # the connection ended
            pass

    def forwarding(self) -> asyncio.Task:
        return asyncio.create_task(self.forward_all())
