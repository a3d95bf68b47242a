"""Server mode of the application: the simulated PBX's App object connects out to it.

The simulator connects to the application's URL, sends ``AppChallenge``, logs in with
``AppLogin`` (digest over an ``info`` like a real App object's) and, once ``AppLoginResult`` is
ok, serves EpSignal on that session exactly as on inbound sessions. It reconnects with a
back-off of 1 s doubling to 32 s (reset after a successful login) while the simulator runs; a
refused login backs off the same way, it is never retried in a tight loop.
"""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from bridge.protocol.errors import FrameError
from bridge.protocol.login import ClientLogin, LoginFailed
from bridge.protocol.messages import (
    MAX_FRAME_BYTES,
    AppChallengeResult,
    AppLoginResult,
    decode,
    encode,
)
from bridge.sim.session import Session, SessionHost

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 32.0
LOGIN_TIMEOUT_S = 10.0


def app_login(app: str, password: str) -> ClientLogin:
    """The login a PBX App object named ``app`` sends."""
    info = {"appobj": app, "appdn": app, "pbx": "sim", "cn": app, "apps": []}
    return ClientLogin(app, password, info=info, domain="sim.local", sip=app, dn=app,
                       guid="00000000000000000000009033400000")


async def _login(ws, login: ClientLogin) -> None:
    await ws.send(encode(login.start()), text=True)
    async with asyncio.timeout(LOGIN_TIMEOUT_S):
        msg = decode(await ws.recv())  # a text frame with invalid UTF-8 fails the connection
        if not isinstance(msg, AppChallengeResult):
            raise FrameError("invalid", f"expected AppChallengeResult, got {type(msg).__name__}")
        await ws.send(encode(login.on_challenge(msg)), text=True)
        msg = decode(await ws.recv())
        if not isinstance(msg, AppLoginResult):
            raise FrameError("invalid", f"expected AppLoginResult, got {type(msg).__name__}")
    login.on_result(msg)  # raises LoginFailed


async def run_outbound(pbx: SessionHost, url: str, app: str, password: str) -> None:
    backoff = FIRST_BACKOFF_S
    while True:
        try:
            async with connect(url, compression=None, open_timeout=10, close_timeout=2,
                               ping_interval=None, max_size=MAX_FRAME_BYTES + 1024) as ws:
                try:
                    await _login(ws, app_login(app, password))
                except LoginFailed:
                    pbx.counters.logins_failed += 1
                    raise
                pbx.counters.logins_ok += 1
                backoff = FIRST_BACKOFF_S
                await Session(pbx, ws, outbound=True).serve()
        except (OSError, TimeoutError, WebSocketException, FrameError, LoginFailed):
            pass
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, MAX_BACKOFF_S)
