"""One device as the bridge sees it: frames in, events out. Pure: no sockets, no broker.

The PBX session hands every frame that belongs to the device to :meth:`Device.on_frame` *after*
it has forwarded it; what comes back is the list of events to publish. Signaling the bridge
sends for a command goes through :meth:`Device.on_sent`, so the call state follows both.
"""

from __future__ import annotations

import logging

from msgspec import Raw

from bridge.events import EventFactory, Outgoing
from bridge.protocol.callstate import CallTracker
from bridge.protocol.errors import FrameError
from bridge.protocol.messages import AttachResult, Attached, CallState, Detached, Signaling, Sync

log = logging.getLogger("bridge.device")

#: the empty set every device shares until it has calls to confirm (an empty set is 216 bytes)
_NONE: frozenset = frozenset()


class Device:
    def __init__(self, hw: str, factory: EventFactory) -> None:
        self.hw = hw
        self.factory = factory
        self.tracker = CallTracker()
        #: the PBX's answer to our Attach (None: not answered yet)
        self.result: AttachResult | None = None
        #: the device is registered and we are in its signaling path
        self.attached = False
        self.bad_sig = 0
        #: call id -> the context of the call's trace (see bridge.tracing)
        self.trace_ctx: dict = {}
        #: calls known before the session was lost and not yet confirmed by a Sync since
        self._unconfirmed: set[int] | frozenset = _NONE  # a set only after a session loss

    def on_frame(self, msg) -> list[Outgoing]:
        f = self.factory
        t = type(msg)
        if t is Signaling:
            return self._signaling(msg, "pbx")
        if t is Sync:
            if self._unconfirmed:
                self._unconfirmed.discard(msg.call)
            return [f.call_state(self.hw, self.tracker.sync(msg), sync=True)]
        if t is AttachResult:
            self.result = msg
            if msg.failed:
                return [f.attach_failed(self.hw, msg.err)]
            return []
        if t is Attached:
            self.attached = True
            return [f.attached(self.hw, self.result or AttachResult())]
        if t is Detached:
            self.attached = False
            self.trace_ctx.clear()
            out = [f.detached(self.hw, "unregistered")]
            out += [f.call_state(self.hw, s) for s in self.tracker.release_all()]
            return out
        return []

    def on_sent(self, call: int, to: bool, sig: Raw) -> list[Outgoing]:
        return self._signaling(Signaling(call=call, sig=sig, to=to), "command")

    def on_lost(self, reason: str) -> list[Outgoing]:
        """The session holding the attachment ended (``command``, ``session-lost``, ``shutdown``)."""
        was = self.attached
        self.attached = False
        self.result = None
        self._unconfirmed = {c.call for c in self.tracker.calls()} or _NONE
        return [self.factory.detached(self.hw, reason)] if was or reason == "command" else []

    def settle(self) -> list[Outgoing]:
        """After a re-attach and its Syncs: calls known before the loss that no Sync confirmed
        ended while the bridge was away; they get their ``released`` state (cause unknown)."""
        gone, self._unconfirmed = self._unconfirmed, _NONE
        out = []
        for call in sorted(gone):
            status = self.tracker.forget(call)
            if status is not None:
                out.append(self.factory.call_state(self.hw, status))
                self.trace_ctx.pop(call, None)
        return out

    def _signaling(self, msg: Signaling, origin: str) -> list[Outgoing]:
        toward = msg.to is True
        sig = msg.sig
        try:
            str(sig, "utf-8")  # forwarded as it came, but an event must be valid JSON text
        except UnicodeDecodeError:
            sig = Raw(str(sig, "utf-8", "replace").encode())
        out = [self.factory.signaling(self.hw, msg.call, toward, sig, origin)]
        try:
            status = self.tracker.signaling(msg.call, toward, msg.signal)
        except FrameError as e:
            self.bad_sig += 1
            if self.bad_sig & (self.bad_sig - 1) == 0:  # 1, 2, 4, 8, ...: no flood
                log.warning("device %s call %s: sig not understood, state not tracked (%d so far): %s",
                            self.hw, msg.call, self.bad_sig, e)
            return out
        if status is not None:
            out.append(self.factory.call_state(self.hw, status))
            if status.state is CallState.RELEASED:
                self.trace_ctx.pop(msg.call, None)
        return out
