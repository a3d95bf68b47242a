"""The event publisher: the buffer drained into the events exchange with publisher confirms.

``publish_nowait`` never blocks and never fails: it is what the PBX side calls after it has
forwarded a frame. A single task drains the buffer, keeping up to ``publish_window`` events in
flight; an event leaves the buffer only when the broker confirmed it (or returned it as
unroutable: no queue is bound, which is counted, not an error).

What goes wrong, and what happens then:

- the connection is lost (broker gone, watchdog, a stalled link): the drain of that connection
  is *cancelled*, wherever it waits (the aiormq writer queue of a dead connection is never read
  again); every event in flight on it is failed at once and put back at the front; the next
  connection drains them first.
- a *nack* (the broker refused the event, e.g. for a queue at ``x-max-length`` with
  ``reject-publish``): per event and per device, in the buffer (see :mod:`bridge.buffer`); other
  devices' events go on.
- no confirm within ``publish_timeout_s`` on a connection that is not blocked: the connection is
  not working, whatever its socket says: the link is reset (reconnect), the events sent again.
- ``connection.blocked`` (a broker memory or disk alarm): nothing is written until unblocked,
  confirm timers wait, events stay buffered.

How it publishes (docs/PERFORMANCE.md): not through ``aio_pika.Exchange.publish`` (one task,
one ``Message`` object, one channel-lock round and one hand-off to the writer task per event)
but in *slices* of at most :data:`SLICE` events: the AMQP frames of a slice (``basic.publish``
+ content header + body, encoded here, byte-identical to what aio-pika/pamqp send) are written
to the aiormq channel's writer queue as one buffer (one ``send()``), and every event gets a
confirmation future registered with the channel exactly as ``aiormq.Channel.basic_publish``
registers it, so acks, nacks and returns (``mandatory``) resolve it the same way; a channel or
connection loss fails it through the link's ``lost`` (the futures are plain asyncio ones, not
the channel's future store's). The task yields to the event loop after every slice, so the PBX
sockets are
read between slices: calls come first also under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from functools import partial
from typing import cast

import aiormq
from aiormq.abc import ChannelFrame, DeliveredMessage
from aiormq.exceptions import DeliveryError

from bridge import tracing
from bridge.amqp.link import BrokerLink
from bridge.amqp.wire import Wire
from bridge.metrics import PUBLISH_SECONDS
from bridge.buffer import Entry, EventBuffer
from bridge.events import EventFactory, Outgoing

log = logging.getLogger("bridge.publisher")

#: events encoded and written at once; the PBX side runs between two slices
SLICE = 32

class PublisherStats:
    __slots__ = ("confirmed", "failed", "nacked", "published", "returned", "timeouts")

    def __init__(self) -> None:
        self.published = self.confirmed = self.returned = self.failed = self.nacked = self.timeouts = 0


class EventPublisher:
    def __init__(self, link: BrokerLink, factory: EventFactory, *, window: int,
                 timeout_s: float, max_events: int, max_age_s: float, max_attempts: int = 6,
                 max_bytes: int = 256 * 2**20) -> None:
        self.link = link
        self.factory = factory
        self.window = window
        self.timeout_s = timeout_s
        self.buffer = EventBuffer(max_events, max_age_s, clock=time.monotonic, max_attempts=max_attempts,
                                  max_bytes=max_bytes)
        self.stats = PublisherStats()
        #: set for anything the drain loop may be waiting for: new events, a free window
        #: slot, a broken link, closing
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._inflight = 0
        self._idle = asyncio.Event()  # nothing in flight
        self._idle.set()
        self._failed: list[Entry] = []
        self._slices: set[_Slice] = set()  # written, not all settled
        self._broken = asyncio.Event()
        self._closing = False
        self._episodes_seen = (0, 0)  # (opened, closed) already logged
        self._last_gap = 0.0
        #: monotonic time of the last confirm, or of the moment events began to wait
        self._progress_at = time.monotonic()
        #: events that could not be flushed at the last stop (a metric)
        self.unflushed = 0
        #: (nacks, dropped_nacked) when the current run of nacks began (for its log lines)
        self._nacks_from: tuple[int, int] | None = None

    # ----------------------------------------------------------------- the PBX side's door
    def publish_nowait(self, event: Outgoing) -> None:
        buffer = self.buffer
        if not buffer:
            self._progress_at = time.monotonic()
        buffer.append(event)
        s, seen = buffer.stats, self._episodes_seen
        if s.episodes != seen[0] or s.episodes_closed != seen[1]:
            self._log_episodes()
        self._drained.clear()
        self._wakeup.set()

    def stalled_s(self) -> float:
        """Seconds events have waited without a single confirm (0 when nothing waits)."""
        return time.monotonic() - self._progress_at if self.buffer else 0.0

    # ----------------------------------------------------------------- recovery (BrokerLink)
    async def restore(self, conn, topo) -> None:
        """A new connection: nothing to declare (the events go out on the link's channel); the
        drain starts once the link is ready."""

    def lost(self, exc: BaseException | None) -> None:
        """The connection is given up: the drain writes nothing more on it (its confirms are
        failed and its events put back by :meth:`run`)."""
        self._break()

    # ----------------------------------------------------------------- the drain task
    async def run(self) -> None:
        """One drain per connection; a lost connection cancels its drain wherever it waits."""
        while not self._closing:
            if not self.link.ready:  # (ready: the current connection's ``lost`` is not done)
                await self.link.wait_ready()
                continue
            lost = self.link.lost
            assert lost is not None  # ready: a connection, and its ``lost``
            self._broken.clear()
            drain = asyncio.create_task(self._drain(), name="publisher drain")
            try:
                await asyncio.wait((drain, lost), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not drain.done():
                    drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)
            # let what is in flight settle, unless the connection is gone: then at once
            idle = asyncio.ensure_future(self._idle.wait())
            await asyncio.wait((idle, lost), return_when=asyncio.FIRST_COMPLETED)
            if not idle.done():
                self._fail_inflight()
                await idle
            # what did not get a confirm goes back to the front, and first on the next connection
            self.buffer.requeue(self._failed)
            self._failed.clear()

    def _fail_inflight(self) -> None:
        """The connection is gone: its confirms will never come; fail every event in flight."""
        for sl in list(self._slices):
            sl.lost = True
            sl.expire()

    def _break(self) -> None:
        self._broken.set()
        self._wakeup.set()

    async def _drain(self) -> None:
        try:
            ch, topo, lost = self.link.channel, self.link.topology, self.link.lost
            if ch is None or topo is None or lost is None:
                raise ConnectionError("the link is not ready")
            # aiormq's Channel (its writer queue, lock, confirmations), or the benchmark's stand-in
            raw = cast(aiormq.Channel, await ch.get_underlay_channel())
            wire = Wire(raw.number, topo.events.name, raw.max_content_size)
        except Exception as e:  # the channel went away between ready and here
            log.debug("publisher: no channel (%s: %s)", type(e).__name__, e)
            self._break()
            return
        buffer = self.buffer
        while not self._broken.is_set() and not self._closing:
            now = time.monotonic()
            if now - self._last_gap >= 1.0:  # one gap event a second at most, whatever the drops
                self._last_gap = now
                self._announce_gaps()
            room = self.window - self._inflight
            batch: list[Entry] = []
            if room > 0:
                for _ in range(min(room, SLICE)):
                    entry = buffer.take()
                    if entry is None:
                        break
                    batch.append(entry)
                self._log_episodes()  # take() may have dropped events for age
            if not batch:
                if room > 0:
                    if self._announce_gaps():  # drained: what was dropped is announced right away
                        continue
                    if not buffer:
                        self._drained.set()
                self._wakeup.clear()
                retry_at = buffer.next_retry()  # a device's nacked event waits for its pause
                if retry_at is None:
                    await self._wakeup.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), max(0.0, retry_at - time.monotonic()))
                continue
            if self.link.blocked is not None:  # a broker alarm: write nothing until it is over
                try:
                    await self.link.wait_unblocked()
                except asyncio.CancelledError:  # the connection went meanwhile: first on the next
                    self._failed.extend(batch)
                    raise
                if self._broken.is_set():  # lost meanwhile (the link said so: :meth:`lost`)
                    self._failed.extend(batch)
                    break
            await self._send(raw, wire, batch, lost)
            # let the PBX sockets be read between slices: calls first
            await asyncio.sleep(0)

    async def _send(self, raw: aiormq.Channel, wire: Wire, batch: list[Entry], lost: asyncio.Future) -> None:
        """Write the frames of ``batch`` at once, each event with its confirmation future
        (``lost``: the connection's, of the drain that writes it)."""
        parts: list[bytes] = []
        futs: list[asyncio.Future] = []
        sl = _Slice(futs, self, lost)
        # plain futures, not the channel's (``raw.create_future``: two more done-callbacks per
        # event, one call_soon each): a closed channel or connection fails them through
        # ``link.lost`` (``run`` -> ``_fail_inflight``), not through aiormq's future store
        new_future = asyncio.get_running_loop().create_future
        # the lock never comes when the connection goes meanwhile (the drain is cancelled, or
        # aiormq refuses a closed channel): then the batch goes back with what was in flight,
        # first on the next connection. Inside, each event is accounted for by its future.
        locked = False
        try:
            async with raw.lock:  # the channel's delivery tags are counted under its lock
                locked = True
                tag0 = raw.delivery_tag
                confirmations, ids = raw.confirmations, raw.message_id_delivery_tag
                for entry in batch:
                    ev = entry.event
                    try:
                        data = wire.encode(ev)
                    except (ValueError, TypeError, struct.error) as e:  # refused before sending: never
                        self._unpublishable(entry, e)
                        continue
                    raw.delivery_tag += 1
                    tag = raw.delivery_tag
                    fut = new_future()
                    confirmations[tag] = fut
                    ids[ev.message_id] = tag
                    parts.append(data)
                    futs.append(fut)
                    fut.add_done_callback(partial(self._settled, entry, tag, ids, sl))
                if not futs:
                    return
                sl.left = len(futs)
                self._slices.add(sl)
                self._inflight += len(futs)
                self._idle.clear()
                self.stats.published += len(futs)
                try:
                    await raw.write_queue.put(ChannelFrame(payload=b"".join(parts), should_close=False))
                except BaseException:
                    # not written: the broker has not seen these tags; give them back (under the lock)
                    raw.delivery_tag = tag0
                    for i in range(tag0 + 1, tag0 + 1 + len(futs)):
                        confirmations.pop(i, None)
                    sl.lost = True
                    sl.expire()
                    raise
        except BaseException:
            if not locked:
                self._failed.extend(batch)
            raise
        if sl.left:
            sl.arm()

    def _settled(self, entry: Entry, tag: int, ids: dict, sl: _Slice, fut: asyncio.Future) -> None:
        """A confirmation future is done: acked, returned, nacked, timed out or rejected."""
        sl.left -= 1
        ev = entry.event
        if ids.get(ev.message_id) == tag:
            del ids[ev.message_id]
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()
        self._wakeup.set()
        if fut.cancelled():
            exc: BaseException | None = (ConnectionError("broker connection lost") if sl.lost else
                                         TimeoutError(f"no publisher confirm within {self.timeout_s:g}s"))
        else:
            exc = fut.exception()
        if exc is None:
            if isinstance(fut.result(), DeliveredMessage):
                self.stats.returned += 1  # unroutable: nobody bound yet; not an error
            self.stats.confirmed += 1
            now = self._progress_at = self.link.heard_at = time.monotonic()
            self.buffer.confirm(entry)
            PUBLISH_SECONDS.observe(now - entry.enqueued)
            if self.buffer.stats.episodes_closed != self._episodes_seen[1]:
                self._log_episodes()
        elif isinstance(exc, DeliveryError):  # a nack: this event, not the link
            self.stats.nacked += 1
            sl.failed.append(ev)
            sl.error = exc
            self.link.heard_at = time.monotonic()
            self.buffer.nacked(entry)
            self._log_nacks()
        else:  # timeout, channel or connection gone: stays buffered, sent again
            self.stats.failed += 1
            sl.failed.append(ev)
            sl.error = exc
            self._failed.append(entry)
            if not self._broken.is_set():
                log.warning("publish failed, events stay buffered: %s: %s",
                            type(exc).__name__, exc or type(exc).__name__)
                self._break()
                if not sl.lost:  # confirms stopped on a connection that looks up: replace it
                    self.stats.timeouts += 1
                    self.link.reset(f"no publisher confirm within {self.timeout_s:g}s", sl.conn_lost)
        if sl.left == 0:
            sl.done()
            self._slices.discard(sl)
            if sl.failed and tracing.ENABLED:
                tracing.publish_failed(self.link.s.events_exchange, sl.start_ns, sl.failed, len(sl.futs),
                                       sl.error or ConnectionError("broker connection lost"))
        if self._nacks_from is not None and not self.buffer.held_devices:
            self._log_nacks()
        if not self.buffer:
            self._drained.set()

    def _unpublishable(self, entry: Entry, e: Exception) -> None:
        self.stats.failed += 1
        self.buffer.discard(entry)
        log.error("event %s cannot be published (%s); dropped and announced as a gap",
                  entry.event.message_id, e)
        if not self.buffer:
            self._drained.set()

    async def _settle(self) -> None:
        await self._idle.wait()

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

    def _log_nacks(self) -> None:
        """One line when the broker begins to nack and one when no device is held any more."""
        bs = self.buffer.stats
        if self._nacks_from is None:
            self._nacks_from = (bs.nacks - 1, bs.dropped_nacked)
            log.warning("the broker nacks events (a queue refused them, e.g. one at its x-max-length "
                        "with reject-publish): each goes again after a pause, at most %d times, then "
                        "is dropped and announced in a gap event; other devices' events go on",
                        self.buffer.max_attempts)
        elif not self.buffer.held_devices:
            nacks, dropped = self._nacks_from
            self._nacks_from = None
            log.warning("nacks over: %d nacks, %d events dropped after %d attempts",
                        bs.nacks - nacks, bs.dropped_nacked - dropped, self.buffer.max_attempts)

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
        """Stop publishing; what is still in flight is given up (after :meth:`flush`)."""
        self._closing = True
        self._break()
        self._fail_inflight()
        await self._settle()


class _Slice:
    """The events written at once: one confirm timer for all of them, cancelled (and the
    futures let go) when the last one settled."""

    __slots__ = ("conn_lost", "error", "failed", "futs", "left", "lost", "publisher", "start_ns", "timer")

    def __init__(self, futs: list[asyncio.Future], publisher: EventPublisher,
                 conn_lost: asyncio.Future) -> None:
        self.futs = futs
        self.publisher = publisher
        self.conn_lost = conn_lost  # the ``lost`` of the connection it was written on
        self.left = 0
        self.timer: asyncio.TimerHandle | None = None
        self.failed: list[Outgoing] = []  # the events not confirmed
        self.error: BaseException | None = None
        self.start_ns = time.time_ns()
        #: the connection went away under it (its futures are cancelled for that, not a timeout)
        self.lost = False

    def arm(self) -> None:
        self.timer = asyncio.get_running_loop().call_later(self.publisher.timeout_s, self._timeout)

    def done(self) -> None:
        """The last of its events settled."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timeout(self) -> None:
        if self.publisher.link.blocked is not None:  # a broker alarm: confirms wait for it too
            self.arm()
            return
        self.expire()

    def expire(self) -> None:
        """What is still unconfirmed counts as failed."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = None
        for f in self.futs:
            if not f.done():
                f.cancel()
