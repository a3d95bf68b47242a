"""The simulated PBX: a WebSocket server speaking AppWebsocket + EpSignal (EPSIGNAL.md section 4).

It holds the devices, the application sessions and the calls, answers login and Attach, and
routes each call's messages through the application that is attached to the device.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque
from typing import TYPE_CHECKING, Any, Literal

from msgspec import UNSET
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response
from websockets.uri import parse_uri

from bridge.protocol.messages import MAX_FRAME_BYTES, Attached, Detached, Remote, encode
from bridge.sim import calls as _calls
from bridge.sim.calls import Call, Outcome, Scenario
from bridge.sim.config import SimConfig, hw_id, remote_dn, remote_sip
from bridge.sim.devices import Device
from bridge.sim.faults import Faults
from bridge.sim.session import Session
from bridge.sim.stats import Counters, RttWindow

if TYPE_CHECKING:
    from aiohttp import web

PATH = "/PBX0/APPS/websocket"
#: ended calls whose record (what each end received) the simulator keeps, the newest
CALL_HISTORY = 1000


class PbxSimulator:
    """See the package docstring; start() it, stop() it."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.faults = Faults()
        self.counters = Counters()
        #: the device of every stalled call, in order (which replica's devices stalled, in tests)
        self.stalled_hw: list[str] = []
        #: the device of every Attach refused as "already attached", in order
        self.conflict_hw: list[str] = []
        self.rtt = RttWindow()
        self.url: str | None = None
        self.control_url: str | None = None
        self.rng = random.Random(self.config.seed)
        cfg = self.config
        self.devices: dict[str, Device] = {}
        for i in range(1, cfg.devices + cfg.unregistered + 1):
            d = Device(i, registered=i <= cfg.devices)
            self.devices[d.hw] = d
        for i, hw in enumerate(cfg.extra_hw, start=cfg.devices + cfg.unregistered + 1):
            self.devices[hw] = Device(i, registered=True, hw=hw)
        #: registered devices, for O(1) random choice (swap-remove on unregister)
        self._registered: list[Device] = [d for d in self.devices.values() if d.registered]
        self._reg_pos: dict[str, int] = {d.hw: i for i, d in enumerate(self._registered)}
        #: positive-id calls by id (negative ids live only in their device's calls)
        self._calls: dict[int, Call] = {}
        #: the last CALL_HISTORY ended calls, oldest first (their records stay queryable)
        self._ended: deque[Call] = deque(maxlen=CALL_HISTORY)
        self._last_id = 0
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._sessions: set[Session] = set()
        self._server: Server | None = None
        self._control: web.AppRunner | None = None
        self._tasks: set[asyncio.Task] = set()
        self._running = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle
    async def start(
        self, host: str = "127.0.0.1", port: int = 0, control_port: int | None = None,
        control_host: str | None = None,
    ) -> None:
        """Listen (port 0: a free port); the control API too if ``control_port`` is given."""
        if self._running or self._stopped:
            raise RuntimeError("a simulator starts once")
        self._server = await serve(
            self._handler, host, port, process_request=self._process_request,
            compression=None, max_size=MAX_FRAME_BYTES + 1024, max_queue=64,
            ping_interval=None,
        )
        bound = self._server.sockets[0].getsockname()
        self.url = f"ws://{_hostport(host, bound[1])}{PATH}"
        self._running = True
        if control_port is not None:
            from bridge.sim.control import start_control

            self._control, self.control_url = await start_control(
                self, control_host or host, control_port)
        if self.config.call_rate > 0:
            from bridge.sim.traffic import random_traffic

            self._spawn(random_traffic(self))

    async def stop(self) -> None:
        """Close everything and cancel all traffic. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._running = False
        for t in list(self._tasks):
            t.cancel()
        calls = [c for d in self.devices.values() for c in d.calls.values()]
        for c in calls:
            c.abort()
        tasks = [c.task for c in calls if c.task is not None]
        await asyncio.gather(*self._tasks, *tasks, return_exceptions=True)
        for s in list(self._sessions):
            if s.outbound:
                s.abort()
        if self._server is not None:
            self._server.close(close_connections=True)
            try:
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
            except TimeoutError:
                for s in list(self._sessions):
                    s.abort()
        if self._control is not None:
            await self._control.cleanup()
            self._control = None

    # the faults, also as attributes of the simulator
    @property
    def refuse_logins(self) -> bool:
        return self.faults.refuse_logins

    @refuse_logins.setter
    def refuse_logins(self, value: bool) -> None:
        self.faults.refuse_logins = bool(value)

    @property
    def delay_ms(self) -> int:
        return self.faults.delay_ms

    @delay_ms.setter
    def delay_ms(self, value: int) -> None:
        if value < 0:
            raise ValueError("delay_ms must not be negative")
        self.faults.delay_ms = int(value)

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    @staticmethod
    def _process_request(conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != PATH:
            return conn.respond(404, f"no such path; the AppWebsocket is at {PATH}\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        await Session(self, ws, outbound=False).serve()

    # ------------------------------------------------------------------ stats, lookups
    def stats(self) -> dict[str, Any]:
        c = self.counters
        out: dict[str, Any] = {
            "sessions": sum(1 for s in self._sessions if s.logged_in),
            "logins_ok": c.logins_ok,
            "logins_failed": c.logins_failed,
            "attached_devices": sum(len(s.devices) for s in self._sessions),
            "registered_devices": len(self._registered),
            "calls_started": c.calls_started,
            "calls_completed": c.calls_completed,
            "calls_stalled": c.calls_stalled,
            "calls_aborted": c.calls_aborted,
            "calls_active": self._active,
            "app_calls": c.app_calls,
            "messages_forwarded": c.messages_forwarded,
            "messages_injected": c.messages_injected,
            "bad_frames": c.bad_frames,
            #: frames the application sent as binary frames (handled like text frames)
            "binary_frames": c.binary_frames,
            #: sessions failed (close 1007) for a text frame that was not valid UTF-8
            "invalid_utf8": c.invalid_utf8,
            "bad_signaling": c.bad_signaling,
            "late_signaling": c.late_signaling,
            "attach_conflicts": c.attach_conflicts,
            "forward_rtt_us": self.rtt.summary(),
        }
        return out

    def hw(self, index: int) -> str:
        """The hw id of device ``index`` (1-based)."""
        return hw_id(index)

    def device(self, hw: str) -> Device:
        """The device with this hw id; KeyError names an unknown one."""
        try:
            return self.devices[hw]
        except KeyError:
            raise KeyError(f"unknown device {hw!r}") from None

    def device_info(self, hw: str) -> dict[str, Any]:
        d = self.device(hw)
        return {
            "hw": d.hw, "ext": d.ext, "registered": d.registered, "attached": d.session is not None,
            "calls": [c.snapshot() for c in d.calls.values()],
        }

    def call_records(self, hw: str) -> list[dict[str, Any]]:
        """What each end of the device's calls received: the ended calls still kept
        (CALL_HISTORY over all devices), then the running ones; see ``Call.record``."""
        d = self.device(hw)
        ended = [c for c in self._ended if c.device is d]
        return [c.record(d.hw) for c in (*ended, *d.calls.values())]

    def call_record(self, hw: str, call_id: int) -> dict[str, Any]:
        """One call's record (running, or ended and still kept); KeyError if none."""
        d = self.device(hw)
        c = d.calls.get(call_id)
        if c is None:
            c = next((c for c in reversed(self._ended) if c.device is d and c.id == call_id), None)
        if c is None:
            raise KeyError(f"no call {call_id} of device {hw!r} (running or among the last "
                           f"{CALL_HISTORY} ended)")
        return c.record(d.hw)

    def received(self, call_id: int) -> dict[str, list]:
        """The sigs each end of call ``call_id`` (started by the PBX) received, in order:
        ``{"device": [...], "pbx": [...]}`` (running, or among the last CALL_HISTORY ended;
        empty lists for another id)."""
        c = self._calls.get(call_id) or next(
            (c for c in reversed(self._ended) if c.id == call_id), None)
        if c is None:
            return {"device": [], "pbx": []}
        rec = c.record(c.device.hw)
        return {"device": rec["device"], "pbx": rec["pbx"]}

    @property
    def last_call_id(self) -> int:
        """The id of the last call the PBX started (ids count up from 1)."""
        return self._last_id

    def call(self, call_id: int) -> Call | None:
        """A running call started by the PBX (positive id)."""
        return self._calls.get(call_id)

    async def wait_call_state(self, call_id: int, state, timeout: float) -> None:
        """Until call ``call_id`` is in ``state`` (a CallState); TimeoutError, LookupError."""
        c = self._calls.get(call_id)
        if c is None:
            raise LookupError(f"no running call {call_id}")
        async with asyncio.timeout(timeout):
            await c.wait_state(state)

    async def wait_idle(self, timeout: float) -> None:
        """Until no call is active; TimeoutError after ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()

    # ------------------------------------------------------------------ devices
    def register(self, hw: str) -> None:
        d = self.device(hw)
        if d.registered:
            return
        d.registered = True
        self._reg_pos[d.hw] = len(self._registered)
        self._registered.append(d)
        if d.session is not None:
            self.announce(d)

    def unregister(self, hw: str) -> None:
        d = self.device(hw)
        if not d.registered:
            return
        d.registered = False
        pos = self._reg_pos.pop(d.hw)
        last = self._registered.pop()
        if last is not d:
            self._registered[pos] = last
            self._reg_pos[last.hw] = pos
        if d.session is not None:
            d.session.post(encode(Detached(src=d.src)))
        for c in d.calls.values():
            c.flush()

    def announce(self, d: Device) -> None:
        """Attached, and one Sync per call of the device."""
        s = d.session
        assert s is not None  # announced when attached
        s.post(encode(Attached(src=d.src)))
        for c in d.calls.values():
            s.post(c.sync_frame(d.src))

    def random_registered(self) -> Device | None:
        return self.rng.choice(self._registered) if self._registered else None

    # ------------------------------------------------------------------ calls
    async def place_call(
        self, hw: str, direction: Literal["in", "out"] = "in", remote: str = "201", answer: bool = True,
        hold_s: float = 1.0, busy: bool = False, hold: bool = False,
        transfer_to: str | None = None, hangup: Literal["remote", "device"] = "remote",
    ) -> int:
        """Start one scripted call of device ``hw``; its call id at once (the call runs in a task).

        KeyError: unknown device; ValueError: a bad argument, or the device is not registered.
        """
        d = self.device(hw)
        sc = Scenario(direction=direction, remote=remote, answer=answer, hold_s=hold_s, busy=busy,
                      hold=hold, transfer_to=transfer_to, hangup=hangup)
        if not d.registered:
            raise ValueError(f"device {hw!r} is not registered")
        if not self._running:
            raise RuntimeError("the simulator is not running")
        return self.start_call(d, sc)

    def start_call(self, d: Device, sc: Scenario) -> int:
        self._last_id += 1
        cid = self._last_id
        call = Call(self, cid, d, incoming=sc.direction == "in",
                    remote=Remote(num=sc.remote, sip=remote_sip(sc.remote),
                                  dn=remote_dn(sc.remote)))
        self._calls[cid] = call
        self.begin(call, lambda c: _calls.scripted(c, sc))
        return cid

    def begin(self, call: Call, script) -> None:
        call.device.calls[call.id] = call
        self.counters.calls_started += 1
        self._active += 1
        self._idle.clear()
        call.task = asyncio.create_task(call.run(script))
        # a task cancelled before it ran never reaches run()'s own accounting
        call.task.add_done_callback(lambda _t: self.call_finished(call, "aborted"))

    def call_finished(self, call: Call, outcome: Outcome) -> None:
        d = call.device
        if d.calls.pop(call.id, None) is None:
            return
        if call.id > 0:
            self._calls.pop(call.id, None)
        call.outcome = outcome
        self._ended.append(call)
        c = self.counters
        if outcome == "completed":
            c.calls_completed += 1
        elif outcome == "stalled":
            c.calls_stalled += 1
            self.stalled_hw.append(d.hw)
        else:
            c.calls_aborted += 1
        self._active -= 1
        if self._active == 0:
            self._idle.set()

    # ------------------------------------------------------------------ sessions
    def session_opened(self, s: Session) -> None:
        self._sessions.add(s)

    def session_closed(self, s: Session) -> None:
        """The session ended (any way): its devices are detached, their calls flow directly."""
        self._sessions.discard(s)
        for d in s.devices.values():
            if d.session is s:
                d.session = None
                d.src = UNSET
            for c in list(d.calls.values()):
                if c.app and c.session is s:
                    c.abort()
                else:
                    c.flush()
        s.devices.clear()
        s.by_src.clear()

    async def drop_sessions(self) -> int:
        """Cut every application session (TCP abort, no close frame); the number cut."""
        sessions = list(self._sessions)
        for s in sessions:
            s.abort()
        for s in sessions:
            try:
                async with asyncio.timeout(5):
                    await s.closed.wait()
            except TimeoutError:
                pass
        return len(sessions)

    async def send_garbage(self, count: int) -> int:
        """Send ``count`` malformed frames to every session; the number of frames sent."""
        from bridge.sim.faults import garbage_frames

        frames = garbage_frames(count)
        sessions = [s for s in self._sessions if not s._closing]
        for s in sessions:
            for f in frames:
                s.post(f)
        return len(frames) * len(sessions)

    async def connect(self, url: str, app: str, password: str) -> None:
        """Server mode: connect out to the application as the PBX's App object (in a task).

        Returns at once; the task logs in, serves EpSignal on the session, and reconnects with
        a back-off of 1 s doubling to 32 s while the simulator runs.
        """
        if not self._running:
            raise RuntimeError("start the simulator first")
        parse_uri(url)  # raises InvalidURI now rather than in the task
        from bridge.sim.outbound import run_outbound

        self._spawn(run_outbound(self, url, app, password))


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
