"""Server mode: the simulated PBX connects out to the application and logs in."""

from __future__ import annotations

import asyncio
import json

from websockets.asyncio.server import serve

from bridge.protocol.login import ServerLogin
from bridge.protocol.messages import (
    AppChallenge,
    AppLogin,
    Attach,
    Attached,
    AttachResult,
    Signaling,
    decode,
    encode,
)

TIMEOUT = 3.0


class TinyApp:
    """An application in server mode: verifies the PBX's login, then attaches devices."""

    def __init__(self, password: str = "pw", refuse_first: int = 0) -> None:
        self.login = ServerLogin({"epsignal": password})
        self.refuse_first = refuse_first
        self.logins: list[tuple[float, AppLogin, bool]] = []
        self.sessions: asyncio.Queue = asyncio.Queue()

    async def handler(self, ws) -> None:
        login = ServerLogin(self.login._passwords)
        async with asyncio.timeout(TIMEOUT):
            msg = decode(await ws.recv(decode=False))
            assert isinstance(msg, AppChallenge)
            await ws.send(encode(login.on_challenge_request(msg)), text=True)
            msg = decode(await ws.recv(decode=False))
            assert isinstance(msg, AppLogin)
            result = login.on_login(msg)
            if self.refuse_first > 0:
                self.refuse_first -= 1
                result.ok = False
            self.logins.append((asyncio.get_running_loop().time(), msg, result.ok))
            await ws.send(encode(result), text=True)
        if not result.ok:
            await ws.close()
            return
        await self.sessions.put(ws)
        await ws.wait_closed()  # the session lives until either side closes it


async def recv(ws):
    async with asyncio.timeout(TIMEOUT):
        return decode(await ws.recv(decode=False))


async def test_connect_logs_in_and_serves_epsignal(make_sim):
    sim = await make_sim(password="pw")
    app = TinyApp("pw")
    async with serve(app.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        await sim.connect(f"ws://127.0.0.1:{port}/app", "epsignal", "pw")
        async with asyncio.timeout(TIMEOUT):
            ws = await app.sessions.get()
        (_, login, ok), = app.logins
        assert ok is True
        info = json.loads(bytes(login.info))
        assert info["pbx"] == "sim" and info["appobj"] == "epsignal" and info["apps"] == []
        assert {"appdn", "cn"} <= set(info)
        # two devices on the one session
        for i in (1, 2):
            await ws.send(encode(Attach(hw=sim.hw(i), src=f"d{i}")), text=True)
            res = await recv(ws)
            assert isinstance(res, AttachResult) and not res.failed and res.src == f"d{i}"
            att = await recv(ws)
            assert isinstance(att, Attached) and att.src == f"d{i}"
        assert sim.stats()["sessions"] == 1 and sim.stats()["attached_devices"] == 2
        # a call of device 2 goes through this session; forward everything
        call = await sim.place_call(sim.hw(2), hold_s=0.02)
        types = []
        while len(types) < 5:
            data = await asyncio.wait_for(ws.recv(decode=False), TIMEOUT)
            msg = decode(data)
            assert isinstance(msg, Signaling) and msg.call == call and msg.src == "d2"
            types.append(msg.signal.type)
            await ws.send(data, text=True)
        await sim.wait_idle(2)
        assert types == ["setup", "alert", "conn", "disc", "rel"]
        assert sim.stats()["calls_completed"] == 1 and sim.stats()["messages_forwarded"] == 5


async def test_connect_backs_off_after_a_refused_login(make_sim):
    sim = await make_sim(password="pw")
    app = TinyApp("pw", refuse_first=1)
    async with serve(app.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        await sim.connect(f"ws://127.0.0.1:{port}/", "epsignal", "pw")
        async with asyncio.timeout(TIMEOUT):
            ws = await app.sessions.get()
        (t1, _, ok1), (t2, _, ok2) = app.logins
        assert (ok1, ok2) == (False, True)
        assert t2 - t1 >= 0.95  # the first back-off is 1 s, never a tight loop
        await ws.send(encode(Attach(hw=sim.hw(1), src="x")), text=True)
        assert isinstance(await recv(ws), AttachResult)  # the sim serves: it took the login
        s = sim.stats()
        assert (s["logins_failed"], s["logins_ok"]) == (1, 1)


async def test_wrong_password_is_refused_by_the_app(make_sim):
    sim = await make_sim(password="not-the-apps")
    app = TinyApp("pw")
    async with serve(app.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        await sim.connect(f"ws://127.0.0.1:{port}/", "epsignal", "not-the-apps")
        async with asyncio.timeout(TIMEOUT):
            while not app.logins:
                await asyncio.sleep(0.01)
        assert app.logins[0][2] is False


async def test_reconnects_after_the_session_is_cut(make_sim):
    sim = await make_sim(password="pw")
    app = TinyApp("pw")
    async with serve(app.handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        await sim.connect(f"ws://127.0.0.1:{port}/", "epsignal", "pw")
        async with asyncio.timeout(TIMEOUT):
            first = await app.sessions.get()
        await first.send(encode(Attach(hw=sim.hw(1), src="first")), text=True)
        assert isinstance(await recv(first), AttachResult)  # the sim serves this session
        assert await sim.drop_sessions() == 1
        async with asyncio.timeout(TIMEOUT):
            second = await app.sessions.get()
        assert second is not first
        (t1, _, ok1), (t2, _, ok2) = app.logins
        assert ok1 and ok2 and t2 - t1 >= 0.95  # back-off 1 s after the cut
        await second.send(encode(Attach(hw=sim.hw(1), src="again")), text=True)
        res = await recv(second)
        assert isinstance(res, AttachResult) and res.src == "again" and not res.failed
