"""The cyclic garbage collector and the event loop: what the bridge keeps for long (events
buffered during a broker outage, the heap it starts with) stays out of the collector's walks,
which stall the event loop and with it the PBX side (docs/PERFORMANCE.md: a full collection took
30-80 ms with 20,000-100,000 events buffered, and 20 ms for the startup heap alone)."""

from __future__ import annotations

import gc

from bridge.buffer import EventBuffer
from bridge.events import EventFactory
from bridge.main import GC_THRESHOLD0, tune_gc


def test_buffered_events_are_not_tracked_by_the_collector():
    f = EventFactory("i1")
    buf = EventBuffer(10, 60.0, clock=lambda: 0.0)
    buf.append(f.detached("hw1", "command"))
    buf.append(f.detached("hw2", "command"))
    buf.push_front(f.gap("outage", {"hw1": [(1, 2)], "hw2": [(4, 4)]}))  # a gap event holds containers
    entries = [buf.take() for _ in range(3)]
    assert [e.event.type for e in entries if e is not None] == ["gap", "detached", "detached"]
    for entry in entries:
        assert entry is not None and not gc.is_tracked(entry) and not gc.is_tracked(entry.event)
    # what they hold is still there after a full collection (untracked is not unreferenced)
    gc.collect()
    assert entries[0] is not None and entries[0].event.gap == ("outage", {"hw1": [(1, 2)], "hw2": [(4, 4)]})


def test_serving_starts_with_the_startup_heap_frozen():
    threshold = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold()[0] == GC_THRESHOLD0
        assert gc.get_freeze_count() > 10_000  # the modules, classes and settings loaded by now
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
