"""Nacks in the event buffer: per event, per device, bounded. Pure, no broker."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.backoff import nack_pause as retry_pause
from bridge.buffer import EventBuffer
from bridge.events import EventFactory


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def fill(b: EventBuffer, f: EventFactory, hws: str) -> None:
    for hw in hws:
        b.append(f.detached(hw, "command"))


def drain(b: EventBuffer) -> list[tuple[str, int]]:
    out = []
    while (e := b.take()) is not None:
        out.append((e.event.hw, e.event.seq))
        b.confirm(e)
    return out


def test_a_nack_holds_back_only_its_own_device_and_keeps_its_order():
    clock, f = Clock(), EventFactory("i")
    b = EventBuffer(100, 1e9, clock)
    fill(b, f, "ab")
    a1, b1 = b.take(), b.take()
    assert b.nacked(a1) is False and b.held_devices == 1
    b.confirm(b1)
    fill(b, f, "abab")
    # a's later events wait behind a1; b's go on at once
    assert drain(b) == [("b", 2), ("b", 3)]
    assert len(b) == 3 and b.next_retry() == retry_pause(1)
    clock.t = retry_pause(1)
    assert drain(b) == [("a", 1), ("a", 2), ("a", 3)]
    assert b.held_devices == 0 and len(b) == 0 and b.stats.nacks == 1


def test_confirms_of_other_events_never_shorten_a_nacked_events_pause():
    clock, f = Clock(), EventFactory("i")
    b = EventBuffer(100, 1e9, clock)
    fill(b, f, "a")
    b.nacked(b.take())
    for _ in range(50):  # a healthy device confirms all the time
        fill(b, f, "b")
        b.confirm(b.take())
    assert b.take() is None  # a1 still waits for its own pause
    clock.t = retry_pause(1)
    assert b.take().event.seq == 1


def test_pauses_double_and_the_event_is_dropped_and_announced_after_max_attempts():
    clock, f = Clock(), EventFactory("i")
    b = EventBuffer(100, 1e9, clock, max_attempts=4)
    fill(b, f, "aa")
    pauses = []
    for attempt in range(1, 5):
        e = b.take()
        assert e.event.seq == 1
        dropped = b.nacked(e)
        assert dropped is (attempt == 4)
        if not dropped:
            pauses.append(b.next_retry() - clock.t)
            clock.t = b.next_retry()
    assert pauses == [0.5, 1.0, 2.0]
    assert b.stats.dropped_nacked == 1 and b.stats.nacks == 4
    assert b.take_gaps() == ("nacked", {"a": [(1, 1)]})
    assert drain(b) == [("a", 2)]  # the next event of the device goes at once
    assert b.held_devices == 0


def test_a_link_loss_puts_a_lane_event_back_in_its_lane():
    clock, f = Clock(), EventFactory("i")
    b = EventBuffer(100, 1e9, clock)
    fill(b, f, "aa")
    b.nacked(b.take())
    clock.t = 10
    e = b.take()
    b.requeue([e])  # the link broke while the retry was in flight
    assert b.held_devices == 1 and drain(b) == [("a", 1), ("a", 2)]


def test_buffer_limits_apply_to_held_events_too():
    clock, f = Clock(), EventFactory("i")
    b = EventBuffer(3, 5, clock)
    fill(b, f, "a")
    b.nacked(b.take())
    fill(b, f, "aaa")
    assert len(b) == 3 and b.stats.dropped_full == 1  # the oldest, the held one, went first
    assert b.take_gaps() == ("buffer-full", {"a": [(1, 1)]})
    clock.t = 6
    assert b.take() is None and len(b) == 0 and b.stats.dropped_age == 3


def test_unsent_lists_every_unconfirmed_event_as_ranges():
    clock, f = Clock(), EventFactory("i")
    b = EventBuffer(100, 1e9, clock)
    fill(b, f, "aabab")
    e = b.take()
    b.nacked(e)
    b.take()  # b1 in flight
    assert b.unsent() == {"a": [(1, 3)], "b": [(1, 2)]}


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "take", "confirm", "nack", "fail", "tick"]),
                          st.sampled_from("abc")), max_size=120))
def test_nacks_never_lose_an_event_uncounted_nor_reorder_a_device(ops):
    """Every appended event is confirmed, buffered, or counted dropped; and no event is sent
    while an older event of its device waits after a nack."""
    clock, f = Clock(), EventFactory("i")
    b = EventBuffer(12, 50, clock, max_attempts=3)
    inflight = []
    waiting_nacked: dict[str, set[int]] = {}
    for op, hw in ops:
        if op == "append":
            b.append(f.detached(hw, "command"))
        elif op == "take" and (e := b.take()):
            ev = e.event
            if ev.hw is not None:
                held = waiting_nacked.get(ev.hw, set())
                assert all(seq >= ev.seq for seq in held), (ev.hw, ev.seq, held)
                held.discard(ev.seq)
            inflight.append(e)
        elif op == "confirm" and inflight:
            b.confirm(inflight.pop(0))
        elif op == "nack" and inflight:
            e = inflight.pop()
            if not b.nacked(e) and e.event.hw is not None:
                waiting_nacked.setdefault(e.event.hw, set()).add(e.event.seq)
        elif op == "fail" and inflight:
            b.requeue(inflight)
            inflight = []
        elif op == "tick":
            clock.t += 3
        # events dropped for age or count leave the buffer unsent: they no longer wait
        live = {(x.event.hw, x.event.seq) for x in b._pending} | {
            (x.event.hw, x.event.seq) for ln in b._lanes.values() for x in ln.entries}
        for h, seqs in waiting_nacked.items():
            seqs &= {s for (hh, s) in live if hh == h}
    s = b.stats
    assert s.appended == s.confirmed + len(b) + s.dropped_full + s.dropped_age + s.dropped_nacked


def test_the_buffer_is_bounded_in_bytes_too():
    """Large events while the broker is away: the oldest go once the bodies pass ``max_bytes``."""
    clock, f = Clock(), EventFactory("i")
    b = EventBuffer(10_000, 1e9, clock, max_bytes=10_000)
    for _ in range(1000):
        b.append(f.detached("a", "command"))
    largest = max(len(e.event.body) for e in b._pending)
    assert 10_000 - largest < b.bytes <= 10_000  # full, within one event
    assert b.stats.dropped_full == 1000 - len(b)
    reason, dropped = b.take_gaps()
    assert reason == "buffer-full" and dropped == {"a": [(1, 1000 - len(b))]}
    drain(b)
    assert b.bytes == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["append", "take", "confirm", "nack", "fail", "gap"]), max_size=100))
def test_the_byte_count_is_always_the_bodies_held(ops):
    clock, f = Clock(), EventFactory("i")
    b = EventBuffer(8, 1e9, clock, max_attempts=2, max_bytes=900)
    inflight = []
    for op in ops:
        if op == "append":
            b.append(f.detached("ab"[len(inflight) % 2], "command"))
        elif op == "take" and (e := b.take()):
            inflight.append(e)
        elif op == "confirm" and inflight:
            b.confirm(inflight.pop(0))
        elif op == "nack" and inflight:
            b.nacked(inflight.pop())
        elif op == "fail" and inflight:
            b.requeue(inflight)
            inflight = []
        elif op == "gap" and (g := b.take_gaps()):
            b.push_front(f.gap(*g))
        held = [*b._pending, *b._inflight.values(), *(x for ln in b._lanes.values() for x in ln.entries)]
        assert b.bytes == sum(len(x.event.body) for x in held)
        assert b.bytes <= 900 or not b._pending
