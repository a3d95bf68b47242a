"""Calls come first: forwarding without a broker, and sessions that come back after a cut."""

from __future__ import annotations

import asyncio
import gc

import pytest

from bridge.service import Bridge

pytestmark = pytest.mark.broker


async def test_calls_complete_while_the_broker_is_unreachable(sim, settings_for):
    hws = [sim.hw(i) for i in range(1, 4)]
    # nothing listens on port 1: the broker is down for the whole test
    s = settings_for(sim, devices=",".join(hws), amqp_url="amqp://guest:guest@127.0.0.1:1/")
    bridge = Bridge(s)
    await bridge.start()
    try:
        async with asyncio.timeout(10):
            while sim.stats()["attached_devices"] < 3:
                await asyncio.sleep(0.05)
        calls = [await sim.place_call(hw, direction="in", hold_s=0.1) for hw in hws]
        await sim.wait_idle(10)
        st = sim.stats()
        assert st["calls_stalled"] == 0 and st["calls_completed"] >= len(calls)
        assert st["messages_forwarded"] > 0
        assert not bridge.link.ready
        # every event is still held, in order, waiting for the broker
        assert bridge.publisher.buffer.pending >= 3 * 3 + st["messages_forwarded"]
        assert bridge.publisher.stats.confirmed == 0
    finally:
        await bridge.stop(0.5)


async def test_session_cut_mid_call_reattaches_and_republishes_state(sim, bus, settings_for, start_bridge):
    hw = sim.hw(8)
    q = await bus.bind(f"device.{hw}.#")
    bridge = await start_bridge(settings_for(sim, devices=hw))
    await q.until(lambda e: e.body["type"] == "attached")
    call = await sim.place_call(hw, direction="in", hold_s=30.0)
    await q.until(lambda e: e.body.get("state") == "connected")
    assert await sim.drop_sessions() >= 1
    evs = await q.until(lambda e: e.body["type"] == "call.state" and e.body.get("sync"))
    kinds = [e.body["type"] for e in evs]
    assert kinds.index("detached") < kinds.index("attached") < len(kinds) - 1
    assert [e.body["reason"] for e in evs if e.body["type"] == "detached"] == ["session-lost"]
    sync = evs[-1].body
    assert sync["call"] == call and sync["state"] == "connected" and sync["in"] is True
    assert bridge.pbx.runners[hw].reconnects == 1
    seqs = [e.body["seq"] for e in evs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap across the reconnect


async def test_a_broker_that_stops_answering_is_detected_within_the_heartbeat_interval(sim, settings_for, start_bridge):
    from tests.tcpproxy import TcpProxy

    proxy = await TcpProxy("127.0.0.1", 5672).start()
    try:
        bridge = await start_bridge(settings_for(sim, heartbeat_s=2,
                                                 amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
        loop = asyncio.get_running_loop()
        proxy.stall()  # connection open, no byte moves: only a heartbeat check can tell
        t0 = loop.time()
        async with asyncio.timeout(10):
            while bridge.link.ready:
                await asyncio.sleep(0.05)
        detected = loop.time() - t0
        assert detected <= 2 * 1.5, detected  # the interval, with slack for a loaded CI machine
        proxy.unstall()
        proxy.cut()
        proxy.restore()
        assert await bridge.link.wait_ready(15)
    finally:
        await proxy.stop()


async def test_a_call_that_ended_while_the_session_was_down_is_released_after_the_reattach(
        sim, bus, settings_for, start_bridge):
    from tests.tcpproxy import TcpProxy
    from urllib.parse import urlsplit

    u = urlsplit(sim.url)
    proxy = await TcpProxy(u.hostname, u.port).start()
    try:
        hw = sim.hw(11)
        q = await bus.bind(f"device.{hw}.call.*.state")
        await start_bridge(settings_for(sim, devices=hw, pbx_url=f"ws://127.0.0.1:{proxy.port}{u.path}"))
        await asyncio.sleep(0.3)
        call = await sim.place_call(hw, direction="in", hold_s=0.5)
        await q.until(lambda e: e.body["state"] == "connected")
        proxy.cut()  # the bridge is out of the path; the call goes on without it and ends
        await sim.wait_idle(10)
        proxy.restore()
        evs = await q.until(lambda e: e.body["state"] == "released", timeout=15)
        assert evs[-1].body["call"] == call and evs[-1].body["cause"] is None
    finally:
        await proxy.stop()


async def test_commands_come_back_after_the_broker_cancels_the_consumer(sim, bus, settings_for, start_bridge):
    bridge = await start_bridge(settings_for(sim))
    ch = await bus.conn.channel()
    await ch.queue_delete(bridge.s.commands_queue)  # the broker cancels the bridge's consumer
    await ch.close()
    async with asyncio.timeout(10):
        while bridge.consumer.consumer_restarts < 1:
            await asyncio.sleep(0.05)
    reply = await bus.command(sim.hw(1), "attach")
    assert reply["ok"] is True


async def test_commands_for_one_device_never_overlap(settings_for, bus):
    """Regression: the per-device lock was dropped while a command still waited for it."""
    from bridge import commands as cmds
    from bridge.amqp.consumer import CommandConsumer
    from bridge.amqp.link import BrokerLink

    trace: list[str] = []

    async def handler(hw, verb, cmd):
        name = f"call{cmd.call}"
        trace.append(f"start {name}")
        await asyncio.sleep(0.2 if cmd.call == -1 else 0.05)
        trace.append(f"end {name}")
        return cmds.Reply(ok=True)

    link = BrokerLink(settings_for(None))
    CommandConsumer(link, handler)
    task = asyncio.create_task(link.run())
    try:
        assert await link.wait_ready(10)
        for call in (-1, -2, -3, -4):
            await bus.command("hw", "signaling", {"call": call, "sig": {"type": "setup"}}, reply=False)
        async with asyncio.timeout(10):
            while len(trace) < 8:
                await asyncio.sleep(0.02)
        assert trace == [f"{x} call{c}" for c in (-1, -2, -3, -4) for x in ("start", "end")]
    finally:
        await link.close()
        task.cancel()


async def test_connecting_leaves_no_reference_cycles_behind(sim, bus, settings_for, start_bridge):
    """What a runner made to connect (tenacity's retry objects above all) is freed by reference
    counting once the session is up, not at some later full GC collection: with 10,000 devices
    that garbage was 40 MB of the bridge's peak RSS (docs/PERFORMANCE.md)."""
    hws = [sim.hw(i) for i in range(10, 15)]
    q = await bus.bind("device.*.attached")
    seen: list[str] = []
    gc.collect()
    gc.disable()
    try:
        bridge = await start_bridge(settings_for(sim, devices=",".join(hws)))
        await q.until(lambda e: seen.append(e.body["hw"]) or len(seen) == len(hws))
        assert await sim.drop_sessions() >= len(hws)  # and once more, through the reconnect path
        await q.until(lambda e: seen.append(e.body["hw"]) or len(seen) == 2 * len(hws))
        assert all(bridge.pbx.runners[hw].reconnects == 1 for hw in hws)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = [type(o).__qualname__ for o in gc.garbage if type(o).__module__.startswith("tenacity")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []
