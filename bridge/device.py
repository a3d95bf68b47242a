"""One device as the bridge sees it: frames in, events out. Pure: no sockets, no broker.

The PBX session hands every frame that belongs to the device to :meth:`Device.on_frame` *after*
it has forwarded it; what comes back is the list of events to publish. Signaling the bridge
sends for a command goes through :meth:`Device.on_sent`, so the call state follows both.

What the device keeps of the PBX's words is bounded (README "Limits"): the calls by
:class:`~bridge.protocol.callstate.CallLimits` (checked after every Signaling and Sync, so no
timer is needed: a call dropped by a bound gets its ``released`` event with ``evicted``), the
strings of a call by the tracker, and each field of the AttachResult (kept, and repeated in
every ``attached`` event) at :data:`MAX_ATTACH_TEXT` characters.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import msgspec
from msgspec import UNSET, Raw, structs

from bridge.events import EventFactory, Outgoing
from bridge.protocol.callstate import CallLimits, CallTracker, cut
from bridge.protocol.errors import FrameError
from bridge.protocol.messages import AttachResult, Attached, CallState, Detached, Signaling, Sync

log = logging.getLogger("bridge.device")

#: longest text kept of one AttachResult field (``err``, ``stun``, ... ; a non-string value
#: longer than this as JSON is kept as its cut JSON text)
MAX_ATTACH_TEXT = 1000


def bounded_result(r: AttachResult) -> AttachResult:
    """``r`` with every field cut to :data:`MAX_ATTACH_TEXT` characters (``r`` itself if none is
    longer: the common case)."""
    changes = {}
    for name in r.__struct_fields__:
        v = getattr(r, name)
        if v is UNSET or v is None or isinstance(v, (bool, int, float)):
            continue
        text = v if isinstance(v, str) else msgspec.json.encode(v).decode()
        if len(text) > MAX_ATTACH_TEXT:
            changes[name] = cut(text, MAX_ATTACH_TEXT)
    return structs.replace(r, **changes) if changes else r

#: the empty set every device shares until it has calls to confirm (an empty set is 216 bytes)
_NONE: frozenset = frozenset()


DEFAULT_LIMITS = CallLimits()


class CallWatcher(Protocol):
    """Told when calls end, so that what an observer keeps per call (bridge.tracing: the context
    of each call's trace) ends with them."""

    def ended(self, call: int) -> None:
        """The call ended: released, dropped by a bound, or not confirmed after a re-attach."""

    def cleared(self) -> None:
        """Every call ended (the PBX said Detached)."""


class Device:
    """One device as the bridge sees it: the PBX session hands it the frames of the device
    (:meth:`on_frame`, after forwarding them) and the Signaling the bridge sent itself
    (:meth:`on_sent`); it keeps the device's attachment and call state and returns the events
    to publish. Pure: no I/O, time only from the injected ``clock``."""

    def __init__(self, hw: str, factory: EventFactory, limits: CallLimits = DEFAULT_LIMITS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.hw = hw
        self.factory = factory
        self.tracker = CallTracker(limits, clock)
        #: the PBX's answer to our Attach (None: not answered yet)
        self.result: AttachResult | None = None
        #: the device is registered and we are in its signaling path
        self.attached = False
        self.bad_sig = 0
        #: told when calls end (bridge.tracing keeps a context per call); None: nobody asks
        self.watcher: CallWatcher | None = None
        #: calls known before the session was lost and not yet confirmed by a Sync since
        self._unconfirmed: set[int] | frozenset = _NONE  # a set only after a session loss

    def on_frame(self, msg) -> list[Outgoing]:
        f = self.factory
        t = type(msg)
        if t is Signaling:
            return self._signaling(msg, "pbx")
        if t is Sync:
            if isinstance(self._unconfirmed, set):  # the shared empty frozenset otherwise
                self._unconfirmed.discard(msg.call)
            return self._bounded(_some(f.call_state(self.hw, self.tracker.sync(msg), sync=True)))
        if t is AttachResult:
            self.result = msg = bounded_result(msg)
            if msg.failed:
                return _some(f.attach_failed(self.hw, msg.err))
            return []
        if t is Attached:
            self.attached = True
            return _some(f.attached(self.hw, self.result or AttachResult()))
        if t is Detached:
            self.attached = False
            if self.watcher is not None:
                self.watcher.cleared()
            return _some(f.detached(self.hw, "unregistered"),
                         *(f.call_state(self.hw, s) for s in self.tracker.release_all()))
        return []

    def on_sent(self, call: int, to: bool, sig: Raw, origin: str = "command") -> list[Outgoing]:
        """A Signaling the bridge sent itself: for a command, or (``intercept``) the release of a
        rejected message."""
        return self._signaling(Signaling(call=call, sig=sig, to=to), origin)

    def on_lost(self, reason: str) -> list[Outgoing]:
        """The session holding the attachment ended (``command``, ``session-lost``, ``shutdown``)."""
        was = self.attached
        self.attached = False
        self.result = None
        self._unconfirmed = {c.call for c in self.tracker.calls()} or _NONE
        return _some(self.factory.detached(self.hw, reason)) if was or reason == "command" else []

    def settle(self) -> list[Outgoing]:
        """After a re-attach and its Syncs: calls known before the loss that no Sync confirmed
        ended while the bridge was away; they get their ``released`` state (cause unknown)."""
        gone, self._unconfirmed = self._unconfirmed, _NONE
        out = []
        for call in sorted(gone):
            status = self.tracker.forget(call)
            if status is not None:
                out += _some(self.factory.call_state(self.hw, status))
                if self.watcher is not None:
                    self.watcher.ended(call)
        return out

    def _signaling(self, msg: Signaling, origin: str) -> list[Outgoing]:
        toward = msg.to is True
        out: list[Outgoing] = []
        if self.factory.signaling_events:
            sig = msg.sig
            try:
                str(sig, "utf-8")  # forwarded as it came, but an event must be valid JSON text
            except UnicodeDecodeError:
                sig = Raw(str(sig, "utf-8", "replace").encode())
            ev = self.factory.signaling(self.hw, msg.call, toward, sig, origin)
            if ev is not None:  # always made when signaling_events
                out.append(ev)
        try:
            status = self.tracker.signaling(msg.call, toward, msg.signal)
        except FrameError as e:
            self.bad_sig += 1
            if self.bad_sig & (self.bad_sig - 1) == 0:  # 1, 2, 4, 8, ...: no flood
                log.warning("device %s call %s: sig not understood, state not tracked (%d so far): %s",
                            self.hw, msg.call, self.bad_sig, e)
            return self._bounded(out)
        if status is not None:
            state_ev = self.factory.call_state(self.hw, status)
            if state_ev is not None:
                out.append(state_ev)
            if status.state is CallState.RELEASED and self.watcher is not None:
                self.watcher.ended(msg.call)
        return self._bounded(out)

    def _bounded(self, out: list[Outgoing]) -> list[Outgoing]:
        """After a message: the calls the tracker's bounds dropped get their ``released`` event."""
        gone = self.tracker.expire()
        if gone:
            for status in gone:
                out += _some(self.factory.call_state(self.hw, status))
                if self.watcher is not None:
                    self.watcher.ended(status.call)
        return out


def _some(*events: Outgoing | None) -> list[Outgoing]:
    """The events made (a kind the deployment does not publish is None)."""
    return [e for e in events if e is not None]
