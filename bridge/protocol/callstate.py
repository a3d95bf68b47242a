"""Call-state tracking for one device: Sync and Signaling in, call snapshots out. Pure.

A :class:`CallTracker` is fed what passes through the bridge for one device, in the order it
passed: ``Sync`` messages at attach, and every ``Signaling`` message with its direction
(``toward_device`` true: from the PBX side to the device). It answers with the call's new
:class:`CallStatus` when something a consumer cares about changed, and None otherwise.

Mapping of ``sig.type`` to states (``Sync.info.state`` uses the same names):

=========== ============================================================================
setup       ``setup``; the direction of the setup gives ``in``; the remote party is ``cg`` of
            an incoming setup and ``cd`` of an outgoing one
setup_ack   ``setup-ack``
call_proc   ``call-proc``
alert       ``alert``
conn        ``connected``
disc        ``disconnected`` when it travels toward the device (the remote side hung up),
            ``disconnecting`` when it comes from the device (the device hung up)
rel         ``released`` with the cause (``cau``); the call is forgotten
fty         ``name_identification`` toward the device sets the remote display name (from the
            device it names the device itself, and is ignored), ``hold_notify`` /
            ``retrieve_notify`` set ``held``, ``cp_park`` sets ``parked``; any message
info        carries more digits of ``cd`` for an outgoing call in setup/setup-ack: appended
=========== ============================================================================

A message for a call the tracker has not seen (attached mid-call, before any Sync) creates the
call with ``in`` unknown. Calls the application started have negative ids (``app`` true).

Bounds (everything here is PBX-controlled; the tracker keeps it and every later event of the
call repeats it, so each has a limit, see README "Limits"):

- the remote number is cut at :data:`MAX_NUM` characters, ``sip``, ``dn`` and a cause's ``loc``
  at :data:`MAX_TEXT`; a cut string ends with :data:`CUT` (overlap dialing past the bound adds
  nothing and publishes nothing more);
- at most :attr:`CallLimits.max_calls` calls: beyond, the least recently signaled is dropped;
- a call with no signaling for :attr:`CallLimits.idle_s` (setting up, ringing, disconnecting)
  or :attr:`CallLimits.connected_idle_s` (connected, held, parked, or state unknown: a
  connected call may be silent for hours) is dropped, checked by :meth:`CallTracker.expire`
  (the device calls it after every message; it scans at most every :data:`SCAN_S`).

A dropped call's last status is ``released`` with ``evicted`` (``too-many-calls`` or ``idle``)
and no cause: the bridge stopped tracking it, the PBX may still have it. Should it signal again,
it is a new call to the tracker (``in`` unknown).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from msgspec import UNSET, Struct, UnsetType, field, structs

from bridge.protocol.messages import CallState, Remote, Sync
from bridge.protocol.signal import Cause, Party, Sig

#: longest remote number kept (E.164 numbers have at most 15 digits; with prefixes, a
#: subaddress or a feature code a real number stays far below 128)
MAX_NUM = 128
#: longest ``sip``/``dn`` of the remote party (and text of a cause's ``loc``) kept
MAX_TEXT = 256
#: the last character of a string that was cut
CUT = "\u2026"
#: at most this often (seconds of the injected clock) the idle calls are looked for
SCAN_S = 60.0

Evicted = Literal["idle", "too-many-calls"]


def cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit - 1`` characters and :data:`CUT` when it is longer."""
    return text if len(text) <= limit else text[:limit - 1] + CUT


@dataclass(frozen=True, slots=True)
class CallLimits:
    """How many calls a device's tracker keeps, and how long a silent one (0: for ever)."""

    max_calls: int = 256
    idle_s: float = 3600.0
    connected_idle_s: float = 86400.0


_BY_TYPE = {
    "setup": CallState.SETUP,
    "setup_ack": CallState.SETUP_ACK,
    "call_proc": CallState.CALL_PROC,
    "alert": CallState.ALERT,
    "conn": CallState.CONNECTED,
}


class CallStatus(Struct, kw_only=True, frozen=True, omit_defaults=True):
    """What a consumer is told about a call; one per change."""

    call: int
    state: CallState
    #: true: a call to the device; None: not known (first seen mid-call)
    in_: bool | None = field(default=None, name="in")
    remote: Remote = field(default_factory=Remote)
    channel: int | None = None
    held: bool = False
    #: the call was started by the application (negative id)
    app: bool = False
    #: Q.931 cause, with ``released`` (and with disc when the PBX gave one)
    cause: Cause | None = None
    #: with ``released``: the bridge dropped the call (a bound), the PBX did not end it
    evicted: Evicted | None = None


#: states a call may sit in silently for hours (NULL: first seen mid-call, may be connected)
_LONG_LIVED = frozenset({CallState.CONNECTED, CallState.PARKED, CallState.NULL})


def _bounded_remote(r: Remote) -> Remote:
    num = None if r.num is None else cut(r.num, MAX_NUM)
    sip = None if r.sip is None else cut(r.sip, MAX_TEXT)
    dn = None if r.dn is None else cut(r.dn, MAX_TEXT)
    return r if (num, sip, dn) == (r.num, r.sip, r.dn) else Remote(num=num, sip=sip, dn=dn)


def _bounded_cause(c: Cause) -> Cause:
    loc: Any = c.loc
    if isinstance(loc, (int, float, bool)) or loc is None:
        return c
    text = loc if isinstance(loc, str) else msgspec.json.encode(loc).decode()
    return c if len(text) <= MAX_TEXT else Cause(num=c.num, loc=cut(text, MAX_TEXT))


def _merge_party(remote: Remote, party: Party | UnsetType, *, append: bool = False) -> Remote:
    if party is UNSET:
        return remote
    num, sip = remote.num, remote.sip
    if party.num is not UNSET:
        num = cut((num or "") + party.num if append else party.num, MAX_NUM)
    if party.sip is not UNSET:
        sip = cut(party.sip, MAX_TEXT)
    return structs.replace(remote, num=num, sip=sip)


class CallTracker:
    """The calls of one device. Not thread-safe; one per device session."""

    def __init__(self, limits: CallLimits = CallLimits(), clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._max_calls = limits.max_calls
        self._clock = clock
        #: the calls, the least recently signaled first (a call moves to the end on each message)
        self._calls: dict[int, CallStatus] = {}
        #: call -> clock time of its last message
        self._seen: dict[int, float] = {}
        self._now = 0.0
        first = min((idle for idle in (limits.idle_s, limits.connected_idle_s) if idle > 0), default=0.0)
        #: a call silent for less than this is never idle; the scan stops at the first such call
        self._first_idle = first
        self._scan_every = min(SCAN_S, first / 8) if first else 0.0
        self._next_scan = self._scan_every if first else float("inf")

    def __len__(self) -> int:
        return len(self._calls)

    def calls(self) -> list[CallStatus]:
        return list(self._calls.values())

    def get(self, call: int) -> CallStatus | None:
        return self._calls.get(call)

    def sync(self, msg: Sync) -> CallStatus:
        """A call that exists at attach time. Always answers (one state event per Sync)."""
        info = msg.info
        status = CallStatus(
            call=msg.call,
            state=info.state if info.state is not None else CallState.NULL,
            in_=info.in_ if info.in_ is not UNSET else None,
            remote=_bounded_remote(info.remote) if info.remote is not UNSET else Remote(),
            channel=info.channel if info.channel is not UNSET else None,
            app=msg.call < 0,
        )
        self._keep(msg.call, status)
        return status

    def signaling(self, call: int, toward_device: bool, sig: Sig) -> CallStatus | None:
        """One Signaling message in the direction it travels; the new status if it changed."""
        old = self._calls.get(call)
        if sig.type == "setup" or old is None:
            cur = CallStatus(
                call=call,
                state=CallState.SETUP if sig.type == "setup" else CallState.NULL,
                in_=toward_device if sig.type == "setup" else None,
                app=call < 0,
            )
        else:
            cur = old
        new = self._apply(cur, toward_device, sig)
        if new.state is CallState.RELEASED:
            self._calls.pop(call, None)
            self._seen.pop(call, None)
        else:
            self._keep(call, new)
        return None if new == old else new

    def _keep(self, call: int, status: CallStatus) -> None:
        calls = self._calls
        calls.pop(call, None)  # to the end: the most recently signaled
        calls[call] = status
        self._now = self._seen[call] = self._clock()

    def forget(self, call: int) -> CallStatus | None:
        """The call ended unseen: its ``released`` status (no cause), or None if unknown."""
        cur = self._calls.pop(call, None)
        self._seen.pop(call, None)
        return None if cur is None else structs.replace(cur, state=CallState.RELEASED, cause=None)

    def release_all(self, cause: Cause | None = None) -> list[CallStatus]:
        """Forget every call (the attachment ended); the ``released`` status of each."""
        out = [structs.replace(c, state=CallState.RELEASED, cause=cause) for c in self._calls.values()]
        self._calls.clear()
        self._seen.clear()
        return out

    def expire(self) -> Sequence[CallStatus]:
        """Enforce the bounds after a message: the calls silent beyond their idle limit (looked
        for at most every :data:`SCAN_S`, at the time of the last message), then the least
        recently signaled calls beyond ``max_calls`` are dropped. Their ``released`` status,
        marked ``evicted``; usually nothing, cheaply."""
        calls = self._calls
        now = self._now
        if now < self._next_scan and len(calls) <= self._max_calls:
            return ()  # the common case
        out = []
        if now >= self._next_scan:
            self._next_scan = now + self._scan_every
            short, long = self.limits.idle_s, self.limits.connected_idle_s
            idle = []
            for call, st in calls.items():  # the least recently signaled first
                silent = now - self._seen[call]
                if silent < self._first_idle:
                    break
                limit = long if st.state in _LONG_LIVED else short
                if limit > 0 and silent >= limit:
                    idle.append(call)
            out += [self._evict(call, "idle") for call in idle]
        while len(calls) > self._max_calls:
            out.append(self._evict(next(iter(calls)), "too-many-calls"))
        return out

    def _evict(self, call: int, why: Evicted) -> CallStatus:
        st = self._calls.pop(call)
        del self._seen[call]
        return structs.replace(st, state=CallState.RELEASED, cause=None, evicted=why)

    @staticmethod
    def _apply(cur: CallStatus, toward_device: bool, sig: Sig) -> CallStatus:
        t = sig.type
        changes: dict = {}
        state = _BY_TYPE.get(t)
        if t == "disc":
            state = CallState.DISCONNECTED if toward_device else CallState.DISCONNECTING
        elif t == "rel":
            state = CallState.RELEASED
        if state is not None and state is not cur.state:
            changes["state"] = state
        if sig.cau is not UNSET and t in ("disc", "rel"):
            changes["cause"] = _bounded_cause(sig.cau)
        if sig.channel is not UNSET:
            changes["channel"] = sig.channel

        # The remote party: cg of an incoming call, cd of an outgoing one.
        remote = cur.remote
        incoming = cur.in_ if cur.in_ is not None else toward_device
        party = sig.cg if incoming else sig.cd
        if t == "info" and not incoming and cur.state in (CallState.SETUP, CallState.SETUP_ACK):
            remote = _merge_party(remote, sig.cd, append=True)  # overlap dialing
        elif t != "info":
            remote = _merge_party(remote, party)
        for f in sig.facilities():
            if f.type == "name_identification" and f.name is not UNSET and toward_device:
                # from the PBX side it names the remote party; from the device, the device itself
                remote = structs.replace(remote, dn=cut(f.name, MAX_TEXT))
            elif f.type == "hold_notify":
                changes["held"] = True
            elif f.type == "retrieve_notify":
                changes["held"] = False
            elif f.type == "cp_park":
                changes["state"] = CallState.PARKED
        if remote != cur.remote:
            changes["remote"] = remote
        return structs.replace(cur, **changes) if changes else cur
