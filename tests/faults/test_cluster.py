"""Issue 15: two bridge replicas on a 3-node RabbitMQ cluster of the test's own; nodes die.

A cluster of three private nodes (tests/rabbitnode.py), apart from the machine's broker. Before
any traffic, a quorum queue bound to ``device.#`` (and to the gap announcements) on the events
exchange: the consumer that must get every event. Two ``epsignal-bridge run`` processes with
leases on (quorum queues: commands, dead letters, one lease queue per device), each with the three
nodes' URLs in its own order (replica a starts on node 1, replica b on node 2), the simulator's
call traffic, and attach commands with ``reply_to`` all the time. Then:

1. SIGKILL the node replica a is connected to (its ``epsignal_broker_info`` address); measured:
   kill -> its broker_info shows a surviving node and its confirmed events count again;
2. restart that node (as Kubernetes restarts a pod; with two nodes dead of three the quorum
   queues would have no majority);
3. SIGKILL the node leading the commands queue; measured: kill -> a command sent after the kill
   answered, and the failover of any replica that was on that node.

Asserted: every event a replica counted as confirmed is in the quorum queue (per instance and
device, the seqs are 1..last without a hole, duplicates dropped by seq, and as many as the replica
confirmed), nothing dropped; every command answered (by correlation id), ok or with a clear error;
no call stalled; no device attached on two replicas' sessions at any 100 ms sample.

The test's own client (commands, replies) goes through the nodes in turn too, and its reply queue
is a durable quorum queue: a node dying must not lose the test's own replies.

Step 3 is where RabbitMQ 3.10.8 can leave a device's lease queue with no active consumer (its
consumers' node died): every device attached again asserts the bridge's repair of it
(bridge.leases.Orphans; docs/SCALING.md); the figures say how many queues were repaired.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
import uuid

import aio_pika
import aiormq
import pytest

from bridge.amqp import topology
from bridge.config import Settings
from bridge.sim import PbxSimulator, SimConfig, hw_id
from bridge.sim.traffic import random_scenario
from tests import rabbitnode
from tests.conftest import PASSWORD
from tests.faults.helpers import BridgeProcess, bridge_env, eventually, http_get, metric
from tests.faults.test_replicas import owners
from tests.ports import free_port

pytestmark = [pytest.mark.broker,
              pytest.mark.skipif(not rabbitnode.available(), reason="no rabbitmq-server on this machine")]

DEVICES = 30
QUORUM = {"x-queue-type": "quorum"}
#: what a node dying looks like to the test's client (aiormq's errors, sockets, timeouts)
BROKER_DOWN = (aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, OSError, TimeoutError)


@pytest.fixture
async def cluster():
    c = rabbitnode.RabbitCluster(3)
    try:
        await asyncio.to_thread(c.start)
        yield c
    finally:
        await asyncio.to_thread(c.stop)


class Client:
    """The test's side of the bus on the cluster: goes to the next node when its node dies. Its
    tasks (commands, replies) share one connection, opened again by one of them at a time."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.i = 0
        self.conn: aio_pika.abc.AbstractConnection | None = None
        self.channel: aio_pika.abc.AbstractChannel | None = None
        self._opening = asyncio.Lock()
        self._closing: set[asyncio.Task] = set()  # connections left, closing in the background

    @staticmethod
    def _down(e: BaseException, *used) -> bool:
        """``e`` is the node dying: one of its errors, or any error while the connection or
        channel ``used`` went down (aiormq fails an RPC cut short by a closing connection with a
        bare Exception). Never while the task is being cancelled: aiormq turns the cancellation
        of an RPC into such an error too, and trying again would never let the task end."""
        if asyncio.current_task().cancelling():
            return False
        return isinstance(e, BROKER_DOWN) or any(x is not None and x.is_closed for x in used)

    async def ch(self) -> aio_pika.abc.AbstractChannel:
        async with self._opening:
            while self.channel is None or self.channel.is_closed:
                self._next()
                url = self.urls[self.i % len(self.urls)]
                try:
                    async with asyncio.timeout(5):  # a node that accepts but does not answer
                        self.conn = await aio_pika.connect(url, timeout=3)
                        self.channel = await self.conn.channel()  # publisher confirms on
                except Exception as e:
                    if not self._down(e, self.conn):
                        raise
                    self.i += 1
                    self.channel = None
                    await asyncio.sleep(0.1)
            return self.channel

    def _next(self) -> None:
        """Leave the current connection (closed in the background)."""
        if self.conn is not None:
            task = asyncio.ensure_future(self.conn.close())
            self._closing.add(task)  # a task only weakly referenced by the loop may be collected
            task.add_done_callback(self._closing.discard)
        self.conn = self.channel = None

    async def do(self, op):
        """``op(channel)``, again on another node until it succeeds (a command or reply twice is
        fine: each is matched by correlation id)."""
        while True:
            if asyncio.current_task().cancelling():  # aiormq may have swallowed the cancel
                raise asyncio.CancelledError
            ch = await self.ch()
            conn = self.conn
            try:
                async with asyncio.timeout(10):
                    return await op(ch)
            except Exception as e:
                if not self._down(e, conn, ch):
                    raise
                if self.channel is ch:  # not opened again by another task meanwhile
                    self.i += 1
                    self._next()

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


def broker_port(page: str) -> int | None:
    """The AMQP port of the node a bridge says it is connected to (its epsignal_broker_info)."""
    m = re.search(r'epsignal_broker_info\{address="127\.0\.0\.1:(\d+)"', page)
    return int(m.group(1)) if m else None


def leader(node: rabbitnode.RabbitNode, queue: str) -> str:
    for line in node.ctl("list_queues", "-q", "--no-table-headers", "name", "leader").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == queue:
            return parts[1]
    raise LookupError(f"no queue {queue!r} on {node.name}")


@pytest.mark.timeout(300)  # three nodes started and stopped (~30 s; more on a busy machine)
async def test_two_replicas_on_a_cluster_whose_nodes_die(cluster, names, tmp_path):
    n1, n2, n3 = cluster.nodes
    devices = [hw_id(i) for i in range(1, DEVICES + 1)]
    s = Settings.from_env({}, devices=",".join(devices), **names)
    audit = f"{names['events_exchange']}.audit"
    replies_q = f"{names['events_exchange']}.replies"
    sim = PbxSimulator(SimConfig(password=PASSWORD, devices=DEVICES, call_rate=0, stall_timeout_s=3.0, seed=5))
    await sim.start()
    client = Client([n3.url, n2.url, n1.url])
    procs: dict[str, BridgeProcess] = {}
    ports: dict[str, int] = {}
    tasks: list[asyncio.Task] = []
    bad: list[str] = []
    attached: list[tuple[float, int]] = []  # (time, devices attached), every 100 ms
    try:
        async def declare(ch):
            ex = await ch.declare_exchange(s.events_exchange, "topic", durable=True)
            q = await ch.declare_queue(audit, durable=True, arguments=QUORUM)
            await q.bind(ex, "device.#")
            await q.bind(ex, "bridge.*.gap")
            await ch.declare_queue(replies_q, durable=True, arguments=QUORUM)
        await client.do(declare)

        for tag, order in (("a", [n1, n2, n3]), ("b", [n2, n3, n1])):
            ports[tag] = free_port()
            env = bridge_env(names, amqp_url=",".join(n.url for n in order), pbx_url=f"{sim.url}?replica={tag}",
                             pbx_password=PASSWORD, devices=",".join(devices), leases="true",
                             lease_heartbeat_s=0.5, instance_id=f"replica-{tag}", http_port=ports[tag],
                             command_rate=1000, command_burst=1000)
            procs[tag] = BridgeProcess(env, tmp_path, name=f"replica-{tag}").start()

        async def page(tag: str) -> str:
            return (await http_get(ports[tag], "/metrics"))[1]

        async def sample():
            while True:
                for hw, tags in owners(sim).items():
                    if len(tags) > 1:
                        bad.append(f"{hw} on replicas {sorted(tags)}")
                attached.append((time.monotonic(), sim.stats()["attached_devices"]))
                await asyncio.sleep(0.1)

        def gap(t0: float, t1: float) -> tuple[int, float]:
            """Between ``t0`` and ``t1``: the fewest devices attached at a sample, and seconds
            from ``t0`` until every device was attached again."""
            window = [(t, n) for t, n in attached if t0 <= t <= t1]
            low = [t for t, n in window if n < DEVICES]
            back = next((t for t, n in window if low and t > low[-1] and n == DEVICES), t1)
            return min(n for _, n in window), (back - t0 if low else 0.0)

        tasks.append(asyncio.create_task(sample()))
        await eventually(lambda: sim.stats()["attached_devices"] == DEVICES, 60, "every device attached")
        assert broker_port(await page("a")) == n1.port and broker_port(await page("b")) == n2.port

        # call traffic (about 8 calls a second) and a command every 50 ms, all the time
        rng = random.Random(5)
        running = True

        async def calls():
            while running:
                d = sim.devices[rng.choice(devices)]
                if not d.calls:
                    sim.start_call(d, random_scenario(rng, 1.0))
                await asyncio.sleep(0.12)

        sent: dict[str, float] = {}
        replies: dict[str, list[dict]] = {}

        async def commands():
            while running:
                cid = uuid.uuid4().hex
                msg = aio_pika.Message(b"", reply_to=replies_q, correlation_id=cid,
                                       delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                key = f"device.{rng.choice(devices)}.attach"
                sent[cid] = time.monotonic()

                async def publish(ch, msg=msg, key=key):
                    ex = await ch.get_exchange(s.commands_exchange, ensure=False)
                    await ex.publish(msg, key)
                await client.do(publish)
                await asyncio.sleep(0.05)

        async def collect():
            while True:
                async def get(ch):
                    q = await ch.get_queue(replies_q, ensure=False)
                    m = await q.get(fail=False)
                    if m is not None:
                        replies.setdefault(m.correlation_id, []).append(json.loads(m.body))
                        await m.ack()
                    return m
                if await client.do(get) is None:
                    await asyncio.sleep(0.05)

        tasks += [asyncio.create_task(f()) for f in (calls, commands, collect)]
        await asyncio.sleep(3)

        def confirmed_in(p: str) -> float:
            return metric(p, "epsignal_events_total", outcome="confirmed")

        async def failover(tag: str, dead: rabbitnode.RabbitNode, t0: float, before: float) -> tuple[float, float]:
            """Seconds from ``t0`` (the kill) until replica ``tag`` says it is on another node, and
            until it has an event confirmed there (``before``: its confirmed count at the kill;
            a page still naming the dead node raises it)."""
            on = None
            async with asyncio.timeout(30):
                while True:
                    p = await page(tag)
                    port = broker_port(p)
                    if port == dead.port:
                        before = confirmed_in(p)
                    elif port is not None:
                        on = on or time.monotonic() - t0
                        if confirmed_in(p) > before:
                            return on, time.monotonic() - t0
                    await asyncio.sleep(0.02)

        # 1. the node replica a is on dies
        before = confirmed_in(await page("a"))
        t0 = time.monotonic()
        n1.kill()
        first = await failover("a", n1, t0, before)
        print(f"\nnode 1 SIGKILLed: replica a on port {broker_port(await page('a'))} after {first[0]:.2f}s, "
              f"confirming events again after {first[1]:.2f}s")
        assert broker_port(await page("b")) == n2.port, "replica b left a node that lives"
        await asyncio.sleep(2)

        # 2. it comes back (a pod restarted), and catches up
        await eventually(lambda: sim.stats()["attached_devices"] == DEVICES, 30, "every device attached again")
        t1 = time.monotonic()
        first_gap = gap(t0, t1)
        print(f"devices: at least {first_gap[0]} of {DEVICES} attached, all again after {first_gap[1]:.2f}s")
        await asyncio.to_thread(n1.start)
        await eventually(lambda: n2.ctl("eval", "length(rabbit_nodes:all_running()).").strip() == "3", 30,
                         "node 1 back in the cluster")
        print(f"node 1 back in the cluster after {time.monotonic() - t1:.1f}s")

        # 3. the node leading the commands queue dies
        lead = await asyncio.to_thread(leader, n2, s.commands_queue)
        victim = next(n for n in cluster.nodes if n.name == lead)
        on_victim = {tag: confirmed_in(p) for tag in ("a", "b")
                     if broker_port(p := await page(tag)) == victim.port}
        t2 = time.monotonic()
        victim.kill()
        moving = asyncio.gather(*(failover(tag, victim, t2, c) for tag, c in on_victim.items()))
        tasks.append(moving)
        await eventually(lambda: any(c in replies for c, at in list(sent.items()) if at > t2), 30,
                         "a reply to a command sent after the leader died")
        answered = time.monotonic() - t2
        moved = dict(zip(on_victim, await moving, strict=True))
        print(f"commands queue leader {lead} (node {cluster.nodes.index(victim) + 1}) SIGKILLed: a command "
              f"sent after it answered after {answered:.2f}s; replicas on it: "
              + (", ".join(f"{t} on another node after {v[0]:.2f}s, confirming after {v[1]:.2f}s"
                           for t, v in moved.items()) or "none"))
        await asyncio.sleep(3)
        try:
            await eventually(lambda: sim.stats()["attached_devices"] == DEVICES, 20, "every device attached again")
        except AssertionError as e:  # say what the unattached devices' lease queues hold
            alive = next(n for n in cluster.nodes if n is not victim)
            left = [hw for hw in devices if sim.devices[hw].session is None]
            lease_qs = {topology.lease_queue(s, hw) for hw in left}
            rows = [line for line in alive.ctl("list_queues", "-q", "--no-table-headers", "name", "leader",
                                               "messages_ready", "messages_unacknowledged", "consumers").splitlines()
                    if line.split()[0] in lease_qs]
            consumers = [line for line in alive.ctl("list_consumers", "-q", "--no-table-headers", "queue_name",
                                                    "channel_pid", "active", "activity_status").splitlines()
                         if line.split()[0] in lease_qs]
            await asyncio.to_thread(victim.start)  # does the dead node's return free them?
            await asyncio.sleep(10)
            still = [hw for hw in left if sim.devices[hw].session is None]
            raise AssertionError(f"{e}: unattached {left}; their lease queues (name leader ready unacked "
                                 f"consumers): {rows}; consumers (queue channel active status): {consumers}; "
                                 f"10 s after the killed node was started again, unattached: {still}") from None
        second_gap = gap(t2, time.monotonic())

        # the end: no more traffic or commands; every reply, every event confirmed
        running = False
        async with asyncio.timeout(30):
            await asyncio.gather(tasks[1], tasks[2])
        await eventually(lambda: set(sent) <= set(replies), 30, "a reply to every command")
        await eventually(lambda: sim.stats()["calls_active"] == 0, 15, "calls ended")
        await asyncio.sleep(3.5)  # a call broken by a kill stalls within the stall timeout

        last: list = [None]

        async def settled():
            """Every event confirmed, and nothing made since the last look: no device still moving
            (a device handed on makes events; a lease ping-pong once made them for good)."""
            pages = {tag: await page(tag) for tag in procs}
            now = [(metric(p, "epsignal_events_total", outcome="confirmed"),
                    metric(p, "epsignal_leases_handed_on_total")) for p in pages.values()]
            quiet, last[0] = now == last[0], now
            return pages if quiet and all(metric(p, "epsignal_buffer_events") == 0 for p in pages.values()) else None
        pages = await eventually(settled, 30, "every event confirmed, no device moving", interval=2.0)
        confirmed = {tag: metric(p, "epsignal_events_total", outcome="confirmed") for tag, p in pages.items()}
        dropped = {tag: metric(p, "epsignal_events_dropped_total") for tag, p in pages.items()}
        repairs = sum(metric(p, "epsignal_lease_repairs_total") for p in pages.values())

        events: list[dict] = []

        async def drain(ch):
            """Take the audit queue's events, each kept once acked (an op cut short by its
            timeout on a busy machine, or by a node, is done again from where it stopped: a
            message taken but not acked goes back to the queue); what is left in it after."""
            q = await ch.declare_queue(audit, passive=True)
            while (m := await q.get(fail=False)) is not None:
                await m.ack()
                events.append(json.loads(m.body))
            return (await ch.declare_queue(audit, passive=True)).declaration_result.message_count
        assert await client.do(drain) == 0

        gaps = [e for e in events if e["type"] == "gap"]
        assert gaps == [] and set(dropped.values()) == {0}, f"events dropped: {gaps[:3]} {dropped}"
        seqs: dict[tuple[str, str], set[int]] = {}
        for e in events:
            seqs.setdefault((e["instance"], e["hw"]), set()).add(e["seq"])
        holes = {k: sorted(set(range(1, max(v) + 1)) - v)[:5] for k, v in seqs.items() if len(v) != max(v)}
        assert holes == {}, f"events missing in the quorum queue: {holes}"
        unique = {tag: sum(len(v) for (inst, _), v in seqs.items() if inst == f"replica-{tag}") for tag in procs}
        assert unique == confirmed, f"events in the queue {unique} != confirmed by the replicas {confirmed}"

        assert set(sent) == set(replies)
        errors = [r[0] for r in replies.values() if not r[0]["ok"]]
        assert all(isinstance(r.get("error"), str) and r["error"] for r in errors), errors[:3]
        st = sim.stats()
        assert st["calls_stalled"] == 0, f"calls stalled on {sim.stalled_hw}"
        assert bad == [], f"a device on two replicas at once: {bad[:5]}"
        assert st["attached_devices"] == DEVICES
        # a hand-on that came straight back is said once (INFO), the preferred replica lines up
        # again, and the next one takes: again in a row (a WARNING) is a device churning
        churn = [e["msg"] for p in procs.values() for e in p.logs()
                 if e.get("level") == "WARNING" and "is not in line for it" in e.get("msg", "")]
        assert churn == [], churn[:3]
        print(f"FIGURES cluster: node kill -> replica on a surviving node {first[0]:.2f}s, confirming "
              f"{first[1]:.2f}s; commands queue leader kill -> command answered {answered:.2f}s, replicas on "
              f"it confirming {'/'.join(f'{v[1]:.2f}s' for v in moved.values()) or '(none on it)'}; devices attached "
              f"at least {first_gap[0]}/{second_gap[0]} of {DEVICES}, all again after {first_gap[1]:.2f}/"
              f"{second_gap[1]:.2f}s ({repairs:.0f} lease queues repaired); events confirmed "
              f"{sum(confirmed.values()):.0f}, in the quorum queue {len(events)} "
              f"({len(events) - sum(unique.values())} duplicates), none missing; commands {len(sent)} "
              f"answered ({len(errors)} with an error, {sum(len(r) - 1 for r in replies.values())} "
              f"replies twice); calls {st['calls_completed']} completed, 0 stalled; refused second "
              f"Attaches {st['attach_conflicts']}; owners sampled {len(attached)} times, never two")
    finally:
        running = False
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=10)  # the replicas are killed whatever happens
        for p in procs.values():
            p.kill()
            p.close_files()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 5)
        await sim.stop()

