"""Device leases in RabbitMQ: which replica attaches which device (EPSIGNAL_LEASES; design and
failure analysis in docs/SCALING.md; the decisions in :mod:`bridge.leases`).

Every device has a lease queue (:func:`bridge.amqp.topology.declare_lease_queue`): durable,
single-active-consumer, bound to the commands exchange with ``device.<hw>.*``. It holds one
*token* message: the replica whose consumer is active receives it and never acknowledges it
while it holds the device. Holding the token is owning the device: the runner (the PBX session)
starts when the token arrives and stops when the lease is handed on or lost. The device's
commands arrive behind the token in the same queue, so they reach only the holder, in order,
and wait in the queue while nobody holds it.

- Failover: a replica that dies loses its channel; the broker makes the next consumer in line
  active and redelivers the token (and any unacknowledged command) to it at once.
- Balance: the replicas hear each other on the presence exchange; for each device only the
  first two in rank (:func:`bridge.leases.rank`) stand in line; a holder hands an *idle* device
  on to the preferred replica (cancel, then requeue the token) once the member set has settled.
- The token carries the device's wanted state (``attach``) and a generation: a detach command
  replaces the token with ``attach: false``, so the next holder does not attach it again. Two
  tokens (two replicas created the queue at once) meet at the active consumer, which keeps the
  newer generation and acknowledges the other.
- Broker lost: the runners go on (calls come first); after the reconnect the replica lines up
  first for the leases it held and gives up any whose token does not come back within
  ``REACQUIRE_S`` (another replica holds it now).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from pamqp.commands import Basic

from bridge.amqp import topology as t
from bridge.amqp.link import BrokerLink
from bridge.leases import PRESENCE_DECODER, PRESENCE_ENCODER, LeasePlan, Membership, Presence

log = logging.getLogger("bridge.leases")

#: after a broker reconnect: time for the token of a lease held before to come back
REACQUIRE_S = 5.0
#: a command that arrives before its device's token waits this long for it
TOKEN_WAIT_S = 2.0
#: a token that was someone else's (redelivered: handed on, or its holder died) starts the
#: runner after this pause, for the PBX to notice the old holder's session is gone (else its
#: "already attached" refusal costs a retry)
TAKEOVER_PAUSE_S = 0.3


class Token(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of a lease token."""

    v: int = 1
    hw: str
    #: the device is wanted attached (false after a detach command)
    attach: bool = True
    #: newer tokens win over older ones
    gen: int = 0


TOKEN_ENCODER = msgspec.json.Encoder()
TOKEN_DECODER = msgspec.json.Decoder(Token)


class Owner(Protocol):
    """What the bridge does with leases."""

    def acquired(self, hw: str) -> None: ...            # start the device's runner
    async def released(self, hw: str, reason: str) -> None: ...  # stop it (detached event)
    def idle(self, hw: str) -> bool: ...               # no call, no command in progress


class LeaseManager:
    def __init__(self, link: BrokerLink, owner: Owner, configured: list[str],
                 on_command: Callable[[AbstractIncomingMessage], Awaitable[None]]) -> None:
        self.link = link
        self.s = link.s
        self.owner = owner
        self.configured = set(configured)
        #: devices not configured that a command made known (here, or to another replica, learned
        #: from its heartbeats: every replica announces all it knows, so a device outlives the
        #: replica that adopted it)
        self.dynamic: set[str] = set()
        self._on_command = on_command
        loop = asyncio.get_running_loop()
        self.members = Membership(self.s.instance_id, self.s.lease_heartbeat_s, loop.time())
        self.plan = LeasePlan(self.members, self.s.lease_heartbeat_s)
        #: hw -> (delivery tag, token) of the tokens held on the current channel
        self.tokens: dict[str, tuple[int, Token]] = {}
        #: devices whose runner this replica started (may outlive a channel)
        self.running: set[str] = set()
        #: hw -> deadline: held before a broker reconnect, token not back yet
        self.reacquire: dict[str, float] = {}
        self.consuming: dict[str, str] = {}  # hw -> consumer tag
        self._hw_by_tag: dict[str, str] = {}
        self._token_arrived: dict[str, asyncio.Event] = {}
        #: devices with a command waiting for the token
        self._waiting: set[str] = set()
        self._ch: aiormq.abc.AbstractChannel | None = None
        self._declared: set[str] = set()
        self._line_up_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.handed_on = 0
        link.on_ready(self._start)

    # ------------------------------------------------------------------ connection
    async def _start(self, conn: AbstractConnection, topo: t.Topology) -> None:
        ch = await (await conn.channel(publisher_confirms=False)).get_underlay_channel()
        await ch.basic_qos(prefetch_count=self.s.prefetch)  # per consumer (RabbitMQ)
        ch.on_consumer_cancel_callbacks.add(self._on_cancel)
        presence = t.presence_exchange(self.s)
        await ch.exchange_declare(presence, exchange_type="fanout", durable=True)
        q = (await ch.queue_declare("", exclusive=True, auto_delete=True)).queue
        await ch.queue_bind(q, presence)
        await ch.basic_consume(q, self._on_presence, no_ack=True)
        loop = asyncio.get_running_loop()
        # a new channel: every token held on the old one is void; the runners go on meanwhile
        for hw in self.running:
            self.reacquire.setdefault(hw, loop.time() + REACQUIRE_S)
        self.tokens.clear()
        self.consuming.clear()
        self._hw_by_tag.clear()
        self._declared.clear()
        self._ch = ch
        # hear the others before lining up for devices: they answer a hello at once
        self._line_up_at = loop.time() + min(0.5, self.s.lease_heartbeat_s)
        await self._announce(hello=True)
        for hw in list(self.reacquire):  # first in line for what we held
            await self._consume(hw)
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="leases")
            self._beat = asyncio.create_task(self._heartbeat(), name="presence")
        self._wake.set()

    def _usable(self) -> aiormq.abc.AbstractChannel | None:
        ch = self._ch
        return None if ch is None or ch.is_closed else ch

    async def _announce(self, hello: bool = False, bye: bool = False) -> None:
        ch = self._usable()
        if ch is None:
            return
        dynamic = sorted(self.dynamic)
        body = PRESENCE_ENCODER.encode(Presence(
            instance=self.s.instance_id, held=len(self.tokens), dynamic=dynamic, hello=hello, bye=bye))
        ttl = str(int(self.s.lease_heartbeat_s * 3000))
        await ch.basic_publish(body, exchange=t.presence_exchange(self.s), properties=Basic.Properties(
            content_type="application/json", expiration=ttl, message_type="presence"))

    def _on_presence(self, msg: aiormq.abc.DeliveredMessage) -> None:
        try:
            p = PRESENCE_DECODER.decode(msg.body)
        except msgspec.DecodeError as e:
            log.warning("bad presence message ignored: %s", e)
            return
        self.dynamic.update(p.dynamic)
        if self.members.heard(p, asyncio.get_running_loop().time()):
            log.info("replicas: %s", ", ".join(self.members.live))
            self._wake.set()
        if p.hello and p.instance != self.s.instance_id:
            asyncio.get_running_loop().create_task(self._announce())

    async def _heartbeat(self) -> None:
        """On a task of its own: a long lease round must not make the others think us gone."""
        while not self._stopping:
            await asyncio.sleep(self.s.lease_heartbeat_s)
            try:
                await self._announce()
            except Exception as e:  # the channel is down: the link reconnects
                log.debug("presence heartbeat not sent: %s", e)

    # ------------------------------------------------------------------ the plan, carried out
    async def _loop(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._wake.wait(), self.s.lease_heartbeat_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._reconcile()
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as e:
                log.debug("lease round interrupted: %s", e)  # the link reconnects; _start redoes it
            except Exception:
                log.exception("lease round failed")

    def devices(self) -> set[str]:
        return self.configured | self.dynamic | self.running | set(self.tokens)

    async def _reconcile(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.members.expire(now):
            log.info("replicas: %s", ", ".join(self.members.live))
        for hw, deadline in list(self.reacquire.items()):
            if hw in self.tokens:
                del self.reacquire[hw]
            elif now > deadline:
                del self.reacquire[hw]
                log.warning("device %s: lease not back after the broker reconnect; another replica "
                            "holds it now", hw)
                await self._stop_runner(hw, "lease-lost")
        if self._usable() is None:
            return
        # first in line where preferred; stand-in only once the member set is stable (so that at
        # a start the preferred replicas line up first); out of line at once where neither
        lined_up = now >= self._line_up_at
        stable = lined_up and self.plan.settled(now)
        me = self.members.me
        for hw in self.devices():
            ranking = self.plan.ranking(hw)
            keep = hw in self.tokens or hw in self.reacquire
            if hw not in self.consuming:
                if keep or (lined_up and ranking[0] == me) or (stable and me in ranking):
                    await self._consume(hw)
            elif not keep and me not in ranking:
                await self._cancel(hw)
        for hw in list(self.running):  # a runner runs only while its lease is held
            if hw not in self.tokens and hw not in self.reacquire and hw not in self._waiting:
                log.warning("device %s: runner without its lease; detaching", hw)
                await self._stop_runner(hw, "lease-lost")
        moving = []
        for hw, (_tag, token) in list(self.tokens.items()):
            if token.attach and hw in self.running:
                self.owner.acquired(hw)  # a runner that ended (attach refused) is tried again
            if len(moving) < self.s.attach_concurrency and self.plan.hand_on(hw, self.owner.idle(hw), now):
                moving.append(hw)  # a few at a time: a misjudged member set moves little
        await asyncio.gather(*(self.hand_on(hw) for hw in moving))

    async def _consume(self, hw: str) -> None:
        ch = self._usable()
        if ch is None or hw in self.consuming:
            return
        tag = f"lease:{self.s.instance_id}:{hw}"
        self.consuming[hw] = tag  # before the first await: a second caller returns above
        self._hw_by_tag[tag] = hw
        try:
            if hw not in self._declared:
                ready = await t.declare_lease_queue(ch, self.s, hw)
                self._declared.add(hw)
                if ready == 0 and hw not in self.tokens:
                    # maybe the holder has it (unacked), maybe nobody: a second token is harmless
                    await self._publish_token(Token(hw=hw))
            await ch.basic_consume(t.lease_queue(self.s, hw), self._on_deliver, consumer_tag=tag)
        except BaseException:
            self.consuming.pop(hw, None)
            self._hw_by_tag.pop(tag, None)
            raise

    async def _cancel(self, hw: str) -> None:
        tag = self.consuming.pop(hw, None)
        ch = self._usable()
        if tag is not None and ch is not None:
            await ch.basic_cancel(tag)

    async def _publish_token(self, token: Token) -> None:
        """Put a token in the device's lease queue (straight, through the default exchange),
        confirmed (on the link's confirming channel)."""
        topo_ch = self.link.channel
        if topo_ch is None:
            raise ConnectionError("no publishing channel")
        await topo_ch.default_exchange.publish(aio_pika.Message(
            TOKEN_ENCODER.encode(token), type=t.LEASE_TOKEN, content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        ), t.lease_queue(self.s, token.hw), timeout=self.s.publish_timeout_s)

    # ------------------------------------------------------------------ deliveries
    async def _on_deliver(self, msg: aiormq.abc.DeliveredMessage) -> None:
        hw = self._hw_by_tag.get(msg.consumer_tag or "")
        ch = msg.channel
        if self._stopping:  # left unacked: closing the channel requeues it for the next holder
            return
        if hw is None:  # a consumer of an old channel: not ours any more
            await ch.basic_nack(msg.delivery_tag, requeue=True)
            return
        if msg.header.properties.message_type == t.LEASE_TOKEN:
            return await self._on_token(hw, msg)
        if hw not in self.tokens and hw in self.consuming:
            # the token comes first, or is on its way; if it does not come, it was lost (a purged
            # queue): make a new one (a holder of a newer one keeps its own)
            for attempt in range(2):
                if await self._token_within(hw, TOKEN_WAIT_S) or hw not in self.consuming:
                    break
                if attempt == 0:
                    log.warning("device %s: a command but no lease token; making a new token", hw)
                    await self._publish_token(Token(hw=hw))
        if hw not in self.tokens:  # handed on or lost meanwhile: back to the queue, for the holder
            await ch.basic_nack(msg.delivery_tag, requeue=True)
            return
        await self._on_command(aio_pika.IncomingMessage(msg, no_ack=False))

    async def _token_within(self, hw: str, timeout: float) -> bool:
        ev = self._token_arrived.setdefault(hw, asyncio.Event())
        self._waiting.add(hw)
        try:
            await asyncio.wait_for(ev.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self._waiting.discard(hw)
        return hw in self.tokens

    async def _on_token(self, hw: str, msg: aiormq.abc.DeliveredMessage) -> None:
        ch = msg.channel
        try:
            token = TOKEN_DECODER.decode(msg.body)
        except msgspec.DecodeError as e:
            log.warning("device %s: bad lease token dropped: %s", hw, e)
            await ch.basic_ack(msg.delivery_tag)
            return
        held = self.tokens.get(hw)
        if held is not None:  # two tokens: keep the newer
            if token.gen <= held[1].gen:
                await ch.basic_ack(msg.delivery_tag)
                return
            await ch.basic_ack(held[0])
        if hw not in self.consuming:  # cancelled meanwhile
            await ch.basic_nack(msg.delivery_tag, requeue=True)
            await self._stop_runner(hw, "lease-moved")
            return
        self.tokens[hw] = (msg.delivery_tag, token)
        self.reacquire.pop(hw, None)
        ev = self._token_arrived.pop(hw, None)
        if ev is not None:
            ev.set()
        if token.attach and hw not in self.running:
            self.running.add(hw)
            if msg.delivery.redelivered:
                asyncio.get_running_loop().call_later(TAKEOVER_PAUSE_S, self._take_over, hw)
            else:
                self.owner.acquired(hw)
        elif not token.attach and hw in self.running:
            await self._stop_runner(hw, "command")

    def _take_over(self, hw: str) -> None:
        if hw in self.running and hw in self.tokens:
            self.owner.acquired(hw)

    async def _on_cancel(self, frame: Basic.Cancel) -> None:
        """The broker cancelled a consumer: its queue was deleted. Declare it again next round."""
        hw = self._hw_by_tag.pop(frame.consumer_tag, None)
        if hw is None:
            return
        self.consuming.pop(hw, None)
        self._declared.discard(hw)
        self.dynamic.discard(hw)
        if self.tokens.pop(hw, None) is not None:
            await self._stop_runner(hw, "lease-lost")
        self._wake.set()

    async def _stop_runner(self, hw: str, reason: str) -> None:
        if hw in self.running:
            self.running.discard(hw)
            await self.owner.released(hw, reason)

    # ------------------------------------------------------------------ for the bridge
    async def hand_on(self, hw: str) -> None:
        """Give the device up to the next replica in line: detach, step out of the line, then
        put the token back (the broker gives it to the consumer now active)."""
        if not self.owner.idle(hw):
            # a command (or a call) began since the round chose this device: an attach command
            # carried out after the runner stopped would start it again beside the next holder's
            return
        # from here on a command for hw goes back to the queue (no token), for the next holder
        held = self.tokens.pop(hw, None)
        await self._stop_runner(hw, "lease-moved")
        await asyncio.sleep(TAKEOVER_PAUSE_S)  # for the PBX to see the session end
        await self._cancel(hw)
        ch = self._usable()
        if held is not None and ch is not None:
            await ch.basic_nack(held[0], requeue=True)
            self.handed_on += 1
            log.info("device %s: handed on to %s", hw, self.plan.preferred(hw))

    async def want(self, hw: str, attach: bool) -> None:
        """An attach or detach command for a device held here: start or stop its runner, and
        replace the token with one of the next generation saying so (confirmed before the old
        one is let go), so that the next holder knows too."""
        if attach:
            self.running.add(hw)
            self.owner.acquired(hw)
        else:
            self.running.discard(hw)
        held = self.tokens.get(hw)
        if held is None or held[1].attach == attach:
            return
        # the old token goes when the new one arrives (newer wins): never a moment without one
        await self._publish_token(Token(hw=hw, attach=attach, gen=held[1].gen + 1))

    async def adopt(self, hw: str) -> str:
        """A command for a device without a lease queue (not configured, or its queue is gone):
        make the queue (with a token), line up for it; the queue to move the command to."""
        if hw not in self.configured:
            self.dynamic.add(hw)
        await self._consume(hw)
        return t.lease_queue(self.s, hw)

    def pause(self) -> None:
        """Graceful stop, first step: commands that arrive now wait, unacknowledged, for the
        channel to close (they go to the next holder then)."""
        self._stopping = True

    async def stop(self) -> None:
        """Graceful stop, after the runners were stopped: say goodbye, close the channel (the
        broker hands every token to the next in line)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            self._beat.cancel()
            await asyncio.gather(self._task, self._beat, return_exceptions=True)
        try:
            await self._announce(bye=True)
        except Exception:
            pass
        ch, self._ch = self._usable(), None
        if ch is not None:
            try:
                await ch.close()
            except Exception:
                pass
