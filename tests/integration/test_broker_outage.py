"""Broker outages through a TCP proxy: events buffered in order, published when the broker is
back, confirmed or announced as a gap: never lost silently; forwarding never waits."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import attached

pytestmark = pytest.mark.broker


def by_device(events):
    out: dict[str, list[int]] = {}
    for e in events:
        if "hw" in e.body and e.body["type"] != "gap":
            out.setdefault(e.body["hw"], []).append(e.body["seq"])
    return out


async def _outage_with_calls(sim, proxy, bridge, hws, calls_per_device):
    proxy.cut()
    async with asyncio.timeout(10):
        while bridge.link.ready:
            await asyncio.sleep(0.05)
    for _ in range(calls_per_device):
        for hw in hws:
            await sim.place_call(hw, direction="in", hold_s=0.05)
    await sim.wait_idle(20)
    assert sim.stats()["calls_stalled"] == 0  # forwarding never waited on the broker
    proxy.restore()


async def test_outage_events_are_buffered_in_order_and_delivered(sim, bus, proxy, settings_for, start_bridge):
    hws = [sim.hw(i) for i in range(1, 4)]
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(sim, devices=",".join(hws), heartbeat_s=2,
                                             amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
    first = await q.until_all([attached(hw) for hw in hws])
    await _outage_with_calls(sim, proxy, bridge, hws, 3)
    assert await bridge.link.wait_ready(20)
    assert await bridge.publisher.flush(20)
    await asyncio.sleep(0.5)
    got = first + q.drain()
    seqs = by_device(got)
    for hw in hws:
        unique = sorted(set(seqs[hw]))
        assert unique == list(range(1, unique[-1] + 1)), hw  # nothing lost
        assert seqs[hw] == sorted(seqs[hw])  # in order (a resent batch may repeat, never reorder)
    assert bridge.publisher.buffer.stats.dropped == 0
    st = bridge.publisher.stats
    assert st.confirmed >= sum(len(set(v)) for v in seqs.values())


async def test_long_outage_drops_the_oldest_and_announces_a_gap(sim, bus, proxy, settings_for, start_bridge, caplog):
    caplog.set_level(logging.WARNING, logger="bridge.publisher")
    hws = [sim.hw(i) for i in range(4, 6)]
    q = await bus.bind("device.#", "bridge.*.gap")
    bridge = await start_bridge(settings_for(sim, devices=",".join(hws), heartbeat_s=2, buffer_max_events=15,
                                             amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
    first = await q.until_all([attached(hw) for hw in hws])
    await _outage_with_calls(sim, proxy, bridge, hws, 4)
    assert await bridge.link.wait_ready(20)
    assert await bridge.publisher.flush(20)
    await asyncio.sleep(0.5)
    got = first + q.drain()
    gaps = [e for e in got if e.body["type"] == "gap"]
    assert len(gaps) == 1 and gaps[0].key == f"bridge.{bridge.s.instance_id}.gap"
    assert gaps[0].body["reason"] == "buffer-full"
    dropped = {hw: [s for r in rs for s in range(r["first"], r["last"] + 1)]
               for hw, rs in gaps[0].body["dropped"].items()}
    seqs = by_device(got)
    for hw in hws:
        have = set(seqs.get(hw, [])) | set(dropped.get(hw, []))
        # every seq: delivered or announced missing
        assert have == set(range(1, max(have) + 1)), (hw, gaps[0].body["dropped"], sorted(seqs.get(hw, [])))
    n_dropped = sum(len(v) for v in dropped.values())
    assert n_dropped == bridge.publisher.buffer.stats.dropped_full > 0
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("over its limits" in m for m in msgs) == 1  # once per episode, not per event
    assert any(f"{n_dropped} events were dropped" in m for m in msgs)
