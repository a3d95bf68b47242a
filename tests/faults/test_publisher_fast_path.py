"""The publisher's fast path (issue 19): an event that comes while nothing is in flight is
written by the caller at once, not one event-loop round later by the drain task. It must keep
every guarantee of the slow path: the event stays in the buffer until the broker confirmed it,
events of a burst arrive in order, and a channel whose lock is held (another publish between
its delivery tag and its frames) is never written past. Real broker."""

from __future__ import annotations

import pytest

from bridge.amqp.publisher import channel_lock
from bridge.protocol.messages import AttachResult
from tests.faults.helpers import eventually

pytestmark = pytest.mark.broker


async def _quiet(bridge) -> None:
    """Until nothing is buffered and the drain task waits for new events."""
    pub = bridge.publisher
    assert await pub.flush(15)
    await eventually(lambda: pub._parked is not None, 5, "the drain task waiting for events")


async def test_an_event_in_a_quiet_moment_is_written_at_once_and_confirmed(sim, bus, settings_for, start_bridge):
    hw = sim.hw(1)
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(sim, devices=hw))
    await q.until(lambda e: e.body["type"] == "attached")
    raw = await bridge.link.channel.get_underlay_channel()
    assert channel_lock(raw) is not None  # this aiormq keeps the lock where the fast path looks
    await _quiet(bridge)
    pub = bridge.publisher
    published = pub.stats.published

    ev = pub.factory.attached(hw, AttachResult())
    pub.publish_nowait(ev)
    # written before the caller gave the loop a chance to run the drain task ...
    assert pub.stats.published == published + 1
    # ... and still in the buffer until the broker confirms it
    assert len(pub.buffer) == 1
    assert await pub.flush(15)
    got = await q.until(lambda e: e.message.message_id == ev.message_id)
    assert got[-1].body["seq"] == ev.seq

    # a burst: the first goes at once, the rest in slices behind it; all arrive, in order
    await _quiet(bridge)
    burst = [pub.factory.attached(hw, AttachResult()) for _ in range(200)]
    for e in burst:
        pub.publish_nowait(e)
    assert pub.stats.published == published + 2  # only the first: the others wait for the drain
    assert await pub.flush(15)
    got = await q.until(lambda e: e.message.message_id == burst[-1].message_id)
    assert [e.body["seq"] for e in got] == [e.seq for e in burst]


async def test_a_held_channel_lock_sends_the_event_the_slow_way(sim, bus, settings_for, start_bridge):
    """Someone holds the channel's lock (an aio-pika publish on the same channel, between its
    delivery tag and its frames): writing past it would misnumber the confirms."""
    hw = sim.hw(1)
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(sim, devices=hw))
    await q.until(lambda e: e.body["type"] == "attached")
    await _quiet(bridge)
    pub = bridge.publisher
    published = pub.stats.published
    raw = await bridge.link.channel.get_underlay_channel()
    ev = pub.factory.attached(hw, AttachResult())
    async with raw.lock:
        pub.publish_nowait(ev)
        assert pub.stats.published == published  # not written past the holder
    assert await pub.flush(15)
    assert pub.stats.published == published + 1
    got = await q.until(lambda e: e.message.message_id == ev.message_id)
    assert got[-1].body["seq"] == ev.seq
