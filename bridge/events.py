"""The events the bridge publishes: bodies as msgspec Structs, and the factory that numbers them.

Every event body carries ``type`` (the event name, also the AMQP ``type`` property), ``v`` (the
schema version), ``hw``, ``seq`` (per device and bridge instance, 1, 2, 3, ... without gaps),
``instance`` (the bridge instance id) and ``time`` (UTC). ``message_id`` is
``<instance>/<hw>/<seq>``: unique, and the same for a republished duplicate, so a consumer can
drop duplicates by id or by (instance, hw, seq).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, UTC
from typing import Any

import msgspec
from msgspec import UNSET, Raw, Struct, UnsetType, field

from bridge import ids, routing
from bridge.protocol.callstate import CallStatus, Evicted
from bridge.protocol.messages import AttachResult, CallState, Remote
from bridge.protocol.signal import Cause

SCHEMA_VERSION = 1


class Event(Struct, kw_only=True, tag_field="type"):
    v: int = SCHEMA_VERSION
    hw: ids.HwId
    seq: int
    instance: str
    time: datetime


class AttachInfo(Struct, kw_only=True, omit_defaults=True):
    """What the PBX told about the attachment: AttachResult without the TURN password."""

    stun: list[str] = field(default_factory=list)
    turn: list[str] = field(default_factory=list)
    turnUsr: str | None = None
    prefixIntl: str | None = None
    prefixNtl: str | None = None
    prefixSubs: str | None = None
    area: str | None = None
    country: str | None = None
    maxIntern: Any = None
    tones: Any = None

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
    attach: AttachInfo


class DeviceDetached(Event, tag="detached", kw_only=True):
    #: "unregistered" (the PBX said Detached), "command", "session-lost", "shutdown",
    #: "lease-moved", "lease-lost", "wanted-detached" (several replicas, docs/SCALING.md)
    reason: str


class AttachFailed(Event, tag="attach.failed", kw_only=True):
    #: the PBX's ``err``, as text
    error: str


class CallStateChanged(Event, tag="call.state", kw_only=True):
    call: int
    state: CallState
    in_: bool | None = field(default=None, name="in")
    remote: Remote
    channel: int | None = None
    held: bool = False
    app: bool = False
    cause: Cause | None = None
    #: true when the state comes from a Sync at attach, not from a Signaling message
    sync: bool = False
    #: with ``released``, present only when the bridge dropped the call, not the PBX: ``idle``
    #: (no signaling for EPSIGNAL_CALL_IDLE_S / EPSIGNAL_CONNECTED_CALL_IDLE_S) or
    #: ``too-many-calls`` (beyond EPSIGNAL_MAX_CALLS_PER_DEVICE, the least recently signaled)
    evicted: Evicted | UnsetType = UNSET


class CallSignaling(Event, tag="call.signaling", kw_only=True):
    call: int
    #: true: toward the device
    to: bool
    #: "pbx": received from the PBX side and forwarded; "command": sent for a command;
    #: "intercept": the release the bridge sent for a rejected message (docs/INTERCEPT.md)
    origin: str
    #: the Signal object exactly as it passed
    sig: Raw


class CallIntercepted(Event, tag="call.intercepted", kw_only=True):
    """How an intercepted message ended (docs/INTERCEPT.md); published before the
    ``call.signaling`` of what passed."""

    call: int
    #: true: the message went toward the device
    to: bool
    #: the intercept request's id
    id: str
    #: the held message's sig type
    sig_type: str
    #: forward, replace, reject (a verdict); timeout, unroutable, broker-down, stopping (the fail
    #: policy decided); bad-verdict (forwarded unchanged); session-lost (nothing to send to)
    outcome: str
    #: forwarded, replaced, rejected, dropped
    action: str
    #: milliseconds the message was held
    waited_ms: float
    #: bad-verdict: why the verdict was refused
    error: str | UnsetType = UNSET
    #: rejected: the cause of the release the bridge sent back
    cause: int | UnsetType = UNSET


class SeqRange(Struct, array_like=False):
    first: int
    last: int


class Gap(Struct, kw_only=True, tag_field="type", tag="gap"):
    """Events dropped unsent (buffer full or too old), per device, as seq ranges."""

    v: int = SCHEMA_VERSION
    instance: str
    time: datetime
    reason: str
    dropped: dict[ids.HwId, list[SeqRange]]


_encoder = msgspec.json.Encoder()
_word = routing.word
_UTC = UTC


@dataclass(slots=True)
class Outgoing:
    """One event ready to publish: routing key, body, and the AMQP properties it needs."""

    key: str
    body: bytes
    type: str
    message_id: str
    timestamp: datetime
    hw: str | None = None
    seq: int = 0
    headers: dict | None = None
    #: tracing on: the SpanContext the event was made in (its headers carry it)
    origin: Any = None
    #: a gap event's (reason, ranges), so a gap event that is itself dropped is announced again
    gap: Any = None


#: the kinds of device event a deployment may choose to publish (``EPSIGNAL_EVENT_KINDS``);
#: gap events are always published
KINDS = ("attached", "detached", "attach.failed", "call.state", "call.signaling", "call.intercepted")


class EventFactory:
    """Numbers and encodes events for one bridge instance (pure, no I/O).

    Only the ``kinds`` chosen are made: a kind left out returns None and takes no ``seq``, so a
    consumer still sees each device's events numbered without gaps."""

    def __init__(self, instance: str, kinds: tuple[str, ...] | frozenset[str] = KINDS) -> None:
        self.instance = instance
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
        return Outgoing(key, _encoder.encode(ev), ev.__struct_config__.tag,
                        f"{self.instance}/{_word(hw)}/{seq}", ev.time, hw, seq)

    def _base(self, hw: str) -> dict:
        return dict(hw=hw, seq=self._next(hw), instance=self.instance, time=datetime.now(UTC))

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
            hw=hw, seq=self._next(hw), instance=self.instance, time=datetime.now(_UTC),
        )
        return self._out(routing.call_key(hw, s.call, "state"), ev)

    def signaling(self, hw: str, call: int, to: bool, sig: Raw, origin: str) -> Outgoing | None:
        if not self.signaling_events:
            return None
        ev = CallSignaling(call=call, to=to, sig=sig, origin=origin,
                           hw=hw, seq=self._next(hw), instance=self.instance, time=datetime.now(_UTC))
        return self._out(routing.call_key(hw, call, "signaling"), ev)

    def intercepted(self, hw: str, call: int, to: bool, id: str, sig_type: str, outcome: str, action: str,
                    waited_ms: float, error: str | None = None, cause: int | None = None) -> Outgoing | None:
        if "call.intercepted" not in self.kinds:
            return None
        ev = CallIntercepted(call=call, to=to, id=id, sig_type=sig_type, outcome=outcome, action=action,
                             waited_ms=round(waited_ms, 3), error=UNSET if error is None else error,
                             cause=UNSET if cause is None else cause, **self._base(hw))
        return self._out(routing.call_key(hw, call, "intercepted"), ev)

    def gap(self, reason: str, dropped: dict[str, list[tuple[int, int]]]) -> Outgoing:
        now = datetime.now(UTC)
        self._gaps += 1
        ev = Gap(instance=self.instance, time=now, reason=reason,
                 dropped={hw: [SeqRange(a, b) for a, b in r] for hw, r in dropped.items()})
        return Outgoing(key=routing.gap_key(self.instance), body=_encoder.encode(ev), type="gap",
                        message_id=f"{self.instance}/.gap/{self._gaps}", timestamp=now,
                        gap=(reason, dropped))
