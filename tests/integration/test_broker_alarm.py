"""A broker memory alarm (``connection.blocked``) on a RabbitMQ node of the test's own: calls
go on, events wait in the buffer, readiness and metrics say why, nothing reconnects, and every
event arrives once the alarm is over."""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest

from bridge.amqp import topology
from bridge.service import Bridge
from tests.faults.helpers import eventually, http_get, http_port, serve_http, stop_http
from tests.rabbitnode import RabbitNode

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def node():
    n = RabbitNode().start()
    yield n
    n.stop()


async def test_a_memory_alarm_blocks_publishing_but_never_a_call(node, sim, settings_for):
    hws = [sim.hw(i) for i in range(1, 4)]
    s = settings_for(sim, devices=",".join(hws), amqp_url=node.url, heartbeat_s=2, publish_timeout_s=1.0)
    conn = await aio_pika.connect(node.url)
    ch = await conn.channel()
    events = await ch.declare_exchange(s.events_exchange, "topic", durable=True)
    q = await ch.declare_queue(exclusive=True)
    await q.bind(events, "device.#")
    got: list[dict] = []

    async def on(msg):
        got.append(json.loads(msg.body))
        await msg.ack()
    await q.consume(on)
    bridge = Bridge(s)
    await serve_http(bridge)
    await bridge.start()
    try:
        assert await bridge.link.wait_ready(10)
        await eventually(lambda: sum(e["type"] == "attached" for e in got) == 3, 10, "3 attached")

        node.memory_alarm(True)
        await asyncio.sleep(0.2)
        for hw in hws:  # a publish makes the broker block the connection and say so
            await sim.place_call(hw, direction="in", hold_s=0.02)
        await eventually(lambda: bridge.link.blocked is not None, 10, "connection.blocked")
        assert "memory" in bridge.link.blocked
        for _ in range(2):
            for hw in hws:
                await sim.place_call(hw, direction="in", hold_s=0.02)
        await sim.wait_idle(10)
        assert sim.stats()["calls_stalled"] == 0  # forwarding never waited on the alarm
        # longer than the heartbeat and the confirm timeout: no reconnect cycle while blocked
        await asyncio.sleep(3)
        status, body = await http_get(http_port(bridge), "/readyz")
        assert status == 503 and "broker blocks publishing" in body and "memory" in body, body
        _, text = await http_get(http_port(bridge), "/metrics")
        assert "epsignal_broker_blocked 1.0" in text
        assert bridge.link.reconnects == 0 and bridge.publisher.stats.timeouts == 0
        waiting = len(bridge.publisher.buffer)
        assert waiting >= 3 * 3 * 8

        node.memory_alarm(False)
        assert await bridge.publisher.flush(20)
        assert bridge.link.blocked is None and bridge.link.reconnects == 0
        assert (await http_get(http_port(bridge), "/readyz"))[0] == 200
        _, text = await http_get(http_port(bridge), "/metrics")
        assert "epsignal_broker_blocked 0.0" in text and "epsignal_broker_blocks_total 1.0" in text
        await eventually(lambda: len(got) >= 3 + waiting, 10, "every event after the alarm")
        for hw in hws:
            seqs = [e["seq"] for e in got if e["hw"] == hw]
            first_seen = list(dict.fromkeys(seqs))
            assert first_seen == list(range(1, bridge.factory._seq[hw] + 1)), (hw, seqs)
        print(f"\nFIGURES alarm: buffered_during_alarm={waiting} delivered_after={len(got)} lost=0 "
              f"reconnects={bridge.link.reconnects} confirm_timeouts={bridge.publisher.stats.timeouts} "
              f"calls_stalled=0")
    finally:
        node.memory_alarm(False)
        await bridge.stop(2)
        await stop_http(bridge)
        await topology.delete_for(conn, s)
        await conn.close()
