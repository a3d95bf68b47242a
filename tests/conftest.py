"""Shared fixtures: tests against the real RabbitMQ and the real PBX simulator.

Every test gets its own exchange and queue names, so tests never see each other's traffic and
leave nothing behind.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import uuid
from dataclasses import dataclass, field

import aio_pika
import pytest

from bridge.amqp import topology
from bridge.config import Settings
from bridge.service import Bridge
from tests.faults.helpers import serve_http, stop_http
from bridge.sim import PbxSimulator, SimConfig

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
PASSWORD = "sim-secret-pw"
#: fixtures that talk to the real RabbitMQ: a test using one must carry the ``broker`` marker
#: (``pytest -m "not broker"`` runs without a broker). Tests that reach the broker otherwise (a
#: bridge process, a connection of their own) are marked by hand: checked once for issue 17 by
#: running ``-m "not broker"`` where 127.0.0.1:5672 refuses connections (``unshare -rn``).
BROKER_FIXTURES = frozenset({"amqp", "bus", "start_bridge", "proxy"})


def pytest_collection_modifyitems(config, items):
    unmarked = [item.nodeid for item in items
                if BROKER_FIXTURES & set(getattr(item, "fixturenames", ()))
                and item.get_closest_marker("broker") is None]
    if unmarked:
        raise pytest.UsageError("tests using the broker without the `broker` marker: " + ", ".join(unmarked[:10]))


def attached(hw: str):
    """A predicate for :meth:`EventQueue.until` / :meth:`EventQueue.until_all`: ``hw``'s attached event."""
    return lambda e: e.body["type"] == "attached" and e.body["hw"] == hw


class _Unretrieved(logging.Handler):
    """asyncio's "Task exception was never retrieved" (and the Future's): a task or future
    that failed with nobody awaiting it, reported by the garbage collector whenever it frees it,
    i.e. in the middle of whatever runs then. Once, in CI, that was a later test's ``ast.parse``,
    which failed with "SystemError: AST constructor recursion depth mismatch" (the leak: an
    aiormq connect abandoned by a stop, see bridge.amqp.link.connect)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "exception was never retrieved" in record.getMessage():
            self.messages.append(record.getMessage())


_UNRETRIEVED = _Unretrieved()
logging.getLogger("asyncio").addHandler(_UNRETRIEVED)
#: a full collection after every test, so a leak fails the test that made it, not a later one;
#: off by default: with the test run's heap one costs 50-200 ms (some 2 minutes of CPU a run)
GC_EACH_TEST = os.environ.get("EPSIGNAL_TEST_GC") == "1"


@pytest.fixture(autouse=True)
def no_task_exception_unretrieved():
    """Fails a test while which asyncio reported an exception that nobody retrieved. Without
    EPSIGNAL_TEST_GC=1 the task may be an earlier test's in this process (the collector frees it
    when it runs): run the file again with EPSIGNAL_TEST_GC=1 to fail the test that made it."""
    seen = len(_UNRETRIEVED.messages)
    yield
    if GC_EACH_TEST:
        gc.collect()
    new = _UNRETRIEVED.messages[seen:]
    assert not new, (f"{len(new)} task or future exception(s) never retrieved (made by this test, or by an "
                     "earlier one unless EPSIGNAL_TEST_GC=1):\n" + "\n".join(new))


@dataclass
class Received:
    key: str
    body: dict
    message: aio_pika.abc.AbstractIncomingMessage


@dataclass
class EventQueue:
    queue: aio_pika.abc.AbstractQueue
    items: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def get(self, timeout: float = 10.0) -> Received:
        return await asyncio.wait_for(self.items.get(), timeout)

    async def until(self, pred, timeout: float = 15.0) -> list[Received]:
        """Every event up to and including the first one for which ``pred`` is true."""
        seen = []
        async with asyncio.timeout(timeout):
            while True:
                ev = await self.items.get()
                seen.append(ev)
                if pred(ev):
                    return seen

    async def until_all(self, preds, timeout: float = 15.0) -> list[Received]:
        """Every event up to and including the one that made the last of ``preds`` true, each
        predicate matched by some event, in whatever order they come. For events of different
        devices: there is no order across devices (docs/CONSUMERS.md; each device has a PBX
        session of its own), so ``for hw in hws: await q.until(attached(hw))`` is a race: when
        a later device's event comes first, the wait for an earlier one consumes it, and the
        wait for it then times out."""
        left, seen = list(preds), []
        n = len(left)
        try:
            async with asyncio.timeout(timeout):
                while left:
                    ev = await self.items.get()
                    seen.append(ev)
                    left = [p for p in left if not p(ev)]
        except TimeoutError as e:
            got = [(ev.body.get("type"), ev.body.get("hw")) for ev in seen]
            raise TimeoutError(f"{len(left)} of {n} conditions unmet after {timeout:g}s; "
                               f"events seen (type, hw): {got}") from e
        return seen

    def drain(self) -> list[Received]:
        out = []
        while not self.items.empty():
            out.append(self.items.get_nowait())
        return out


class Bus:
    """The consumer's side of the bus, as a test sees it."""

    def __init__(self, conn: aio_pika.abc.AbstractConnection, settings: Settings) -> None:
        self.conn = conn
        self.s = settings
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def open(self) -> None:
        self.channel = await self.conn.channel()
        self.events = await self.channel.declare_exchange(self.s.events_exchange, "topic", durable=True)
        self.commands = await topology.declare_commands_exchange(self.channel, self.s)

    async def bind(self, *patterns: str) -> EventQueue:
        q = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        for p in patterns:
            await q.bind(self.events, p)
        eq = EventQueue(q)

        async def on(msg):
            await msg.ack()
            eq.items.put_nowait(Received(msg.routing_key, json.loads(msg.body), msg))

        await q.consume(on)
        return eq

    async def command(self, hw: str, verb: str, body: bytes | str | dict = b"", *, reply: bool = True,
                      key: str | None = None, timeout: float = 15.0, message_id: str | None = None) -> dict | None:
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        key = key or f"device.{hw}.{verb}"
        if not reply:
            await self.commands.publish(aio_pika.Message(body, message_id=message_id), key)
            return None
        ch = await self.conn.channel()
        try:
            rq = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
            got = asyncio.get_running_loop().create_future()
            cid = uuid.uuid4().hex

            async def on(msg):
                if msg.correlation_id == cid and not got.done():
                    got.set_result(json.loads(msg.body))

            await rq.consume(on, no_ack=True)
            ex = await ch.get_exchange(self.s.commands_exchange, ensure=False)
            await ex.publish(aio_pika.Message(body, reply_to="amq.rabbitmq.reply-to", correlation_id=cid,
                                              message_id=message_id), key)
            return await asyncio.wait_for(got, timeout)
        finally:
            await ch.close()

    async def dead_letters(self, n: int, timeout: float = 10.0) -> list[aio_pika.abc.AbstractIncomingMessage]:
        q = await self.channel.get_queue(self.s.dead_queue, ensure=False)
        out = []
        async with asyncio.timeout(timeout):
            while len(out) < n:
                msg = await q.get(no_ack=True, fail=False)
                if msg is None:
                    await asyncio.sleep(0.05)
                else:
                    out.append(msg)
        return out


@pytest.fixture
def names() -> dict:
    tag = uuid.uuid4().hex[:8]
    return dict(
        events_exchange=f"t{tag}.events", commands_exchange=f"t{tag}.commands",
        commands_queue=f"t{tag}.commands.bridge", dead_exchange=f"t{tag}.dead",
        dead_queue=f"t{tag}.commands.dead", instance_id=f"test-{tag}",
    )


@pytest.fixture
async def amqp():
    """A connection to the test broker of the test's own."""
    conn = await aio_pika.connect(AMQP_URL)
    yield conn
    await conn.close()


@pytest.fixture
async def proxy():
    """A TCP proxy to the broker, for cutting or stalling the bridge's link."""
    from tests.tcpproxy import TcpProxy

    p = await TcpProxy("127.0.0.1", 5672).start()
    yield p
    await p.stop()


@pytest.fixture
async def sim():
    s = PbxSimulator(SimConfig(password=PASSWORD, devices=20, unregistered=2, ring_s=0.05,
                               stall_timeout_s=3.0, seed=1))
    await s.start(control_port=0)
    yield s
    await s.stop()


@pytest.fixture
async def settings_for(names):
    def make(sim: PbxSimulator | None = None, **overrides) -> Settings:
        kw = dict(names, amqp_url=AMQP_URL, pbx_password=PASSWORD, reconnect_min_s=0.1, http_port=0,
                  reconnect_max_s=1.0, attach_timeout_s=5.0, login_retry_s=2.0)
        if sim is not None:
            kw["pbx_url"] = sim.url
        kw.update(overrides)
        return Settings.from_env({}, **kw)
    return make


@pytest.fixture
async def bus(names):
    s = Settings.from_env({}, amqp_url=AMQP_URL, **names)
    conn = await aio_pika.connect(AMQP_URL)
    b = Bus(conn, s)
    await b.open()
    yield b
    await topology.delete_for(conn, s)
    await conn.close()


@pytest.fixture
async def start_bridge(bus):  # after `bus`, so the bridge stops before bus deletes its queues
    started: list[Bridge] = []

    async def start(settings: Settings) -> Bridge:
        b = Bridge(settings)
        started.append(b)
        await serve_http(b)
        await b.start()
        assert await b.link.wait_ready(10), "bridge did not connect to the broker"
        return b

    yield start
    for b in started:
        await b.stop(2)
        await stop_http(b)
    for b in started:  # its queues (a test may name its own) and the lease queues of every device it knew
        leases = [topology.lease_queue(b.s, hw) for hw in b.leases.devices()] if b.leases is not None else []
        await topology.delete(bus.conn, (), [b.s.commands_queue, b.s.dead_queue, *leases])
