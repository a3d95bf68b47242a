"""The lease retirer (leases off: lease queues left from a time with leases on are removed) ends
quietly when its connection closes under it, whatever aiormq fails its pending call with: in CI
its task once ended with a bare ``Exception()`` (aiormq's reason for a connection closed without
one) that nobody retrieved (the suite's guard in tests/conftest.py reported it)."""

from __future__ import annotations

import asyncio

import aio_pika
import pytest

from bridge.amqp import topology
from bridge.amqp.leases import LeaseRetirer
from bridge.amqp.link import BrokerLink
from tests.conftest import AMQP_URL

pytestmark = [pytest.mark.asyncio, pytest.mark.broker]


async def test_a_pass_cut_by_its_connection_closing_ends_without_an_error(settings_for):
    s = settings_for(devices="009033400001,009033400002")
    admin = await aio_pika.connect(AMQP_URL)
    ch = await admin.channel()
    await ch.declare_exchange(topology.presence_exchange(s), "fanout", auto_delete=True)  # leases were on here
    refused: list[str] = []

    async def refuse(msg, error: str) -> None:
        refused.append(error)
    try:
        for turns in range(12):
            retirer = LeaseRetirer(BrokerLink(s), s.device_list, refuse)
            conn = await aio_pika.connect(AMQP_URL)
            task = asyncio.create_task(retirer._run(conn))
            for _ in range(turns):
                await asyncio.sleep(0)
            await conn.close()  # a stop, or the broker gone, in the middle of a pass
            assert await asyncio.wait_for(task, 10) is None, f"after {turns} turns"
    finally:
        await ch.exchange_delete(topology.presence_exchange(s))
        await admin.close()
    assert refused == []
