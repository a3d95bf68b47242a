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


async def test_a_channel_closed_while_the_connection_is_still_being_restored_is_opened_again(
        sim, bus, settings_for, start_bridge):
    """The command channel closes while a later component is still being restored on a new
    connection (the link not ready yet): the consumer asks the link for its channel then, and must
    get it on that connection, not be dropped as "the connection is lost already" (found in review:
    the link knew the new connection only once every component was restored)."""
    bridge = await start_bridge(settings_for(sim))
    closed, go_on = asyncio.Event(), asyncio.Event()

    class Slow:  # a component that awaits in its restore, attached after the consumer
        async def restore(self, conn, topo):
            ch = bridge.consumer._channel
            assert ch is not None
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):  # the broker closes it
                await ch.declare_queue("epsignal-test-no-such-queue", passive=True)
            closed.set()
            await go_on.wait()

        def lost(self, exc):
            pass

    bridge.link.attach(Slow())
    before = bridge.link.connection
    assert before is not None
    bridge.link.reset("test: a new connection", bridge.link.lost)
    async with asyncio.timeout(15):
        await closed.wait()
        await asyncio.sleep(0.3)  # the consumer's renew runs meanwhile
        go_on.set()
        while not bridge.link.ready or bridge.link.connection is before:
            await asyncio.sleep(0.02)
        while bridge.consumer._channel is None or bridge.consumer._channel.is_closed:
            await asyncio.sleep(0.02)
    reply = await bus.command(sim.hw(1), "attach")
    assert reply is not None and reply["ok"] is True
