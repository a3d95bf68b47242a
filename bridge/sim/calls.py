"""Calls: the signaling path through the application, and the scripted call scenarios.

A call has two ends: the simulated device and the simulated remote party (the PBX side). A call
is one coroutine that plays both ends in turn; every message it sends awaits delivery to the
other end. With the device in the application's signaling path (attached and registered) a
message goes to the application as a ``Signaling`` (``to`` true: from the remote toward the
device; absent: from the device toward the PBX) and is delivered when the application sends it
back with the same call id and direction; without it, it is delivered at once. A message not
forwarded within ``stall_timeout_s`` stalls the call: the PBX releases it toward the device
(``rel`` cause 102, not waiting for a forward) and the call ends.

Sequences of ``sig.type`` with direction (``>`` toward the device, ``<`` from the device):

============================ ==============================================================
in, answered, hangup remote  >setup <alert <conn >disc <rel
in, answered, hangup device  >setup <alert <conn <disc >rel
in, busy                     >setup <rel(17)
in, no answer                >setup <alert  (ring_s*5)  >rel(16)
out, answered, hangup remote <setup >call_proc >alert >conn >disc <rel
out, answered, hangup device <setup >call_proc >alert >conn <disc >rel
out, busy                    <setup >rel(17)
out, no answer               <setup >call_proc >alert  (ring_s*5)  <rel(16)
hold (after conn)            <facility(hold_notify) (hold_s/2) <facility(retrieve_notify)
transfer (after hold_s)      <facility(ct_initiate) >rel(16)   (instead of the hangup)
============================ ==============================================================

The connected phase lasts ``hold_s``. The application may change what it forwards: the other
end receives what the application sent (each call records what each end received:
``Call.delivered``, see ``record``); a forwarded or injected ``disc``/``rel`` the script did
not send ends the call (``disc``: the receiving end answers ``rel``).

Calls the application starts (negative ids) are answered by the simulated end directly, without
forwarding: toward the PBX ``>call_proc >alert >conn``, toward the device ``<alert <conn``; they
stay connected until the application sends ``disc`` (answered with ``rel``) or ``rel``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from time import perf_counter_ns
from typing import Any, Literal, Protocol

import msgspec
from msgspec import UNSET, Raw, UnsetType

from bridge.protocol.errors import FrameError
from bridge.protocol.messages import CallState, Info, Remote, Signaling, Sync, encode
from bridge.protocol.signal import decode_sig
from bridge.sim import sigs
from bridge.sim.config import SimConfig, remote_dn, remote_sip
from bridge.sim.stats import RttWindow

TO_DEVICE = True
FROM_DEVICE = False
DEVICE_PORT = 5004
REMOTE_PORT = 5006

Outcome = Literal["completed", "stalled", "aborted"]


class AppLink(Protocol):
    """What a call (and a device) needs of an application session
    (:class:`bridge.sim.session.Session`): to send it a frame."""

    def post(self, frame: bytes) -> None: ...


class Line(Protocol):
    """What a call needs of its device (:class:`bridge.sim.devices.Device`)."""

    hw: str
    ext: str
    sip: str
    dn: str
    registered: bool
    #: the application session attached to the device (None: not attached)
    session: AppLink | None
    src: str | UnsetType
    calls: dict[int, Call]


class CallHost(Protocol):
    """What a call needs of the simulator (:class:`bridge.sim.pbx.PbxSimulator`)."""

    config: SimConfig
    rtt: RttWindow

    def call_finished(self, call: Call, outcome: Outcome) -> None: ...


class CallStalled(Exception):
    """A message of the call was not forwarded in time."""


class _EndedByApp(Exception):
    def __init__(self, kind: str, to: bool) -> None:
        self.kind, self.to = kind, to


class Pending:
    """A message sent to the application, waiting for its forward."""

    __slots__ = ("fut", "raw", "t0")

    def __init__(self, fut: asyncio.Future, t0: int, raw: bytes) -> None:
        self.fut, self.t0, self.raw = fut, t0, raw


def signaling_frame(src: str | UnsetType, call: int, raw: bytes, to: bool) -> bytes:
    return encode(Signaling(src=src, call=call, sig=Raw(raw), to=True if to else UNSET))


@dataclass(frozen=True)
class Scenario:
    """One scripted call (the keyword arguments of ``place_call``)."""

    direction: Literal["in", "out"] = "in"
    remote: str = "201"
    answer: bool = True
    hold_s: float = 1.0
    busy: bool = False
    hold: bool = False
    transfer_to: str | None = None
    hangup: Literal["remote", "device"] = "remote"

    def __post_init__(self) -> None:
        if self.direction not in ("in", "out"):
            raise ValueError(f"direction must be 'in' or 'out', not {self.direction!r}")
        if self.hangup not in ("remote", "device"):
            raise ValueError(f"hangup must be 'remote' or 'device', not {self.hangup!r}")
        if not isinstance(self.remote, str) or not self.remote:
            raise ValueError("remote must be a non-empty string")
        t = self.transfer_to
        if t is not None and (not isinstance(t, str) or not t):
            raise ValueError("transfer_to must be a non-empty string or null")
        h = self.hold_s
        if not isinstance(h, (int, float)) or isinstance(h, bool) or h < 0:
            raise ValueError("hold_s must be a number >= 0")
        for name in ("answer", "busy", "hold"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean")


class Call:
    """One call of a device; ``app`` calls were started by the application (negative id)."""

    __slots__ = (
        "_aborting",
        "_interrupt",
        "_pending",
        "_waiters",
        "app",
        "delivered",
        "device",
        "id",
        "in_",
        "outcome",
        "pbx",
        "remote",
        "session",
        "src",
        "state",
        "task",
    )

    def __init__(
        self, pbx: CallHost, call_id: int, device: Line, *, incoming: bool, remote: Remote,
        app_session: AppLink | None = None, app_src: str | UnsetType = UNSET,
    ) -> None:
        self.pbx = pbx
        self.id = call_id
        self.device = device
        self.in_ = incoming
        self.remote = remote
        self.state = CallState.NULL
        self.app = app_session is not None
        #: app calls: the session that started the call, and its src
        self.session = app_session
        self.src = app_src
        self.task: asyncio.Task | None = None
        #: what the ends received, in order: (to, sig bytes); to true: the device received it,
        #: false: the PBX side (the remote party) did. With the application in the path, what
        #: it sent (forwarded, changed or its own); without it, what the other end sent.
        self.delivered: list[tuple[bool, bytes]] = []
        #: how the call ended (None while it runs)
        self.outcome: Outcome | None = None
        #: per direction (index: to), FIFO of messages waiting for their forward
        self._pending: tuple[deque[Pending], deque[Pending]] = (deque(), deque())
        self._interrupt: tuple[str, bool] | None = None
        self._waiters: list[tuple[CallState, asyncio.Future]] | None = None
        self._aborting = False

    # ------------------------------------------------------------------ state
    def set_state(self, state: CallState) -> None:
        self.state = state
        if self._waiters:
            keep = []
            for want, fut in self._waiters:
                if want is state:
                    if not fut.done():
                        fut.set_result(None)
                else:
                    keep.append((want, fut))
            self._waiters = keep

    async def wait_state(self, state: CallState) -> None:
        if self.state is state:
            return
        fut = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append((state, fut))
        await fut

    def sync_frame(self, src: str | UnsetType) -> bytes:
        return encode(Sync(src=src, call=self.id, info=Info(
            channel=-1, in_=self.in_, state=self.state, remote=self.remote)))

    def snapshot(self) -> dict[str, Any]:
        return {
            "call": self.id, "in": self.in_, "state": self.state.value, "app": self.app,
            "remote": {"num": self.remote.num, "sip": self.remote.sip, "dn": self.remote.dn},
        }

    def record(self, hw: str) -> dict[str, Any]:
        """What each end received, for the control API (``GET /devices/<hw>/calls/<id>``):
        ``device``/``pbx`` the sigs in order, ``order`` both ends interleaved as ``">setup"``
        (to the device) / ``"<alert"`` (to the PBX side)."""
        device: list[Any] = []
        pbx: list[Any] = []
        order: list[str] = []
        for to, raw in self.delivered:
            sig = msgspec.json.decode(raw)
            (device if to else pbx).append(sig)
            kind = sig.get("type") if type(sig) is dict else None
            order.append(f"{'>' if to else '<'}{kind}")
        return {
            "call": self.id, "hw": hw, "in": self.in_, "app": self.app,
            "active": self.outcome is None, "outcome": self.outcome, "state": self.state.value,
            "device": device, "pbx": pbx, "order": order,
        }

    # ------------------------------------------------------------------ sending
    async def emit(self, to: bool, sig: sigs.Sig, state: CallState | None = None) -> None:
        """Send one message from one end toward the other (app calls: to the application)."""
        if self.app:
            if state is not None:
                self.set_state(state)
            assert self.session is not None  # an app call has its session
            self.session.post(signaling_frame(self.src, self.id, sigs.encode_sig(sig), to))
        else:
            await self.send(to, sig, state)

    async def send(self, to: bool, sig: sigs.Sig, state: CallState | None = None) -> None:
        """Send through the signaling path; returns when the other end has it."""
        if state is not None:
            self.set_state(state)
        raw = sigs.encode_sig(sig)
        dev = self.device
        session = dev.session
        if session is None or not dev.registered:
            self.delivered.append((to, raw))  # the application is not in the path: directly
            return
        fut = asyncio.get_running_loop().create_future()
        self._pending[to].append(Pending(fut, perf_counter_ns(), raw))
        session.post(signaling_frame(dev.src, self.id, raw, to))
        try:
            async with asyncio.timeout(self.pbx.config.stall_timeout_s):
                delivered = await fut
        except TimeoutError:
            raise CallStalled from None
        if delivered is not raw and bytes(delivered) != raw:
            self._check_changed(sig["type"], delivered, to)

    @staticmethod
    def _check_changed(sent_type: str, delivered: Any, to: bool) -> None:
        try:
            kind = decode_sig(delivered).type
        except FrameError:
            return
        if kind in ("disc", "rel") and kind != sent_type:
            raise _EndedByApp(kind, to)

    def forwarded(self, to: bool, sig: Raw) -> bool:
        """The application forwarded a message in direction ``to``; False if none was waiting.

        A message dropped by an interruption (the application ended the call meanwhile) keeps
        its place in the FIFO so that its forward, when it comes, is absorbed instead of being
        taken for the next message; once older than the stall timeout it no longer counts.
        """
        q = self._pending[to]
        now = perf_counter_ns()
        while q:
            p = q.popleft()
            if p.fut.done():
                if now - p.t0 > self.pbx.config.stall_timeout_s * 1e9:
                    continue
                return True
            self.pbx.rtt.add((now - p.t0) // 1000)
            self.delivered.append((to, bytes(sig)))
            p.fut.set_result(sig)
            return True
        return False

    def flush(self) -> None:
        """The application left the path: deliver what waits for a forward directly, now."""
        for to, q in enumerate(self._pending):
            while q:
                p = q.popleft()
                if not p.fut.done():
                    self.delivered.append((bool(to), p.raw))
                    p.fut.set_result(p.raw)

    def inject(self, to: bool, kind: str) -> None:
        """A message the application sent on its own (no forward pending) reached one end."""
        if kind not in ("disc", "rel") or self.task is None or self.task.done():
            return
        if self._interrupt is None:
            self._interrupt = (kind, to)
            self.task.cancel()
        elif kind == "rel":
            self._interrupt = (kind, to)

    def abort(self) -> None:
        """End the call at once (simulator stopping, app call whose session closed)."""
        self._aborting = True
        if self.task is not None:
            self.task.cancel()

    def _drop_pending(self) -> None:
        """Give up waiting for the forwards in flight (their entries stay: see forwarded)."""
        for q in self._pending:
            for p in q:
                p.fut.cancel()

    # ------------------------------------------------------------------ running
    async def run(self, script) -> None:
        """Run ``script(call)`` to its end and account for the outcome."""
        outcome: Outcome = "aborted"
        try:
            end: tuple[str, bool] | None = None
            first = True
            while True:
                try:
                    if first:
                        first = False
                        await script(self)
                    elif end is not None:
                        kind, to = end
                        end = None
                        self._drop_pending()
                        if kind == "disc":  # the end that got the disc answers rel
                            await self.emit(not to, sigs.rel())
                    break
                except _EndedByApp as e:
                    end = (e.kind, e.to)
                except asyncio.CancelledError:
                    if self._interrupt is None or self._aborting:
                        raise
                    task = asyncio.current_task()
                    assert task is not None  # run() is a task's coroutine
                    task.uncancel()
                    end, self._interrupt = self._interrupt, None
            outcome = "completed"
        except CallStalled:
            outcome = "stalled"
            self._release_stalled()
        finally:
            for q in self._pending:
                for p in q:
                    p.fut.cancel()
                q.clear()
            ended = f"call {self.id} ended in state {self.state.value}"
            for _, fut in self._waiters or ():
                if not fut.done():
                    fut.set_exception(LookupError(ended))
            self._waiters = None
            self.pbx.call_finished(self, outcome)

    def _release_stalled(self) -> None:
        dev = self.device
        if dev.session is not None:
            raw = sigs.encode_sig(sigs.rel(sigs.STALLED, "pbx"))
            dev.session.post(signaling_frame(dev.src, self.id, raw, TO_DEVICE))


# ---------------------------------------------------------------------- scenarios
async def scripted(call: Call, sc: Scenario) -> None:
    """One scripted call of the device (see the module's table)."""
    ring = call.pbx.config.ring_s
    dev = call.device
    me = sigs.party(dev.ext, dev.sip)
    other = sigs.party(sc.remote, remote_sip(sc.remote))
    other_dn = remote_dn(sc.remote)
    send = call.send
    if sc.direction == "in":
        await send(TO_DEVICE, sigs.setup(other, me, other_dn, REMOTE_PORT), CallState.SETUP)
        if sc.busy:
            await send(FROM_DEVICE, sigs.rel(sigs.BUSY))
            return
        await send(FROM_DEVICE, sigs.alert(dev.dn, DEVICE_PORT), CallState.ALERT)
        if not sc.answer:
            await asyncio.sleep(ring * 5)
            await send(TO_DEVICE, sigs.rel(sigs.NORMAL))  # the caller gives up
            return
        await asyncio.sleep(ring)
        await send(FROM_DEVICE, sigs.conn(dev.dn, DEVICE_PORT), CallState.CONNECTED)
    else:
        await send(FROM_DEVICE, sigs.setup(me, other, dev.dn, DEVICE_PORT), CallState.SETUP)
        if sc.busy:
            await send(TO_DEVICE, sigs.rel(sigs.BUSY))
            return
        await send(TO_DEVICE, sigs.call_proc(), CallState.CALL_PROC)
        await send(TO_DEVICE, sigs.alert(other_dn, REMOTE_PORT), CallState.ALERT)
        if not sc.answer:
            await asyncio.sleep(ring * 5)
            await send(FROM_DEVICE, sigs.rel(sigs.NORMAL))  # the caller gives up
            return
        await asyncio.sleep(ring)
        await send(TO_DEVICE, sigs.conn(other_dn, REMOTE_PORT), CallState.CONNECTED)

    if sc.hold:
        await send(FROM_DEVICE, sigs.facility({"type": "hold_notify"}))
        await asyncio.sleep(sc.hold_s / 2)
        await send(FROM_DEVICE, sigs.facility({"type": "retrieve_notify"}))
        await asyncio.sleep(sc.hold_s / 2)
    else:
        await asyncio.sleep(sc.hold_s)
    if sc.transfer_to is not None:
        ct = {"type": "ct_initiate", "cd": {"num": sc.transfer_to}}
        await send(FROM_DEVICE, sigs.facility(ct))
        await send(TO_DEVICE, sigs.rel(sigs.NORMAL))
    elif sc.hangup == "remote":
        await send(TO_DEVICE, sigs.disc(), CallState.DISCONNECTED)
        await send(FROM_DEVICE, sigs.rel())
    else:
        await send(FROM_DEVICE, sigs.disc(), CallState.DISCONNECTING)
        await send(TO_DEVICE, sigs.rel())


async def app_toward_pbx(call: Call) -> None:
    """The application called a remote party (setup toward the PBX): the remote answers."""
    ring = call.pbx.config.ring_s
    name = call.remote.dn or ""
    await call.emit(TO_DEVICE, sigs.call_proc(), CallState.CALL_PROC)
    await call.emit(TO_DEVICE, sigs.alert(name, REMOTE_PORT), CallState.ALERT)
    await asyncio.sleep(ring)
    await call.emit(TO_DEVICE, sigs.conn(name, REMOTE_PORT), CallState.CONNECTED)
    await asyncio.get_running_loop().create_future()  # connected until the application ends it


async def app_toward_device(call: Call) -> None:
    """The application called the device (setup toward the device): the device answers."""
    dev = call.device
    if not dev.registered:
        await call.emit(FROM_DEVICE, sigs.rel(sigs.SUBSCRIBER_ABSENT, "pbx"))
        return
    await call.emit(FROM_DEVICE, sigs.alert(dev.dn, DEVICE_PORT), CallState.ALERT)
    await asyncio.sleep(call.pbx.config.ring_s)
    await call.emit(FROM_DEVICE, sigs.conn(dev.dn, DEVICE_PORT), CallState.CONNECTED)
    await asyncio.get_running_loop().create_future()
