"""The events the bridge publishes: bodies as msgspec Structs, and the factory that numbers them.

Every event body carries ``type`` (the event name, also the AMQP ``type`` property), ``v`` (the
schema version), ``hw``, ``seq`` (per device and bridge instance, 1, 2, 3, ... without gaps),
``instance`` (the bridge instance id) and ``time`` (UTC). ``message_id`` is
``<instance>/<hw>/<seq>``: unique, and the same for a republished duplicate, so a consumer can
drop duplicates by id or by (instance, hw, seq).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, UTC
from functools import partial
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType, field

from bridge import ids, routing
from bridge.protocol.callstate import CallStatus, Evicted
from bridge.protocol.messages import AttachResult, CallState, Remote
from bridge.protocol.signal import SIG_TEXT, Cause

SCHEMA_VERSION = 1


class Event(Struct, kw_only=True, tag_field="type"):
    """What every device event carries (the module docstring says what each field means; their
    descriptions in the contracts are ``bridge.contracts.COMMON``)."""

    v: int = SCHEMA_VERSION
    hw: ids.HwId
    seq: int
    instance: str
    time: datetime


class AttachInfo(Struct, kw_only=True, omit_defaults=True):
    """What the PBX told about the attachment: its AttachResult without the TURN password."""

    stun: Annotated[list[str], Meta(description=
        "STUN servers (host[:port]); absent when none.")] = field(default_factory=list)
    turn: Annotated[list[str], Meta(description=
        "TURN servers (host[:port]); absent when none.")] = field(default_factory=list)
    turnUsr: Annotated[str | None, Meta(description="TURN user name. The TURN password is never published.")] = None
    prefixIntl: Annotated[str | None, Meta(description="Prefix for international numbers.")] = None
    prefixNtl: Annotated[str | None, Meta(description="Prefix for national numbers.")] = None
    prefixSubs: Annotated[str | None, Meta(description="Prefix for subscriber numbers.")] = None
    area: Annotated[str | None, Meta(description="Area code.")] = None
    country: Annotated[str | None, Meta(description="Country code.")] = None
    maxIntern: Annotated[Any, Meta(description=
        "Length of internal numbers (newer PBX releases; undocumented, an integer so far).")] = None
    tones: Annotated[Any, Meta(description="Tone scheme (newer PBX releases; undocumented, an integer so far).")] = None

    @classmethod
    def from_result(cls, r: AttachResult) -> AttachInfo:
        def opt(v: Any) -> Any:
            return None if v is UNSET else v

        def split(v: str | UnsetType) -> list[str]:
            return [s for s in v.split(";") if s] if isinstance(v, str) else []

        return cls(
            stun=split(r.stun), turn=split(r.turn), turnUsr=opt(r.turnUsr),
            prefixIntl=opt(r.prefixIntl), prefixNtl=opt(r.prefixNtl), prefixSubs=opt(r.prefixSubs),
            area=opt(r.area), country=opt(r.country), maxIntern=opt(r.maxIntern), tones=opt(r.tones),
        )


class DeviceAttached(Event, tag="attached", kw_only=True):
    """The bridge is in the device's signaling path (the PBX attached it)."""

    attach: Annotated[AttachInfo, Meta(description="What the PBX answered to the Attach.")]


class DeviceDetached(Event, tag="detached", kw_only=True):
    """The bridge is no longer in the device's signaling path."""

    reason: Annotated[str, Meta(description=
        "Why: `unregistered` (the PBX said Detached), `command` (a detach command), `session-lost` (the PBX session "
        "broke; the bridge reconnects), `shutdown` (the bridge stops), `lease-moved` (handed on to another replica, "
        "which attaches it next), `lease-lost` (another replica holds the device's lease now), `wanted-detached` "
        "(the replica that now holds the device's lease keeps it detached: a detach command made under the current "
        "configuration; docs/SCALING.md).")]


class AttachFailed(Event, tag="attach.failed", kw_only=True):
    """The PBX refused the Attach; the bridge does not retry."""

    error: Annotated[str, Meta(description="The PBX's `err`, as text (e.g. `unknown device`).")]


class CallStateChanged(Event, tag="call.state", kw_only=True):
    """A call's state changed, or a Sync at attach told it (`sync` true)."""

    call: Annotated[int, Meta(description=
        "Call id on the device; negative for calls the application started (click to dial).")]
    state: Annotated[CallState, Meta(description="The new state of the call.")]
    in_: Annotated[bool | None, Meta(description=
        "True: a call to the device; false: from the device; null: not known (first seen mid-call).")] = field(
            default=None, name="in")
    remote: Annotated[Remote, Meta(description="The remote party, as far as known (fields absent when unknown).")]
    channel: Annotated[int | None, Meta(description="Media channel, when the PBX named one.")] = None
    held: Annotated[bool, Meta(description="The call is on hold.")] = False
    app: Annotated[bool, Meta(description="The call was started by the application (negative `call`).")] = False
    cause: Annotated[Cause | None, Meta(description=
        "Q.931 cause of `released` (and of `disconnected`/`disconnecting` when the PBX gave one).")] = None
    sync: Annotated[bool, Meta(description=
        "True when the state comes from a Sync at attach (the call existed before), not from a Signaling "
        "message.")] = False
    evicted: Annotated[Evicted | UnsetType, Meta(description=
        "Only with `released`, and only when the bridge stopped tracking the call, not the PBX ended it (the PBX "
        "may still have it; no `cause`): `idle` (no signaling for EPSIGNAL_CALL_IDLE_S, or "
        "EPSIGNAL_CONNECTED_CALL_IDLE_S when connected, held, parked or state unknown), `too-many-calls` (more than "
        "EPSIGNAL_MAX_CALLS_PER_DEVICE calls: the least recently signaled one). Should the call signal again, it "
        "comes back as a call first seen mid-call.")] = UNSET


class CallSignaling(Event, tag="call.signaling", kw_only=True):
    """A Signaling message passed (`origin` pbx), was sent for a command (`origin` command) or for an
    intercept verdict (`origin` intercept)."""

    call: Annotated[int, Meta(description="Call id on the device; negative for calls the application started.")]
    to: Annotated[bool, Meta(description="True: toward the device; false: toward the PBX.")]
    origin: Annotated[str, Meta(description=
        "`pbx`: passed through the bridge on the signaling path (forwarded, or replaced by an intercept verdict); "
        "`command`: sent by the bridge for a signaling command; `intercept`: sent by the bridge for an intercept "
        "verdict (the release of a rejected message).")]
    sig: Annotated[Raw, Meta(description=SIG_TEXT)]


class CallIntercepted(Event, tag="call.intercepted", kw_only=True):
    """How an intercepted message ended (docs/INTERCEPT.md). Published before the
    `call.signaling` and `call.state` events of what passed."""

    call: Annotated[int, Meta(description="Call id on the device (intercepted calls have positive ids).")]
    to: Annotated[bool, Meta(description=
        "True: the message went toward the device (it came from the PBX); false: toward the PBX.")]
    id: Annotated[str, Meta(description="The intercept request's id (its `correlation_id`).")]
    sig_type: Annotated[str, Meta(description="The held message's sig type (`setup`, ...).")]
    outcome: Annotated[str, Meta(description=
        "How the hold ended: `forward`, `replace`, `reject` (a verdict); `timeout` (no verdict by the deadline), "
        "`unroutable` (nobody bound to the request's key), `broker-down` (the request could not be published, or "
        "the link was lost while held), `stopping` (the bridge stopped): the rule's fail policy decided; "
        "`bad-verdict` (refused, see `error`: forwarded unchanged whatever the policy); `session-lost` (the PBX "
        "session ended: nothing to send to).")]
    action: Annotated[str, Meta(description=
        "What happened to the message: `forwarded` (unchanged), `replaced` (the verdict's sig went instead), "
        "`rejected` (not forwarded; a `rel` with `cause` went back the way it came), `dropped` (the session was "
        "gone).")]
    waited_ms: Annotated[float, Meta(description="Milliseconds the message was held.")]
    error: Annotated[str | UnsetType, Meta(description="bad-verdict: why the verdict was refused.")] = UNSET
    cause: Annotated[int | UnsetType, Meta(description=
        "rejected: the cause of the `rel` the bridge sent back.")] = UNSET


class SeqRange(Struct, array_like=False):
    """A range of `seq`, both ends included."""

    first: Annotated[int, Meta(description="First `seq` dropped.")]
    last: Annotated[int, Meta(description="Last `seq` dropped (inclusive).")]


class Gap(Struct, kw_only=True, tag_field="type", tag="gap"):
    """Events were dropped unsent during a long broker outage (buffer full or too old), per
    device as `seq` ranges. Published before the events that follow the gap."""

    v: int = SCHEMA_VERSION
    instance: str
    time: datetime
    reason: Annotated[str, Meta(description=
        "Why they were dropped: `buffer-full`, `too-old`, or both joined by `+` (`buffer-full+too-old`).")]
    dropped: Annotated[dict[ids.HwId, list[SeqRange]], Meta(description=
        "The events dropped unsent: per device (key: hw, not percent-encoded), ranges of `seq`.")]


_encoder = msgspec.json.Encoder()
_word = routing.word
#: per device (hw), the ranges of ``seq`` dropped: (first, last), both included
Dropped = dict[str, list[tuple[int, int]]]
#: the wall clock of the events' ``time`` (a C call: it is read twice per frame)
utc_now: Callable[[], datetime] = partial(datetime.now, UTC)


class Outgoing(Struct, gc=False):
    """One event ready to publish: routing key, body, and the AMQP properties it needs.

    Not tracked by the cyclic garbage collector (``gc=False``: it holds no reference back to
    anything that holds it): during a broker outage the buffer keeps up to 100,000 of them, and
    every full collection walked them all, pausing the event loop (and the PBX side's
    forwarding) for 20-90 ms (docs/PERFORMANCE.md)."""

    key: str
    body: bytes
    type: str
    message_id: str
    timestamp: datetime
    hw: str | None = None
    seq: int = 0
    #: tracing on: the event's creation context (``traceparent``, ...; bridge.tracing)
    headers: dict[str, str] | None = None
    #: a gap event's (reason, ranges), so a gap event that is itself dropped is announced again
    gap: tuple[str, Dropped] | None = None


#: each device event's type (its tag)
_TAGS: dict[type, str] = {c: str(c.__struct_config__.tag) for c in (
    DeviceAttached, DeviceDetached, AttachFailed, CallStateChanged, CallSignaling, CallIntercepted)}

#: the kinds of device event a deployment may choose to publish (``EPSIGNAL_EVENT_KINDS``);
#: gap events are always published
KINDS = ("attached", "detached", "attach.failed", "call.state", "call.signaling", "call.intercepted")


class EventFactory:
    """Numbers and encodes events for one bridge instance (pure, no I/O).

    Only the ``kinds`` chosen are made: a kind left out returns None and takes no ``seq``, so a
    consumer still sees each device's events numbered without gaps."""

    def __init__(self, instance: str, kinds: tuple[str, ...] | frozenset[str] = KINDS,
                 clock: Callable[[], datetime] = utc_now) -> None:
        self.instance = instance
        #: the time of the events made (UTC)
        self._clock = clock
        self._seq: dict[str, int] = {}
        self._gaps = 0
        unknown = set(kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown event kinds {sorted(unknown)}; the kinds are {', '.join(KINDS)}")
        self.kinds = frozenset(kinds)
        self._state = "call.state" in self.kinds
        #: ``call.signaling`` events are made (the costly kind: one per frame)
        self.signaling_events = "call.signaling" in self.kinds

    def _next(self, hw: str) -> int:
        n = self._seq.get(hw, 0) + 1
        self._seq[hw] = n
        return n

    def _out(self, key: str, ev: Event) -> Outgoing:
        hw, seq = ev.hw, ev.seq
        return Outgoing(key, _encoder.encode(ev), _TAGS[type(ev)],
                        f"{self.instance}/{_word(hw)}/{seq}", ev.time, hw, seq)

    def _base(self, hw: str) -> dict:
        return dict(hw=hw, seq=self._next(hw), instance=self.instance, time=self._clock())

    def attached(self, hw: str, result: AttachResult) -> Outgoing | None:
        if "attached" not in self.kinds:
            return None
        ev = DeviceAttached(attach=AttachInfo.from_result(result), **self._base(hw))
        return self._out(routing.device_key(hw, "attached"), ev)

    def detached(self, hw: str, reason: str) -> Outgoing | None:
        if "detached" not in self.kinds:
            return None
        return self._out(routing.device_key(hw, "detached"), DeviceDetached(reason=reason, **self._base(hw)))

    def attach_failed(self, hw: str, error: Any) -> Outgoing | None:
        if "attach.failed" not in self.kinds:
            return None
        text = error if isinstance(error, str) else msgspec.json.encode(error).decode()
        return self._out(routing.device_key(hw, "attach", "failed"), AttachFailed(error=text, **self._base(hw)))

    def call_state(self, hw: str, s: CallStatus, *, sync: bool = False) -> Outgoing | None:
        if not self._state:
            return None
        # keywords, not **self._base(hw): the two events of every frame are made here (hot path)
        ev = CallStateChanged(
            call=s.call, state=s.state, in_=s.in_, remote=s.remote, channel=s.channel, held=s.held,
            app=s.app, cause=s.cause, sync=sync, evicted=s.evicted or UNSET,
            hw=hw, seq=self._next(hw), instance=self.instance, time=self._clock(),
        )
        return self._out(routing.call_key(hw, s.call, "state"), ev)

    def signaling(self, hw: str, call: int, to: bool, sig: Raw, origin: str) -> Outgoing | None:
        if not self.signaling_events:
            return None
        ev = CallSignaling(call=call, to=to, sig=sig, origin=origin,
                           hw=hw, seq=self._next(hw), instance=self.instance, time=self._clock())
        return self._out(routing.call_key(hw, call, "signaling"), ev)

    def intercepted(self, hw: str, call: int, to: bool, id: str, sig_type: str, outcome: str, action: str,
                    waited_ms: float, error: str | None = None, cause: int | None = None) -> Outgoing | None:
        if "call.intercepted" not in self.kinds:
            return None
        ev = CallIntercepted(call=call, to=to, id=id, sig_type=sig_type, outcome=outcome, action=action,
                             waited_ms=round(waited_ms, 3), error=UNSET if error is None else error,
                             cause=UNSET if cause is None else cause, **self._base(hw))
        return self._out(routing.call_key(hw, call, "intercepted"), ev)

    def gap(self, reason: str, dropped: Dropped) -> Outgoing:
        now = self._clock()
        self._gaps += 1
        ev = Gap(instance=self.instance, time=now, reason=reason,
                 dropped={hw: [SeqRange(a, b) for a, b in r] for hw, r in dropped.items()})
        return Outgoing(key=routing.gap_key(self.instance), body=_encoder.encode(ev), type="gap",
                        message_id=f"{self.instance}/.gap/{self._gaps}", timestamp=now,
                        gap=(reason, dropped))
