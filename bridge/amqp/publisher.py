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
        self._episodes_seen = (0, 0)  # (opened, closed) already logged
        self._last_gap = 0.0
        #: pause before resending after a failure while the link still looks up (doubles to 5 s)
        self._retry_pause = 0.0

    # ----------------------------------------------------------------- the PBX side's door
    def publish_nowait(self, event: Outgoing) -> None:
        self.buffer.append(event)
        self._log_episodes()
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
            elif not self._closing:  # failing with the link up (nacks, timeouts): no tight loop
                self._retry_pause = min(5.0, max(0.05, self._retry_pause * 2))
                await asyncio.sleep(self._retry_pause)

    async def _drain(self) -> None:
        exchange = self.link.topology.events
        started = 0
        while not self._broken.is_set() and not self._closing:
            now = time.monotonic()
            if now - self._last_gap >= 1.0:  # one gap event a second at most, whatever the drops
                self._last_gap = now
                self._announce_gaps()
            entry = self.buffer.take()
            self._log_episodes()  # take() may have dropped events for age
            if entry is None:
                if self._announce_gaps():  # drained: what was dropped is announced right away
                    continue
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
            started += 1
            if started % 32 == 0:  # let the PBX sockets be read between publish bursts: calls first
                await asyncio.sleep(0)

    async def _publish(self, exchange, entry: Entry) -> None:
        ev = entry.event
        self.stats.published += 1
        try:
            msg = aio_pika.Message(
                ev.body, content_type="application/json", delivery_mode=DeliveryMode.PERSISTENT,
                message_id=ev.message_id, timestamp=ev.timestamp, type=ev.type,
                app_id="epsignal-bridge", headers=ev.headers or {},
            )
            result = await exchange.publish(msg, ev.key, mandatory=True, timeout=self.timeout_s)
        except (ValueError, TypeError) as e:  # refused before sending (a key over 255 bytes): never
            self.stats.failed += 1
            self.buffer.discard(entry)
            log.error("event %s cannot be published (%s); dropped and announced as a gap",
                      ev.message_id, e)
        except (Exception, asyncio.CancelledError) as e:  # nack, timeout, channel or connection gone
            # aiormq cancels pending confirmations when the connection drops: that is a failed
            # publish like any other, unless this task itself is being cancelled (shutdown).
            if isinstance(e, asyncio.CancelledError) and asyncio.current_task().cancelling():
                self._failed.append(entry)
                raise
            self.stats.failed += 1
            self._failed.append(entry)
            if not self._broken.is_set():
                log.warning("publish failed, events stay buffered: %s: %s", type(e).__name__, e)
                self._broken.set()
        else:
            if isinstance(result, DeliveredMessage):
                self.stats.returned += 1  # unroutable: nobody bound yet; not an error
            self.stats.confirmed += 1
            self._retry_pause = 0.0
            self.buffer.confirm(entry)
            PUBLISH_SECONDS.observe(time.monotonic() - entry.enqueued)
            if ev.span is not None:
                tracing.published(ev)
            self._log_episodes()
        finally:
            self._slots.release()
            if not self.buffer:
                self._drained.set()

    async def _settle(self) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    def _announce_gaps(self) -> bool:
        """Put a gap event for what was dropped since the last one at the front; True if any."""
        gaps = self.buffer.take_gaps()
        if gaps is None:
            return False
        reason, dropped = gaps
        n = sum(b - a + 1 for r in dropped.values() for a, b in r)
        log.debug("gap event: %d events dropped unsent (%s) for %d devices", n, reason, len(dropped))
        self.buffer.push_front(self.factory.gap(reason, dropped))
        return True

    def _log_episodes(self) -> None:
        """One line when dropping starts and one when the buffer is empty again: never per event."""
        s = self.buffer.stats
        if (s.episodes, s.episodes_closed) == self._episodes_seen:
            return
        if s.episodes != self._episodes_seen[0]:
            log.warning("event buffer over its limits (%d events, %gs): dropping the oldest unsent "
                        "events; consumers get a gap event", self.buffer.max_events, self.buffer.max_age_s)
        if s.episodes_closed != self._episodes_seen[1]:
            log.warning("event buffer drained; %d events were dropped unsent in this episode",
                        s.last_episode_dropped)
        self._episodes_seen = (s.episodes, s.episodes_closed)

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
