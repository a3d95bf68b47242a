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
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import msgspec

#: replicas consuming each lease queue: the preferred holder and one stand-in (failover is then
#: immediate: the broker hands the token to the stand-in the moment the holder's channel closes)
STANDBY = 2
#: a member unheard for this many heartbeats is gone (for balance only: failover does not wait
#: for it, the broker hands a dead replica's leases on at once)
MISSED_HEARTBEATS = 5


def weight(member: str, hw: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}\0{hw}".encode(), digest_size=8).digest(), "big")


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
        if new:
            self._update(now)
        return new

    def expire(self, now: float) -> list[str]:
        """Forget members unheard for too long; the ones forgotten."""
        gone = [m for m, t in self._last.items() if now - t > self.timeout_s]
        self._forget(gone, now)
        return gone

    def _forget(self, members: list[str], now: float) -> bool:
        changed = False
        for m in members:
            changed |= self._last.pop(m, None) is not None
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
        only to another live preferred holder, only once the member set has settled."""
        return idle and self.preferred(hw) != self.m.me and self.settled(now)
