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
"""

from __future__ import annotations

from msgspec import UNSET, Struct, field, structs

from bridge.protocol.messages import CallState, Remote, Sync
from bridge.protocol.signal import Cause, Party, Sig

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


def _merge_party(remote: Remote, party: Party | object, *, append: bool = False) -> Remote:
    if party is UNSET:
        return remote
    num, sip = remote.num, remote.sip
    if party.num is not UNSET:
        num = (num or "") + party.num if append else party.num
    if party.sip is not UNSET:
        sip = party.sip
    return structs.replace(remote, num=num, sip=sip)


class CallTracker:
    """The calls of one device. Not thread-safe; one per device session."""

    def __init__(self) -> None:
        self._calls: dict[int, CallStatus] = {}

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
            remote=info.remote if info.remote is not UNSET else Remote(),
            channel=info.channel if info.channel is not UNSET else None,
            app=msg.call < 0,
        )
        self._calls[msg.call] = status
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
        else:
            self._calls[call] = new
        return None if new == old else new

    def forget(self, call: int) -> CallStatus | None:
        """The call ended unseen: its ``released`` status (no cause), or None if unknown."""
        cur = self._calls.pop(call, None)
        return None if cur is None else structs.replace(cur, state=CallState.RELEASED, cause=None)

    def release_all(self, cause: Cause | None = None) -> list[CallStatus]:
        """Forget every call (the attachment ended); the ``released`` status of each."""
        out = [structs.replace(c, state=CallState.RELEASED, cause=cause) for c in self._calls.values()]
        self._calls.clear()
        return out

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
            changes["cause"] = sig.cau
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
                remote = structs.replace(remote, dn=f.name)
            elif f.type == "hold_notify":
                changes["held"] = True
            elif f.type == "retrieve_notify":
                changes["held"] = False
            elif f.type == "cp_park":
                changes["state"] = CallState.PARKED
        if remote != cur.remote:
            changes["remote"] = remote
        return structs.replace(cur, **changes) if changes else cur
