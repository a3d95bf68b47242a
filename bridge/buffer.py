"""The event buffer between the PBX side and the broker. Pure: no I/O, no clock of its own.

Events wait here, in order, until the broker confirms them. ``take()`` hands the oldest
unsent event to the publisher and keeps it as in flight; ``confirm()`` forgets it;
``requeue()`` puts failed in-flight events back at the front, in their original order (they are
published again: a consumer may see a duplicate, never a loss).

The buffer is bounded by count and by age. What is dropped (the oldest unsent events first) is
counted and remembered as per-device ``seq`` ranges until :meth:`take_gaps` collects them for a
gap event. An *episode* runs from the first drop until the buffer is empty again, so a caller
can log once per episode rather than once per event.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from bridge.events import Outgoing


@dataclass(slots=True)
class Entry:
    id: int
    event: Outgoing
    enqueued: float


@dataclass
class BufferStats:
    appended: int = 0
    confirmed: int = 0
    requeued: int = 0
    dropped_full: int = 0
    dropped_age: int = 0
    #: events the broker can never take (e.g. a routing key over 255 bytes)
    dropped_invalid: int = 0
    episodes: int = 0
    episodes_closed: int = 0
    #: events dropped in the last closed episode
    last_episode_dropped: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_full + self.dropped_age + self.dropped_invalid


@dataclass
class _Gaps:
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
    def __init__(self, max_events: int, max_age_s: float, clock: Callable[[], float]) -> None:
        self.max_events = max_events
        self.max_age_s = max_age_s
        self._clock = clock
        self._ids = itertools.count()
        self._pending: deque[Entry] = deque()
        self._inflight: dict[int, Entry] = {}
        self._gaps = _Gaps()
        self.stats = BufferStats()
        #: True from the first drop until the buffer is empty again
        self.in_episode = False
        self._episode_start = 0

    def __len__(self) -> int:
        return len(self._pending) + len(self._inflight)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def append(self, event: Outgoing) -> None:
        self.stats.appended += 1
        if len(self) >= self.max_events:
            self._drop_oldest("buffer-full")
        self._pending.append(Entry(next(self._ids), event, self._clock()))

    def push_front(self, event: Outgoing) -> None:
        """An event that must go out before everything waiting (the gap announcement)."""
        self._pending.appendleft(Entry(-next(self._ids), event, self._clock()))

    def take(self) -> Entry | None:
        """The oldest unsent event, now in flight; None when nothing is waiting."""
        self.expire()
        if not self._pending:
            return None
        e = self._pending.popleft()
        self._inflight[e.id] = e
        return e

    def confirm(self, entry: Entry) -> None:
        if self._inflight.pop(entry.id, None) is not None:
            self.stats.confirmed += 1
        if self.in_episode and not self:
            self.in_episode = False
            self.stats.episodes_closed += 1
            self.stats.last_episode_dropped = self.stats.dropped - self._episode_start

    def discard(self, entry: Entry) -> None:
        """An in-flight event that can never be published: dropped, counted, announced as a gap."""
        if self._inflight.pop(entry.id, None) is None:
            return
        self.stats.dropped_invalid += 1
        if entry.event.hw is not None:
            self._gaps.add(entry.event.hw, entry.event.seq, "unpublishable")

    def requeue(self, entries: list[Entry]) -> None:
        """Failed in-flight entries go back to the front, oldest first."""
        back = [self._inflight.pop(e.id) for e in entries if e.id in self._inflight]
        back.sort(key=lambda e: e.id)
        self._pending.extendleft(reversed(back))
        self.stats.requeued += len(back)

    def expire(self) -> None:
        """Drop unsent events older than the age limit."""
        limit = self._clock() - self.max_age_s
        while self._pending and self._pending[0].enqueued < limit:
            self._drop_oldest("too-old")

    def _drop_oldest(self, reason: str) -> None:
        if not self._pending:
            return  # everything is in flight: the count limit is exceeded by the window at most
        e = self._pending.popleft()
        if not self.in_episode:
            self.in_episode = True
            self.stats.episodes += 1
            self._episode_start = self.stats.dropped
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
        return "+".join(sorted(g.reason)), {hw: [tuple(r) for r in rs] for hw, rs in g.ranges.items()}
