"""Which replica should hold which device: the sans-I/O half of the leases (docs/SCALING.md).

Ownership itself is a lease held in RabbitMQ (a token in a single-active-consumer queue, see
:mod:`bridge.amqp.leases`); this module only decides what a replica *wants*, from what it has
heard of the others:

- :func:`rank` orders the live replicas for one device by rendezvous (highest random weight)
  hashing: every replica computes the same order from the same member set, a member leaving
  moves only its own devices (each to its next in rank), a member joining takes about 1/N of
  the devices from the others.
- :class:`Membership` is the set of live replicas, from their presence heartbeats.
- :class:`LeasePlan` answers, for one device: consume its lease queue (the replica is one of the
  first ``STANDBY`` in rank: the preferred holder and its stand-in), and hand the lease on (held
  here, another replica is preferred, the device is idle, and the member set has been stable long
  enough for the others to line up behind the lease).
- :class:`Orphans` answers, for a device this replica stands in line for: has no replica said it
  holds it for a while (then the adapter looks at its lease queue, and lines up again if the
  queue has no active consumer: RabbitMQ 3.10 can leave a quorum queue so).
- :meth:`LeasePlan.rejoin` answers the same for a device another replica holds: it handed the
  lease to this replica, the preferred one, and it came straight back (this replica's consumer is
  not in line): line up again.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

import msgspec

#: replicas consuming each lease queue: the preferred holder and one stand-in (failover is then
#: immediate: the broker hands the token to the stand-in the moment the holder's channel closes)
STANDBY = 2
#: a member unheard for this many heartbeats is gone (for balance only: failover does not wait
#: for it, the broker hands a dead replica's leases on at once)
MISSED_HEARTBEATS = 5
#: a device this replica stands in line for that every other live replica has said, for this many
#: heartbeats, it does not hold is an orphan (:class:`Orphans`); twice as many where this replica
#: is not the preferred holder, so that one replica repairs it, not two at once
ORPHAN_BEATS = 4
#: a hand-on that bounced (its token came back here at once: the preferred replica was not in
#: line) is not tried again for the settle time doubled per bounce in a row, up to this many times
#: the settle time (:meth:`LeasePlan.hand_on`)
BOUNCE_BACKOFF_MAX = 64
#: a heartbeat names at most this many devices whose hand-on bounced (the next ones in the next)
BOUNCED_PER_BEAT = 200


def weight(member: str, hw: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}\0{hw}".encode(), digest_size=8).digest(), "big")


def config_id(devices: Iterable[str]) -> str:
    """The configuration a token's wanted state was made under: a short hash of the configured
    device list (order and duplicates do not matter). See THE RULE below."""
    return hashlib.blake2b("\0".join(sorted(set(devices))).encode(), digest_size=6).hexdigest()


def rank(hw: str, members: Iterable[str]) -> list[str]:
    """The members ordered by preference for holding ``hw`` (stable across processes)."""
    return sorted(members, key=lambda m: weight(m, hw), reverse=True)


class Presence(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A replica's heartbeat on the presence exchange."""

    v: int = 1
    instance: str
    #: devices held now
    held: int = 0
    #: devices not in the configuration that a command made known: the others learn them here,
    #: so they can hold them and stand in for them
    dynamic: list[str] = []
    #: just started: the others answer at once with their own heartbeat
    hello: bool = False
    #: stopping: forget me now rather than after the timeout
    bye: bool = False
    #: which devices are held now (:meth:`Orphans.announce`): the configuration ``held_map`` is
    #: made over (config_id), a bitmap over its sorted devices (bit i of byte i // 8: the i-th is
    #: held; 10,000 devices in 1,250 bytes), and the held devices not in it by name
    cfg: str = ""
    held_map: bytes = b""
    held_other: frozenset[str] = frozenset()
    #: devices held here whose hand-on to their preferred replica came straight back, and how
    #: often in a row (:meth:`LeasePlan.bounced`): that replica is not in line for them, and
    #: lines up again when it hears it (:meth:`LeasePlan.rejoin`)
    bounced: dict[str, int] = {}


PRESENCE_ENCODER = msgspec.json.Encoder()
PRESENCE_DECODER = msgspec.json.Decoder(Presence)


class Membership:
    """The live replicas, as heard on the presence exchange (this one always included)."""

    def __init__(self, me: str, heartbeat_s: float, now: float) -> None:
        self.me = me
        self.timeout_s = heartbeat_s * MISSED_HEARTBEATS
        self._last: dict[str, float] = {}
        #: when the member set last changed
        self.changed_at = now
        self._live: tuple[str, ...] = (me,)
        #: each live member's last heartbeat
        self.said: dict[str, Presence] = {}

    @property
    def live(self) -> tuple[str, ...]:
        return self._live

    def heard(self, p: Presence, now: float) -> bool:
        """Take a heartbeat; True if the member set changed."""
        if p.instance == self.me:
            return False
        if p.bye:
            return self._forget([p.instance], now)
        new = p.instance not in self._last
        self._last[p.instance] = now
        self.said[p.instance] = p
        if new:
            self._update(now)
        return new

    def fresh(self, member: str, now: float) -> bool:
        """``member`` was heard within two heartbeats (this replica always is): a lease is handed
        on only to a fresh one, never to a replica that may be dead (SIGKILL: its heartbeats stop
        at once, it is forgotten only after MISSED_HEARTBEATS)."""
        if member == self.me:
            return True
        last = self._last.get(member)
        return last is not None and now - last <= 2 * self.timeout_s / MISSED_HEARTBEATS

    def expire(self, now: float) -> list[str]:
        """Forget members unheard for too long; the ones forgotten."""
        gone = [m for m, t in self._last.items() if now - t > self.timeout_s]
        self._forget(gone, now)
        return gone

    def _forget(self, members: list[str], now: float) -> bool:
        changed = False
        for m in members:
            changed |= self._last.pop(m, None) is not None
            self.said.pop(m, None)
        if changed:
            self._update(now)
        return changed

    def _update(self, now: float) -> None:
        self._live = tuple(sorted((self.me, *self._last)))
        self.changed_at = now


class LeasePlan:
    """What this replica wants, per device, for the current member set."""

    def __init__(self, membership: Membership, heartbeat_s: float) -> None:
        self.m = membership
        #: the member set must be this old before a lease is handed on, so that the replica it is
        #: handed to has had time to line up (and the ones it is not for to step back)
        self.settle_s = 3 * heartbeat_s
        self._ranks: dict[str, list[str]] = {}
        self._for: tuple[str, ...] = ()
        #: device -> when it was handed on from here (until its token comes back, or not)
        self._handed: dict[str, float] = {}
        #: device -> (hand-ons that bounced in a row, none again before, for which member set)
        self._bounced: dict[str, tuple[int, float, tuple[str, ...]]] = {}
        #: (holder, device) -> the bounces in a row this replica lined up again for (rejoin)
        self._rejoined: dict[tuple[str, str], int] = {}
        self._bounced_from = 0  # where the next heartbeat's bounced devices start (bounced)

    def ranking(self, hw: str) -> list[str]:
        if self._for != self.m.live:
            self._ranks.clear()
            self._for = self.m.live
        r = self._ranks.get(hw)
        if r is None:
            r = self._ranks[hw] = rank(hw, self._for)[:STANDBY]
        return r

    def preferred(self, hw: str) -> str:
        return self.ranking(hw)[0]

    def settled(self, now: float) -> bool:
        """The member set has not changed for ``settle_s``."""
        return now - self.m.changed_at >= self.settle_s

    def hand_on(self, hw: str, idle: bool, now: float) -> bool:
        """Give up a lease held here: only an idle device (no call, no command in progress),
        only to another preferred holder heard lately, only once the member set has settled,
        and not while a hand-on of it that bounced backs off (:meth:`holding`)."""
        if not idle or not self.settled(now):
            return False
        p = self.preferred(hw)
        if p == self.m.me or not self.m.fresh(p, now):
            return False
        bounced = self._bounced.get(hw)
        return bounced is None or bounced[2] != self.m.live or now >= bounced[1]

    def handed_on(self, hw: str, now: float) -> None:
        """The lease of ``hw`` was handed on from here."""
        self._handed[hw] = now

    def holding(self, hw: str, now: float) -> int:
        """The token of ``hw`` arrived here. If it was handed on from here within the settle
        time, the hand-on bounced: the preferred replica is not in line for it (its consumer on
        the lease queue is gone while the replica lives: a quorum queue shows only its active
        consumer, so the holder cannot see that before), and the broker gave the token back to
        this replica, the stand-in. Then the next hand-on of it waits the settle time doubled
        per bounce in a row (at most ``BOUNCE_BACKOFF_MAX`` times), so that the device is not
        detached and attached again every few heartbeats, and this replica's heartbeat says so
        (:meth:`bounced`: the preferred replica lines up again). Returns the bounces in a row
        (0: none)."""
        at = self._handed.pop(hw, None)
        if at is None:
            return 0
        if now - at > self.settle_s:  # it was taken, and came back later for another reason
            self._bounced.pop(hw, None)
            return 0
        n, _, live = self._bounced.get(hw, (0, 0.0, self.m.live))
        n = n + 1 if live == self.m.live else 1
        self._bounced[hw] = (n, now + self.settle_s * min(2 ** n, BOUNCE_BACKOFF_MAX), self.m.live)
        return n

    def backoff_s(self, hw: str, now: float) -> float:
        """Seconds until ``hw`` may be handed on again after bounces (0: not held back)."""
        bounced = self._bounced.get(hw)
        return max(0.0, bounced[1] - now) if bounced is not None and bounced[2] == self.m.live else 0.0

    def bounced(self, held: Iterable[str]) -> dict[str, int]:
        """For this replica's heartbeat: the devices of ``held`` whose hand-ons bounced, and how
        often in a row (under the current member set); at most ``BOUNCED_PER_BEAT`` of them, the
        next ones in the next heartbeat (a node's death can bounce many at once)."""
        out = [(hw, b[0]) for hw in held
               if (b := self._bounced.get(hw)) is not None and b[2] == self.m.live]
        if len(out) > BOUNCED_PER_BEAT:
            start = self._bounced_from % len(out)
            out = (out + out)[start:start + BOUNCED_PER_BEAT]
            self._bounced_from = start + BOUNCED_PER_BEAT
        return dict(out)

    def rejoin(self, p: Presence) -> list[str]:
        """The devices ``p``'s replica holds and says its hand-on of bounced, where this
        replica is the preferred holder: this replica's consumer on their lease queue is not in
        line (lost with a node, or never made), so it lines up again, once per bounce (the holder
        tries again only after its pause, :meth:`holding`, and by then the new consumer stands in
        line). The adapter does it for devices it stands in line for."""
        for key in [k for k in self._rejoined if k[0] not in self.m.live
                    or (k[0] == p.instance and k[1] not in p.bounced)]:
            del self._rejoined[key]  # that holder is gone, or its streak ended: what comes is new
        out = []
        for hw, n in p.bounced.items():
            key = (p.instance, hw)
            if n != self._rejoined.get(key) and self.preferred(hw) == self.m.me:
                self._rejoined[key] = n  # a count not heard before: a bounce not answered yet
                out.append(hw)
        return out


class Orphans:
    """Devices nobody holds: what the live replicas' heartbeats say they hold, and since when none
    of them has said so of a device this replica stands in line for.

    RabbitMQ 3.10.8 can leave a single-active-consumer quorum queue with its token ready and no
    active consumer after the node of its consumers died (docs/SCALING.md, "A lease queue nobody
    is given"): the replicas stand in line and the token is never delivered. Only devices lined up
    for here (IN_LINE) are watched, each replica says what it holds in every heartbeat, and a
    replica whose heartbeat does not say it for this configuration (not heard yet, another
    EPSIGNAL_DEVICES, an older version) counts as holding everything: no repair on a guess."""

    def __init__(self, membership: Membership, configured: Iterable[str], heartbeat_s: float) -> None:
        self.m = membership
        self.order = sorted(set(configured))
        self.cfg = config_id(self.order)
        self._index = {hw: i for i, hw in enumerate(self.order)}
        self.after_s = ORPHAN_BEATS * heartbeat_s
        #: device -> since when no other replica has said it holds it (watched devices only)
        self._since: dict[str, float] = {}

    def announce(self, held: Collection[str]) -> tuple[bytes, frozenset[str]]:
        """``held`` (the devices held here) for this replica's heartbeat: (held_map, held_other)."""
        bits = bytearray((len(self.order) + 7) // 8)
        other = []
        for hw in held:
            i = self._index.get(hw)
            if i is None:
                other.append(hw)
            else:
                bits[i >> 3] |= 1 << (i & 7)
        return bytes(bits), frozenset(other)

    def held_by(self, member: str, hw: str) -> bool | None:
        """What ``member``'s last heartbeat says of ``hw``: held, not held, or None (it does not
        say: not heard yet, or made under another configuration or by an older version)."""
        p = self.m.said.get(member)
        if p is None:
            return None
        if hw in p.held_other:
            return True
        if p.cfg != self.cfg:
            return None
        i = self._index.get(hw)
        if i is None:  # not configured: held_other names every such device held there
            return False
        return i >> 3 < len(p.held_map) and bool(p.held_map[i >> 3] >> (i & 7) & 1)

    def orphaned(self, hw: str, preferred: bool, now: float) -> bool:
        """``hw`` stands in line here, not held here: True once every other live replica has said
        it does not hold it for ORPHAN_BEATS heartbeats (twice that unless this replica is the
        preferred holder). Then the adapter looks at the queue, and calls :meth:`watch` again."""
        if any(self.held_by(m, hw) is not False for m in self.m.live if m != self.m.me):
            self._since.pop(hw, None)
            return False
        since = self._since.setdefault(hw, now)
        return now - since >= self.after_s * (1 if preferred else 2)

    def watch(self, hw: str, now: float | None = None) -> None:
        """Start counting ``hw``'s time anew (from ``now``: just looked at or repaired), or stop
        watching it (None: held here, or not in line here)."""
        if now is None:
            self._since.pop(hw, None)
        else:
            self._since[hw] = now


# ====================================================================== ownership: the state machine
#
# THE INVARIANT (issue 14; docs/SCALING.md). A replica runs device D only while
#
#   its consumer on D's lease queue is on its current, open lease channel, and it holds a token
#   for D delivered on that channel since it last began releasing D.
#
# It is enforced here and only here: a runner is started only by a StartRunner action, which
# only the HOLDING state emits; every way out of HOLDING stops the runner first; a token is only
# ever given back (nack) after the runner stopped *and* the consumer was cancelled (so no other
# token can reach another replica while ours still runs). bridge.amqp.leases carries the actions
# out and feeds the broker's answers back in; it decides nothing about ownership.
#
# The broker (RabbitMQ single-active-consumer queue) does the rest: it delivers only to the
# first consumer in line; basic.cancel keeps the cancelled consumer's unacked messages on its
# channel; closing a channel (crash, error, consumer timeout) requeues them in order for the
# next consumer. So a token moves only when its holder lets go of it: by nack after cancel-ok, or
# by losing its channel, and both leave the state machine OUT with its runner stopped.
#
#   state      consumer   token held   runner        events taken (-> next state)
#   OUT        none       none         off           line_up -> IN_LINE
#   IN_LINE    yes        none         off           token -> HOLDING; release -> LEAVING;
#                                                    consume_failed -> OUT
#   HOLDING    yes        yes          per token     token (keep the newer), want, renew, command;
#                                                    release -> RELEASING
#   RELEASING  yes        yes          stopping      runner_stopped (every stop ended) -> LEAVING
#   LEAVING    cancelled  maybe        off           cancel_ok -> OUT (token nacked)
#   any        -          -            -             channel_lost, broker_cancel -> OUT (runner
#                                                    stopped; the broker already took the token)
#
# THE RULE: configuration versus commands (issue 20; docs/SCALING.md). The token carries the
# device's wanted state (attach or not), the configuration it was made under (``cfg``: a hash of
# EPSIGNAL_DEVICES, :func:`config_id`), since when and by whom. For a configured device a
# command's effect lasts until the configured device list changes:
#
#   - a token saying "detached" made under this replica's configuration is obeyed: the device
#     stays detached across restarts, failovers and rolling restarts (same configuration), and
#     the holder says so (Wanted: a log line and a `detached` event, reason `wanted-detached`);
#   - one made under another configuration (a changed EPSIGNAL_DEVICES, or a token older than
#     this rule) is void: the device is attached as configured, and the token is replaced at once
#     by one saying so under this configuration (Wanted, reason `stale-detach`), so a replica
#     still on the old configuration cannot bring the old detach back;
#   - a device not in the configuration (attached by command) follows the commands only.
#
# How long waiting commands and the wanted state last without any replica (queue TTLs) is the
# adapter's topology: bridge.amqp.topology.declare_lease_queue.
#
# A command delivered IN_LINE (the token is on its way: a hand-on requeues it after commands
# that went straight to the new active consumer) waits for it (Defer), and is requeued if it does
# not come; RELEASING or LEAVING, it is requeued for the next holder. Tokens are minted only
# where the invariant allows no holder: a queue declared with nothing ready *and no consumer*
# (a held token is unacked, so the ready count alone does not tell; a holder is a consumer).



class LeaseError(Exception):
    """An event the state machine does not take in its state (a bug in the caller)."""


class State(enum.Enum):
    """Where one device's lease stands, as one replica sees it (the table below)."""

    OUT = "out"
    IN_LINE = "in line"
    HOLDING = "holding"
    RELEASING = "releasing"
    LEAVING = "leaving"


class Ev(enum.Enum):
    """The events of the lease state machine (the methods of :class:`Lease`)."""

    LINE_UP = "line_up"
    TOKEN = "token"
    COMMAND = "command"
    WANT = "want"
    RENEW = "renew"
    RELEASE = "release"
    RUNNER_STOPPED = "runner_stopped"
    CANCEL_OK = "cancel_ok"
    CHANNEL_LOST = "channel_lost"
    BROKER_CANCEL = "broker_cancel"
    CONSUME_FAILED = "consume_failed"


S, E = State, Ev
#: the only transitions there are (h11 ``_state.py`` style); anything else raises LeaseError
TRANSITIONS: dict[State, dict[Ev, State]] = {
    S.OUT: {E.LINE_UP: S.IN_LINE, E.RUNNER_STOPPED: S.OUT, E.CHANNEL_LOST: S.OUT},
    S.IN_LINE: {E.TOKEN: S.HOLDING, E.COMMAND: S.IN_LINE, E.RELEASE: S.LEAVING,
                E.RUNNER_STOPPED: S.IN_LINE, E.CHANNEL_LOST: S.OUT, E.BROKER_CANCEL: S.OUT,
                E.CONSUME_FAILED: S.OUT},
    S.HOLDING: {E.TOKEN: S.HOLDING, E.COMMAND: S.HOLDING, E.WANT: S.HOLDING, E.RENEW: S.HOLDING,
                E.RELEASE: S.RELEASING, E.RUNNER_STOPPED: S.HOLDING, E.CHANNEL_LOST: S.OUT,
                E.BROKER_CANCEL: S.OUT},
    S.RELEASING: {E.TOKEN: S.RELEASING, E.COMMAND: S.RELEASING, E.RUNNER_STOPPED: S.LEAVING,
                  E.CHANNEL_LOST: S.OUT, E.BROKER_CANCEL: S.OUT},
    S.LEAVING: {E.TOKEN: S.LEAVING, E.COMMAND: S.LEAVING, E.CANCEL_OK: S.OUT,
                E.RUNNER_STOPPED: S.LEAVING, E.CHANNEL_LOST: S.OUT, E.BROKER_CANCEL: S.OUT},
}


# ---------------------------------------------------------------- actions (carried out by the I/O side)
@dataclass(frozen=True)
class Consume:
    """Declare the lease queue (mint a token if it has nothing ready and no consumer), then
    basic.consume with ``ctag`` on the lease channel of ``epoch``."""
    hw: str
    epoch: int
    ctag: str


@dataclass(frozen=True)
class Cancel:
    """basic.cancel the consumer ``ctag`` on the lease channel of ``epoch`` (feed
    ``cancel_ok`` back when the broker confirms)."""
    hw: str
    epoch: int
    ctag: str


@dataclass(frozen=True)
class Ack:
    """Acknowledge (destroy) a duplicate token."""
    hw: str
    epoch: int
    dtag: int


@dataclass(frozen=True)
class Nack:
    """Requeue a message (a token given back, a command for the next holder)."""
    hw: str
    epoch: int
    dtag: int


@dataclass(frozen=True)
class Publish:
    """Publish a token of generation ``gen`` to the lease queue (confirmed), made under
    configuration ``cfg``; ``since``/``by`` None: now, by this replica (a new wanted state)."""
    hw: str
    gen: int
    attach: bool
    cfg: str = ""
    since: float | None = None
    by: str | None = None


@dataclass(frozen=True)
class StartRunner:
    """Run the device here (its runner: the PBX session): the token is held and says attach."""
    hw: str
    #: the token was someone else's before: give the PBX a moment to see their session end
    takeover: bool = False


@dataclass(frozen=True)
class StopRunner:
    """Stop the runner; feed ``runner_stopped(seq)`` back when it has ended."""
    hw: str
    seq: int


@dataclass(frozen=True)
class Process:
    """Carry the command out (its delivery stays unacked until answered)."""
    hw: str
    dtag: int


@dataclass(frozen=True)
class Defer:
    """Hold the command until the token arrives, then offer it again (``retry=True``)."""
    hw: str
    dtag: int


@dataclass(frozen=True)
class Wanted:
    """Say (log, event) why a held device is not attached as configured, or why a command's
    detach no longer holds: ``reason`` is ``wanted-detached`` (a detach made under this
    configuration is obeyed) or ``stale-detach`` (one made under another configuration is void:
    attaching as configured)."""
    hw: str
    reason: str
    cfg: str
    since: float
    by: str


Action = Consume | Cancel | Ack | Nack | Publish | StartRunner | StopRunner | Process | Defer | Wanted


@dataclass
class Held:
    """A token held: where it was delivered and what it says."""
    epoch: int
    dtag: int
    gen: int
    #: the wanted state in effect (THE RULE applied: a void detach reads as attach)
    attach: bool
    at: float = 0.0
    #: the configuration the wanted state was made under, since when (Unix time), by whom
    cfg: str = ""
    since: float = 0.0
    by: str = ""


@dataclass
class Lease:
    """One device's ownership, as seen by one replica. Every method is an event; it returns the
    actions to carry out, in order."""
    hw: str
    #: this replica's configuration (config_id) and whether ``hw`` is in it (THE RULE)
    cfg: str = ""
    configured: bool = True
    state: State = State.OUT
    #: lease channel epoch and consumer tag of the current consumer (None when OUT)
    epoch: int | None = None
    ctag: str | None = None
    token: Held | None = None
    #: the runner is (wanted) on: only ever True in HOLDING
    runner: bool = False
    #: the last StopRunner's number, and the ones not ended yet: RELEASING waits for all of them
    #: (a runner stopped by a detach may still be stopping when the release begins)
    stop_seq: int = 0
    stopping: set[int] = field(default_factory=set)
    #: the token this replica published last and has not received yet (a renewal, a want, a
    #: void detach replaced): tokens older than it are held but not obeyed, they say what was
    #: wanted before; a renewal is not asked for again until it arrives
    pending: Publish | None = None
    history: list[State] = field(default_factory=list, repr=False)

    # -------------------------------------------------------------- the table
    def _go(self, ev: Ev) -> State:
        nxt = TRANSITIONS[self.state].get(ev)
        if nxt is None:
            raise LeaseError(f"device {self.hw}: {ev.value} in state {self.state.value}")
        return nxt

    def _enter(self, state: State) -> None:
        self.state = state
        if state is State.OUT:
            self.epoch = self.ctag = None
            self.token = None
            self.pending = None
        self.check()

    def _stop(self) -> list[Action]:
        if not self.runner:
            return []
        self.runner = False
        self.stop_seq += 1
        self.stopping.add(self.stop_seq)
        return [StopRunner(self.hw, self.stop_seq)]

    def _cancel(self) -> Cancel:
        """Cancel the current consumer: there is one in every state but OUT (``line_up`` sets
        ``epoch`` and ``ctag``, only entering OUT clears them)."""
        if self.epoch is None or self.ctag is None:
            raise LeaseError(f"device {self.hw}: no consumer to cancel in state {self.state.value}")
        return Cancel(self.hw, self.epoch, self.ctag)

    def _mine(self, epoch: int, ctag: str) -> bool:
        return self.epoch == epoch and self.ctag == ctag

    # -------------------------------------------------------------- events
    def line_up(self, epoch: int, ctag: str) -> list[Action]:
        nxt = self._go(Ev.LINE_UP)
        self.epoch, self.ctag = epoch, ctag
        self._enter(nxt)
        return [Consume(self.hw, epoch, ctag)]

    def token_delivered(self, epoch: int, ctag: str, dtag: int, gen: int, attach: bool,
                        redelivered: bool = False, now: float = 0.0, cfg: str = "",
                        since: float = 0.0, by: str = "") -> list[Action]:
        """A token arrived on consumer ``ctag`` of channel ``epoch``; ``attach``/``cfg``/
        ``since``/``by``: the wanted state it carries (THE RULE decides what it means here)."""
        if not self._mine(epoch, ctag):
            # a delivery to a consumer given up (its cancel-ok overtook it) or an old channel's:
            # not ours to hold; back to the queue if its channel still lives (the caller knows)
            return [Nack(self.hw, epoch, dtag)]
        nxt = self._go(Ev.TOKEN)
        out: list[Action] = []
        if self.token is not None:  # two tokens: keep the newer generation, destroy the other
            if gen <= self.token.gen:
                self._enter(nxt)
                return [Ack(self.hw, epoch, dtag)]
            out.append(Ack(self.hw, self.token.epoch, self.token.dtag))
        p = self.pending
        if p is not None and gen < p.gen:
            # older than what this replica wants now (its own token is on the way): hold it, obey
            # the newer wish (already carried out when it was made)
            self.token = Held(epoch, dtag, gen, p.attach, now, p.cfg, p.since or 0.0, p.by or "")
            self._enter(nxt)
            return out
        self.pending = None
        entering = self.state is State.IN_LINE and nxt is State.HOLDING
        if not attach and self.configured and cfg != self.cfg:
            # made under another configuration: void; attach as configured, and say so for good
            self.token = Held(epoch, dtag, gen, True, now, self.cfg)
            if nxt is State.HOLDING:
                out += [Wanted(self.hw, "stale-detach", cfg, since, by), self._publish(True, self.cfg)]
        else:
            self.token = Held(epoch, dtag, gen, attach, now, cfg, since, by)
        if nxt is State.HOLDING:
            if self.token.attach and not self.runner:
                self.runner = True
                out.append(StartRunner(self.hw, takeover=redelivered))
            elif not self.token.attach:
                out += self._stop()
                if entering:
                    out.append(Wanted(self.hw, "wanted-detached", cfg, since, by))
        self._enter(nxt)
        return out

    def _publish(self, attach: bool, cfg: str, since: float | None = None, by: str | None = None) -> Publish:
        """The next token (newer than the held one and any on its way)."""
        assert self.token is not None
        gen = max(self.token.gen, self.pending.gen if self.pending else 0) + 1
        self.pending = Publish(self.hw, gen, attach, cfg, since, by)
        return self.pending

    def command(self, epoch: int, ctag: str, dtag: int, retry: bool = False) -> list[Action]:
        if not self._mine(epoch, ctag):
            return [Nack(self.hw, epoch, dtag)]
        nxt = self._go(Ev.COMMAND)
        self._enter(nxt)
        if self.state is State.HOLDING:
            return [Process(self.hw, dtag)]
        if self.state is State.IN_LINE and not retry:
            return [Defer(self.hw, dtag)]
        return [Nack(self.hw, epoch, dtag)]

    def want(self, attach: bool) -> list[Action]:
        """An attach/detach command carried out here (HOLDING only): the runner follows, and
        the token is replaced by one of the next generation saying so (the old one is acked
        when the new one arrives: never a moment without one)."""
        nxt = self._go(Ev.WANT)
        assert self.token is not None
        out: list[Action] = []
        if attach and not self.runner:
            self.runner = True
            out.append(StartRunner(self.hw))
        elif not attach:
            out += self._stop()
        if self.wanted() != attach:
            out.append(self._publish(attach, self.cfg))
        self._enter(nxt)
        return out

    def renew(self) -> list[Action]:
        """Replace the held token by a fresh delivery of the next generation before the broker's
        consumer timeout (which counts from the delivery) closes the channel over it."""
        nxt = self._go(Ev.RENEW)
        assert self.token is not None
        self._enter(nxt)
        if self.pending is not None:
            return []
        t = self.token
        return [self._publish(t.attach, t.cfg, t.since, t.by)]

    def republish(self) -> list[Action]:
        """What the token carries besides the wanted state changed here (the device's intercept
        rules, docs/INTERCEPT.md): replace it by the next generation (HOLDING only), so that the
        next holder reads it."""
        nxt = self._go(Ev.RENEW)
        assert self.token is not None
        self._enter(nxt)
        p, t = self.pending, self.token
        if p is not None:
            return [self._publish(p.attach, p.cfg, p.since, p.by)]
        return [self._publish(t.attach, t.cfg, t.since, t.by)]

    def wanted(self) -> bool:
        """The wanted state in effect (HOLDING): the last one asked for, else the token's."""
        assert self.token is not None
        return self.pending.attach if self.pending is not None else self.token.attach

    def release(self) -> list[Action]:
        """Give the lease up (hand on, step out of line): stop the runner, then cancel, then
        give the token back."""
        nxt = self._go(Ev.RELEASE)
        if nxt is State.LEAVING:
            self._enter(nxt)
            return [self._cancel()]
        self.runner = True  # RELEASING always waits for a StopRunner of its own
        out = self._stop()
        self._enter(nxt)
        return out

    def runner_stopped(self, seq: int) -> list[Action]:
        self.stopping.discard(seq)
        if self.state is State.RELEASING and self.stopping:
            return []  # another stop has not ended yet: the release waits for every one
        nxt = self._go(Ev.RUNNER_STOPPED)
        if self.state is not State.RELEASING:
            self._enter(nxt)
            return []
        self._enter(nxt)
        return [self._cancel()]

    def cancel_ok(self, epoch: int, ctag: str) -> list[Action]:
        if not self._mine(epoch, ctag):
            return []
        nxt = self._go(Ev.CANCEL_OK)
        held = self.token
        self._enter(nxt)
        return [Nack(self.hw, held.epoch, held.dtag)] if held is not None else []

    def channel_lost(self, epoch: int) -> list[Action]:
        """The lease channel of ``epoch`` closed: every token on it is the broker's again."""
        if self.epoch != epoch:
            return []
        nxt = self._go(Ev.CHANNEL_LOST)
        out = self._stop()
        self._enter(nxt)
        return out

    def broker_cancel(self, epoch: int, ctag: str) -> list[Action]:
        """The broker cancelled our consumer (the queue was deleted, token and all)."""
        if not self._mine(epoch, ctag):
            return []
        nxt = self._go(Ev.BROKER_CANCEL)
        out = self._stop()
        self._enter(nxt)
        return out

    def consume_failed(self, epoch: int, ctag: str) -> list[Action]:
        """Lining up failed before the consumer was made (the queue's declare or its first
        token raised): not in line, so OUT, to line up again. Left IN_LINE it would wait for a
        token that can never come, and a holder's hand-ons to it would bounce for good. Nothing
        if the lease has moved on meanwhile (the channel was lost; a release began)."""
        if not self._mine(epoch, ctag) or self.state is not State.IN_LINE:
            return []
        self._enter(self._go(Ev.CONSUME_FAILED))
        return []

    # -------------------------------------------------------------- the invariant
    @property
    def holding(self) -> bool:
        return self.state is State.HOLDING

    def check(self, open_epoch: int | None = None) -> None:
        """The invariant, as far as this replica can know it (``open_epoch``: its current open
        lease channel, when the caller knows it). Raises LeaseError."""
        if self.runner and not (self.state is State.HOLDING and self.token is not None
                                and self.token.epoch == self.epoch and self.ctag is not None):
            raise LeaseError(f"device {self.hw}: runner on in state {self.state.value} with token {self.token}")
        if self.runner and open_epoch is not None and self.epoch != open_epoch:
            raise LeaseError(f"device {self.hw}: runner on for channel {self.epoch}, open is {open_epoch}")
        if self.state is State.OUT and (self.token is not None or self.runner):
            raise LeaseError(f"device {self.hw}: OUT with a token or a runner")
