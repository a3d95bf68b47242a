"""The load generator: a minimal PBX that the bridge attaches to, and that pumps Signaling.

Why not the simulator: its calls are scripts that wait for each forward before the next
message (one message in flight per call), ring and hold for real time, and it numbers devices
up to 9,999; the benchmark needs frames as fast as the bridge takes them, a precise offered
rate, a send stamp in every frame, and 10,000 devices. This is the PBX side reduced to what the
bridge needs: AppWebsocket login (the real :class:`~bridge.protocol.login.ServerLogin`), an
``AttachResult`` + ``Attached`` for every ``Attach``, then Signaling frames of a realistic call
cycle (:mod:`bridge.bench.frames`). The bridge forwards each one back unchanged; the load
generator reads the stamp in the forwarded frame (forwarding latency) and frees a window slot.

Two pumps:

- :meth:`LoadGen.run_closed` (throughput): up to ``window`` frames in flight (sent, not yet
  forwarded back) per session, and at most ``credit`` frames sent whose ``call.signaling`` event
  the consumer has not received yet (the consumer calls :meth:`LoadGen.release`): the offered
  load follows what the whole path delivers, and the bridge's buffer stays bounded.
- :meth:`LoadGen.run_rate` (latency): open loop, frames at a fixed rate round robin over the
  sessions, whatever comes back.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Callable

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from bridge.bench.frames import COMMAND_STAMP, STAMP, FrameMaker, stamp_of
from bridge.protocol import messages as m
from bridge.protocol.errors import FrameError
from bridge.protocol.login import ServerLogin

PATH = "/PBX0/APPS/websocket"
now_ns = time.monotonic_ns


class LgSession:
    """One attached device's session at the load generator: its frame maker and the frames it
    has in flight."""

    __slots__ = ("closed", "hw", "maker", "outstanding", "stamps", "ws")

    def __init__(self, ws: ServerConnection, hw: str, index: int) -> None:
        self.ws = ws
        self.hw = hw
        self.maker = FrameMaker(hw, index)
        self.outstanding = 0
        self.closed = False
        #: send stamps of the frames sent, oldest first (only with ``LoadGen.keep_stamps``)
        self.stamps: deque[int] = deque()


class LoadGen:
    """The minimal PBX of the module docstring: the bridge attaches to it, it pumps frames."""

    def __init__(self, password: str, app: str = "epsignal") -> None:
        self.app = app
        self.password = password
        self.url: str | None = None
        self._server: Server | None = None
        #: attached sessions by hw, and in the order they attached
        self.sessions: dict[str, LgSession] = {}
        self.order: list[LgSession] = []
        self._index = itertools.count()
        # attach progress
        self.connections = 0
        self.login_failures = 0
        self.t_first_connect: int | None = None
        self.t_last_attached: int | None = None
        self._attach_target = 0
        self._attached_ev = asyncio.Event()
        # traffic
        self.sent = 0
        self.forwards = 0
        self.commands = 0
        self.other_frames = 0
        self.send_errors = 0
        #: forwarding round trips (ns) of frames stamped at or after ``record_from``
        self.fwd_rtt: list[int] = []
        self.record_from = 1 << 62
        #: called with (session, forwarded frame, send stamp, time back) for each one recorded,
        #: to sort them (the intercept scenario: by device and message kind)
        self.tap: Callable[[LgSession, bytes, int, int], None] | None = None
        self.cmd_latency: list[int] = []
        self._fwd_target = 1 << 62
        self._fwd_ev = asyncio.Event()
        self._cmd_target = 1 << 62
        self._cmd_ev = asyncio.Event()
        # closed loop
        self._ready: deque[LgSession] | None = None
        self._wake = asyncio.Event()
        self.credit = 0
        #: keep every frame's send stamp per session, for a consumer whose events carry none
        #: (:meth:`stamp_by_key`)
        self.keep_stamps = False

    # ------------------------------------------------------------------ server
    async def start(self, host: str = "127.0.0.1") -> str:
        server = self._server = await serve(
            self._handler, host, 0, compression=None, max_size=m.MAX_FRAME_BYTES + 1024,
            ping_interval=None, max_queue=64, backlog=4096,
        )
        port = server.sockets[0].getsockname()[1]
        self.url = f"ws://{host}:{port}{PATH}"
        return self.url

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            try:
                async with asyncio.timeout(15):
                    await self._server.wait_closed()
            except TimeoutError:
                for s in list(self.sessions.values()):
                    s.ws.transport.abort()

    # ------------------------------------------------------------------ one session
    async def _handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        if self.t_first_connect is None:
            self.t_first_connect = now_ns()
        s: LgSession | None = None
        try:
            s = await self._login_attach(ws)
            if s is None:
                return
            recv, on_forward, on_command = ws.recv, self._on_forward, self._on_command
            while True:
                data = await recv(decode=False)
                t = now_ns()
                stamp = stamp_of(data, STAMP)
                if stamp is not None:
                    on_forward(s, stamp, t, data)
                    continue
                stamp = stamp_of(data, COMMAND_STAMP)
                if stamp is not None:
                    on_command(stamp, t)
                else:
                    self.other_frames += 1
        except ConnectionClosed:
            pass
        finally:
            if s is not None:
                s.closed = True
                if self.sessions.get(s.hw) is s:
                    del self.sessions[s.hw]

    async def _login_attach(self, ws: ServerConnection) -> LgSession | None:
        login = ServerLogin({self.app: self.password})
        while True:
            data = await ws.recv(decode=False)
            try:
                msg = m.decode(data)
            except FrameError:
                self.other_frames += 1
                continue
            if isinstance(msg, m.AppChallenge):
                await ws.send(m.encode(login.on_challenge_request(msg)), text=True)
            elif isinstance(msg, m.AppLogin):
                result = login.on_login(msg)
                await ws.send(m.encode(result), text=True)
                if not result.ok:
                    self.login_failures += 1
                    await ws.close(1008, "login failed")
                    return None
            elif isinstance(msg, m.Attach) and login.app is not None:
                await ws.send(m.encode(m.AttachResult(
                    src=msg.src, stun="stun1.example.net;stun2.example.net", turn="turn.example.net:3478",
                    turnUsr="bench", turnPwd="bench-turn-pw", prefixIntl="000", prefixNtl="00",
                    prefixSubs="0", area="7031", country="49", maxIntern=4, tones=1,
                )), text=True)
                await ws.send(m.encode(m.Attached(src=msg.src)), text=True)
                s = LgSession(ws, msg.hw, next(self._index))
                self.sessions[s.hw] = s
                self.order.append(s)
                self.t_last_attached = now_ns()
                if len(self.sessions) >= self._attach_target:
                    self._attached_ev.set()
                return s
            else:
                self.other_frames += 1

    # ------------------------------------------------------------------ what comes back
    def _on_forward(self, s: LgSession, stamp: int, t: int, data: bytes) -> None:
        self.forwards += 1
        s.outstanding -= 1
        if stamp >= self.record_from:
            self.fwd_rtt.append(t - stamp)
            if self.tap is not None:
                self.tap(s, data, stamp, t)
        if self.forwards >= self._fwd_target:
            self._fwd_ev.set()
        ready = self._ready
        if ready is not None:
            ready.append(s)
            self._wake.set()

    def _on_command(self, stamp: int, t: int) -> None:
        self.commands += 1
        self.cmd_latency.append(t - stamp)
        if self.commands >= self._cmd_target:
            self._cmd_ev.set()

    def release(self) -> None:
        """One ``call.signaling`` event reached the consumer: one more frame may go out."""
        self.credit += 1
        if self._ready:
            self._wake.set()

    # ------------------------------------------------------------------ waiting
    async def wait_attached(self, n: int, timeout: float) -> bool:
        self._attach_target = n
        if len(self.sessions) >= n:
            return True
        self._attached_ev.clear()
        try:
            async with asyncio.timeout(timeout):
                while len(self.sessions) < n:
                    await self._attached_ev.wait()
                    self._attached_ev.clear()
            return True
        except TimeoutError:
            return False

    async def wait_forwards(self, total: int, timeout: float) -> bool:
        """Until ``total`` forwards have come back since the start."""
        self._fwd_target = total
        self._fwd_ev.clear()
        try:
            async with asyncio.timeout(timeout):
                while self.forwards < total:
                    await self._fwd_ev.wait()
                    self._fwd_ev.clear()
            return True
        except TimeoutError:
            return False
        finally:
            self._fwd_target = 1 << 62

    async def wait_commands(self, total: int, timeout: float) -> bool:
        self._cmd_target = total
        self._cmd_ev.clear()
        try:
            async with asyncio.timeout(timeout):
                while self.commands < total:
                    await self._cmd_ev.wait()
                    self._cmd_ev.clear()
            return True
        except TimeoutError:
            return False
        finally:
            self._cmd_target = 1 << 62

    # ------------------------------------------------------------------ pumps
    def stamp_by_key(self, key: str) -> int | None:
        """The send stamp of the oldest frame of the device in routing key ``key``
        (``device.<hw>.call.<n>.state``) not claimed yet."""
        s = self.sessions.get(key.split(".", 2)[1])
        return s.stamps.popleft() if s is not None and s.stamps else None

    def forget_stamps(self) -> None:
        """Drop the send stamps not claimed yet (a new measured run begins)."""
        for s in self.sessions.values():
            s.stamps.clear()

    async def _send(self, s: LgSession) -> bool:
        t = now_ns()
        if self.keep_stamps:
            s.stamps.append(t)
        try:
            await s.ws.send(s.maker.next(t), text=True)
        except ConnectionClosed:
            s.closed = True
            self.send_errors += 1
            return False
        s.outstanding += 1
        self.sent += 1
        return True

    async def run_closed(self, total: int, window: int, credit: int) -> int:
        """Send ``total`` frames, ``window`` in flight per session at most, ``credit`` frames
        ahead of the consumer at most. Returns the monotonic time of the first send (ns)."""
        sessions = [s for s in self.order if not s.closed]
        if not sessions:
            raise RuntimeError("no attached session")
        ready: deque[LgSession] = deque()
        for _ in range(window):
            ready.extend(sessions)
        self._ready = ready
        self.credit = credit
        wake = self._wake
        sent = 0
        t_first = now_ns()
        try:
            while sent < total:
                while ready and sent < total and self.credit > 0:
                    s = ready.popleft()
                    if s.closed:
                        continue
                    if await self._send(s):
                        sent += 1
                        self.credit -= 1
                if sent >= total:
                    break
                if not self.sessions:
                    raise RuntimeError("every session closed during the run")
                wake.clear()
                await wake.wait()
        finally:
            self._ready = None
        return t_first

    async def run_rate(self, fps: float, duration_s: float) -> dict:
        """Open loop: ``fps`` frames per second for ``duration_s``, round robin over sessions."""
        sessions = [s for s in self.order if not s.closed]
        if not sessions:
            raise RuntimeError("no attached session")
        cyc = itertools.cycle(sessions)
        start = now_ns()
        end = start + int(duration_s * 1e9)
        period = 1e9 / fps
        sent = 0
        backlog_max = 0
        base_sent, base_fwd = self.sent, self.forwards
        while True:
            t = now_ns()
            if t >= end:
                break
            due = int((t - start) / period) + 1 - sent
            for _ in range(due):
                if await self._send(next(cyc)):
                    sent += 1
            backlog = (self.sent - base_sent) - (self.forwards - base_fwd)
            if backlog > backlog_max:
                backlog_max = backlog
            delay = (start + sent * period - now_ns()) / 1e9
            await asyncio.sleep(delay if delay > 0 else 0)
        return {"sent": sent, "t_start": start, "t_end": now_ns(), "backlog_max": backlog_max}
