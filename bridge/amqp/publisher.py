"""The event publisher: the buffer drained into the events exchange with publisher confirms.

``publish_nowait`` never blocks and never fails: it is what the PBX side calls after it has
forwarded a frame. A single task drains the buffer, keeping up to ``publish_window`` events in
flight; an event leaves the buffer only when the broker confirmed it (or returned it as
unroutable: no queue is bound, which is counted, not an error). A failed, nacked or timed-out
publish puts the in-flight events back at the front and waits for the link to come back.

How it publishes (docs/PERFORMANCE.md): not through ``aio_pika.Exchange.publish`` (one task,
one ``Message`` object, one channel-lock round and one hand-off to the writer task per event)
but in *slices* of at most :data:`SLICE` events: the AMQP frames of a slice (``basic.publish``
+ content header + body, encoded here, byte-identical to what aio-pika/pamqp send) are written
to the aiormq channel's writer queue as one buffer (one ``send()``), and every event gets a
confirmation future registered with the channel exactly as ``aiormq.Channel.basic_publish``
registers it, so acks, nacks, returns (``mandatory``) and a channel or connection loss resolve
it the same way. The task yields to the event loop after every slice, so the PBX sockets are
read between slices: calls come first also under load.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from functools import partial

from aiormq.abc import ChannelFrame, DeliveredMessage
from pamqp import encode as _pamqp_encode

from bridge import tracing
from bridge.amqp.link import BrokerLink
from bridge.metrics import PUBLISH_SECONDS
from bridge.buffer import Entry, EventBuffer
from bridge.events import EventFactory, Outgoing

log = logging.getLogger("bridge.publisher")

#: events encoded and written at once; the PBX side runs between two slices
SLICE = 32

CONTENT_TYPE = "application/json"
APP_ID = "epsignal-bridge"


class PublisherStats:
    __slots__ = ("published", "confirmed", "returned", "failed")

    def __init__(self) -> None:
        self.published = self.confirmed = self.returned = self.failed = 0


def _shortstr(s: str) -> bytes:
    b = s.encode()
    if len(b) > 255:
        raise ValueError(f"{s[:40]!r}...: longer than 255 bytes (AMQP short string)")
    return bytes((len(b),)) + b


_FRAME_END = b"\xce"
_pack_len = struct.Struct(">I").pack
_pack_header = struct.Struct(">HHQH").pack  # class, weight, body size, property flags
_pack_ts = struct.Struct(">Q").pack
# Basic.Properties flags of an event: content-type, headers, delivery-mode, priority (0, as
# aio-pika always sent it), message-id, timestamp, type, app-id (AMQP 0-9-1 order)
_FLAGS = 0x8000 | 0x2000 | 0x1000 | 0x0800 | 0x0080 | 0x0040 | 0x0020 | 0x0008
_EMPTY_TABLE = b"\x00\x00\x00\x00"


class Wire:
    """The AMQP frames of one event published to one exchange on one channel, as bytes.

    The same bytes pamqp makes for ``Basic.Publish(exchange, key, mandatory=True)`` and the
    properties ``EventPublisher`` always sent (content type, persistent, priority 0, message id,
    timestamp, type, app id, headers), checked by ``tests/unit/test_publisher_wire.py``."""

    def __init__(self, channel: int, exchange: str, max_body: int) -> None:
        """``max_body``: the largest body in one frame (aiormq's ``max_content_size``)."""
        ch = struct.pack(">H", channel)
        self._method = b"\x01" + ch
        self._header = b"\x02" + ch
        self._body = b"\x03" + ch
        self._publish = struct.pack(">HHH", 60, 40, 0) + _shortstr(exchange)
        self.max_body = max_body
        self._ct = _shortstr(CONTENT_TYPE)
        self._app = _shortstr(APP_ID)
        self._types: dict[str, bytes] = {}
        self._headers: dict | None = None  # the last headers table encoded, and its bytes
        self._table = _EMPTY_TABLE

    def encode(self, ev: Outgoing) -> bytes:
        """Raises ValueError for what AMQP cannot carry (a key or id over 255 bytes)."""
        key = ev.key.encode()
        if len(key) > 255:
            raise ValueError(f"routing key over 255 bytes: {ev.key[:40]!r}...")
        method = self._publish + bytes((len(key),)) + key + b"\x01"  # mandatory, not immediate
        typ = self._types.get(ev.type)
        if typ is None:
            typ = self._types[ev.type] = _shortstr(ev.type)
        headers = ev.headers
        if not headers:
            headers = _EMPTY_TABLE
        elif headers is self._headers:  # the events of one frame share their (trace) headers
            headers = self._table
        else:
            self._headers, headers = headers, _pamqp_encode.field_table(headers)
            self._table = headers
        body = ev.body
        n = len(body)
        props = b"".join((
            _pack_header(60, 0, n, _FLAGS), self._ct, headers, b"\x02\x00", _shortstr(ev.message_id),
            _pack_ts(int(ev.timestamp.timestamp())), typ, self._app,
        ))
        parts = [self._method, _pack_len(len(method)), method, _FRAME_END,
                 self._header, _pack_len(len(props)), props, _FRAME_END]
        step = self.max_body
        if n < step:  # as aiormq splits
            parts += (self._body, _pack_len(n), body, _FRAME_END)
        else:
            for i in range(0, n, step):
                chunk = body[i:i + step]
                parts += (self._body, _pack_len(len(chunk)), chunk, _FRAME_END)
        return b"".join(parts)


class EventPublisher:
    def __init__(self, link: BrokerLink, factory: EventFactory, *, window: int,
                 timeout_s: float, max_events: int, max_age_s: float) -> None:
        self.link = link
        self.factory = factory
        self.window = window
        self.timeout_s = timeout_s
        self.buffer = EventBuffer(max_events, max_age_s, clock=time.monotonic)
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
        self._broken = asyncio.Event()
        self._closing = False
        self._episodes_seen = (0, 0)  # (opened, closed) already logged
        self._last_gap = 0.0
        #: pause before resending after a failure while the link still looks up (doubles to 5 s)
        self._retry_pause = 0.0

    # ----------------------------------------------------------------- the PBX side's door
    def publish_nowait(self, event: Outgoing) -> None:
        buffer = self.buffer
        buffer.append(event)
        s, seen = buffer.stats, self._episodes_seen
        if s.episodes != seen[0] or s.episodes_closed != seen[1]:
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

    def _break(self) -> None:
        self._broken.set()
        self._wakeup.set()

    async def _drain(self) -> None:
        try:
            raw = await self.link.channel.get_underlay_channel()
            wire = Wire(raw.number, self.link.topology.events.name, raw.max_content_size)
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
                await self._wakeup.wait()
                continue
            if raw.is_closed:
                self._failed.extend(batch)
                self._break()
                break
            await self._send(raw, wire, batch)
            # let the PBX sockets be read between slices: calls first
            await asyncio.sleep(0)

    async def _send(self, raw, wire: Wire, batch: list[Entry]) -> None:
        """Write the frames of ``batch`` at once, each event with its confirmation future."""
        parts: list[bytes] = []
        futs: list[asyncio.Future] = []
        sl = _Slice(futs)
        async with raw.lock:  # the channel's delivery tags are counted under its lock
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
                fut = raw.create_future()
                confirmations[tag] = fut
                ids[ev.message_id] = tag
                parts.append(data)
                futs.append(fut)
                fut.add_done_callback(partial(self._settled, entry, tag, ids, sl))
            if not futs:
                return
            sl.left = len(futs)
            self._inflight += len(futs)
            self._idle.clear()
            self.stats.published += len(futs)
            try:
                await raw.write_queue.put(ChannelFrame(payload=b"".join(parts), should_close=False))
            except BaseException:
                # not written: the broker has not seen these tags; give them back (under the lock)
                raw.delivery_tag = tag0
                for i, fut in enumerate(futs, tag0 + 1):
                    confirmations.pop(i, None)
                    fut.cancel()
                raise
        if sl.left:
            sl.timer = asyncio.get_running_loop().call_later(self.timeout_s, sl.expire)

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
            exc: BaseException | None = TimeoutError(f"no publisher confirm within {self.timeout_s:g}s")
        else:
            exc = fut.exception()
        if exc is None:
            if isinstance(fut.result(), DeliveredMessage):
                self.stats.returned += 1  # unroutable: nobody bound yet; not an error
            self.stats.confirmed += 1
            self._retry_pause = 0.0
            self.buffer.confirm(entry)
            PUBLISH_SECONDS.observe(time.monotonic() - entry.enqueued)
            if self.buffer.stats.episodes_closed != self._episodes_seen[1]:
                self._log_episodes()
        else:  # nack, timeout, channel or connection gone: stays buffered, sent again
            self.stats.failed += 1
            sl.failed.append(ev)
            sl.error = exc
            self._failed.append(entry)
            if not self._broken.is_set():
                log.warning("publish failed, events stay buffered: %s: %s",
                            type(exc).__name__, exc or type(exc).__name__)
                self._break()
        if sl.left == 0:
            sl.done()
            if sl.failed and tracing.ENABLED:
                tracing.publish_failed(self.link.topology.events.name, sl.start_ns, sl.failed,
                                       len(sl.futs), sl.error)
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
        self._break()
        await self._settle()


class _Slice:
    """The events written at once: one confirm timer for all of them, cancelled (and the
    futures let go) when the last one settled."""

    __slots__ = ("futs", "left", "timer", "failed", "error", "start_ns")

    def __init__(self, futs: list[asyncio.Future]) -> None:
        self.futs = futs
        self.left = 0
        self.timer: asyncio.TimerHandle | None = None
        self.failed: list[Outgoing] = []  # the events not confirmed
        self.error: BaseException | None = None
        self.start_ns = time.time_ns()

    def done(self) -> None:
        """The last of its events settled."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expire(self) -> None:
        """The confirm timeout: what is still unconfirmed counts as failed."""
        self.timer = None
        for f in self.futs:
            if not f.done():
                f.cancel()
