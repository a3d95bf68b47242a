"""The command consumer: takes commands from the queue, has them carried out, answers, acks.

- A command is acked only after it was carried out (or refused): a bridge killed mid-command
  leaves it in the queue for redelivery.
- Commands for one device are carried out one at a time, in the order they arrived
  (:class:`DeviceLocks`); commands for different devices run concurrently (up to ``prefetch``
  at once). Answering, dead-lettering and acking happen after the device's lock is let go: a
  refusal waiting for its dead-letter copy's confirm does not hold up the device's next command.
- A refused command (bad key, bad body, device not attached, the PBX said no) is answered with
  ``{"ok": false, "error": ...}`` when it has ``reply_to``, and dead-lettered: a copy goes to
  the dead-letter exchange with header ``x-epsignal-error`` saying why, then the original is
  acked. The copy has a ``message_id`` of its own (:func:`dead_letter`), the command's in header
  ``x-original-message-id``: aiormq pairs a returned message with its publish by message id, and
  commands' ids are the clients' (a retry often has the same one), anything at all. Should that
  copy come back unroutable (the dead-letter queue was deleted), the bridge declares the queue
  again and sends the copy once more. Should it not be confirmed, the original is rejected
  without requeue and the queue's own dead-lettering keeps it. Nothing is dropped silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from bridge import commands as cmds
from bridge import ids, routing
from bridge import tracing
from bridge.amqp.link import BrokerLink
from bridge.amqp.topology import Topology, declare_commands_queue, declare_dead_queue
from bridge.ratelimit import RateLimiter

log = logging.getLogger("bridge.commands")

Handler = Callable[[str, str, cmds.Command], Awaitable[cmds.Reply]]
#: (hw, verb) -> the queue to move the command to, or None to carry it out here
Redirect = Callable[[str, str], Awaitable[str | None]]
ERROR_HEADER = "x-epsignal-error"
#: the refused command's own message_id, on its dead letter
ORIGINAL_ID_HEADER = "x-original-message-id"


class CommandStats:
    def __init__(self) -> None:
        self.by_outcome: dict[tuple[str, str], int] = {}

    def count(self, verb: str, outcome: str) -> None:
        k = (verb, outcome)
        self.by_outcome[k] = self.by_outcome.get(k, 0) + 1


class _DeviceEntry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # commands of the device holding the lock, waiting for it, or finishing


class DeviceLocks:
    """One :class:`asyncio.Lock` per device: its commands are carried out one at a time, in the
    order they asked for the lock (an asyncio.Lock wakes its waiters first in, first out).

    A device's entry lives while a command uses it (:meth:`use`: from its arrival, through
    waiting for and holding the lock, until it is answered and acked) and goes with the last
    one, so the map holds only the devices with a command in progress, whatever ids the bus
    sends."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: dict[str, _DeviceEntry] = {}

    @contextmanager
    def use(self, hw: str) -> Iterator[asyncio.Lock]:
        """Count a command of ``hw`` in (at once, before any await) and give the device's lock;
        the entry is dropped when the last command of the device leaves."""
        entry = self._entries.get(hw)
        if entry is None:
            entry = self._entries[hw] = _DeviceEntry()
        entry.users += 1
        try:
            yield entry.lock
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[hw]

    def busy(self, hw: str) -> bool:
        """A command of ``hw`` is in progress or waiting."""
        return hw in self._entries

    def __len__(self) -> int:
        return len(self._entries)


class CommandConsumer:
    def __init__(self, link: BrokerLink, handler: Handler, redirect: Redirect | None = None) -> None:
        self.link = link
        self.s = link.s
        self._handler = handler
        self._redirect = redirect
        self._devices = DeviceLocks()
        self._inflight: set[asyncio.Task] = set()
        self._channel: AbstractChannel | None = None
        self._tag: str | None = None
        self._accepting = True
        self._limiter = RateLimiter(self.s.command_rate, self.s.command_burst)
        self.stats = CommandStats()
        self.consumer_restarts = 0
        #: one re-declare of a vanished dead-letter queue at a time (refusals come in parallel)
        self._redeclaring = asyncio.Lock()
        self._redeclared_at = -1e9
        link.attach(self)

    # ------------------------------------------------------------------ recovery (BrokerLink)
    async def restore(self, conn: AbstractConnection, topo: Topology) -> None:
        """A new connection, or this one again after the command channel closed alone: a
        channel of its own, the commands queue declared, consuming."""
        self._drop_channel()
        ch = await conn.channel(publisher_confirms=False)
        await ch.set_qos(prefetch_count=self.s.prefetch)
        self._channel = ch
        (await ch.get_underlay_channel()).on_consumer_cancel_callbacks.add(self._on_cancelled)
        await self._consume(topo)  # a failed declare fails the restore: the link retries, says why
        ch.close_callbacks.add(lambda _c, exc: self._channel_closed(ch, exc))

    def lost(self, exc: BaseException | None) -> None:
        """The connection is gone, and the channel with it: the link restores it on the next."""
        self._channel = None

    def _drop_channel(self) -> None:
        ch, self._channel = self._channel, None
        if ch is not None and not ch.is_closed:  # a consume that failed on it: let it go
            self._pending_close = asyncio.get_running_loop().create_task(_close_quietly(ch))

    async def _consume(self, topo: Topology | None) -> None:
        if self._channel is None or topo is None:
            raise ConnectionError("no command channel")
        q = await declare_commands_queue(self._channel, self.s, topo)
        if self._accepting:
            self._tag = await q.consume(self.on_message)

    def _channel_closed(self, ch, exc) -> None:
        """The broker closed the consuming channel (e.g. a failed re-declare): without it no
        command would arrive while everything looked ready, so ask the link for it again (it
        does nothing when the whole connection is going: the next one restores this)."""
        if self._accepting and exc is not None and ch is self._channel:
            self._channel = None
            self.link.renew(self, f"command channel closed by the broker ({exc})")

    async def _on_cancelled(self, frame) -> None:
        """The broker cancelled our consumer (the queue was deleted): declare it again, consume."""
        if not self._accepting or self._channel is None or self.link.topology is None:
            return
        log.warning("command consumer cancelled by the broker; declaring %s again", self.s.commands_queue)
        self._pending_restart = asyncio.get_running_loop().create_task(self._restart())

    async def _restart(self) -> None:
        ch = self._channel
        try:
            await self._consume(self.link.topology)
            self.consumer_restarts += 1  # counted once the consumer is back
        except Exception as e:  # a channel the broker closed for it is given back by the link
            log.warning("could not consume again (%s); asking the broker link for the channel again", e)
            if self._accepting and ch is not None and ch is self._channel:  # not replaced meanwhile
                self.link.renew(self, f"command consumer not restarted ({e})")

    def busy(self, hw: str) -> bool:
        """A command for ``hw`` is in progress or waiting."""
        return self._devices.busy(hw)

    async def on_message(self, message: AbstractIncomingMessage, redirect: bool = True) -> None:
        """Carry out one command (``redirect``: it came from the shared queue, see Redirect)."""
        t = asyncio.current_task()
        assert t is not None  # a consumer callback runs in a task of its own
        self._inflight.add(t)
        try:
            await self._process(message, redirect)
        finally:
            self._inflight.discard(t)

    async def _process(self, message: AbstractIncomingMessage, redirect: bool) -> None:
        key = message.routing_key or ""
        parsed = routing.parse_command_key(key)
        verb = parsed[1] if parsed is not None and parsed[1] in cmds.VERBS else "invalid"
        try:
            hw, verb, cmd = cmds.parse(key, message.body)
        except cmds.CommandError as e:  # the reply names the hw only when it is a valid one
            valid = parsed[0] if parsed is not None and ids.valid_hw(parsed[0]) else None
            return await self._refuse(message, verb, valid, str(e))
        if redirect and self._redirect is not None:
            try:
                target = await self._redirect(hw, verb)
            except Exception as e:  # left unacked, it would wait for the channel's end, then again
                log.warning("could not make the lease queue of %s for a command: %s: %s", hw, type(e).__name__, e)
                return await self._refuse(message, verb, hw, (
                    f"not carried out: the lease queue of {hw} could not be made "
                    f"({type(e).__name__}: {e}); send it again"))
            if target is not None:
                return await self._move(message, target, verb, hw)
        if not self._limiter.allow(hw, time.monotonic()):
            return await self._refuse(message, verb, hw, (
                f"rate limit: more than {self.s.command_burst} commands at once or "
                f"{self.s.command_rate:g}/s sustained for device {hw}"))
        span = tracing.command_span(
            message.headers, self.s.commands_exchange, hw, verb, key, message.message_id,
            message.correlation_id) if tracing.ENABLED else nullcontext()
        with self._devices.use(hw) as lock:
            error: str | None = None
            async with lock:
                with span:
                    try:
                        reply = await self._handler(hw, verb, cmd)
                    except cmds.CommandError as e:
                        error = str(e)
                    except Exception as e:  # a bug must not leave the command unanswered and unacked
                        log.exception("command %s for %s failed", verb, hw)
                        error = f"internal error: {type(e).__name__}"
            # the device's next command goes ahead meanwhile: answering, dead-lettering (a
            # publisher confirm) and acking this one need no lock
            if error is not None:
                return await self._refuse(message, verb, hw, error)
            await self._reply(message, reply)
            self.stats.count(verb, "ok")
            await message.ack()

    async def _move(self, message: AbstractIncomingMessage, queue: str, verb: str, hw: str) -> None:
        """Publish the command again, as it is, now that ``queue`` is bound for its key
        (confirmed), then ack it here. Returned unroutable (``queue`` unbound or deleted again
        meanwhile, and the shared queue no longer bound behind the alternate exchange), it is
        refused: answered and dead-lettered with the reason, never acked unseen."""
        topo = self.link.topology
        try:
            if topo is None or self.link.channel is None:
                raise ConnectionError("no publishing channel")
            returned = _returned(await topo.commands.publish(
                _copy(message, message.headers, message.message_id), message.routing_key or "",
                timeout=self.s.publish_timeout_s))
        except Exception as e:
            log.warning("could not move the command to %s (%s); it goes back to the queue", queue, e)
            await message.nack(requeue=True)
            return
        if returned:
            return await self._refuse(message, verb, hw, (
                f"not carried out: moved to the lease queue {queue}, the broker routed it nowhere (that "
                f"queue and {self.s.commands_queue} are unbound or gone); send it again"))
        await message.ack()

    async def refuse(self, message: AbstractIncomingMessage, error: str) -> None:
        """Refuse a command taken elsewhere (a retired lease queue): answered, dead-lettered."""
        parsed = routing.parse_command_key(message.routing_key or "")
        verb = parsed[1] if parsed is not None and parsed[1] in cmds.VERBS else "invalid"
        hw = parsed[0] if parsed is not None and ids.valid_hw(parsed[0]) else None
        await self._refuse(message, verb, hw, error)

    async def _refuse(self, message: AbstractIncomingMessage, verb: str, hw: str | None, error: str) -> None:
        log.info("command refused: key=%s: %s", message.routing_key, error)
        self.stats.count(verb, "refused")
        await self._reply(message, cmds.error_reply(error, command=verb if verb != "invalid" else None, hw=hw))
        topo = self.link.topology
        try:
            if topo is None or self.link.channel is None:
                raise ConnectionError("no publishing channel")
            copy = dead_letter(message, error, self.s.instance_id)
            if _returned(await topo.dead.publish(copy, message.routing_key or "", timeout=self.s.publish_timeout_s)):
                # unroutable: the dead-letter queue was deleted or unbound under the bridge (the
                # queue's own dead-lettering goes to the same exchange: it would be dropped too)
                await self._dead_queue_again()
                if _returned(await topo.dead.publish(copy, message.routing_key or "",
                                                     timeout=self.s.publish_timeout_s)):
                    raise ConnectionError(f"exchange {self.s.dead_exchange} routes it nowhere: the command "
                                          "is dropped by the broker")
        except Exception as e:
            log.warning("dead-letter copy failed (%s); rejecting to the queue's dead-letter exchange", e)
            await message.reject(requeue=False)
            return
        await message.ack()

    async def _dead_queue_again(self) -> None:
        """Declare the dead-letter queue again (a copy came back unroutable): once for all the
        refusals that found it gone at the same moment, on a channel of its own (the link's
        carries the events: a failed declare closes its channel, and an RPC holds its lock)."""
        async with self._redeclaring:
            if time.monotonic() - self._redeclared_at < 1.0:  # another refusal just did it
                return
            log.error("a dead-letter copy came back unroutable: queue %s is gone from exchange %s; "
                      "declaring it again", self.s.dead_queue, self.s.dead_exchange)
            conn = self.link.connection
            if conn is None:
                raise ConnectionError("no broker connection")
            async with asyncio.timeout(self.s.publish_timeout_s):
                ch = await conn.channel(publisher_confirms=False)
                try:
                    await declare_dead_queue(ch, self.s, self.s.dead_exchange)
                finally:
                    await _close_quietly(ch)
            self._redeclared_at = time.monotonic()

    async def _reply(self, message: AbstractIncomingMessage, reply: cmds.Reply) -> None:
        if not message.reply_to:
            return
        ch = self.link.channel
        if ch is None:
            log.warning("cannot reply to %s: broker channel down", message.reply_to)
            return
        try:
            await ch.default_exchange.publish(
                aio_pika.Message(cmds.encode_reply(reply), content_type="application/json",
                                 correlation_id=message.correlation_id, type="reply"),
                message.reply_to, mandatory=False, timeout=self.s.publish_timeout_s,
            )
        except Exception as e:
            log.warning("reply to %s failed: %s", message.reply_to, e)

    async def stop_accepting(self) -> None:
        """Stop taking new commands (deliveries not yet started go back to the queue)."""
        self._accepting = False
        ch, self._channel = self._channel, None
        if ch is not None and not ch.is_closed:
            try:
                if self._tag is not None:
                    q = await ch.get_queue(self.s.commands_queue, ensure=False)
                    await q.cancel(self._tag)
            except Exception:
                pass
        self._ch_to_close = ch

    async def drain(self, timeout: float) -> None:
        """Wait for commands in progress (bounded), then close the consuming channel."""
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)
        ch = getattr(self, "_ch_to_close", None)
        if ch is not None and not ch.is_closed:
            try:
                await ch.close()
            except Exception:
                pass


async def _close_quietly(ch) -> None:
    try:
        await ch.close()
    except Exception:  # broken already: nothing left to release
        pass


def _returned(confirmation: object) -> bool:
    """A mandatory publish the broker returned (no queue bound), as aiormq confirms it on a
    channel that does not raise on returns."""
    return isinstance(confirmation, aiormq.abc.DeliveredMessage)


def dead_letter(message: AbstractIncomingMessage, error: str, instance: str) -> aio_pika.Message:
    """The dead letter of a refused command (its routing key is the publisher's to give): a
    persistent copy with header ``x-epsignal-error`` = ``error`` and a message id of its own,
    ``<instance>/.dead/<random>`` (the command's, if any, in ``x-original-message-id``)."""
    headers = dict(message.headers or {})
    headers[ERROR_HEADER] = error
    if message.message_id:
        headers[ORIGINAL_ID_HEADER] = message.message_id
    return _copy(message, headers, f"{instance}/.dead/{uuid.uuid4().hex}")


def _copy(message: AbstractIncomingMessage, headers, message_id: str | None) -> aio_pika.Message:
    """A persistent copy of a command (its routing key is the publisher's to give)."""
    return aio_pika.Message(
        message.body, headers=headers, content_type=message.content_type,
        correlation_id=message.correlation_id, reply_to=message.reply_to,
        message_id=message_id, timestamp=message.timestamp, type=message.type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
