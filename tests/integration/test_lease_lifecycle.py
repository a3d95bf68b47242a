"""Issue 20: lease queues across the replica count's changes (leases on -> off -> on), their
lifetimes, and the rule for configuration versus commands (docs/SCALING.md).

In-process bridges, the real broker and the real simulator, as the other lease tests.
"""

from __future__ import annotations

import asyncio
import json

import aio_pika
import pytest

from bridge.amqp import leases as amqp_leases
from bridge.amqp import topology
from bridge.leases import config_id
from bridge.sim import hw_id
from tests.faults.helpers import http_port, need_rabbitmqctl, rabbitmq_queue
from tests.integration.conftest import N
from tests.integration.test_leases import attached_by, held, until

pytestmark = [pytest.mark.asyncio, pytest.mark.broker]

ALL = [hw_id(i) for i in range(1, N + 1)]


async def queue_state(conn, s, hw) -> tuple[int, int] | None:
    """(messages ready, consumers) in ``hw``'s lease queue, None if it does not exist."""
    ch = await conn.channel()
    try:
        q = await ch.declare_queue(topology.lease_queue(s, hw), passive=True)
        return q.declaration_result.message_count, q.declaration_result.consumer_count
    except aio_pika.exceptions.ChannelNotFoundEntity:
        return None
    finally:
        if not ch.is_closed:
            await ch.close()


async def dead_letters(bus) -> aio_pika.abc.AbstractQueue:
    """A queue of the test's own with a copy of every dead letter."""
    ex = await bus.channel.declare_exchange(bus.s.dead_exchange, "topic", durable=True)
    q = await bus.channel.declare_queue(exclusive=True)
    await q.bind(ex, "#")
    return q


@pytest.fixture
async def cleanup(bus, names):
    """The lease queues of every simulator device, whatever bridge made them."""
    yield
    from bridge.config import Settings

    s = Settings.from_env({}, **names)
    await topology.delete(bus.conn, (), [topology.lease_queue(s, hw) for hw in ALL])


def outcomes(bridges, verb: str) -> int:
    return sum(b.consumer.stats.by_outcome.get((verb, "ok"), 0) for b in bridges)


async def test_leases_on_off_on_no_orphan_takes_a_command_and_nothing_stale_runs(
        sim, bus, start_bridge, lease_settings, cleanup, monkeypatch):
    """The operator's path of issue 20: two replicas with leases, a detach; every replica down
    and commands sent meanwhile (they wait in the lease queues); one replica with leases off:
    the lease queues are retired (waiting commands refused with the reason, never carried out),
    and commands in the off phase are carried out once and captured by no lease queue; leases on
    again: no stale command runs, every configured device ends attached."""
    monkeypatch.setattr(amqp_leases, "RETIRE_EVERY_S", 0.3)
    dead = await dead_letters(bus)
    # --- on
    a = await start_bridge(lease_settings(1))
    b = await start_bridge(lease_settings(2))
    await until(lambda: len(attached_by([a, b])) == N, what="every device attached (leases on)")
    assert (await bus.command(ALL[0], "detach"))["ok"]
    await until(lambda: ALL[0] not in attached_by([a, b]), 5, "the detached device")
    await a.stop(2)
    await b.stop(2)
    # nobody holds the devices now: these wait in the lease queues
    for hw in ALL[1:4]:
        await bus.command(hw, "detach", reply=False)
    await until(lambda: True)
    assert (await queue_state(bus.conn, a.s, ALL[1]))[0] == 2  # the token and the detach
    # --- off
    c = await start_bridge(lease_settings(3, leases=False))
    await until(lambda: not c.retirer.pending, 15, "the lease queues retired")
    for hw in ALL:
        assert await queue_state(bus.conn, c.s, hw) is None, f"{hw}: lease queue left behind"
    assert c.retirer.retired == N and c.retirer.refused == 3
    await until(lambda: len(attached_by([c])) == N, 15, "every device attached (leases off)")
    refused = []
    async with asyncio.timeout(10):
        while len(refused) < 3:
            msg = await dead.get(no_ack=True, fail=False)
            if msg is None:
                await asyncio.sleep(0.05)
            elif msg.routing_key.endswith(".detach"):
                refused.append(msg)
    assert all("leases are off" in m.headers["x-epsignal-error"] for m in refused)
    assert outcomes([c], "detach") == 0, "a command that waited for a lease holder was carried out"
    # commands now reach the shared queue only, once
    r = await bus.command(ALL[4], "detach")
    assert r["ok"] and r["was_attached"]
    assert (await bus.command(ALL[4], "attach"))["ok"]
    for hw in ALL:
        assert await queue_state(bus.conn, c.s, hw) is None, f"{hw}: a lease queue took a command"
    assert outcomes([c], "detach") == 1 and outcomes([c], "attach") == 1
    await c.stop(2)
    await bus.command(ALL[5], "detach", reply=False)  # nobody runs: waits in the shared queue
    # --- on again
    d = await start_bridge(lease_settings(4))
    e = await start_bridge(lease_settings(5))
    await until(lambda: sum(held([d, e])) == N, 15, "every lease held again")
    await until(lambda: len(attached_by([d, e])) == N, 15, "every configured device attached")
    await asyncio.sleep(1.0)
    # nothing stale ran: no detach of the first phase (its token was dropped with leases off),
    # none of the off phase; the one left in the shared queue is for a device nobody held when
    # it was taken: refused (answered, dead-lettered), as every such command with leases on
    assert outcomes([d, e], "detach") == 0
    assert sum(b.consumer.stats.by_outcome.get(("detach", "refused"), 0) for b in (d, e)) == 1
    assert len(attached_by([d, e])) == N and set(attached_by([d, e]).values()) == {1}
    assert sim.stats()["attach_conflicts"] == 0


async def test_a_replica_still_on_leases_keeps_its_queues_until_it_stops(
        sim, bus, start_bridge, lease_settings, cleanup, monkeypatch):
    """A rolling change from leases on to off: a lease queue still consumed is left to its
    replica (its holder carries the commands out); once that replica is gone, it is retired."""
    monkeypatch.setattr(amqp_leases, "RETIRE_EVERY_S", 0.3)
    a = await start_bridge(lease_settings(1))
    await until(lambda: held([a]) == [N], 15, "every lease held")
    c = await start_bridge(lease_settings(2, leases=False))
    await asyncio.sleep(1.0)
    assert len(c.retirer.pending) == N and c.retirer.retired == 0
    for hw in ALL:
        assert (await queue_state(bus.conn, a.s, hw))[1] >= 1, f"{hw}: its lease queue not consumed"
    await a.stop(2)
    await until(lambda: not c.retirer.pending, 10, "the queues retired once their replica stopped")
    assert c.retirer.retired == N


async def test_waiting_commands_are_dead_lettered_and_unused_lease_queues_expire(
        sim, bus, start_bridge, lease_settings, cleanup, monkeypatch):
    """Queue lifetimes, shortened: a command waits for a holder at most the command TTL, then
    is dead-lettered (x-death reason expired); a lease queue nobody consumes goes after its
    queue TTL. A held token never expires: it is renewed well within the TTL."""
    monkeypatch.setattr(topology, "LEASE_COMMAND_TTL_S", 2.0)
    monkeypatch.setattr(topology, "LEASE_QUEUE_EXPIRES_S", 4.0)
    dead = await dead_letters(bus)
    a = await start_bridge(lease_settings(1))
    await until(lambda: len(attached_by([a])) == N, what="every device attached")
    await asyncio.sleep(3.0)  # longer than the TTL: held tokens renewed (every 0.4 s), kept
    assert held([a]) == [N] and len(attached_by([a])) == N
    await a.stop(2)
    await bus.command(ALL[0], "detach", reply=False)
    expired = None
    async with asyncio.timeout(10):
        while expired is None:
            msg = await dead.get(no_ack=True, fail=False)
            if msg is None:
                await asyncio.sleep(0.1)
            elif msg.routing_key == f"device.{ALL[0]}.detach":
                expired = msg
    assert expired.headers["x-death"][0]["reason"] == "expired"
    assert expired.headers["x-death"][0]["queue"] == topology.lease_queue(a.s, ALL[0])
    # a look at the queue (a declare, even passive) counts as a use: look once, after the TTL
    await asyncio.sleep(topology.LEASE_QUEUE_EXPIRES_S + 2)
    for hw in ALL:
        assert await queue_state(bus.conn, a.s, hw) is None, f"{hw}: the unused lease queue did not expire"


async def test_a_detach_lasts_across_restarts_until_the_configuration_changes(
        sim, bus, start_bridge, lease_settings, cleanup):
    """THE RULE (docs/SCALING.md): a rolling restart keeps a detached device detached, and says
    why (log, `detached` event `wanted-detached`); a new EPSIGNAL_DEVICES voids the detach (the
    device is attached as configured) and for good: a replica still on the old configuration
    does not bring the old detach back."""
    old = ",".join(ALL[:-1])  # configuration A
    new = ",".join(ALL)       # configuration B
    events = await bus.bind("device.*.detached", "device.*.attached")
    a = await start_bridge(lease_settings(1, devices=old))
    b = await start_bridge(lease_settings(2, devices=old))
    await until(lambda: len(attached_by([a, b])) == N - 1, what="every configured device attached")
    assert (await bus.command(ALL[0], "detach"))["ok"]
    seen: list[str] = []

    async def sample(bridges):
        while True:
            if ALL[0] in attached_by(bridges):
                seen.append("attached")
            await asyncio.sleep(0.05)
    # rolling restart, same configuration: the device never attached again
    bridges = [a, b]
    task = asyncio.create_task(sample(bridges))
    try:
        for n, old_one in ((3, a), (4, b)):
            new_one = await start_bridge(lease_settings(n, devices=old))
            bridges.append(new_one)
            await asyncio.sleep(1.0)
            await old_one.stop(2)
            bridges.remove(old_one)
            await until(lambda: sum(held(bridges)) == N - 1, 15, "every lease held")
            await until(lambda: len(attached_by(bridges)) == N - 2, 15, "all but the detached attached")
    finally:
        task.cancel()
    assert seen == [], "the detached device was attached again by a rolling restart"
    reasons = [ev.body["reason"] for ev in events.drain() if ev.body["type"] == "detached" and ev.body["hw"] == ALL[0]]
    assert "command" in reasons and "wanted-detached" in reasons, reasons
    holder = next(br for br in bridges if br.leases.holds(ALL[0]))
    row = next(r for r in holder.leases.view()["devices"] if r["hw"] == ALL[0])
    assert row["wanted"] == "detached" and row["by"] in ("replica-1", "replica-2") and row["since"]
    # a new configuration: the old detach is void
    for br in list(bridges):
        await br.stop(2)
    f = await start_bridge(lease_settings(5, devices=new))
    await until(lambda: len(attached_by([f])) == N, 15, "every device of the new configuration attached")
    row = next(r for r in f.leases.view()["devices"] if r["hw"] == ALL[0])
    await until(lambda: f.leases.leases[ALL[0]].pending is None, 5, "the voided token replaced")
    assert f.leases.leases[ALL[0]].token.cfg == config_id(ALL)
    # a replica still on the old configuration (a rollout in progress) does not detach it again
    await f.stop(2)
    g = await start_bridge(lease_settings(6, devices=old))
    await until(lambda: len(attached_by([g])) == N - 1, 15, "the old configuration's devices attached")
    assert ALL[0] in attached_by([g])


async def test_leases_view_over_http(sim, bus, start_bridge, lease_settings, cleanup):
    import aiohttp

    a = await start_bridge(lease_settings(1))
    await until(lambda: held([a]) == [N], 15, "every lease held")
    assert (await bus.command(ALL[0], "detach"))["ok"]
    await until(lambda: a.leases.leases[ALL[0]].pending is None, 5, "the detach's token")
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{http_port(a)}/leases") as r:
        assert r.status == 200
        view = json.loads(await r.text())
    assert view["instance"] == "replica-1" and view["replicas"] == ["replica-1"]
    rows = {r["hw"]: r for r in view["devices"]}
    assert set(rows) == set(ALL)
    assert rows[ALL[0]]["state"] == "holding" and rows[ALL[0]]["wanted"] == "detached"
    assert rows[ALL[1]]["wanted"] == "attached" and rows[ALL[1]]["runner"] is True


async def test_leases_list_and_reset_as_an_operator_would(sim, bus, start_bridge, lease_settings, cleanup, names):
    """`epsignal-bridge leases list|reset` as processes: two replicas answer; a detached device
    shows its holder, wanted state, since when and by whom; reset forgets it (the device is
    attached again from the configuration); an orphan queue's waiting command is dead-lettered."""
    from tests.conftest import AMQP_URL
    from tests.integration.test_cli_bus import cli

    env = {f"EPSIGNAL_{k.upper()}": v for k, v in names.items() if k != "instance_id"}
    env["EPSIGNAL_DEVICES"] = ",".join(ALL)
    a = await start_bridge(lease_settings(1))
    b = await start_bridge(lease_settings(2))
    await until(lambda: len(attached_by([a, b])) == N, what="every device attached")
    await until(lambda: sum(held([a, b])) == N and min(held([a, b])) > 0, what="both hold devices")
    assert (await bus.command(ALL[0], "detach"))["ok"]
    await until(lambda: all(br.leases.leases[ALL[0]].pending is None for br in (a, b)), 5, "the detach's token")
    await until(lambda: all(lease.state.value in ("holding", "in line") for br in (a, b)
                            for lease in br.leases.leases.values()), 10, "both in line for every device")
    code, out, err = await cli("leases", "list", "--json", "--amqp-url", AMQP_URL, **env)
    assert code == 0, err
    rows = {r["hw"]: r for r in json.loads(out)}
    assert set(rows) == set(ALL)
    holders = {hw: ("replica-1" if hw in a.leases.tokens else "replica-2") for hw in ALL}
    assert {hw: r["holder"] for hw, r in rows.items()} == holders
    r0 = rows[ALL[0]]
    assert r0["wanted"] == "detached" and r0["by"] == holders[ALL[0]] and r0["since"]
    # the broker's own count: a quorum queue (the default) counts only its active consumer, a
    # classic one every consumer in line too
    assert r0["configuration"] == "current" and r0["queue"] == {"ready": 0, "consumers": 1}
    assert r0["in_line"] == [m for m in ("replica-1", "replica-2") if m != holders[ALL[0]]]
    assert rows[ALL[1]]["wanted"] == "attached"
    code, out, err = await cli("leases", "list", "--amqp-url", AMQP_URL, **env)
    assert code == 0 and f"{ALL[0]}  held by {holders[ALL[0]]}" in out and "wanted detached since" in out
    # reset: the detach is forgotten, the device attached again from the configuration
    code, out, err = await cli("leases", "reset", ALL[0], "--amqp-url", AMQP_URL, **env)
    assert code == 0 and out.startswith(f"{ALL[0]}: lease queue deleted"), (out, err)
    await until(lambda: ALL[0] in attached_by([a, b]), 15, "the reset device attached again")
    assert set(attached_by([a, b]).values()) == {1}
    # an orphan (no replica): its waiting command is dead-lettered by the reset, not dropped
    dead = await dead_letters(bus)
    await a.stop(2)
    await b.stop(2)
    await bus.command(ALL[1], "detach", reply=False)
    await until(lambda: True)
    code, out, err = await cli("leases", "list", ALL[1], "--amqp-url", AMQP_URL, **{**env, "EPSIGNAL_DEVICES": ""})
    assert code == 0 and out.strip() == (f"{ALL[1]}  not held; wanted ?; no holder: 2 message(s) in the queue "
                                          "(the token among them), 0 consumer(s)"), out
    code, out, err = await cli("leases", "reset", ALL[1], "--amqp-url", AMQP_URL, **env)
    assert code == 0 and "1 waiting command(s) dead-lettered" in out, out
    msg = await dead.get(timeout=5)
    assert msg.routing_key == f"device.{ALL[1]}.detach" and "reset by an operator" in msg.headers["x-epsignal-error"]
    code, out, err = await cli("leases", "reset", "--amqp-url", AMQP_URL, **{**env, "EPSIGNAL_DEVICES": ""})
    assert code == 2 and "name the devices" in err


async def test_a_lease_queue_made_with_other_arguments_is_used_and_named(
        sim, bus, start_bridge, lease_settings, cleanup, caplog):
    """An upgrade: lease queues made by a bridge before issue 20 (no TTLs) or of another queue
    type. Their declare is refused; the bridge uses them as they are (on a declare channel of its
    own: the lease channel is never closed by it) and names the fix once per device."""
    ch = await bus.conn.channel()
    old = topology.lease_queue(bus.s, ALL[0])
    await ch.declare_queue(old, durable=True, arguments={
        "x-single-active-consumer": True, "x-dead-letter-exchange": bus.s.dead_exchange})
    await ch.close()
    a = await start_bridge(lease_settings(1))
    await until(lambda: len(attached_by([a])) == N, 15, "every device attached, the old queue's too")
    assert a.leases.channels_lost == 0
    warned = [r.getMessage() for r in caplog.records if "exists with other arguments" in r.getMessage()]
    assert len(warned) == 1 and ALL[0] in warned[0] and "leases reset" in warned[0]
    r = await bus.command(ALL[0], "attach")  # bound: its commands reach the holder
    assert r["ok"] and r["attached"]


async def test_a_command_moved_to_a_lease_queue_that_routes_nowhere_is_refused_not_dropped(
        sim, bus, start_bridge, lease_settings, cleanup):
    """An attach for a device without a lease queue comes through the shared queue; the bridge
    makes the device's lease queue and publishes the command again for it. If that copy is
    routed nowhere (the lease queue unbound again meanwhile, and the shared queue no longer
    behind the alternate exchange), the command was acked all the same and lost unseen; now it
    is answered and dead-lettered with the reason."""
    hw = ALL[-1]
    a = await start_bridge(lease_settings(1, devices=",".join(ALL[:-1])))
    await until(lambda: len(attached_by([a])) == N - 1, 15, "the configured devices attached")
    redirect = a.consumer._redirect

    async def redirect_then_unbind(hw_, verb):
        target = await redirect(hw_, verb)
        ch = await bus.conn.channel()
        await (await ch.get_queue(target, ensure=False)).unbind(bus.s.commands_exchange, topology.lease_key(hw_))
        await (await ch.get_queue(bus.s.commands_queue, ensure=False)).unbind(topology.unrouted_exchange(bus.s))
        await ch.close()
        return target
    a.consumer._redirect = redirect_then_unbind
    r = await bus.command(hw, "attach", message_id="m-1")
    assert r["ok"] is False and "routed it nowhere" in r["error"] and topology.lease_queue(bus.s, hw) in r["error"], r
    [dead] = await bus.dead_letters(1)
    assert "routed it nowhere" in dead.headers["x-epsignal-error"]
    assert dead.headers["x-original-message-id"] == "m-1" and dead.routing_key == f"device.{hw}.attach"


async def test_a_command_whose_lease_queue_cannot_be_made_is_refused_not_left_unacked(
        sim, bus, start_bridge, lease_settings, cleanup):
    """An attach for a device without a lease queue while the bridge cannot make that queue (its
    lease channel is gone): the command was left unacked, to wait for the channel's end (or the
    broker's consumer timeout) and come back to fail again. Now it is answered and dead-lettered
    with the reason, and acked; the device is not adopted (it is not announced as dynamic)."""
    need_rabbitmqctl()
    hw = ALL[-1]
    a = await start_bridge(lease_settings(1, devices=",".join(ALL[:-1])))
    await until(lambda: len(attached_by([a])) == N - 1, 15, "the configured devices attached")
    a.leases._usable = lambda: None  # adopt's own failure: no lease channel to declare on
    r = await bus.command(hw, "attach", message_id="m-2")
    assert r["ok"] is False and "could not be made" in r["error"] and "no lease channel" in r["error"], r
    [dead] = await bus.dead_letters(1)
    assert "could not be made" in dead.headers["x-epsignal-error"]
    assert dead.headers["x-original-message-id"] == "m-2" and dead.routing_key == f"device.{hw}.attach"
    assert rabbitmq_queue(bus.s.commands_queue)["unacked"] == 0  # acked: nothing waits to come back
    assert hw not in a.leases.devices() and hw not in attached_by([a])


async def test_a_command_whose_lease_queue_is_refused_is_refused_once_not_bounced(
        sim, bus, start_bridge, lease_settings, cleanup, monkeypatch):
    """The broker refuses the new lease queue's declare (say, no configure permission on it).
    The line-up's own failure is quiet (the device goes OUT, tried again next round), so the
    attach was moved to a queue that did not exist, came back through the alternate exchange to
    the shared queue, and round it went. Now the attach is refused once, with the reason."""
    need_rabbitmqctl()
    hw = ALL[-1]
    a = await start_bridge(lease_settings(1, devices=",".join(ALL[:-1])))
    await until(lambda: len(attached_by([a])) == N - 1, 15, "the configured devices attached")
    declare, adopt = amqp_leases.LeaseManager._declare, a.leases.adopt
    adopted = []

    async def declare_refused(self, hw_):
        if hw_ == hw:
            raise ConnectionRefusedError(f"ACCESS_REFUSED - access to queue lease {hw_} refused")
        return await declare(self, hw_)

    async def counted(hw_):
        adopted.append(hw_)
        return await adopt(hw_)
    monkeypatch.setattr(amqp_leases.LeaseManager, "_declare", declare_refused)
    a.leases.adopt = counted
    r = await bus.command(hw, "attach", message_id="m-3")
    assert r["ok"] is False and "could not be made" in r["error"] and "ACCESS_REFUSED" in r["error"], r
    [dead] = await bus.dead_letters(1)
    assert dead.headers["x-original-message-id"] == "m-3"
    await asyncio.sleep(1.0)  # a bounced command would come back meanwhile, many times
    assert adopted == [hw]
    assert rabbitmq_queue(bus.s.commands_queue)["unacked"] == 0
    assert hw not in a.leases.devices()  # not adopted: no round lines up for it
