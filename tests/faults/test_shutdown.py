"""SIGTERM with calls in progress, events buffered and commands in flight: a graceful stop."""

from __future__ import annotations

import asyncio
import signal
import time

import aio_pika
import aiohttp
import pytest

from bridge.protocol.messages import CallState
from tests.conftest import PASSWORD
from tests.faults.helpers import (
    AMQP_URL, bridge_env, BridgeProcess, eventually, metric, need_rabbitmqctl,
    publish_command, queue_counts, rabbitmq_queue, Replies,
)
from tests.tcpproxy import TcpProxy
from tests.ports import free_port

pytestmark = pytest.mark.broker

GRACE_S = 10.0


async def test_sigterm_finishes_commands_flushes_events_and_closes_sessions(sim, bus, names, tmp_path):
    need_rabbitmqctl()
    hws = [sim.hw(i) for i in range(1, 5)]
    slow = [sim.hw(5), sim.hw(6)]  # attached by commands that are in flight at SIGTERM
    q = await bus.bind("#")  # bound before the bridge starts: sees every event it publishes
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    port = free_port()
    conn = await aio_pika.connect(AMQP_URL)
    proc = BridgeProcess(bridge_env(names, pbx_url=sim.url, pbx_password=PASSWORD, devices=",".join(hws),
                                    amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/", http_port=port,
                                    attach_timeout_s=10), tmp_path, grace_s=GRACE_S).start()
    try:
        await eventually(lambda: sim.stats()["attached_devices"] == 4, 15, "4 devices attached")
        replies = await Replies(conn).open()
        ex = await (await conn.channel()).get_exchange(names["commands_exchange"], ensure=True)

        async def consumer_up():
            try:
                return (await queue_counts(conn, names["commands_queue"]))[1] == 1
            except aio_pika.exceptions.ChannelClosed:
                return False
        await eventually(consumer_up, 10, "the bridge consuming commands")
        # calls in progress at SIGTERM (they outlive the bridge), and a burst of short ones
        long_calls = [await sim.place_call(hw, direction="in", hold_s=2.5) for hw in hws]
        for c in long_calls:
            await sim.wait_call_state(c, CallState.CONNECTED, 5)
        # two attach commands in flight: each takes about 3 s against a PBX that answers 1 s late
        sim.delay_ms = 1000
        cids = [await publish_command(ex, f"device.{hw}.attach", b"", reply_to=replies.name) for hw in slow]
        await eventually(lambda: len(sim._sessions) >= 6, 5, "the attach sessions opening")
        # the broker stops answering (no byte moves): the events of a burst of calls pile up
        # unconfirmed in the buffer
        proxy.stall()
        for i, hw in enumerate(hws * 2):
            await sim.place_call(hw, direction="out" if i % 2 else "in", hold_s=0.05)

        async def buffered_events():
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
                return metric(await r.text(), "epsignal_buffer_events")
        buffered = await eventually(buffered_events, 5, "events waiting for a confirm")

        assert not any(c in replies.by_id for c in cids)  # still in flight
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        await proc.wait_log(lambda r: r.get("msg", "").startswith("stopping"), 5)
        await asyncio.sleep(0.3)
        proxy.unstall()  # the broker answers again within the grace period
        await asyncio.sleep(0.2)
        late = [await publish_command(ex, f"device.{hws[0]}.detach", b"", reply_to=replies.name) for _ in range(3)]
        rc = await proc.wait(GRACE_S + 5)
        took = time.monotonic() - t0
        assert rc == 0, proc.stderr()[-3000:]
        assert took <= GRACE_S + 1.0, took

        # the commands in flight were carried out and answered; the late ones wait in the queue
        for cid, hw in zip(cids, slow, strict=True):
            r = await replies.get(cid, timeout=5)
            assert r["ok"] is True and r["hw"] == hw, r
        await asyncio.sleep(0.5)
        assert not any(c in replies.by_id for c in late)
        # rabbitmqctl shows a quorum queue's counts as its leader last reported them (every few
        # seconds): wait for the report after the stop, then it must be exactly this
        want = {"ready": 3, "unacked": 0, "consumers": 0}
        left = await eventually(lambda: (lambda c: c if c == want else None)(
            rabbitmq_queue(names["commands_queue"])), 15, "the late commands waiting", interval=0.5)
        assert left == want, left

        # the PBX sessions were closed: nothing attached, nothing logged in
        await eventually(lambda: sim.stats()["attached_devices"] == 0 and sim.stats()["sessions"] == 0, 5,
                         "the PBX sessions closed")
        # the calls in progress go on without the bridge and complete
        await sim.wait_idle(10)
        st = sim.stats()
        assert st["calls_stalled"] == 0

        # every event it published is in the queue: per device seq 1..n without gap or duplicate,
        # the last one the shutdown detach; every message the bridge forwarded was published
        await asyncio.sleep(0.5)
        evs = q.drain()
        ids = [e.message.message_id for e in evs]
        assert len(ids) == len(set(ids)), "duplicates"
        by_hw: dict[str, list] = {}
        for e in evs:
            by_hw.setdefault(e.body["hw"], []).append(e)
        assert set(by_hw) == set(hws + slow)
        for hw, es in by_hw.items():
            seqs = [e.body["seq"] for e in es]
            assert sorted(seqs) == list(range(1, len(seqs) + 1)), (hw, seqs)
            last = max(es, key=lambda e: e.body["seq"]).body
            assert last["type"] == "detached" and last["reason"] == "shutdown", (hw, last)
        forwarded = [e for e in evs if e.body["type"] == "call.signaling" and e.body["origin"] == "pbx"]
        assert len(forwarded) == st["messages_forwarded"]
        logs = proc.logs()
        assert not [r for r in logs if "not confirmed" in r.get("msg", "")]
        assert not [r for r in logs if r.get("level") == "ERROR" or "raw" in r]
        print(f"\nFIGURES sigterm: exit={rc} took_s={took:.2f} grace_s={GRACE_S:g} buffered_at_sigterm={buffered:.0f} "
              f"events_received={len(evs)} duplicates=0 lost=0 forwarded_msgs={st['messages_forwarded']} "
              f"commands_in_flight={len(cids)} answered={len(cids)} late_commands_left_in_queue=3 "
              f"calls_in_progress={len(long_calls)} stalled={st['calls_stalled']}")
    finally:
        proxy.unstall()
        await proc.stop()
        proc.close_files()
        await proxy.stop()
        await conn.close()
