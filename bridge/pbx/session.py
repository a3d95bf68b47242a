"""One AppWebsocket session that carries EpSignal, and the login on it.

:class:`PbxSession` reads frames, **forwards every Signaling message the PBX sends before
anything else happens to it** (the same bytes, back in the same direction: that is what keeps
the call going), then hands the decoded frame to its :class:`~bridge.device.Device` (chosen by
``src``) and passes the events it returns to ``emit``, which only appends to the publisher's
buffer. Nothing on this path waits on the broker.

Calls the application started (negative ids) end at the application: their messages are
published, not forwarded (EPSIGNAL decision, see docs/DESIGN.md).

Frames are taken in the event loop's callback that read them, so a forward never waits behind
other work the loop has queued (:mod:`bridge.pbx.connection`). A frame is forwarded as the kind
of frame it came as: text as text, binary as binary. Text frames are not checked for UTF-8 on
this path (it would cost a decode per frame): the bytes go back as they came, so the bridge
never makes a frame invalid that was not.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from contextlib import nullcontext
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import msgspec

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request, Response

from bridge import intercept as ic
from bridge import tracing
from bridge.device import Device
from bridge.pbx.connection import PbxConnection
from bridge.metrics import FORWARD_SECONDS, FRAMES as STATS
from bridge.events import Outgoing
from bridge.protocol import messages as m
from bridge.protocol.errors import FrameError
from bridge.protocol.login import ClientLogin, LoginFailed, ServerLogin

if TYPE_CHECKING:
    from bridge.amqp.intercept import Interceptor, Session

log = logging.getLogger("bridge.pbx")

Emit = Callable[[Outgoing], None]

#: time after a (re-)attach for the PBX's Sync messages to arrive (EpSignal marks no end of Sync)
SETTLE_S = 2.0


async def _recv(ws: PbxConnection, timeout: float, max_bytes: int) -> m.Frame:
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that arrives just
    # after its inner future finished (a stopped runner then went on attaching; fixed in 3.12)
    async with asyncio.timeout(timeout):
        data = await ws.recv(decode=False)
    return m.decode(data, max_bytes)


async def _expect(ws: PbxConnection, kind: type, timeout: float, max_bytes: int):
    msg = await _recv(ws, timeout, max_bytes)
    if type(msg) is not kind:
        raise FrameError("invalid", f"expected {kind.__name__} during login, got {type(msg).__name__}")
    return msg


async def login_as_client(ws: PbxConnection, app: str, password: str, timeout: float, max_bytes: int) -> None:
    """Log in to the PBX (client mode). Raises LoginFailed on a refused login."""
    lg = ClientLogin(app, password)
    await ws.send(m.encode(lg.start()), text=True)
    challenge = await _expect(ws, m.AppChallengeResult, timeout, max_bytes)
    await ws.send(m.encode(lg.on_challenge(challenge)), text=True)
    lg.on_result(await _expect(ws, m.AppLoginResult, timeout, max_bytes))


async def login_as_server(ws: PbxConnection, app: str, password: str, timeout: float, max_bytes: int) -> str:
    """Verify the login of a PBX App object that connected in (server mode)."""
    lg = ServerLogin({app: password})
    req = await _expect(ws, m.AppChallenge, timeout, max_bytes)
    await ws.send(m.encode(lg.on_challenge_request(req)), text=True)
    login = await _expect(ws, m.AppLogin, timeout, max_bytes)
    result = lg.on_login(login)
    await ws.send(m.encode(result), text=True)
    if not result.ok:
        raise LoginFailed(f"PBX login as {login.app!r} refused: wrong app name or password")
    return login.app


#: stand-ins for a finished handshake (websockets tests ``request``/``response`` for None to know
#: whether the handshake is done, so they cannot just be dropped)
_DONE_REQUEST = Request("/", Headers())
_DONE_RESPONSE = Response(101, "Switching Protocols", Headers())


def _forget_handshake(ws) -> None:
    """The handshake is over: its HTTP request and response (their headers, ~3.7 kB per
    session) are read by nothing any more; 10,000 sessions would keep ~37 MB of them."""
    if isinstance(getattr(ws, "request", None), Request):
        ws.request = _DONE_REQUEST
    if isinstance(getattr(ws, "response", None), Response):
        ws.response = _DONE_RESPONSE


class PbxSession:
    """One AppWebsocket session carrying EpSignal for one device (client mode) or all of them
    (server mode): reads, forwards, hands frames to their devices, sends on their behalf."""

    def __init__(self, ws: PbxConnection, emit: Emit, max_bytes: int,
                 intercept: Interceptor | None = None) -> None:
        """``intercept``: the bridge's intercept adapter (None: nothing is ever held here)."""
        _forget_handshake(ws)
        self.ws = ws
        self.emit = emit
        self.max_bytes = max_bytes
        #: src -> device; the src of our Attach is the hw id
        self.devices: dict[str, Device] = {}
        self._results: dict[str, asyncio.Future] = {}
        self._attached: dict[str, asyncio.Future] = {}  # hw -> resolved by its Attached
        self.closed = asyncio.get_running_loop().create_future()
        self.reader: asyncio.Task | None = None
        self.intercept = intercept
        #: the messages held for a verdict (intercept mode; None: off)
        self.gate: ic.Gate | None = intercept.gate() if intercept is not None else None
        #: the releases to carry out, in order, and the task doing it
        self._steps: deque[list[ic.Step]] = deque()
        self._carrier: asyncio.Task | None = None
        if intercept is not None:
            intercept.sessions.add(cast("Session", self))  # it has a gate: intercept is on
        ws.take(self._frame)  # from now on (and those that came with the login's last frame)

    async def attach(self, device: Device, timeout: float) -> m.AttachResult:
        """Send Attach for ``device`` and wait for its AttachResult."""
        self.devices[device.hw] = device
        fut = self._results[device.hw] = asyncio.get_running_loop().create_future()
        ok = False
        try:
            await self.ws.send(m.encode(m.Attach(hw=device.hw, src=device.hw)), text=True)
            async with asyncio.timeout(timeout):  # not wait_for: see _recv
                result = await fut
            ok = not result.failed
            return result
        finally:
            self._results.pop(device.hw, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # the session closed while the Attach was sent: the send's own error says it
            if not ok:
                self.devices.pop(device.hw, None)

    async def wait_attached(self, device: Device, timeout: float) -> bool:
        """Whether ``device`` is attached, waiting up to ``timeout`` for the PBX's Attached (a
        registered device's follows its AttachResult at once)."""
        if not device.attached and not self.closed.done():
            fut = self._attached.get(device.hw)
            if fut is None:
                fut = self._attached[device.hw] = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(fut)
            except TimeoutError:
                pass
            finally:
                if self._attached.get(device.hw) is fut and fut.done():
                    del self._attached[device.hw]
        return device.attached

    async def send_signaling(self, device: Device, call: int, to: bool, sig) -> None:
        frame = m.Signaling(call=call, sig=sig, to=True if to else m.UNSET, src=device.hw)
        span = tracing.send_span(device, call, frame.signal.type) if tracing.ENABLED else nullcontext()
        with span:
            await self.ws.send(m.encode(frame), text=True)
            for ev in device.on_sent(call, to, sig):
                self.emit(ev)

    async def run(self) -> None:
        """Wait for the connection to end (its messages are taken from the session's start, in
        the event loop's callbacks: :meth:`_frame`); then every waiter learns of it
        (:meth:`_reader_ended`)."""
        try:
            await self.ws.wait_closed()
        finally:
            self.ws.take(None)
            self._reader_ended()

    def _frame(self, data: bytes, binary: bool) -> None:
        """One message from the PBX, in the event loop's callback that read it
        (:meth:`PbxConnection.take`): count and decode (:meth:`_bad_frame` for one that is not
        a frame); **forward first** (a Signaling message of a PBX call, unless the intercept
        gate takes it: :meth:`_offer`), before the loop runs anything else; then
        :meth:`_deliver` (demultiplex by ``src``, answer a waiting attach, the device's events,
        traced or not, emitted). Forward inline, ``_deliver`` the one call after it: a step of
        its own would cost a call per frame. A bug here closes the session (1011; it
        reconnects) rather than leave the PBX's calls unanswered."""
        try:
            t0 = time.perf_counter_ns()
            STATS.frames_in += 1
            try:
                msg = m.decode(data, self.max_bytes)
            except FrameError as e:
                self._bad_frame(e)
                return
            took = None  # ns from read to forwarded; None: not forwarded
            if type(msg) is m.Signaling and msg.call >= 0:
                # intercept mode: one test while no device has rules and nothing is held, a set
                # lookup for a device without rules while others have some
                gate = self.gate
                if gate is not None and (gate.calls or (gate.rules.on and (
                        gate.rules.everyone or msg.src in gate.rules.watch or msg.src is m.UNSET))) \
                        and self._offer(msg, data, binary):
                    return  # held or queued: forwarded (and its events made) when released
                # forward first, unchanged, the same kind; not sent (False) when the PBX's
                # close came in the same read: published all the same, the PBX said it
                if self.ws.forward(data, binary):
                    took = time.perf_counter_ns() - t0
                    STATS.forwarded += 1
                    FORWARD_SECONDS.observe(took / 1e9)
            self._deliver(msg, t0, took)
        except Exception:  # a bug must not leave the PBX's calls waiting on an unread socket
            log.exception("PBX session failed on a frame; closing the session (it will reconnect)")
            self.ws.fail(CloseCode.INTERNAL_ERROR, "internal error")

    def _bad_frame(self, e: FrameError) -> None:
        """Not a frame the bridge reads: counted, logged at 1, 2, 4, 8, ... (no flood)."""
        stats = STATS
        stats.bad_frames += 1
        if stats.bad_frames & (stats.bad_frames - 1) == 0:
            log.warning("bad frame from PBX (%d so far): %s", stats.bad_frames, e)

    def _deliver(self, msg, t0: int, took: int | None) -> None:
        """After the forward: the frame's device (by ``src``; a session with one device takes
        frames without it), the attach waiting for an AttachResult or Attached, then the
        device's events, emitted (under the frame's span, with tracing: it starts when the
        frame was read, ``t0``; ``took``: ns until it was forwarded, None if it was not)."""
        src, devices = msg.src, self.devices
        if isinstance(src, str):  # _device_for, inline: one call less per frame on the hot path
            dev = devices.get(src)
        elif len(devices) == 1:  # a PBX that does not echo src: the one device of the session
            dev = next(iter(devices.values()))
        else:
            return
        if dev is None:
            return
        if type(msg) is not m.Signaling:
            self._answer(dev.hw, msg)
        if tracing.ENABLED:
            wall0 = time.time_ns() - (time.perf_counter_ns() - t0)
            self._traced(dev, msg, wall0, wall0 + took if took is not None else None)
            return
        emit = self.emit
        for ev in dev.on_frame(msg):
            emit(ev)

    def _reader_ended(self) -> None:
        """The connection ended: held messages are dropped, every waiter learns of it."""
        if self.gate is not None:
            self._lost()
        err = ConnectionError("PBX session closed")
        for fut in self._results.values():
            if not fut.done():
                fut.set_exception(err)
        for fut in self._attached.values():
            if not fut.done():
                fut.set_result(None)
        if not self.closed.done():
            self.closed.set_result(None)

    # ------------------------------------------------------------------ intercept mode
    def _offer(self, msg: m.Signaling, data: bytes, binary: bool) -> bool:
        """Offer a message about to be forwarded to the gate: True if it took it (held, or
        queued behind a held message of its call)."""
        dev = self._device_for(msg)
        if dev is None:
            return False
        gate = self.gate
        assert gate is not None
        sig_type = None
        if gate.rules.table(dev.hw):
            try:
                sig_type = msg.signal.type  # decoded once: the tracker reads the same
            except ValueError:
                pass
        elif not gate.calls:  # a device without rules, and nothing held: the normal path
            return False
        r = gate.offer(dev.hw, msg.call, msg.to is True, sig_type, msg.sig, (msg, data, binary, dev),
                       asyncio.get_running_loop().time())
        if r is ic.PASS:
            return False
        if r is not ic.QUEUED:
            self.carry(r)
        return True

    def carry(self, steps: list[ic.Step]) -> None:
        """Carry out a gate's steps (releases to send, holds to request), after those before
        them, on one task per session: never on the reader."""
        if not steps:
            return
        self._steps.append(steps)
        if self._carrier is None:
            self._carrier = asyncio.get_running_loop().create_task(self._carry_out())

    async def _carry_out(self) -> None:
        gate, queue = self.gate, self._steps
        assert gate is not None and self.intercept is not None
        try:
            while queue:
                steps = queue.popleft()
                calls: dict[tuple[str, int], None] = {}
                for step in steps:
                    msg, _data, _binary, dev = step.item
                    calls[(dev.hw, msg.call)] = None
                    if type(step) is ic.Hold:
                        self.intercept.request(cast("Session", self), step, dev)
                    else:
                        await self._release(cast(ic.Release, step))
                # a call is settled (free again) only when none of its releases waits here: a
                # hold decided meanwhile (a lost broker, a stop) queued its release behind
                waiting = {(s.item[3].hw, s.item[0].call) for later in queue for s in later}
                now = asyncio.get_running_loop().time()
                for key in calls:
                    if key not in waiting:
                        more = gate.settle(key[0], key[1], now)
                        if more:
                            queue.appendleft(more)
        except ConnectionClosed:
            queue.clear()  # the reader ends too: the gate's holds are dropped there
        except Exception:
            log.exception("carrying out intercept decisions failed; closing the session")
            queue.clear()
            await self.ws.close(1011, "internal error")
        finally:
            self._carrier = None

    async def _release(self, r: ic.Release) -> None:
        msg, data, binary, dev = r.item
        token = self._ended(r, dev) if r.hold is not None else None
        try:
            action = r.action
            if action == ic.DROPPED:
                return
            if action == ic.REPLACED:
                msg = msgspec.structs.replace(msg, sig=r.sig)
                data, binary = m.encode(msg), False
            if action != ic.REJECTED:
                await self.ws.send(data, text=not binary)
                STATS.forwarded += 1
            for ev in dev.on_frame(msg):
                self.emit(ev)
            if action == ic.REJECTED:  # a release back the way the message came
                to = msg.to is not True
                rel = m.Signaling(call=msg.call, sig=ic.rel_sig(r.cause or ic.DEFAULT_CAUSE),
                                  to=True if to else m.UNSET, src=msg.src)
                await self.ws.send(m.encode(rel), text=True)
                for ev in dev.on_sent(msg.call, to, rel.sig, origin="intercept"):
                    self.emit(ev)
        finally:
            if token is not None:
                tracing.detach(token)

    def _lost(self) -> None:
        """The session ended: its holds are dropped (nothing to send them to)."""
        gate, ix = self.gate, self.intercept
        assert gate is not None and ix is not None
        ix.sessions.discard(self)
        self._steps.clear()
        for r in gate.lost(asyncio.get_running_loop().time()):
            token = self._ended(r, r.item[3])
            if token is not None:
                tracing.detach(token)

    def _ended(self, r: ic.Release, dev: Device):
        """A hold ended: counted, its ``call.intercepted`` event made (under its span, with
        tracing: the context token the caller detaches when the message's own events are made)."""
        h = r.hold
        assert h is not None and self.intercept is not None
        span = self.intercept.ended(r)
        token = tracing.current(span) if span is not None else None
        ev = dev.factory.intercepted(dev.hw, h.call, h.to, h.id, h.sig_type, r.outcome, r.action,  # type: ignore[arg-type]
                                     r.waited * 1000, r.error, r.cause)
        if ev is not None:
            self.emit(ev)
        return token

    async def stop_intercepting(self, timeout: float) -> None:
        """A stop: every held message gets the fail policy now, and is sent (bounded wait)."""
        gate = self.gate
        if gate is None:
            return
        self.carry(gate.drain(ic.STOPPING, asyncio.get_running_loop().time()))
        carrier = self._carrier
        if carrier is not None:
            await asyncio.wait([carrier], timeout=timeout)

    def _answer(self, hw: str, msg) -> None:
        """An AttachResult or Attached someone awaits (resolved before the device sees the
        frame; the waiter runs after it has)."""
        kind = type(msg)
        waiting = (self._results if kind is m.AttachResult else
                   self._attached if kind is m.Attached else None)
        fut = waiting.get(hw) if waiting is not None else None
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _traced(self, dev: Device, msg, start_ns: int, forwarded_ns: int | None) -> None:
        span, token = tracing.enter_frame(dev, msg, start_ns, forwarded_ns)
        try:
            for ev in dev.on_frame(msg):
                self.emit(ev)
        except BaseException as e:
            tracing.exit_frame(span, token, e)
            raise
        tracing.exit_frame(span, token)

    def _device_for(self, msg) -> Device | None:
        src = msg.src
        if isinstance(src, str):
            return self.devices.get(src)
        if len(self.devices) == 1:  # a PBX that does not echo src: the one device of the session
            return next(iter(self.devices.values()))
        return None

    async def close(self) -> None:
        """Close the session; first every held message gets its fail policy (and is sent)."""
        await self.stop_intercepting(1.0)
        await self.ws.close()
