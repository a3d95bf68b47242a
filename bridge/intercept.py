"""Intercept mode (issue 18; docs/INTERCEPT.md): a consumer on the bus decides, per Signaling
message and within a deadline, whether it is forwarded unchanged, forwarded with a replacement
``sig``, or rejected. Pure: no asyncio, no broker; the clock is the caller's (``now`` arguments).

- :class:`Rule`, :class:`Rules`: what is intercepted. Rules come from the configuration
  (``EPSIGNAL_INTERCEPT``, :func:`parse_config`) and from ``intercept`` commands
  (:class:`InterceptCommand`, per device); a command's rules win over the configuration's for
  the same (type, direction).
- :class:`InterceptRequest`, :class:`Verdict`: the wire formats of the round trip, and
  :func:`validate_verdict`, which turns a verdict's body into a :class:`Decision`.
- :class:`Gate`: one PBX session's held messages. :meth:`Gate.offer` says what to do with a
  message about to be forwarded: pass it (:data:`PASS`), queue it behind a held message of the
  same call (:data:`QUEUED`), or hold it (a :class:`Hold` whose request the adapter publishes).
  :meth:`Gate.decide` ends a hold and returns what to send now, in order; messages queued behind
  it follow, and one of them may become the call's next hold. Other calls never wait.

While the session carries out a call's releases its later messages still queue (the call stays
*busy*), so a slow socket write cannot let a newer message overtake an older one;
:meth:`Gate.settle` ends that, returning what queued meanwhile.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Any, Final, Literal, TypeGuard, get_args

import msgspec
from msgspec import UNSET, Meta, Raw, Struct, UnsetType

from bridge import ids
from bridge.protocol import errors
from bridge.protocol.errors import FrameError
from bridge.protocol.signal import SIG_TEXT, decode_sig

SCHEMA_VERSION = 1
#: a sig type of innovaphone JSON signaling (EPSIGNAL.md section 3)
SigType = Literal["setup", "setup_ack", "call_proc", "alert", "conn", "disc", "rel", "info",
                  "progress", "accept", "channels", "facility", "user_info", "media_info"]
SIG_TYPES: tuple[SigType, ...] = get_args(SigType)
DEADLINE_MIN_MS, DEADLINE_MAX_MS = 20, 4000  # 4 s: Q.931 T303, a setup's own timer
DeadlineMs = Annotated[int, Meta(ge=DEADLINE_MIN_MS, le=DEADLINE_MAX_MS, description=(
    "How long the message is held for a verdict, in milliseconds"))]
CauseNum = Annotated[int, Meta(ge=1, le=127, description="A Q.931 cause value")]
Fail = Literal["open", "closed"]
#: rules a command may set for one device
MAX_RULES = 32
#: Q.931 cause 21, call rejected
DEFAULT_CAUSE = 21
#: what a verdict's body may be at most (the same as a command's)
MAX_VERDICT_BYTES = 64 * 1024

# outcomes (metrics label, event field)
FORWARD, REPLACE, REJECT = "forward", "replace", "reject"
TIMEOUT, UNROUTABLE, BROKER_DOWN = "timeout", "unroutable", "broker-down"
BAD_VERDICT, STOPPING, SESSION_LOST = "bad-verdict", "stopping", "session-lost"
OUTCOMES = (FORWARD, REPLACE, REJECT, TIMEOUT, UNROUTABLE, BROKER_DOWN, BAD_VERDICT, STOPPING,
            SESSION_LOST)
#: outcomes where the rule's fail policy decides (no verdict could be had)
FAILURES = (TIMEOUT, UNROUTABLE, BROKER_DOWN, STOPPING)
# actions: what happened to the message
FORWARDED, REPLACED, REJECTED, DROPPED = "forwarded", "replaced", "rejected", "dropped"


# ====================================================================== rules
class Rule(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What to intercept: messages of a sig type in one direction (docs/INTERCEPT.md)."""

    # options left out take the configuration's (EPSIGNAL_INTERCEPT_DEADLINE_MS, _FAIL, _CAUSE)

    type: Annotated[SigType, Meta(description="The sig type held for a verdict.")]
    to: Annotated[bool, Meta(description=
        "True: messages toward the device (from the PBX); false: from the device toward the PBX.")]
    deadline_ms: Annotated[DeadlineMs | UnsetType, Meta(description=
        f"How long a message waits for its verdict ({DEADLINE_MIN_MS} to {DEADLINE_MAX_MS}; default "
        "EPSIGNAL_INTERCEPT_DEADLINE_MS).")] = UNSET
    fail: Annotated[Fail | UnsetType, Meta(description=
        "Without a verdict: `open`, forward unchanged; `closed`, reject (default EPSIGNAL_INTERCEPT_FAIL).")] = UNSET
    cause: Annotated[CauseNum | UnsetType, Meta(description=
        "The cause of the `rel` a fail-closed rejection sends (default EPSIGNAL_INTERCEPT_CAUSE).")] = UNSET


class Effective(Struct, kw_only=True, frozen=True):
    """An intercept rule in effect, every option decided."""

    # what a command's reply shows

    type: Annotated[SigType, Meta(description="The sig type held for a verdict.")]
    to: Annotated[bool, Meta(description="True: toward the device; false: toward the PBX.")]
    deadline_ms: Annotated[int, Meta(description="How long a message waits for its verdict.")]
    fail: Annotated[Fail, Meta(description="`open` or `closed`.")]
    cause: Annotated[int, Meta(description="The cause of a fail-closed rejection.")]
    source: Annotated[Literal["command", "config"], Meta(description=
        "`command` (an intercept command) or `config` (EPSIGNAL_INTERCEPT).")]


@dataclass(frozen=True, slots=True)
class Defaults:
    """The options of a rule that leaves them out (EPSIGNAL_INTERCEPT_DEADLINE_MS, _FAIL, _CAUSE)."""

    deadline_ms: int = 250
    fail: Fail = "open"
    cause: int = DEFAULT_CAUSE


class InterceptCommand(Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``device.<hw>.intercept``: the device's command-set rules, replacing the ones set
    before (``[]`` clears them; the configuration's stay)."""

    rules: Annotated[list[Rule], Meta(max_length=MAX_RULES, description=
        "The device's intercept rules, replacing those set by command before (`[]` clears them; the "
        f"configuration's, EPSIGNAL_INTERCEPT, stay). At most {MAX_RULES}. A command's rule wins over a "
        "configuration rule for the same (`type`, `to`).")]
    v: int = SCHEMA_VERSION


_DIRECTIONS = {"device": True, "pbx": False}


def _is_sig_type(kind: str) -> TypeGuard[SigType]:
    return kind in SIG_TYPES


def parse_config(text: str) -> dict[str, tuple[Rule, ...]]:
    """``EPSIGNAL_INTERCEPT``: ``<hw or *>=<type>:<device|pbx>[,...]`` entries separated by
    ``;``, e.g. ``*=setup:device`` or ``009033400001=setup:device,conn:pbx;*=setup:device``.
    Raises ValueError naming what is wrong."""
    out: dict[str, tuple[Rule, ...]] = {}
    for entry in (e.strip() for e in text.split(";")):
        if not entry:
            continue
        hw, eq, spec = (p.strip() for p in entry.partition("="))
        if not eq:
            raise ValueError(f"EPSIGNAL_INTERCEPT entry {entry!r} is not <hw or *>=<type>:<device|pbx>")
        if hw != "*" and (bad := ids.hw_error(hw)) is not None:
            raise ValueError(f"EPSIGNAL_INTERCEPT entry {entry!r}: {bad}")
        if hw in out:
            raise ValueError(f"EPSIGNAL_INTERCEPT names {hw!r} twice")
        rules: dict[tuple[str, bool], Rule] = {}
        for item in (i.strip() for i in spec.split(",")):
            kind, colon, way = (p.strip() for p in item.partition(":"))
            if not _is_sig_type(kind):
                raise ValueError(f"EPSIGNAL_INTERCEPT entry {entry!r}: sig type {kind!r} is not one of "
                                 f"{', '.join(SIG_TYPES)}")
            if not colon or way not in _DIRECTIONS:
                raise ValueError(f"EPSIGNAL_INTERCEPT entry {entry!r}: {item!r} needs a direction, "
                                 f"{kind}:device (toward the device) or {kind}:pbx (toward the PBX)")
            rules[(kind, _DIRECTIONS[way])] = Rule(type=kind, to=_DIRECTIONS[way])
        out[hw] = tuple(rules.values())
    return out


class Rules:
    """Every device's rules: the configuration's (a device's own entry replaces ``*``) and the
    command-set ones (per device, winning for the same (type, direction)).

    The hot path reads :attr:`on` (any device has rules at all), :attr:`everyone` (``*`` has
    rules) and :attr:`watch` (the devices with rules of their own) before it calls anything."""

    def __init__(self, config: dict[str, tuple[Rule, ...]] | None = None, defaults: Defaults = Defaults()) -> None:
        self.defaults = defaults
        self.config = dict(config or {})
        self.command: dict[str, tuple[Rule, ...]] = {}
        #: read on the hot path before anything is called (set by _index): ``*`` has rules, the
        #: devices with rules of their own, any device has rules at all
        self.everyone = False
        self.watch: set[str] = set()
        self.on = False
        self._default = self._table((), self.config.get("*", ()))
        self._tables: dict[str, dict[tuple[str, bool], Effective]] = {}
        for hw, rules in self.config.items():
            if hw != "*":
                self._tables[hw] = self._table((), rules)
        self._index()

    def _index(self) -> None:
        self.everyone = bool(self._default)
        self.watch = {hw for hw, table in self._tables.items() if table}
        self.on = self.everyone or bool(self.watch)

    def _effective(self, r: Rule, source: Literal["command", "config"]) -> Effective:
        d = self.defaults
        return Effective(type=r.type, to=r.to, source=source,
                         deadline_ms=d.deadline_ms if r.deadline_ms is UNSET else r.deadline_ms,
                         fail=d.fail if r.fail is UNSET else r.fail,
                         cause=d.cause if r.cause is UNSET else r.cause)

    def _table(self, command: tuple[Rule, ...], config: tuple[Rule, ...]) -> dict[tuple[str, bool], Effective]:
        table: dict[tuple[str, bool], Effective] = {(r.type, r.to): self._effective(r, "config") for r in config}
        table.update({(r.type, r.to): self._effective(r, "command") for r in command})
        return table

    def set_command(self, hw: str, rules: list[Rule] | tuple[Rule, ...]) -> list[Effective]:
        """Replace ``hw``'s command-set rules; its effective rules now."""
        rules = tuple(rules)
        if rules:
            self.command[hw] = rules
        else:
            self.command.pop(hw, None)
        config = self.config.get(hw, self.config.get("*", ()))
        if rules or hw in self.config:
            self._tables[hw] = self._table(rules, config)
        else:
            self._tables.pop(hw, None)
        self._index()
        return self.effective(hw)

    def table(self, hw: str) -> dict[tuple[str, bool], Effective]:
        return self._tables.get(hw, self._default)

    def effective(self, hw: str) -> list[Effective]:
        return list(self.table(hw).values())

    def match(self, hw: str, sig_type: str | None, to: bool) -> Effective | None:
        return self.table(hw).get((sig_type, to)) if sig_type is not None else None


# ====================================================================== wire formats
class InterceptRequest(Struct, kw_only=True, tag_field="type", tag="call.intercept"):
    """Published on the events exchange with key ``device.<hw>.call.<call>.intercept``; answer
    with a :class:`Verdict` to the message's ``reply_to`` before ``deadline``."""

    v: int = SCHEMA_VERSION
    id: Annotated[str, Meta(description="`<instance>/<hw>/i<n>`: the verdict's `id` and `correlation_id`.")]
    hw: ids.HwId
    instance: str
    time: datetime
    call: Annotated[int, Meta(description="Call id on the device.")]
    to: Annotated[bool, Meta(description=
        "True: the message goes toward the device (it came from the PBX); false: toward the PBX.")]
    sig: Annotated[Raw, Meta(description=SIG_TEXT + " The held message, as it would be forwarded.")]
    deadline: Annotated[datetime, Meta(description=
        "After this (UTC, RFC 3339) the fail policy applies and a verdict is ignored.")]
    deadline_ms: Annotated[int, Meta(description=
        "The rule's deadline in milliseconds, counted from the moment the message arrived (`deadline` and the "
        "message's `expiration` are what is left of it).")]
    fail: Annotated[Fail, Meta(description=
        "What happens without a verdict: `open`, forwarded unchanged; `closed`, rejected.")]


class Verdict(Struct, kw_only=True, forbid_unknown_fields=True):
    """The answer to an :class:`InterceptRequest`, to its ``reply_to`` (default exchange) with
    ``correlation_id`` = the request's ``id``. Strict: an unknown field is refused."""

    id: Annotated[str, Meta(description="The request's `id`.")]
    verdict: Annotated[Literal["forward", "reject"], Meta(description=
        "`forward` (unchanged, or `sig` instead) or `reject` (not forwarded; a `rel` goes back the way it came).")]
    sig: Annotated[Raw | UnsetType, Meta(description=
        "forward only: the Signal object to forward instead, with the same `type` as the held one (e.g. the setup "
        "with the caller's name replaced).")] = UNSET
    cause: Annotated[CauseNum | UnsetType, Meta(description=
        "reject only: the cause of the `rel` (1 to 127; default 21, call rejected).")] = UNSET
    v: int = SCHEMA_VERSION


_verdict_decoder = msgspec.json.Decoder(Verdict)
_request_encoder = msgspec.json.Encoder()


def encode_request(req: InterceptRequest) -> bytes:
    return _request_encoder.encode(req)


@dataclass(frozen=True, slots=True)
class Decision:
    """How a hold ends: the outcome, and with it a replacement sig, a cause or a refusal."""

    outcome: str
    sig: Raw | None = None
    cause: int | None = None
    #: bad-verdict: why
    error: str | None = None


def validate_verdict(body: bytes, hold: Hold) -> Decision:
    """The decision a verdict's body makes for ``hold`` (bad-verdict with the reason if it is
    not a valid answer to it)."""
    def bad(why: str) -> Decision:
        return Decision(BAD_VERDICT, error=why)

    if len(body) > MAX_VERDICT_BYTES:
        return bad(f"verdict of {len(body)} bytes exceeds the limit of {MAX_VERDICT_BYTES}")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return bad(f"verdict is not valid UTF-8 (byte at {e.start}: {e.reason})")
    try:
        v = errors.decode(_verdict_decoder, body)
    except FrameError as e:
        return bad(f"verdict is not JSON: {e.detail}" if e.kind == "not-json" else f"invalid verdict: {e.detail}")
    if v.v != SCHEMA_VERSION:
        return bad(f"unsupported schema version v={v.v} (this bridge speaks v={SCHEMA_VERSION})")
    if v.id != hold.id:
        return bad(f"verdict id {v.id[:100]!r} is not the request's id {hold.id!r}")
    if v.verdict == "reject":
        if v.sig is not UNSET:
            return bad("`sig` is only for a forward verdict - at `$.sig`")
        return Decision(REJECT, cause=DEFAULT_CAUSE if v.cause is UNSET else v.cause)
    if v.cause is not UNSET:
        return bad("`cause` is only for a reject verdict - at `$.cause`")
    if v.sig is UNSET:
        return Decision(FORWARD)
    if bytes(memoryview(v.sig)[:1]) != b"{":
        return bad("Expected `object` - at `$.sig`")
    try:
        sig = decode_sig(v.sig)
    except FrameError as e:
        return bad(f"invalid verdict: {e.detail}")
    if sig.type != hold.sig_type:
        return bad(f"the replacement sig's type {sig.type[:40]!r} is not the held message's "
                   f"{hold.sig_type!r} - at `$.sig.type`")
    return Decision(REPLACE, sig=v.sig)


# ====================================================================== the gate
@dataclass(eq=False, slots=True)
class Hold:
    """A message held for a verdict. ``item`` is the session's (the frame to send later)."""

    id: str
    hw: str
    call: int
    to: bool
    sig_type: str
    sig: Raw
    item: Any
    rule: Effective
    started: float
    deadline: float


@dataclass(eq=False, slots=True)
class Release:
    """What to send now for one message: ``action`` forwarded (the original, or a message that
    was only queued: ``hold`` None), replaced (``sig``), rejected (a rel with ``cause`` back the
    way it came) or dropped (the session is gone)."""

    item: Any
    action: str
    hold: Hold | None = None
    outcome: str | None = None
    sig: Raw | None = None
    cause: int | None = None
    error: str | None = None
    waited: float = 0.0


class Offered(enum.Enum):
    """What :meth:`Gate.offer` says of a message it does not hold."""

    PASS = "PASS"
    QUEUED = "QUEUED"

    def __repr__(self) -> str:
        return self.value


#: the message goes at once (nothing held on its call, no rule for it)
PASS: Final = Offered.PASS
#: the message waits behind a held one of its call
QUEUED: Final = Offered.QUEUED

Step = Release | Hold


@dataclass(eq=False, slots=True)
class _Call:
    """One busy call of a gate: its hold (None while its releases are carried out) and what
    queued behind it."""

    holding: Hold | None = None
    #: messages waiting behind the hold: (to, sig type or None, sig, item)
    queue: deque[tuple[bool, str | None, Raw, Any]] = field(default_factory=deque)


class Gate:
    """The held messages of one PBX session, by (hw, call); see the module doc."""

    def __init__(self, rules: Rules, instance: str, counter: Iterator[int]) -> None:
        """``counter``: one per bridge (itertools.count()), shared by its sessions' gates: a
        session that ends and its successor must not reuse an id a late verdict still carries."""
        self.rules = rules
        self.instance = instance
        self._counter = counter
        #: (hw, call) -> what is held and queued on it (busy calls; read on the hot path)
        self.calls: dict[tuple[str, int], _Call] = {}
        #: id -> hold
        self.held: dict[str, Hold] = {}
        #: the session is stopping: a message a rule matches gets the fail policy at once
        self.stopping = False

    def busy(self, hw: str, call: int) -> bool:
        return (hw, call) in self.calls

    def offer(self, hw: str, call: int, to: bool, sig_type: str | None, sig: Raw, item: Any,
              now: float) -> Offered | list[Step]:
        """A message about to be forwarded: :data:`PASS`, :data:`QUEUED` or a list of steps."""
        c = self.calls.get((hw, call))
        if c is not None:
            c.queue.append((to, sig_type, sig, item))
            return QUEUED
        if call < 0 or sig_type is None:  # an application's call, a sig not understood: never held
            return PASS
        rule = self.rules.match(hw, sig_type, to)
        if rule is None:
            return PASS
        c = self.calls[(hw, call)] = _Call()
        return self._hold(c, hw, call, to, sig_type, sig, item, rule, now)

    def _hold(self, c: _Call, hw: str, call: int, to: bool, sig_type: str, sig: Raw, item: Any,
              rule: Effective, now: float) -> list[Step]:
        h = Hold(f"{self.instance}/{hw}/i{next(self._counter)}", hw, call, to, sig_type, sig, item,
                 rule, now, now + rule.deadline_ms / 1000)
        if self.stopping:
            return [_ended(h, Decision(STOPPING), now)]
        c.holding = h
        self.held[h.id] = h
        return [h]

    def decide(self, id: str, decision: Decision, now: float) -> list[Step] | None:
        """End hold ``id``: its release, then the messages queued behind it up to the call's next
        hold (if any, last). None: no such hold (late, unknown)."""
        h = self.held.pop(id, None)
        if h is None:
            return None
        c = self.calls[(h.hw, h.call)]
        c.holding = None
        return [_ended(h, decision, now), *self._advance(c, h.hw, h.call, now)]

    def settle(self, hw: str, call: int, now: float) -> list[Step]:
        """The session has sent a call's releases: what queued meanwhile (empty: the call is free
        again)."""
        c = self.calls.get((hw, call))
        if c is None or c.holding is not None:
            return []
        if not c.queue:
            del self.calls[(hw, call)]
            return []
        return self._advance(c, hw, call, now)

    def _advance(self, c: _Call, hw: str, call: int, now: float) -> list[Step]:
        out: list[Step] = []
        q = c.queue
        while q:
            to, sig_type, sig, item = q.popleft()
            if sig_type is None or (rule := self.rules.match(hw, sig_type, to)) is None:
                out.append(Release(item, FORWARDED))
                continue
            steps = self._hold(c, hw, call, to, sig_type, sig, item, rule, now)
            out += steps
            if c.holding is not None:
                break
        return out

    def next_deadline(self) -> float:
        """The earliest deadline of a hold (inf: none)."""
        return min((h.deadline for h in self.held.values()), default=math.inf)

    def expired(self, now: float) -> list[str]:
        """Ids of the holds whose deadline has passed."""
        return [i for i, h in self.held.items() if h.deadline <= now]

    def drain(self, outcome: str, now: float) -> list[Step]:
        """End every hold with ``outcome`` (``stopping``: the fail policy; the session stops taking
        holds, so what was queued goes too), in the order the holds began."""
        self.stopping = self.stopping or outcome == STOPPING
        out: list[Step] = []
        while self.held:
            h = next(iter(self.held.values()))
            steps = self.decide(h.id, Decision(outcome), now) or []
            out += [step for step in steps if type(step) is Release]
        return out

    def lost(self, now: float) -> list[Release]:
        """The session ended: every hold is dropped (nothing to send to); queued messages go with
        it. The releases (action dropped) are for the events and counts."""
        out = [_ended(h, Decision(SESSION_LOST), now) for h in self.held.values()]
        self.held.clear()
        self.calls.clear()
        return out


def _ended(h: Hold, d: Decision, now: float) -> Release:
    waited = now - h.started
    o = d.outcome
    if o == FORWARD:
        return Release(h.item, FORWARDED, h, o, waited=waited)
    if o == REPLACE:
        return Release(h.item, REPLACED, h, o, sig=d.sig, waited=waited)
    if o == REJECT:
        return Release(h.item, REJECTED, h, o, cause=d.cause, waited=waited)
    if o == SESSION_LOST:
        return Release(h.item, DROPPED, h, o, waited=waited)
    if o == BAD_VERDICT:  # a consumer's bug must not cut calls: forwarded whatever the policy
        return Release(h.item, FORWARDED, h, o, error=d.error, waited=waited)
    assert o in FAILURES, o
    if h.rule.fail == "closed":
        return Release(h.item, REJECTED, h, o, cause=h.rule.cause, waited=waited)
    return Release(h.item, FORWARDED, h, o, waited=waited)


def rel_sig(cause: int) -> Raw:
    """The sig of the release the bridge sends for a rejected message."""
    return Raw(b'{"type":"rel","cau":{"num":%d}}' % cause)
