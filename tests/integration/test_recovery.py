"""Recovery has one owner, the broker link: a component whose own channel closes gets it back
from the link on the same connection; the connection is given up only when that fails."""

from __future__ import annotations

import asyncio

import aiormq
import pytest

pytestmark = pytest.mark.broker


async def test_a_command_channel_the_broker_closes_is_opened_again_on_the_same_connection(
        sim, bus, settings_for, start_bridge):
    bridge = await start_bridge(settings_for(sim))
    conn, ch = bridge.link.connection, bridge.consumer._channel
    assert conn is not None and ch is not None
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):  # the broker closes the channel
        await ch.declare_queue("epsignal-test-no-such-queue", passive=True)
    async with asyncio.timeout(10):
        while bridge.consumer._channel is None or bridge.consumer._channel is ch:
            await asyncio.sleep(0.02)
    reply = await bus.command(sim.hw(1), "attach")
    assert reply is not None and reply["ok"] is True
    assert bridge.link.connection is conn and not conn.is_closed
    assert bridge.link.reconnects == 0 and bridge.link.ready


async def test_the_connection_is_given_up_when_the_command_channel_cannot_be_had_again(
        sim, bus, settings_for, start_bridge):
    bridge = await start_bridge(settings_for(sim))
    lost, ch = bridge.link.lost, bridge.consumer._channel
    assert lost is not None and ch is not None
    restore, refused = bridge.consumer.restore, []

    async def refuse_once(conn, topo):
        if not refused:
            refused.append(conn)
            raise ConnectionError("no channel for you")
        await restore(conn, topo)

    bridge.consumer.restore = refuse_once
    with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):  # the broker closes the channel
        await ch.declare_queue("epsignal-test-no-such-queue", passive=True)
    async with asyncio.timeout(10):
        await lost
    assert len(refused) == 1  # asked once on that connection, then it was given up
    async with asyncio.timeout(15):
        while bridge.link.reconnects < 1 or not bridge.link.ready:
            await asyncio.sleep(0.05)
    reply = await bus.command(sim.hw(1), "attach")
    assert reply is not None and reply["ok"] is True
