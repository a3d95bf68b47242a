"""The tests' EventQueue (tests/conftest.py): waiting for events of several devices, which come
in no order across devices (docs/CONSUMERS.md)."""

from __future__ import annotations

import pytest

from tests.conftest import EventQueue, Received, attached


def queue_of(*hws: str) -> EventQueue:
    q = EventQueue(queue=None)  # type: ignore[arg-type]
    for hw in hws:
        q.items.put_nowait(Received(f"device.{hw}.attached", {"type": "attached", "hw": hw}, None))  # type: ignore[arg-type]
    return q


async def test_until_all_takes_the_devices_events_in_either_order():
    # the second device's attached first: seen twice in 22 runs of the slow-PBX test beside the fuzz test
    q = queue_of("hw2", "hw1")
    seen = await q.until_all([attached("hw1"), attached("hw2")], timeout=1)
    assert [e.body["hw"] for e in seen] == ["hw2", "hw1"]


async def test_waiting_device_by_device_loses_an_event_that_came_early():
    """Why until_all: ``until`` consumes what it passes, so waiting for hw1 then hw2 throws
    hw2's event away when it came first, and the wait for hw2 times out (the old flake)."""
    q = queue_of("hw2", "hw1")
    await q.until(attached("hw1"), timeout=1)
    with pytest.raises(TimeoutError):
        await q.until(attached("hw2"), timeout=0.1)


async def test_until_all_says_what_it_saw_when_it_times_out():
    q = queue_of("hw1")
    with pytest.raises(TimeoutError, match=r"1 of 2 conditions unmet after 0.1s; .*\('attached', 'hw1'\)"):
        await q.until_all([attached("hw1"), attached("hw2")], timeout=0.1)
