"""The consumer of the benchmark: one queue bound with ``#`` to an events exchange.

Used the same way for the bridge and for the raw aio-pika ceiling: an exclusive auto-delete
queue, consumed with ``no_ack`` through aio-pika's underlying aiormq channel (the cheapest
consumer aio-pika offers, so that the consumer is not what limits either run). For every
``call.signaling`` / ``call.state`` delivery it counts the event and its distinct
``message_id``; for a ``call.signaling`` that carries a ``bench_t`` stamp it records the hop
latency (send stamp to delivery, same machine clock) and gives the load generator one credit.

A bridge that does not publish ``call.signaling`` (``EPSIGNAL_EVENT_KINDS=call.state``) has no
stamp in its events: then every ``call.state`` is the stamped event, and its stamp comes from
``stamp_by_key`` (the load generator's send times per device, oldest first: the bridge makes one
``call.state`` per frame of the cycle and publishes a device's events in order).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from bridge.bench.frames import STAMP, stamp_of

DATA_TYPES = frozenset({"call.signaling", "call.state"})
now_ns = time.monotonic_ns


class Run:
    """One measured run: how many data events are expected, what arrived, and when."""

    def __init__(self, target: int | None, store: bool, record_from: int) -> None:
        self.target = target
        self.count = 0
        self.ids: set[str] = set()
        self.by_type: Counter = Counter()
        self.hop_ns: list[int] = []
        self.record_from = record_from
        self.t_first: int | None = None
        self.t_last: int | None = None
        self.store = store
        #: (routing key, body, type, message_id, timestamp) as delivered, for the ceiling replay
        self.messages: list[tuple] = []
        self.done = asyncio.Event()
        if target == 0:
            self.done.set()

    def set_target(self, n: int) -> None:
        self.target = n
        if self.count >= n:
            self.done.set()

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
            return True
        except TimeoutError:
            return False

    @property
    def distinct(self) -> int:
        return len(self.ids)


#: events a paused sink keeps (the oldest are dropped by the broker)
PARKED = 1000


class Sink:
    """The consumer of the module docstring: one exclusive queue bound with ``#``; a
    :class:`Run` counts what arrives for one measured run."""

    def __init__(self, url: str, exchange: str, on_stamp: Callable[[], None] | None = None,
                 stamp_by_key: Callable[[str], int | None] | None = None) -> None:
        self.url = url
        self.exchange = exchange
        self.on_stamp = on_stamp
        #: the event type that stands for a frame (hop latency, credit)
        self.stamp_type = "call.signaling" if stamp_by_key is None else "call.state"
        self.stamp_by_key = stamp_by_key
        self.conn: AbstractConnection | None = None
        #: the consumer's queue (exclusive), bound to every event
        self.queue: AbstractQueue | None = None
        self._ch: AbstractChannel | None = None
        self._ex: AbstractExchange | None = None
        self._raw: aiormq.abc.AbstractChannel | None = None
        self._tag: str | None = None
        #: while paused: the queue the events pile up in
        self._parking: AbstractQueue | None = None
        self.by_type: Counter = Counter()
        self.total = 0
        self.run: Run | None = None

    async def open(self) -> None:
        self.conn = await aio_pika.connect(self.url)
        ch = await self.conn.channel()
        ex = await ch.declare_exchange(self.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        # exclusive (gone with the connection), not auto-delete: pause() cancels the consumer
        queue = self.queue = await ch.declare_queue(exclusive=True)
        await queue.bind(ex, "#")
        self._ch, self._ex = ch, ex
        raw = self._raw = await ch.get_underlay_channel()
        ok = await raw.basic_consume(queue.name, self._on, no_ack=True)
        self._tag = ok.consumer_tag
        self._parking = None

    def _opened(self) -> tuple[AbstractChannel, AbstractExchange, AbstractQueue, aiormq.abc.AbstractChannel]:
        if self._ch is None or self._ex is None or self.queue is None or self._raw is None:
            raise RuntimeError("the consumer is not open")
        return self._ch, self._ex, self.queue, self._raw

    async def pause(self) -> None:
        """Stop consuming, without the events going unroutable: they go to a parking queue
        nobody reads (so that the harness does no consumer work, and the bridge's publishing is
        unchanged) that keeps the last :data:`PARKED` of them (the broker drops the oldest: a
        queue growing by 1,000 events a second would be broker work the other runs do not
        have). :meth:`resume` drops them."""
        ch, ex, queue, raw = self._opened()
        parking = self._parking = await ch.declare_queue(
            exclusive=True, arguments={"x-max-length": PARKED, "x-overflow": "drop-head"})
        await parking.bind(ex, "#")
        await queue.unbind(ex, "#")
        assert self._tag is not None
        await raw.basic_cancel(self._tag)

    async def resume(self) -> None:
        _ch, ex, queue, raw = self._opened()
        await queue.bind(ex, "#")
        ok = await raw.basic_consume(queue.name, self._on, no_ack=True)
        self._tag = ok.consumer_tag
        if self._parking is not None:
            await self._parking.delete(if_unused=False, if_empty=False)
            self._parking = None

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()

    def begin(self, target: int | None, *, store: bool = False, record_from: int = 0) -> Run:
        self.run = Run(target, store, record_from)
        return self.run

    async def wait_type(self, typ: str, n: int, timeout: float) -> bool:
        """Until ``n`` events of type ``typ`` have arrived since the sink opened."""
        try:
            async with asyncio.timeout(timeout):
                while self.by_type[typ] < n:
                    await asyncio.sleep(0.05)
            return True
        except TimeoutError:
            return False

    async def _on(self, msg) -> None:
        t = now_ns()
        self.total += 1
        props = msg.header.properties
        typ = props.message_type
        self.by_type[typ] += 1
        run = self.run
        if run is None or typ not in DATA_TYPES:
            return
        if run.t_first is None:
            run.t_first = t
        run.t_last = t
        run.count += 1
        run.by_type[typ] += 1
        run.ids.add(props.message_id)
        body = msg.body
        if typ == self.stamp_type:
            by_key = self.stamp_by_key
            stamp = stamp_of(body, STAMP) if by_key is None else by_key(msg.delivery.routing_key)
            if stamp is not None:
                if stamp >= run.record_from:
                    run.hop_ns.append(t - stamp)
                if self.on_stamp is not None:
                    self.on_stamp()
        if run.store:
            ts = props.timestamp
            run.messages.append((msg.delivery.routing_key, body, typ, props.message_id,
                                 ts.timestamp() if ts is not None else None))
        if run.target is not None and run.count >= run.target:
            run.done.set()
