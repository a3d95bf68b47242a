"""The event publisher: the buffer drained into the events exchange with publisher confirms.

``publish_nowait`` never blocks and never fails: it is what the PBX side calls after it has
forwarded a frame. A single task drains the buffer, keeping up to ``publish_window`` events in
flight; an event leaves the buffer only when the broker confirmed it (or returned it as
unroutable: no queue is bound, which is counted, not an error). A failed, nacked or timed-out
publish puts the in-flight events back at the front and waits for the link to come back.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aio_pika
from aio_pika import DeliveryMode
from aiormq.abc import DeliveredMessage

from bridge import tracing
from bridge.amqp.link import BrokerLink
from bridge.metrics import PUBLISH_SECONDS
from bridge.buffer import Entry, EventBuffer
from bridge.events import EventFactory, Outgoing

log = logging.getLogger("bridge.publisher")


class PublisherStats:
    __slots__ = ("published", "confirmed", "returned", "failed")

    def __init__(self) -> None:
        self.published = self.confirmed = self.returned = self.failed = 0


class EventPublisher:
    def __init__(self, link: BrokerLink, factory: EventFactory, *, window: int,
                 timeout_s: float, max_events: int, max_age_s: float) -> None:
        self.link = link
        self.factory = factory
        self.window = window
        self.timeout_s = timeout_s
        self.buffer = EventBuffer(max_events, max_age_s, clock=time.monotonic)
        self.stats = PublisherStats()
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._slots = asyncio.Semaphore(window)
        self._failed: list[Entry] = []
        self._broken = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._closing = False

    # ----------------------------------------------------------------- the PBX side's door
    def publish_nowait(self, event: Outgoing) -> None:
        self.buffer.append(event)
        self._drained.clear()
        self._wakeup.set()

    # ----------------------------------------------------------------- the drain task
    async def run(self) -> None:
        while not self._closing:
            if not self.link.ready:
                await self.link.wait_ready()
                continue
            self._broken.clear()
            await self._drain()
            # the link broke under us: let in-flight publishes settle, then resend them first
            await self._settle()
            self.buffer.requeue(self._failed)
            self._failed.clear()
            if not self.link.ready and not self._closing:
                await self.link.wait_ready()

    async def _drain(self) -> None:
        exchange = self.link.topology.events
        while not self._broken.is_set() and not self._closing:
            self._announce_gaps()
            entry = self.buffer.take()
            if entry is None:
                if not self.buffer:
                    self._drained.set()
                self._wakeup.clear()
                waiter = asyncio.ensure_future(self._wakeup.wait())
                broken = asyncio.ensure_future(self._broken.wait())
                await asyncio.wait({waiter, broken}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                broken.cancel()
                continue
            await self._slots.acquire()
            if self._broken.is_set():
                self._slots.release()
                self._failed.append(entry)
                break
            t = asyncio.ensure_future(self._publish(exchange, entry))
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _publish(self, exchange, entry: Entry) -> None:
        ev = entry.event
        msg = aio_pika.Message(
            ev.body, content_type="application/json", delivery_mode=DeliveryMode.PERSISTENT,
            message_id=ev.message_id, timestamp=ev.timestamp, type=ev.type,
            app_id="epsignal-bridge", headers=ev.headers or {},
        )
        self.stats.published += 1
        try:
            result = await exchange.publish(msg, ev.key, mandatory=True, timeout=self.timeout_s)
        except Exception as e:  # nack, timeout, channel or connection gone: resend later
            self.stats.failed += 1
            self._failed.append(entry)
            if not self._broken.is_set():
                log.warning("publish failed, events stay buffered: %s: %s", type(e).__name__, e)
                self._broken.set()
        else:
            if isinstance(result, DeliveredMessage):
                self.stats.returned += 1  # unroutable: nobody bound yet; not an error
            self.stats.confirmed += 1
            self.buffer.confirm(entry)
            PUBLISH_SECONDS.observe(time.monotonic() - entry.enqueued)
            if ev.span is not None:
                tracing.published(ev)
        finally:
            self._slots.release()
            if not self.buffer:
                self._drained.set()

    async def _settle(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    def _announce_gaps(self) -> None:
        gaps = self.buffer.take_gaps()
        if gaps is not None:
            reason, dropped = gaps
            n = sum(b - a + 1 for r in dropped.values() for a, b in r)
            log.warning("dropped %d events unsent (%s) for %d devices; gap event published",
                        n, reason, len(dropped))
            self.buffer.push_front(self.factory.gap(reason, dropped))

    # ----------------------------------------------------------------- shutdown
    async def flush(self, timeout: float) -> bool:
        """Wait until every buffered event is confirmed; False if the time ran out."""
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        self._closing = True
        self._broken.set()
        self._wakeup.set()
        await self._settle()
