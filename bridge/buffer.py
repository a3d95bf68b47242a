"""The event buffer between the PBX side and the broker. Pure: no I/O, no clock of its own.

Events wait here, in order, until the broker confirms them. ``take()`` hands the oldest
unsent event to the publisher and keeps it as in flight; ``confirm()`` forgets it;
``requeue()`` puts failed in-flight events back at the front, in their original order (they are
published again: a consumer may see a duplicate, never a loss).

The buffer is bounded by count, by bytes (event bodies: a PBX sending large frames while the
broker is away must not exhaust memory) and by age. What is dropped (the oldest unsent events first) is
counted and remembered as per-device ``seq`` ranges until :meth:`take_gaps` collects them for a
gap event. An *episode* runs from the first drop until the buffer is empty again, so a caller
can log once per episode rather than once per event.

A broker *nack* concerns one event (e.g. a consumer's queue at its ``x-max-length`` with
``reject-publish``), not the link, so it is handled per device: :meth:`nacked` puts the event in
its device's *lane*, where it waits ``bridge.backoff.nack_pause(attempts)`` before it goes
again, and every later event of that device joins the lane behind it (per-device order kept) while other devices'
events go on as before. When the pause is over and nothing of the lane is in flight, the lane
sends what it holds, in order; a lane with nothing left disappears. After ``max_attempts`` nacks
an event is dropped and announced as a gap (reason ``nacked``). The pause belongs to the event:
confirms of other events never shorten it.
"""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from bridge.backoff import nack_pause
from bridge.events import Outgoing


class Entry(msgspec.Struct, gc=False):
    """One event in the buffer: ``id`` orders it (gap announcements pushed to the front have
    negative ids), ``enqueued`` is the clock time it arrived (the age bound counts from it).
    Not tracked by the cyclic GC, as :class:`~bridge.events.Outgoing`: no cycle goes through it."""

    id: int
    event: Outgoing
    enqueued: float
    #: broker nacks so far
    attempts: int = 0



@dataclass(slots=True)
class _Lane:
    """One device's events held behind a nacked one, in ``id`` order."""

    entries: list[Entry]
    ready_at: float = 0.0
    #: ids of the lane's events in flight
    inflight: set[int] = field(default_factory=set)
    #: sending: the pause is over and the lane's events go, in order, until none is left
    open: bool = False


@dataclass
class BufferStats:
    """The buffer's counters since it was made (the metrics read them)."""

    appended: int = 0
    confirmed: int = 0
    dropped_full: int = 0
    dropped_age: int = 0
    #: events the broker can never take (e.g. a routing key over 255 bytes)
    dropped_invalid: int = 0
    #: events nacked ``max_attempts`` times
    dropped_nacked: int = 0
    #: broker nacks (each attempt counted)
    nacks: int = 0
    episodes: int = 0
    episodes_closed: int = 0
    #: events dropped in the last closed episode
    last_episode_dropped: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_age + self.dropped_invalid + self.dropped_nacked


@dataclass
class _Gaps:
    """What was dropped and not announced yet: the reasons, and per device its ``seq`` ranges
    (``[first, last]``, in order)."""

    reason: set[str] = field(default_factory=set)
    ranges: dict[str, list[list[int]]] = field(default_factory=dict)

    def add(self, hw: str, seq: int, reason: str) -> None:
        self.reason.add(reason)
        r = self.ranges.setdefault(hw, [])
        if r and r[-1][1] + 1 == seq:
            r[-1][1] = seq
        else:
            r.append([seq, seq])


class EventBuffer:
    """The events between the PBX side and the broker, oldest first, bounded by count, bytes
    and age; see the module doc. Pure: the clock is the caller's (``clock``)."""

    def __init__(self, max_events: int, max_age_s: float, clock: Callable[[], float],
                 max_attempts: int = 6, max_bytes: int = 256 * 2**20) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        #: bytes of the event bodies held (waiting, in lanes or in flight)
        self.bytes = 0
        self.max_age_s = max_age_s
        self.max_attempts = max_attempts
        self._clock = clock
        self._ids = itertools.count()
        self._pending: deque[Entry] = deque()
        self._inflight: dict[int, Entry] = {}
        self._lanes: dict[str, _Lane] = {}
        self._in_lanes = 0
        self._gaps = _Gaps()
        self.stats = BufferStats()
        #: True from the first drop until the buffer is empty again
        self.in_episode = False
        self._episode_start = 0

    def __len__(self) -> int:
        return len(self._pending) + len(self._inflight) + self._in_lanes

    @property
    def pending(self) -> int:
        """Events waiting to be sent (in lanes too)."""
        return len(self._pending) + self._in_lanes

    @property
    def held_devices(self) -> int:
        """Devices whose events wait behind a nacked one."""
        return len(self._lanes)

    def next_retry(self) -> float | None:
        """When the earliest lane may send again (None: no lane is waiting)."""
        times = [ln.ready_at for ln in self._lanes.values() if not ln.inflight and ln.entries]
        return min(times) if times else None

    def append(self, event: Outgoing) -> None:
        self.stats.appended += 1
        if len(self) >= self.max_events:
            self._drop_oldest("buffer-full")
        self.bytes += len(event.body)
        while self.bytes > self.max_bytes and self._drop_oldest("buffer-full"):
            pass
        self._pending.append(Entry(next(self._ids), event, self._clock()))

    def push_front(self, event: Outgoing) -> None:
        """An event that must go out before everything waiting (the gap announcement). It is
        held to the byte bound too: the oldest unsent device events make room (their drop is
        announced by the next gap event), never the announcement itself."""
        self.bytes += len(event.body)
        while self.bytes > self.max_bytes and self._drop_oldest("buffer-full"):
            pass
        self._pending.appendleft(Entry(-next(self._ids), event, self._clock()))

    def take(self) -> Entry | None:
        """The oldest unsent event, now in flight; None when nothing is waiting (or only
        lanes whose pause is not over)."""
        self.expire()
        lanes = self._lanes
        if lanes:
            e = self._take_from_lane()
            if e is not None:
                return e
        pending = self._pending
        while pending:
            e = pending.popleft()
            hw = e.event.hw
            if lanes and hw is not None and (lane := lanes.get(hw)) is not None:
                self._to_lane(lane, e)  # behind its device's nacked event
                continue
            self._inflight[e.id] = e
            return e
        return None

    def _take_from_lane(self) -> Entry | None:
        now = None
        for lane in self._lanes.values():
            if not lane.entries:
                lane.open = False
                continue
            if not lane.open:
                if lane.inflight:
                    continue
                now = self._clock() if now is None else now
                if lane.ready_at > now:
                    continue
                lane.open = True
            e = lane.entries.pop(0)
            self._in_lanes -= 1
            if not lane.entries:
                lane.open = False
            lane.inflight.add(e.id)
            self._inflight[e.id] = e
            return e
        return None

    def _to_lane(self, lane: _Lane, e: Entry) -> None:
        bisect.insort(lane.entries, e, key=_entry_id)
        self._in_lanes += 1

    def confirm(self, entry: Entry) -> None:
        if self._inflight.pop(entry.id, None) is not None:
            self.stats.confirmed += 1
            self.bytes -= len(entry.event.body)
        if self._lanes:
            self._lane_done(entry)
        if self.in_episode and not self:
            self.in_episode = False
            self.stats.episodes_closed += 1
            self.stats.last_episode_dropped = self.stats.dropped - self._episode_start

    def _lane_done(self, entry: Entry) -> None:
        """A lane's event in flight is settled; a lane with nothing left goes."""
        hw = entry.event.hw
        if hw is None:  # a gap announcement: never in a lane
            return
        lane = self._lanes.get(hw)
        if lane is not None:
            lane.inflight.discard(entry.id)
            if not lane.entries and not lane.inflight:
                del self._lanes[hw]

    def discard(self, entry: Entry) -> None:
        """An in-flight event that can never be published: dropped, counted, announced as a gap."""
        if self._inflight.pop(entry.id, None) is None:
            return
        self._lane_done(entry)
        self.bytes -= len(entry.event.body)
        self.stats.dropped_invalid += 1
        if entry.event.hw is not None:
            self._gaps.add(entry.event.hw, entry.event.seq, "unpublishable")

    def nacked(self, entry: Entry) -> bool:
        """The broker nacked an in-flight event: it waits in its device's lane for its next
        attempt, or, after ``max_attempts``, is dropped and announced. True if dropped."""
        if self._inflight.pop(entry.id, None) is None:
            return False
        self.stats.nacks += 1
        entry.attempts += 1
        hw = entry.event.hw
        if hw is None:  # a gap announcement: no device order to keep, goes again at the front
            self._pending.appendleft(entry)
            return False
        lane = self._lanes.get(hw)
        if lane is None:
            lane = self._lanes[hw] = _Lane([])
        lane.inflight.discard(entry.id)
        if entry.attempts >= self.max_attempts:
            self.stats.dropped_nacked += 1
            self.bytes -= len(entry.event.body)
            self._gaps.add(hw, entry.event.seq, "nacked")
            if not lane.entries and not lane.inflight:
                del self._lanes[hw]
            return True
        lane.open = False  # what is behind it waits for its pause
        self._to_lane(lane, entry)
        lane.ready_at = max(lane.ready_at, self._clock() + nack_pause(entry.attempts))
        return False

    def requeue(self, entries: list[Entry]) -> None:
        """Failed in-flight entries go back to the front (or to their device's lane), oldest
        first."""
        back = []
        for e in entries:
            if self._inflight.pop(e.id, None) is None:
                continue
            hw = e.event.hw
            lane = self._lanes.get(hw) if self._lanes and hw is not None else None
            if lane is not None:
                lane.inflight.discard(e.id)
                lane.open = False
                self._to_lane(lane, e)
            else:
                back.append(e)
        back.sort(key=_entry_id)
        self._pending.extendleft(reversed(back))

    def unsent(self) -> dict[str, list[tuple[int, int]]]:
        """Every device event not yet confirmed, as per-device ``seq`` ranges (what a stop
        that cannot flush loses)."""
        g = _Gaps()
        entries = [*self._pending, *self._inflight.values()]
        for lane in self._lanes.values():
            entries += lane.entries
        for e in sorted(entries, key=_entry_id):
            if e.event.hw is not None:
                g.add(e.event.hw, e.event.seq, "")
        return {hw: [(first, last) for first, last in rs] for hw, rs in g.ranges.items()}

    def expire(self) -> None:
        """Drop unsent events older than the age limit."""
        limit = self._clock() - self.max_age_s
        while self._pending and self._pending[0].enqueued < limit:
            self._drop_oldest("too-old")
        for hw, lane in list(self._lanes.items()):
            while lane.entries and lane.entries[0].enqueued < limit:
                self._drop(lane.entries.pop(0), "too-old")
                self._in_lanes -= 1
            if not lane.entries and not lane.inflight:
                del self._lanes[hw]

    def _drop_oldest(self, reason: str) -> bool:
        """Drop the oldest unsent event, waiting or in a lane; False if none is unsent."""
        oldest: _Lane | None = None
        for lane in self._lanes.values():
            if lane.entries and (oldest is None or lane.entries[0].id < oldest.entries[0].id):
                oldest = lane
        if oldest is not None and (not self._pending or oldest.entries[0].id < self._pending[0].id):
            self._in_lanes -= 1
            self._drop(oldest.entries.pop(0), reason)
        elif self._pending:
            self._drop(self._pending.popleft(), reason)
        else:  # everything is in flight: the limits are exceeded by the window at most
            return False
        return True

    def _start_episode(self) -> None:
        if not self.in_episode:
            self.in_episode = True
            self.stats.episodes += 1
            self._episode_start = self.stats.dropped

    def _drop(self, e: Entry, reason: str) -> None:
        self._start_episode()
        self.bytes -= len(e.event.body)
        if e.event.gap is None:
            if reason == "buffer-full":
                self.stats.dropped_full += 1
            else:
                self.stats.dropped_age += 1
        if e.event.hw is not None:
            self._gaps.add(e.event.hw, e.event.seq, reason)
        elif e.event.gap is not None:  # a gap announcement dropped unsent: announce it again
            old_reason, ranges = e.event.gap
            for hw, rs in ranges.items():
                for first, last in rs:
                    for seq in range(first, last + 1):
                        self._gaps.add(hw, seq, old_reason)

    def take_gaps(self) -> tuple[str, dict[str, list[tuple[int, int]]]] | None:
        """(reason, {hw: [(first, last), ...]}) of what was dropped since the last call."""
        if not self._gaps.ranges:
            return None
        g, self._gaps = self._gaps, _Gaps()
        return "+".join(sorted(g.reason)), {hw: [(first, last) for first, last in rs] for hw, rs in g.ranges.items()}


def _entry_id(e: Entry) -> int:
    return e.id
