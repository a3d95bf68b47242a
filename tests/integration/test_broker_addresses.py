"""Issue 15: several broker addresses (EPSIGNAL_AMQP_URL as a list), on real RabbitMQ nodes.

Two nodes of the test's own and, first in the list, an address where a listener accepts and
closes every connection (a dead broker that answers TCP) and counts the attempts. The bridge
moves on from the dead address at once, says where it is (log, ``epsignal_broker_info``), and
when its node is SIGKILLed it is on the other node within seconds, without hammering the dead
address: one attempt there per round of the addresses.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from bridge import brokers
from bridge.metrics import registry_for, render
from bridge.service import Bridge
from tests import rabbitnode

pytestmark = [pytest.mark.asyncio, pytest.mark.broker,
              pytest.mark.skipif(not rabbitnode.available(), reason="no rabbitmq-server on this machine")]


async def test_the_bridge_moves_on_from_a_dead_address_and_from_a_node_that_dies(settings_for, caplog):
    attempts = []

    async def refuse(reader, writer):
        attempts.append(time.monotonic())
        writer.close()

    dead = await asyncio.start_server(refuse, "127.0.0.1", 0)
    dead_port = dead.sockets[0].getsockname()[1]
    a, b = rabbitnode.RabbitNode(), rabbitnode.RabbitNode()
    bridge = None
    try:
        await asyncio.gather(asyncio.to_thread(a.start), asyncio.to_thread(b.start))  # one may fail: both stopped
        caplog.set_level(logging.INFO)
        urls = [f"amqp://guest:guest@127.0.0.1:{dead_port}/", a.url, b.url]
        s = settings_for(amqp_url=",".join(urls), reconnect_min_s=0.5, reconnect_max_s=4.0)
        bridge = Bridge(s)
        t0 = time.monotonic()
        await bridge.start()
        assert await bridge.link.wait_ready(10)
        print(f"\nconnected to the second address after {time.monotonic() - t0:.2f}s")
        assert bridge.link.address == a.url and len(attempts) == 1
        short = a.name.split("@")[0]  # the cluster name is node@host (the machine's name)
        assert any(f"broker connected: amqp://guest:***@127.0.0.1:{a.port}/ (cluster {short}@"
                   in r.getMessage() for r in caplog.records)
        page = render(registry_for(bridge.snapshot)).decode()
        assert f'epsignal_broker_info{{address="127.0.0.1:{a.port}",cluster="{short}@' in page

        before = len(attempts)
        t1 = time.monotonic()
        a.kill()
        await asyncio.sleep(0.2)
        assert await bridge.link.wait_ready(15), "not back on a surviving node"
        took = time.monotonic() - t1
        print(f"node SIGKILLed: on the other node after {took:.2f}s, {len(attempts) - before} "
              "attempts at the dead address meanwhile")
        assert bridge.link.address == b.url and bridge.link.failovers == 1
        assert len(attempts) - before <= 1, "the dead address was hammered"
        assert "epsignal_broker_failovers_total 1.0" in render(registry_for(bridge.snapshot)).decode()
        assert not any("guest:guest" in r.getMessage() for r in caplog.records), "a password in the log"
        assert brokers.endpoint(b.url) in bridge.link.address
    finally:
        if bridge is not None:
            await bridge.stop(2)
        dead.close()
        await asyncio.gather(asyncio.to_thread(a.stop), asyncio.to_thread(b.stop))
