"""Issue 14: each root cause of a device run by two replicas, reproduced deterministically.

In-process bridges, the real simulator, the real broker (or, for the consumer timeout, a
RabbitMQ node of the test's own with a lowered ``consumer_timeout``). While a test runs, a
sampler checks every 50 ms that no two bridges' state machines allow a runner for one device
(``LeaseManager.runs``) and no device is attached by two bridges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import aio_pika
import pytest

from bridge.amqp import leases as amqp_leases
from bridge.amqp import topology
from bridge.amqp.leases import TOKEN_ENCODER, Token
from bridge.leases import State, rank
from bridge.metrics import registry_for, render
from bridge.sim import hw_id
from tests import rabbitnode
from tests.faults.helpers import queue_counts
from tests.integration.test_leases import N, attached_by, held, until

pytestmark = [pytest.mark.asyncio, pytest.mark.broker]


@contextlib.asynccontextmanager
async def one_owner_at_a_time(bridges: list, *, runs: bool = True):
    """Sample every 50 ms: no device attached by two bridges; with ``runs``, no device two
    bridges' state machines let run."""
    bad: list[str] = []

    async def sample():
        while True:
            for hw, n in attached_by(bridges).items():
                if n > 1:
                    bad.append(f"{hw} attached by {n}")
            if runs:
                for i in range(1, N + 1):
                    hw = hw_id(i)
                    owners = [b.s.instance_id for b in bridges if b.leases.runs(hw)]
                    if len(owners) > 1:
                        bad.append(f"{hw} run by {owners}")
            await asyncio.sleep(0.05)
    task = asyncio.create_task(sample())
    try:
        yield bad
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert bad == [], bad[:5]


async def tokens_in_queues(bridges, conn) -> dict[str, int]:
    """hw -> tokens in its lease queue: ready (a passive declare) plus held by a bridge."""
    out = {}
    ch = await conn.channel()
    try:
        for i in range(1, N + 1):
            hw = hw_id(i)
            q = await ch.declare_queue(topology.lease_queue(bridges[0].s, hw), passive=True)
            out[hw] = q.declaration_result.message_count + sum(b.leases.holds(hw) for b in bridges)
    finally:
        await ch.close()
    return out


async def test_an_extra_token_during_a_hand_on_never_makes_a_second_holder(sim, bus, start_bridge, lease_settings):
    """Cause 1: a token arriving while the holder hands the device on started a runner there."""
    a = await start_bridge(lease_settings(1))
    await until(lambda: len(attached_by([a])) == N, what="one replica attached every device")
    extra: list[str] = []
    released = a.released

    async def released_with_an_extra_token(hw: str, reason: str) -> None:
        if reason == "lease-moved":  # a hand-on: a second token reaches the queue right now
            extra.append(hw)
            ch = await bus.conn.channel()
            await ch.default_exchange.publish(aio_pika.Message(
                TOKEN_ENCODER.encode(Token(hw=hw)), type=topology.LEASE_TOKEN), topology.lease_queue(a.s, hw))
            await ch.close()
            await asyncio.sleep(0.05)  # delivered to the holder, which is still the active consumer
        await released(hw, reason)
    a.released = released_with_an_extra_token
    async with one_owner_at_a_time([a]) as _:
        b = await start_bridge(lease_settings(2))
        async with one_owner_at_a_time([a, b]):
            await until(lambda: held([b])[0] > 0 and sum(held([a, b])) == N, 15, "devices handed on")
            await until(lambda: len(attached_by([a, b])) == N, 15, "every device attached")
            await asyncio.sleep(1.0)
    assert extra, "no hand-on happened"
    assert sim.stats()["attach_conflicts"] == 0
    await until(lambda: True)
    counts = await tokens_in_queues([a, b], bus.conn)
    assert set(counts.values()) == {1}, {hw: n for hw, n in counts.items() if n != 1}


async def test_a_lease_channel_error_stops_the_runners_and_the_replica_lines_up_again(
        sim, bus, start_bridge, lease_settings):
    """Cause 4: an error on the lease channel alone (the connection lives) went unnoticed: the
    runners went on while the broker gave the tokens to the stand-in."""
    a = await start_bridge(lease_settings(1))
    b = await start_bridge(lease_settings(2))
    await until(lambda: sum(held([a, b])) == N and min(held([a, b])) > 0, what="both hold devices")
    await until(lambda: len(attached_by([a, b])) == N, what="every device attached")
    mine = set(a.leases.tokens)
    async with one_owner_at_a_time([a, b], runs=False):
        ch = a.leases._ch
        t0 = asyncio.get_running_loop().time()
        await ch.basic_nack(999_999, requeue=True)  # PRECONDITION_FAILED - unknown delivery tag
        await until(lambda: a.leases.channels_lost == 1, 5, "the lease channel loss noticed")
        assert not a.leases.tokens and not any(a.leases.runs(hw) for hw in mine)
        await until(lambda: not a.pbx.runners, 10, "the runners stopped")
        await until(lambda: len(attached_by([a, b])) == N, 15, "every device attached again")
        print(f"\nlease channel error: {len(mine)} devices attached again in "
              f"{asyncio.get_running_loop().time() - t0:.2f}s")
        await until(lambda: a.leases._usable() is not None, 10, "a new lease channel")
        assert a.link.ready, "the connection was not lost: only the channel"
        await until(lambda: held([a])[0] > 0 and sum(held([a, b])) == N, 15, "the leases balanced again")
        await until(lambda: len(attached_by([a, b])) == N, 15, "every device attached again")
    assert set(sim.conflict_hw) <= mine, "a second Attach for a device the failed channel did not hold"


async def test_a_reconnect_during_a_hand_on_never_nacks_a_stale_tag(sim, bus, start_bridge, lease_settings):
    """Cause 4 (stale tag): a hand-on that ended after a reconnect nacked the old channel's
    delivery tag on the new channel, whose error then closed it."""
    from tests.tcpproxy import TcpProxy

    proxy = await TcpProxy("127.0.0.1", 5672).start()
    try:
        a = await start_bridge(lease_settings(1, amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
                                              heartbeat_s=2))
        await until(lambda: len(attached_by([a])) == N, what="one replica attached every device")
        cut = asyncio.Event()
        released = a.released

        async def released_then_reconnect(hw: str, reason: str) -> None:
            if reason == "lease-moved" and not cut.is_set():  # the broker connection drops mid hand-on
                cut.set()
                proxy.cut()
                await asyncio.sleep(0.3)
                proxy.restore()
            await released(hw, reason)
        a.released = released_then_reconnect
        b = await start_bridge(lease_settings(2))
        await until(lambda: cut.is_set(), 15, "a hand-on began")
        lost = a.leases.channels_lost
        await until(lambda: a.link.ready and a.leases._usable() is not None, 20, "a back on the broker")
        async with one_owner_at_a_time([a, b], runs=False):
            await until(lambda: held([a])[0] > 0 and held([b])[0] > 0 and sum(held([a, b])) == N, 20,
                        "both hold devices again")
            await until(lambda: len(attached_by([a, b])) == N, 15, "every device attached")
            await asyncio.sleep(1.5)
        assert a.leases.channels_lost <= lost + 1, "a lease channel closed after the reconnect (stale tag?)"
        assert a.leases._usable() is not None
    finally:
        await proxy.stop()


@pytest.mark.skipif(not rabbitnode.available(), reason="no rabbitmq-server on this machine")
async def test_the_consumer_timeout_never_moves_a_device(sim, bus, start_bridge, lease_settings, monkeypatch):
    """Cause 4 (consumer timeout): RabbitMQ closes a channel over a delivery unacked for longer
    than consumer_timeout (30 min by default): every holder met it. On a node of the test's own,
    the timeout is 3 s (checked every second); the bridge renews its tokens every second."""
    node = rabbitnode.RabbitNode(config="consumer_timeout = 3000", advanced="{channel_tick_interval, 500}")
    await asyncio.to_thread(node.start)
    try:
        monkeypatch.setattr(amqp_leases, "RENEW_S", 1.0)
        a = await start_bridge(lease_settings(1, amqp_url=node.url))
        b = await start_bridge(lease_settings(2, amqp_url=node.url))
        await until(lambda: sum(held([a, b])) == N and min(held([a, b])) > 0, what="both hold devices")
        await until(lambda: len(attached_by([a, b])) == N, what="every device attached")
        owners = {hw: ("a" if hw in a.leases.tokens else "b") for hw in (hw_id(i) for i in range(1, N + 1))}
        async with one_owner_at_a_time([a, b]):
            await asyncio.sleep(8)  # more than twice the timeout
        assert a.leases.channels_lost == 0 and b.leases.channels_lost == 0, "the consumer timeout closed a channel"
        assert {hw: ("a" if hw in a.leases.tokens else "b") for hw in owners} == owners, "a device moved"
        assert len(attached_by([a, b])) == N
        for br in (a, b):
            await br.stop(2)
        # the same, without renewal: the timeout closes the holder's channel (what the test guards)
        monkeypatch.setattr(amqp_leases, "RENEW_S", 3600.0)
        c = await start_bridge(lease_settings(3, amqp_url=node.url))
        await until(lambda: held([c]) == [N], 15, "one replica holds every device")
        await until(lambda: c.leases.channels_lost > 0, 15, "the consumer timeout closed the channel")
    finally:
        await asyncio.to_thread(node.stop)


async def test_a_lease_queue_nobody_is_given_is_lined_up_for_again(sim, bus, start_bridge, lease_settings,
                                                                   monkeypatch, caplog):
    """Issue 15: RabbitMQ 3.10.8 left a quorum lease queue with its token ready and no active
    consumer after its consumers' node died: the replicas' new consumers were not in it, every
    replica stood in line for good (docs/SCALING.md). Here both replicas' consume of one device
    is lost the same way (the queue declared, its token made, basic.consume never sent): nobody
    holds it, every heartbeat says so, and the repair consumes again."""
    lost = hw_id(1)
    dropped: list[str] = []
    consume = amqp_leases.LeaseManager._consume

    async def consume_but_lose_one(self, lease, a):
        if a.hw != lost or self.s.instance_id in dropped:
            return await consume(self, lease, a)
        dropped.append(self.s.instance_id)
        self._by_ctag[a.ctag] = a.hw  # in line, as far as the replica knows
        if await self._declare(a.hw) == (0, 0):
            await self._publish_token(Token(hw=a.hw, cfg=self.cfg))
    monkeypatch.setattr(amqp_leases.LeaseManager, "_consume", consume_but_lose_one)
    a = await start_bridge(lease_settings(1))
    b = await start_bridge(lease_settings(2))
    async with one_owner_at_a_time([a, b]):
        await until(lambda: len(dropped) == 2, what="both consumes of the device lost")
        t0 = asyncio.get_running_loop().time()
        await until(lambda: len(attached_by([a, b])) == N, 20, "every device attached, the lost one too")
        print(f"\nlease queue without a consumer: attached {asyncio.get_running_loop().time() - t0:.2f}s "
              f"after its second consume was lost (heartbeat 0.3 s, {amqp_leases.ORPHAN_BEATS} beats)")
    assert a.leases.repaired + b.leases.repaired == 1, "one replica repairs it, not both"
    said = [r.getMessage() for r in caplog.records
            if r.levelname == "WARNING" and "no active consumer" in r.getMessage()]
    assert len(said) == 1 and lost in said[0], said
    assert sim.stats()["attach_conflicts"] == 0
    pages = [render(registry_for(br.snapshot)).decode() for br in (a, b)]
    assert sum("epsignal_lease_repairs_total 1.0" in p for p in pages) == 1


async def test_a_preferred_replica_not_in_line_hears_so_from_the_holder_and_lines_up_again(
        sim, bus, start_bridge, lease_settings, monkeypatch, caplog):
    """Seen once in the cluster test after a node kill: replica a, preferred for a device replica
    b held, stood IN_LINE by its state machine with no consumer on the (quorum) lease queue; b's
    hand-ons came straight back to b and the idle device was detached and attached again every
    ~2 s for good. Here a's first consume of such a device is lost (declared, basic.consume never
    sent): b's heartbeat says the hand-on bounced, a lines up again, and b's next hand-on takes."""
    caplog.set_level(logging.INFO, logger="bridge.leases")
    b = await start_bridge(lease_settings(2))
    await until(lambda: held([b]) == [N], what="b alone holds every device")
    lost = next(hw_id(i) for i in range(1, N + 1) if rank(hw_id(i), ["replica-1", "replica-2"])[0] == "replica-1")
    dropped: list[str] = []
    consume = amqp_leases.LeaseManager._consume

    async def consume_but_lose_one(self, lease, a):
        if a.hw != lost or self.s.instance_id != "replica-1" or dropped:
            return await consume(self, lease, a)
        dropped.append(a.ctag)
        self._by_ctag[a.ctag] = a.hw  # in line, as far as the replica knows
        await self._declare(a.hw)
    monkeypatch.setattr(amqp_leases.LeaseManager, "_consume", consume_but_lose_one)
    a = await start_bridge(lease_settings(1))
    async with one_owner_at_a_time([a, b]):
        await until(lambda: dropped, what="a's consume of the device lost")
        t0 = asyncio.get_running_loop().time()
        await until(lambda: a.leases.holds(lost), 20, "the device handed on to a at last")
        print(f"\npreferred replica not in line: it holds the device "
              f"{asyncio.get_running_loop().time() - t0:.2f}s after its consume was lost (heartbeat 0.3 s)")
        await until(lambda: len(attached_by([a, b])) == N, 15, "every device attached")
    assert a.leases.repaired == 1 and b.leases.repaired == 0
    said = [(r.levelname, r.getMessage()) for r in caplog.records
            if "not in line" in r.getMessage() and lost in r.getMessage()]
    assert [lvl for lvl, m in said if "came straight back: replica-1" in m] == ["INFO"], said  # b: once, and it took
    assert sum("lining up again" in m for _, m in said) == 1, said  # a: once
    assert sim.stats()["attach_conflicts"] == 0


async def test_a_line_up_that_fails_before_its_consumer_is_made_is_tried_again(
        sim, bus, start_bridge, lease_settings, monkeypatch):
    """A lease queue's declare that fails (a node dying: timed out, or refused) left the lease
    IN_LINE without a consumer: nothing could ever deliver its token there, and the device was
    never attached by this replica. Now it is OUT, and the next round lines up again."""
    failing = hw_id(2)
    failed: list[str] = []
    declare = amqp_leases.LeaseManager._declare

    async def declare_failing_once(self, hw):
        if hw == failing and not failed:
            failed.append(hw)
            raise TimeoutError("the lease queue's declare timed out (as with a node dying)")
        return await declare(self, hw)
    monkeypatch.setattr(amqp_leases.LeaseManager, "_declare", declare_failing_once)
    a = await start_bridge(lease_settings(1))
    await until(lambda: failed, what="the declare failed")
    await until(lambda: len(attached_by([a])) == N, 10, "every device attached, the failed one too")
    assert held([a]) == [N]


async def test_a_line_up_whose_first_token_fails_mints_it_next_time(
        sim, bus, start_bridge, lease_settings, monkeypatch):
    """The queue declared (empty, nobody consuming), its first token's publish failed: the next
    line-up must declare it again and mint the token, not consume a queue without one."""
    failing = hw_id(3)
    failed: list[str] = []
    publish = amqp_leases.LeaseManager._publish_token

    async def publish_failing_once(self, token):
        if token.hw == failing and not failed:
            failed.append(token.hw)
            raise ConnectionError("no publishing channel (as with a broker link going down)")
        return await publish(self, token)
    monkeypatch.setattr(amqp_leases.LeaseManager, "_publish_token", publish_failing_once)
    a = await start_bridge(lease_settings(1))
    await until(lambda: failed, what="the first token's publish failed")
    await until(lambda: len(attached_by([a])) == N, 10, "every device attached, that one too")


async def test_a_device_whose_line_up_keeps_failing_holds_up_no_other(
        sim, bus, start_bridge, lease_settings, monkeypatch, caplog):
    """One device's lease queue declare fails every time (its queue's node down, say): the lease
    round goes on with the others (before, the round stopped at that device, every device after it
    in order was never lined up, and it started over at once), and it is said once."""
    failing = hw_id(1)  # the first in the round's order
    tries: list[float] = []
    declare = amqp_leases.LeaseManager._declare

    async def declare_failing(self, hw):
        if hw == failing:
            tries.append(asyncio.get_running_loop().time())
            raise TimeoutError("the lease queue's declare timed out")
        return await declare(self, hw)
    monkeypatch.setattr(amqp_leases.LeaseManager, "_declare", declare_failing)
    a = await start_bridge(lease_settings(1))
    await until(lambda: len(attached_by([a])) == N - 1, 10, "every other device attached")
    await asyncio.sleep(1.0)
    assert failing not in attached_by([a])
    assert 2 <= len(tries) <= 1.0 / 0.3 + 4, f"{len(tries)} tries: once a round (heartbeat 0.3 s), not in a loop"
    said = [r.getMessage() for r in caplog.records if "not lined up for" in r.getMessage()]
    assert len(said) == 1 and failing in said[0] and "timed out" in said[0], said


async def test_a_rejoin_while_the_consume_is_on_its_way_leaves_no_stray_consumer(
        sim, bus, start_bridge, lease_settings, monkeypatch):
    """A holder's bounce heard while this replica's line-up of the device still waits on its
    queue's declare: the rejoin gives that line-up up, and its consumer must not be made after
    all (it would be one the lease does not know: the token given to it and back, for good)."""
    hw = hw_id(2)
    go, waiting = asyncio.Event(), asyncio.Event()
    declare = amqp_leases.LeaseManager._declare

    async def declare_slowly(self, hw_):
        if hw_ == hw and not go.is_set():
            waiting.set()
            await go.wait()
        return await declare(self, hw_)
    monkeypatch.setattr(amqp_leases.LeaseManager, "_declare", declare_slowly)
    # classic queues: a declare-ok counts every consumer (a quorum queue's, the active one only)
    a = await start_bridge(lease_settings(1, queue_type="classic", commands_queue=f"{bus.s.commands_queue}.classic",
                                          dead_queue=f"{bus.s.dead_queue}.classic"))
    await asyncio.wait_for(waiting.wait(), 10)
    a.leases._rejoin(hw, "replica-9")  # what hearing a bounce does
    await until(lambda: a.leases.leases[hw].state is State.OUT, 5, "the line-up given up")
    go.set()
    await until(lambda: len(attached_by([a])) == N, 10, "every device attached, that one too")
    await asyncio.sleep(0.5)
    assert (await queue_counts(bus.conn, topology.lease_queue(a.s, hw)))[1] == 1, "one consumer: no stray"
    assert a.leases.repaired == 1
