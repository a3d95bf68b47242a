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
  replaces the token with ``attach: false``, so the next holder does not attach it again. It
  also carries the device's command-set intercept rules (``intercept``, docs/INTERCEPT.md): an
  intercept command replaces the token the same way, and a holder takes them from it. Two
  tokens (two replicas created the queue at once) meet at the active consumer, which keeps the
  newer generation and acknowledges the other.
- Broker or lease channel lost (a crash, a channel error, RabbitMQ's consumer timeout): the
  broker has requeued every token of the channel, so every runner stops (the invariant); the
  channel is opened again (on the same connection if it lives) and the replica lines up again.
- Consumer timeout: a held token is replaced by a new delivery (``renew``) every ``RENEW_S``,
  well within RabbitMQ's ``consumer_timeout`` (30 min by default), so the timeout never fires.
- Orphans: RabbitMQ 3.10.8 can leave a quorum lease queue with its token ready and no active
  consumer after its consumers' node died, every replica waiting in line for good. A replica in
  line for a device that no replica has said it holds for ``ORPHAN_BEATS`` heartbeats (every
  heartbeat says which devices its replica holds) looks at the queue; with no active consumer it
  steps out of line and lines up again, and the broker makes a consumer active
  (``_repair``; docs/SCALING.md).
- Delivery limit (quorum queues): every hand-on and lost channel gives the token back, and the
  queue counts it (``x-delivery-count``); RabbitMQ 4 dead-letters a message given back 20 times.
  A token given back ``RENEW_RETURNS`` times is renewed at once (the fresh copy counts from 0),
  so the limit never takes it. (``x-delivery-limit: -1``, "no limit" on RabbitMQ 4, drops a
  message at its first return on 3.10, so no argument does it on every version.)

Who owns what is decided by :class:`bridge.leases.Lease` (the state machine, with the invariant);
this module only carries out its actions and feeds the broker's answers back.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import aio_pika
import aiormq
import msgspec
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage
from pamqp.commands import Basic

from bridge import backoff
from bridge.amqp import topology as t
from bridge.amqp.link import BrokerLink
from bridge.intercept import Rule, Rules
from bridge.leases import (
    PRESENCE_DECODER, PRESENCE_ENCODER, Ack, Action, Cancel, Consume, Defer, Lease, LeasePlan, Membership,
    ORPHAN_BEATS, Nack, Orphans, Presence, Process, Publish, StartRunner, State, StopRunner, Wanted, config_id,
)

log = logging.getLogger("bridge.leases")

#: a held token is renewed (a new delivery) this often: RabbitMQ's consumer_timeout (30 min by
#: default) closes a channel over a delivery older than that, which would move every device; and
#: the lease queue's message TTL counts from the publish, so a token handed on must be young
#: (bridge.amqp.topology.LEASE_COMMAND_TTL_S; never more than a fifth of it)
RENEW_S = t.LEASE_COMMAND_TTL_S / 5
#: a token given back this often (hand-ons, lost channels: the broker counts them in a quorum
#: queue's x-delivery-count) is replaced by a fresh one at once: RabbitMQ 4 dead-letters a message
#: returned 20 times (its default delivery limit; a policy may set less), and a lease queue
#: without its token would be a device nobody can hold
RENEW_RETURNS = 2
#: with quorum queues: a token held for fewer heartbeats than this is not handed on (see
#: LeaseManager._successor_in_line; a replica unheard for 2 beats is no longer preferred)
HAND_ON_HELD_BEATS = 3
#: a command that arrives before its device's token waits this long for it, then is requeued
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
    #: the configuration the wanted state was made under (bridge.leases.config_id; THE RULE)
    cfg: str = ""
    #: since when (Unix time) and by whom (an instance id, or "reset") it is wanted
    since: float = 0.0
    by: str = ""
    #: the device's intercept rules set by command (bridge.intercept.Rule objects; absent: none).
    #: Read leniently here and converted apart: a token is never dropped for rules this version
    #: cannot read
    intercept: list[Any] = msgspec.field(default_factory=list)


#: the message type of an operator's query on the presence exchange (every replica answers)
LEASE_QUERY = "lease.query"


def _iso(t: float) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else None


TOKEN_ENCODER = msgspec.json.Encoder()
TOKEN_DECODER = msgspec.json.Decoder(Token)


class Owner(Protocol):
    """What the bridge does with leases."""

    def acquired(self, hw: str) -> None: ...            # start the device's runner
    async def released(self, hw: str, reason: str) -> None: ...  # stop it (detached event)
    def idle(self, hw: str) -> bool: ...               # no call, no command in progress
    def not_attached(self, hw: str, reason: str) -> None: ...  # held, wanted detached (event)
    def running(self) -> list[str]: ...                # the devices whose runner runs here


class QueueCount(NamedTuple):
    """What a declare-ok says of a lease queue."""

    #: messages ready (the token, if nobody holds it; commands waiting)
    ready: int
    #: consumers: a classic queue counts every one in line, a quorum queue its active one only
    consumers: int


def _counts(ok: aiormq.spec.Queue.DeclareOk) -> QueueCount:
    # a declare-ok always carries both counts (pamqp types them optional, for its frame builder)
    assert ok.message_count is not None and ok.consumer_count is not None
    return QueueCount(ok.message_count, ok.consumer_count)


@dataclass
class _Round:
    """One lease round's view of the world and its budget (:meth:`LeaseManager._reconcile`)."""

    #: the lease channel the round runs on: a round stops when it is replaced
    epoch: int
    now: float
    #: the hello pause is over: line up where this replica is preferred
    lined_up: bool
    #: and the member set has settled: line up as stand-in too
    stable: bool
    #: leases being given up now (RELEASING, LEAVING): hand-ons start a few at a time
    moving: int
    #: devices looked at for a hand-on this round (a passive declare each)
    checked: int = 0
    #: orphans looked at this round (a passive declare each)
    repairs: int = 0


class LeaseManager:
    """A replica's side of the device leases: carries out what each device's
    :class:`bridge.leases.Lease` decides (line up, hold, hand on, renew) on a lease channel of
    its own, hears and greets the other replicas on the presence exchange, and starts and stops
    the owner's runners as the leases come and go (the module docstring says how)."""

    def __init__(self, link: BrokerLink, owner: Owner, configured: list[str],
                 on_command: Callable[[AbstractIncomingMessage], Awaitable[None]]) -> None:
        self.link = link
        self.s = link.s
        self.owner = owner
        self.configured = set(configured)
        #: the configuration tokens are made under (THE RULE in bridge.leases)
        self.cfg = config_id(configured)
        #: devices not configured that a command made known (here, or to another replica, learned
        #: from its heartbeats: every replica announces all it knows, so a device outlives the
        #: replica that adopted it)
        self.dynamic: set[str] = set()
        self._on_command = on_command
        #: the bridge's intercept rules: a token carries its device's command-set rules
        self.rules: Rules | None = None
        loop = asyncio.get_running_loop()
        self.members = Membership(self.s.instance_id, self.s.lease_heartbeat_s, loop.time())
        self.plan = LeasePlan(self.members, self.s.lease_heartbeat_s)
        self.orphans = Orphans(self.members, configured, self.s.lease_heartbeat_s)
        #: hw -> its ownership state machine (bridge.leases.Lease): the only judge of ownership
        self.leases: dict[str, Lease] = {}
        #: the current lease channel and its epoch (every channel opened gets the next one)
        self._ch: aiormq.abc.AbstractChannel | None = None
        self.epoch = 0
        self._conn: AbstractConnection | None = None
        self._ctags = itertools.count(1)
        self._by_ctag: dict[str, str] = {}  # consumer tag -> hw
        self._declared: set[str] = set()    # declared on the current channel
        #: lease queues are declared on a channel of their own: a declare the broker refuses
        #: (a queue made with other arguments) closes only that one, never the lease channel
        self._decl: aiormq.abc.AbstractChannel | None = None
        self._mismatch: set[str] = set()    # lease queues with other arguments (warned once)
        self._not_lined_up: set[str] = set()  # line-ups that failed (warned once until one succeeds)
        self._token_arrived: dict[str, asyncio.Event] = {}
        #: runner stops and starts in progress (never awaited by the lease round)
        self._stopping_runner: dict[str, asyncio.Task] = {}
        self._starting: set[str] = set()
        self._bg: set[asyncio.Task] = set()
        self._line_up_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._beat: asyncio.Task | None = None
        self._stopping = False
        self.handed_on = 0
        self.channels_lost = 0
        #: lease queues this replica was not in line on and lined up for again (Orphans: found
        #: with no active consumer; rejoin: a holder's hand-on here came straight back)
        self.repaired = 0
        #: a lease queue the broker refused to declare (other arguments), for readiness
        self.problem: str | None = None
        link.on_ready(self._start)

    # ------------------------------------------------------------------ views
    @property
    def tokens(self) -> dict[str, Lease]:
        """Devices whose lease is held here (HOLDING)."""
        return {hw: lease for hw, lease in self.leases.items() if lease.state is State.HOLDING}

    def holds(self, hw: str) -> bool:
        lease = self.leases.get(hw)
        return lease is not None and lease.state is State.HOLDING

    def runs(self, hw: str) -> bool:
        """The invariant allows a runner for ``hw`` here now."""
        lease = self.leases.get(hw)
        return lease is not None and lease.runner

    def _lease(self, hw: str) -> Lease:
        lease = self.leases.get(hw)
        if lease is None:
            lease = self.leases[hw] = Lease(hw, cfg=self.cfg, configured=hw in self.configured)
        return lease

    def devices(self) -> set[str]:
        """Every device this replica knows of: configured, made known by a command, or leased."""
        return self.configured | self.dynamic | set(self.leases)

    def _new_ctag(self, hw: str) -> str:
        """A consumer tag of its own for each time this replica lines up for ``hw``."""
        return f"lease:{self.s.instance_id}:{hw}:{next(self._ctags)}"

    # ------------------------------------------------------------------ connection
    async def _start(self, conn: AbstractConnection, topo: t.Topology) -> None:
        self._conn = conn
        await self._open_channel(conn)
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="leases")
            self._beat = asyncio.create_task(self._heartbeat(), name="presence")

    async def _open_channel(self, conn: AbstractConnection) -> None:
        self._lost(self.epoch)  # the old channel is gone (its close callback may come later)
        ch = await (await conn.channel(publisher_confirms=False)).get_underlay_channel()
        await ch.basic_qos(prefetch_count=self.s.prefetch)  # per consumer (RabbitMQ)
        ch.on_consumer_cancel_callbacks.add(self._on_cancel)
        presence = t.presence_exchange(self.s)
        await ch.exchange_declare(presence, exchange_type="fanout", durable=True)
        q = (await ch.queue_declare("", exclusive=True, auto_delete=True,  # never quorum: exclusive
                                    arguments={"x-queue-type": "classic"})).queue
        assert q is not None  # the broker names a queue declared without a name
        await ch.queue_bind(q, presence)
        await ch.basic_consume(q, self._on_presence, no_ack=True)
        self.epoch += 1
        epoch = self.epoch
        self._declared.clear()
        self._by_ctag.clear()
        self._ch = ch
        ch.closing.add_done_callback(lambda _f: self._on_channel_closed(epoch))
        loop = asyncio.get_running_loop()
        # hear the others before lining up for devices: they answer a hello at once
        self._line_up_at = loop.time() + min(0.5, self.s.lease_heartbeat_s)
        await self._announce(hello=True)
        self._wake.set()

    def _on_channel_closed(self, epoch: int) -> None:
        if epoch != self.epoch or self._stopping:
            return
        self.channels_lost += 1
        log.warning("lease channel closed: every lease held here is void; lining up again")
        self._lost(epoch)
        conn = self._conn
        if conn is not None and not conn.is_closed:  # only the channel: open another one
            self._spawn(self._reopen(conn, epoch))

    async def _reopen(self, conn: AbstractConnection, epoch: int) -> None:
        n = 0
        while not self._stopping and self.epoch == epoch and not conn.is_closed:
            try:
                await self._open_channel(conn)
                return
            except Exception as e:
                n += 1
                log.debug("lease channel not reopened: %s", e)
                await asyncio.sleep(backoff.channel_reopen(n))

    def _lost(self, epoch: int) -> None:
        """The lease channel of ``epoch`` is gone: the broker requeued its tokens."""
        if self._ch is not None and epoch == self.epoch:
            self._ch = None
        for lease in self.leases.values():
            self._carry_out_now(lease, lease.channel_lost(epoch), "lease-lost")

    def _usable(self) -> aiormq.abc.AbstractChannel | None:
        ch = self._ch
        return None if ch is None or ch.is_closed else ch

    async def _announce(self, hello: bool = False, bye: bool = False) -> None:
        ch = self._usable()
        if ch is None:
            return
        dynamic = sorted(self.dynamic)
        held = self.tokens
        held_map, held_other = self.orphans.announce(held)
        body = PRESENCE_ENCODER.encode(Presence(
            instance=self.s.instance_id, held=len(held), dynamic=dynamic, hello=hello, bye=bye,
            cfg=self.orphans.cfg, held_map=held_map, held_other=held_other, bounced=self.plan.bounced(held)))
        ttl = str(int(self.s.lease_heartbeat_s * 3000))
        await ch.basic_publish(body, exchange=t.presence_exchange(self.s), properties=Basic.Properties(
            content_type="application/json", expiration=ttl, message_type="presence"))

    async def _on_presence(self, msg: aiormq.abc.DeliveredMessage) -> None:
        props = msg.header.properties
        if props.message_type == LEASE_QUERY:
            if props.reply_to:
                self._spawn(self._answer(props.reply_to, props.correlation_id))
            return
        try:
            p = PRESENCE_DECODER.decode(msg.body)
        except msgspec.DecodeError as e:
            log.warning("bad presence message ignored: %s", e)
            return
        self.dynamic.update(p.dynamic)
        if self.members.heard(p, asyncio.get_running_loop().time()):
            log.info("replicas: %s", ", ".join(self.members.live))
            self._wake.set()
        for hw in self.plan.rejoin(p):
            self._rejoin(hw, p.instance)
        if p.hello and p.instance != self.s.instance_id:
            self._spawn(self._announce())

    async def _answer(self, reply_to: str, cid: str | None) -> None:
        """An operator's `leases list` asked every replica: answer with this one's view."""
        ch = self._usable()
        if ch is None:
            return
        await ch.basic_publish(msgspec.json.encode(self.view()), routing_key=reply_to, properties=Basic.Properties(
            content_type="application/json", correlation_id=cid, message_type="lease.view"))

    def view(self) -> dict:
        """What this replica knows of each device's lease (``/leases``, `leases list`)."""
        rows = []
        for hw in sorted(self.devices()):
            lease = self.leases.get(hw)
            row: dict = {"hw": hw, "state": lease.state.value if lease else State.OUT.value,
                         "configured": hw in self.configured}
            if lease is not None and lease.token is not None:
                tok = lease.token
                row.update(wanted="attached" if lease.wanted() else "detached", gen=tok.gen,
                           since=_iso(tok.since), by=tok.by, cfg=tok.cfg, runner=lease.runner)
            rows.append(row)
        return {"instance": self.s.instance_id, "cfg": self.cfg, "replicas": list(self.members.live),
                "devices": rows}

    async def _heartbeat(self) -> None:
        """On a task of its own: a long lease round must not make the others think us gone."""
        while not self._stopping:
            await asyncio.sleep(self.s.lease_heartbeat_s)
            try:
                await self._announce()
            except Exception as e:  # the channel is down: the link reconnects
                log.debug("presence heartbeat not sent: %s", e)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._spawned_done)
        return task

    def _spawned_done(self, task: asyncio.Task) -> None:
        """A background step ended: an error is said (a channel closing under a cancel, say: the
        next round or the new channel redoes it), never left for the garbage collector to report."""
        self._bg.discard(task)
        if not task.cancelled() and (e := task.exception()) is not None:
            log.debug("lease step ended early: %r", e)

    # ------------------------------------------------------------------ actions, carried out
    def _carry_out_now(self, lease: Lease, actions: list[Action], reason: str) -> None:
        """Actions from a synchronous context (a channel's close): runner starts and stops at
        once, the rest on a task."""
        rest: list[Action] = []
        for a in actions:
            if isinstance(a, StopRunner):
                self._stop_runner(a, reason)
            elif isinstance(a, StartRunner):
                self._start_runner(a)
            else:
                rest.append(a)
        if rest:
            self._spawn(self._do(lease, rest, reason))

    async def _do(self, lease: Lease, actions: list[Action], reason: str = "lease-moved") -> None:
        for a in actions:
            if isinstance(a, StopRunner):
                self._stop_runner(a, reason)
            elif isinstance(a, StartRunner):
                self._start_runner(a)
            elif isinstance(a, (Ack, Nack)):
                ch = self._usable()
                if ch is None or a.epoch != self.epoch:
                    continue  # that channel is gone, and the tag with it
                if isinstance(a, Ack):
                    await ch.basic_ack(a.dtag)
                else:
                    await ch.basic_nack(a.dtag, requeue=True)
            elif isinstance(a, Publish):
                try:
                    await self._publish_token(Token(
                        hw=a.hw, attach=a.attach, gen=a.gen, cfg=a.cfg,
                        since=time.time() if a.since is None else a.since,
                        by=self.s.instance_id if a.by is None else a.by, intercept=self._rules_of(a.hw)))
                except Exception:
                    lease.pending = None
                    raise
            elif isinstance(a, Wanted):
                self._say(a)
            elif isinstance(a, Consume):
                await self._consume(lease, a)
            elif isinstance(a, Cancel):
                await self._cancel(lease, a)
            else:  # Process and Defer are the delivery's to handle
                raise AssertionError(f"unexpected action {a}")

    def _say(self, a: Wanted) -> None:
        when = _iso(a.since) or "an unknown time"
        if a.reason == "wanted-detached":
            log.warning("device %s: not attached: wanted detached since %s (by %s, under this "
                        "configuration); `send attach %s` or `leases reset %s` attaches it",
                        a.hw, when, a.by or "?", a.hw, a.hw)
            self.owner.not_attached(a.hw, a.reason)
        else:
            log.warning("device %s: a detach of %s (by %s) was made under another configuration "
                        "(%s, now %s): void, attaching as configured", a.hw, when, a.by or "?",
                        a.cfg or "none", self.cfg)

    def _start_runner(self, a: StartRunner) -> None:
        hw = a.hw
        pending = self._stopping_runner.get(hw)
        if not a.takeover and pending is None:
            self.owner.acquired(hw)
            return
        self._starting.add(hw)

        async def start() -> None:
            try:
                if pending is not None:
                    await asyncio.shield(pending)
                if a.takeover:  # for the PBX to notice the old holder's session is gone
                    await asyncio.sleep(TAKEOVER_PAUSE_S)
            finally:
                self._starting.discard(hw)
            if self.runs(hw):  # still wanted (the lease may have moved on meanwhile)
                self.owner.acquired(hw)
        self._spawn(start())

    def _stop_runner(self, a: StopRunner, reason: str) -> None:
        hw = a.hw
        previous = self._stopping_runner.get(hw)

        async def stop() -> None:
            try:
                if previous is not None:
                    await asyncio.shield(previous)
                await self.owner.released(hw, reason)
                if reason == "lease-moved":
                    await asyncio.sleep(TAKEOVER_PAUSE_S)  # for the PBX to see the session end
            finally:
                if self._stopping_runner.get(hw) is task:
                    del self._stopping_runner[hw]
            lease = self.leases.get(hw)
            if lease is not None:
                await self._do(lease, lease.runner_stopped(a.seq), reason)
        task = self._spawn(stop())
        self._stopping_runner[hw] = task

    async def _consume(self, lease: Lease, a: Consume) -> None:
        ch = self._usable()
        if ch is None or a.epoch != self.epoch:
            return  # the channel went: channel_lost has put the lease OUT already
        hw = a.hw
        self._by_ctag[a.ctag] = hw
        try:
            if hw not in self._declared:
                count = await self._declare(hw)
                if count.ready == 0 and count.consumers == 0:
                    # nothing ready and nobody consuming: nobody can hold a token (a holder is
                    # always a consumer, its token unacked); a race of two declares makes two
                    # tokens, which meet at the active consumer (the older is acked)
                    await self._publish_token(Token(hw=hw, cfg=self.cfg, since=time.time(),
                                                    by=self.s.instance_id, intercept=self._rules_of(hw)))
        except Exception as e:
            # not in line (a node dying: the declare or the first token timed out or was
            # refused): OUT, declared anew (a token that landed all the same shows as ready),
            # and the next round lines up again; this round goes on with the other devices
            self._by_ctag.pop(a.ctag, None)
            self._declared.discard(hw)
            await self._do(lease, lease.consume_failed(a.epoch, a.ctag))
            quiet = isinstance(e, ConnectionError) or hw in self._not_lined_up  # the link says it / said
            self._not_lined_up.add(hw)
            log.log(logging.DEBUG if quiet else logging.WARNING,
                    "device %s: not lined up for (%s); tried again next round", hw, e or type(e).__name__)
            return
        if a.epoch != self.epoch or not (lease.state is State.IN_LINE and lease.ctag == a.ctag):
            # given up meanwhile (a rejoin's release, a lost channel): a consumer made now would
            # be one the lease does not know, a stray that takes the token and gives it back
            self._by_ctag.pop(a.ctag, None)
            return
        self._not_lined_up.discard(hw)
        await ch.basic_consume(t.lease_queue(self.s, hw), self._on_deliver, consumer_tag=a.ctag)

    async def _declare(self, hw: str) -> QueueCount:
        """Declare ``hw``'s lease queue and bind it (on the declare channel).
        A queue made with other arguments (by an older bridge, or another queue type) is used
        as it is, with a warning: it works, but without this version's lifetimes."""
        for attempt in (1, 2):
            ch = await self._decl_channel()
            try:
                if hw in self._mismatch or attempt == 2:
                    ok = await ch.queue_declare(t.lease_queue(self.s, hw), passive=True)
                    await ch.queue_bind(t.lease_queue(self.s, hw), self.s.commands_exchange, t.lease_key(hw))
                    count = _counts(ok)
                else:
                    count = QueueCount(*await t.declare_lease_queue(ch, self.s, hw))
                self._declared.add(hw)
                return count
            except (aiormq.exceptions.ChannelPreconditionFailed, t.QueueMismatch) as e:
                if hw not in self._mismatch:
                    self._mismatch.add(hw)
                    log.warning("device %s: lease queue %s exists with other arguments (%s); used as "
                                "it is, without this version's expiry or queue type: delete it when "
                                "the device is idle (`leases reset %s`) and the bridge makes it anew",
                                hw, t.lease_queue(self.s, hw), e, hw)
        raise AssertionError("unreachable")

    async def _decl_channel(self) -> aiormq.abc.AbstractChannel:
        """The channel lease queues are declared and looked at on (opened again if it closed)."""
        conn = self._conn
        if conn is None:
            raise ConnectionError("no broker connection")
        ch = self._decl
        if ch is None or ch.is_closed:
            ch = self._decl = await (await conn.channel(publisher_confirms=False)).get_underlay_channel()
        return ch

    async def _cancel(self, lease: Lease, a: Cancel) -> None:
        ch = self._usable()
        if ch is None or a.epoch != self.epoch:
            return
        await ch.basic_cancel(a.ctag)
        acts = lease.cancel_ok(a.epoch, a.ctag)
        if acts:
            self.handed_on += 1
            log.info("device %s: lease handed on (to %s)", a.hw, self.plan.preferred(a.hw))
        await self._do(lease, acts)

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

    # ------------------------------------------------------------------ the plan, carried out
    async def _loop(self) -> None:
        while not self._stopping:
            try:
                async with asyncio.timeout(self.s.lease_heartbeat_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._reconcile()
                self.problem = None
            except t.QueueMismatch as e:  # said once; the round is tried again (a fix takes effect)
                if str(e) != self.problem:
                    log.error("%s", e)
                self.problem = str(e)
            except (aiormq.exceptions.AMQPError, ConnectionError, RuntimeError) as e:
                log.debug("lease round interrupted: %s", e)  # the channel comes back; redone then
            except Exception:
                log.exception("lease round failed")

    async def _reconcile(self) -> None:
        """One lease round. It only starts things (line up, step out, hand on, renew): no wait
        for a runner or a hand-on, so a slow PBX never holds the round up."""
        now = asyncio.get_running_loop().time()
        self._forget_silent_members(now)
        self._stop_runners_without_lease()
        ch = self._usable()
        if ch is None:
            return
        rnd = self._new_round(now)
        for hw in sorted(self.devices()):
            if self.epoch != rnd.epoch:
                return  # the channel went: the next one's round starts over
            lease = self._lease(hw)
            ranking = self.plan.ranking(hw)
            if lease.state is not State.IN_LINE:
                self.orphans.watch(hw)
            if lease.state is State.OUT:
                await self._line_up_if_ranked(hw, lease, ranking, rnd)
            elif lease.state is State.IN_LINE:
                await self._stand_in_line(hw, lease, ranking, rnd)
            elif lease.state is State.HOLDING:
                await self._keep_or_hand_on(ch, hw, lease, rnd)

    def _forget_silent_members(self, now: float) -> None:
        """Replicas not heard for a while are no longer members (the ranking changes)."""
        if self.members.expire(now):
            log.info("replicas: %s", ", ".join(self.members.live))

    def _stop_runners_without_lease(self) -> None:
        """The safety net of the invariant: a runner the state machine does not allow is stopped."""
        for hw in self.owner.running():
            if not self.runs(hw) and hw not in self._stopping_runner and hw not in self._starting:
                log.warning("device %s: runner without its lease; detaching", hw)
                self._spawn(self.owner.released(hw, "lease-lost"))

    def _new_round(self, now: float) -> _Round:
        # first in line where preferred; stand-in only once the member set is stable (so that at
        # a start the preferred replicas line up first); out of line at once where neither
        lined_up = now >= self._line_up_at
        moving = sum(1 for lease in self.leases.values() if lease.state in (State.RELEASING, State.LEAVING))
        return _Round(epoch=self.epoch, now=now, lined_up=lined_up,
                      stable=lined_up and self.plan.settled(now), moving=moving)

    async def _line_up_if_ranked(self, hw: str, lease: Lease, ranking: list[str], rnd: _Round) -> None:
        """OUT: line up where this replica is preferred, or as stand-in once the members settled."""
        me = self.members.me
        if (rnd.lined_up and ranking[0] == me) or (rnd.stable and me in ranking):
            await self._do(lease, lease.line_up(rnd.epoch, self._new_ctag(hw)))

    async def _stand_in_line(self, hw: str, lease: Lease, ranking: list[str], rnd: _Round) -> None:
        """IN_LINE: step out where this replica is ranked no more; look at an orphan's queue."""
        me = self.members.me
        if me not in ranking:
            await self._do(lease, lease.release())
        elif self.orphans.orphaned(hw, ranking[0] == me, rnd.now) and rnd.repairs < self.s.attach_concurrency:
            rnd.repairs += 1  # a few queues looked at a round
            await self._repair(hw, lease, rnd.epoch, rnd.now)

    async def _keep_or_hand_on(self, ch: aiormq.abc.AbstractChannel, hw: str, lease: Lease,
                               rnd: _Round) -> None:
        """HOLDING: run the device; hand it on if another replica is preferred and it is idle
        (a few at a time), else renew its token once it is ``RENEW_S`` old."""
        if lease.runner and hw not in self._starting and hw not in self._stopping_runner:
            self.owner.acquired(hw)  # a runner that ended (attach refused) is tried again
        if (rnd.moving < self.s.attach_concurrency and rnd.checked < self.s.attach_concurrency
                and self.plan.hand_on(hw, self.owner.idle(hw), rnd.now)):
            rnd.checked += 1
            await self._hand_on(ch, hw, lease, rnd)
        elif lease.token is not None and rnd.now - lease.token.at > RENEW_S:
            await self._do(lease, lease.renew())

    async def _hand_on(self, ch: aiormq.abc.AbstractChannel, hw: str, lease: Lease, rnd: _Round) -> None:
        """Give the lease up for the preferred replica, but only to a replica in line: a second
        consumer on the queue (a replica just SIGKILLed may still be "heard lately", but its
        consumers are gone at once)."""
        if (await self._successor_in_line(ch, hw, lease, rnd.now) and lease.holding
                and self.owner.idle(hw) and self.epoch == rnd.epoch):
            rnd.moving += 1  # a few at a time: a misjudged member set moves little
            self.plan.handed_on(hw, rnd.now)
            await self._do(lease, lease.release(), "lease-moved")

    async def _repair(self, hw: str, lease: Lease, epoch: int, now: float) -> None:
        """``hw`` is an orphan (bridge.leases.Orphans): in line here, and no replica has said it
        holds it for a while. If its lease queue has messages ready (the token) and no active
        consumer (a declare-ok counts a quorum queue's active consumer only, never the ones
        waiting in line), step out of line and line up again: a consumer added to a
        single-active-consumer queue without an active one is made active. RabbitMQ 3.10.8 leaves
        a quorum queue so after its consumers' node died, the token ready and every replica
        waiting (docs/SCALING.md). Nothing ready and no consumer is no such queue: what 3.10.8
        answers for a quorum queue whose leader is slow to answer (an election)."""
        self.orphans.watch(hw, now)  # looked at: again only after another ORPHAN_BEATS
        try:
            ch = await self._decl_channel()
            count = _counts(await ch.queue_declare(t.lease_queue(self.s, hw), passive=True))
        except aiormq.exceptions.AMQPError as e:  # gone (the consumer is cancelled) or no leader now
            log.debug("device %s: lease queue not looked at: %s", hw, e)
            return
        if not count.ready or count.consumers or lease.state is not State.IN_LINE or self.epoch != epoch:
            return
        self.repaired += 1
        log.warning("device %s: its lease queue has no active consumer (%d ready) and no replica has "
                    "said it holds the device for %d heartbeats: lining up again (a RabbitMQ quorum "
                    "queue left without its single active consumer, docs/SCALING.md)",
                    hw, count.ready, ORPHAN_BEATS)
        await self._do(lease, lease.release())
        self._wake.set()  # line up again at once

    def _rejoin(self, hw: str, holder: str) -> None:
        """``holder`` handed ``hw`` on to this replica, the preferred one, and the token came
        straight back to it (LeasePlan.rejoin): this replica's consumer is not in line on the
        lease queue although the lease says IN_LINE (a quorum queue's consumer lost with a node:
        RabbitMQ 3.10.8, docs/SCALING.md). Step out and line up again: the holder's next hand-on,
        after its pause, finds the new consumer in line."""
        lease = self.leases.get(hw)
        if lease is None or lease.state is not State.IN_LINE:
            return  # not lined up (the round does), or no longer waiting
        self.repaired += 1
        log.warning("device %s: %s handed its lease on to this replica and it came straight back: this "
                    "replica is not in line on its lease queue; lining up again (docs/SCALING.md)", hw, holder)
        self._carry_out_now(lease, lease.release(), "lease-lost")
        self._wake.set()

    async def _successor_in_line(self, ch: aiormq.abc.AbstractChannel, hw: str, lease: Lease,
                                 now: float) -> bool:
        """A hand-on goes only to a replica standing in line: a replica SIGKILLed a moment ago
        may still count as heard lately, but its consumers are gone at once. A classic queue
        counts the consumers in line (a passive declare shows a second one); a quorum queue
        counts only its active consumer, so there a token held for less than
        ``HAND_ON_HELD_BEATS`` heartbeats (just taken over from a replica that died, which by
        then is no longer heard lately) is not handed on, and a preferred replica not in line
        shows only when the token comes straight back (_on_token, LeasePlan.holding)."""
        if self.s.queue_type == "classic":
            ok = await ch.queue_declare(t.lease_queue(self.s, hw), passive=True)
            return _counts(ok).consumers >= 2
        return lease.token is not None and now - lease.token.at >= HAND_ON_HELD_BEATS * self.s.lease_heartbeat_s


    # ------------------------------------------------------------------ deliveries
    async def _on_deliver(self, msg: aiormq.abc.DeliveredMessage) -> None:
        """A delivery from a lease queue: the token, or a command behind it."""
        ctag = msg.consumer_tag or ""
        hw = self._by_ctag.get(ctag)
        ch = msg.channel
        dtag = msg.delivery_tag
        assert dtag is not None  # a consumer's delivery (basic.deliver) always has one
        if self._stopping:  # left unacked: closing the channel requeues it for the next holder
            return
        if hw is None or ch is not self._ch:  # an old channel's or consumer's: not ours any more
            if ch is self._ch and not ch.is_closed:
                await ch.basic_nack(dtag, requeue=True)
            return
        lease = self._lease(hw)
        if lease.ctag != ctag:
            # a consumer the lease does not know (given up, its delivery late; or a stray): the
            # single active consumer would get the message back at once, so stop it first
            with contextlib.suppress(aiormq.exceptions.AMQPError):
                await ch.basic_cancel(ctag)
            if not ch.is_closed:
                await ch.basic_nack(dtag, requeue=True)
            return
        if msg.header.properties.message_type == t.LEASE_TOKEN:
            await self._on_token(msg, ch, hw, lease, ctag, dtag)
        else:
            await self._on_lease_command(msg, hw, lease, ctag, dtag)

    async def _on_token(self, msg: aiormq.abc.DeliveredMessage, ch: aiormq.abc.AbstractChannel, hw: str,
                        lease: Lease, ctag: str, dtag: int) -> None:
        """The token came: the lease is held here now (or it was an older copy, acked)."""
        try:
            token = TOKEN_DECODER.decode(msg.body)
        except msgspec.DecodeError as e:
            log.warning("device %s: bad lease token dropped: %s", hw, e)
            await ch.basic_ack(dtag)
            return
        deliver = msg.delivery
        assert isinstance(deliver, Basic.Deliver)
        acts = lease.token_delivered(self.epoch, ctag, dtag, token.gen, token.attach,
                                     bool(deliver.redelivered), asyncio.get_running_loop().time(),
                                     token.cfg, token.since, token.by)
        await self._do(lease, acts, "command")
        if lease.holding:
            now = asyncio.get_running_loop().time()
            if bounces := self.plan.holding(hw, now):
                # once is INFO (a replica still lining up after a start looks the same); again in a
                # row, after it was told to line up again, a WARNING
                log.log(logging.INFO if bounces == 1 else logging.WARNING,
                        "device %s: handed on, and its lease came straight back: %s, the replica preferred "
                        "for it, is not in line for it (still lining up, or its consumer is gone: this "
                        "replica's heartbeat tells it to line up again); tried again in %.0fs (%d in a row)",
                        hw, self.plan.preferred(hw), self.plan.backoff_s(hw, now), bounces)
            self._take_rules(lease, token)
            ev = self._token_arrived.pop(hw, None)
            if ev is not None:
                ev.set()
            if _returns(msg) >= RENEW_RETURNS:  # before a delivery limit can take it
                await self._do(lease, lease.renew())

    async def _on_lease_command(self, msg: aiormq.abc.DeliveredMessage, hw: str, lease: Lease, ctag: str,
                                dtag: int) -> None:
        """A command behind the token: carried out if the lease is held here; before the token,
        it waits for it a while (once)."""
        epoch = self.epoch
        for retry in (False, True):
            acts = lease.command(epoch, ctag, dtag, retry=retry)
            if isinstance(acts[0], Defer):
                # the token is on its way (a hand-on requeues it after commands that came straight
                # here): wait for it; no new token is made here (only the declare mints one)
                ev = self._token_arrived.setdefault(hw, asyncio.Event())
                try:
                    async with asyncio.timeout(TOKEN_WAIT_S):
                        await ev.wait()
                except TimeoutError:
                    pass
                continue
            if isinstance(acts[0], Process):
                await self._on_command(aio_pika.IncomingMessage(msg, no_ack=False))
            else:
                await self._do(lease, acts)
            return

    async def _on_cancel(self, frame: Basic.Cancel) -> None:
        """The broker cancelled a consumer: its queue was deleted. Declare it again next round."""
        ctag = frame.consumer_tag or ""
        hw = self._by_ctag.pop(ctag, None)
        if hw is None:
            return
        self._declared.discard(hw)
        self.dynamic.discard(hw)
        lease = self._lease(hw)
        await self._do(lease, lease.broker_cancel(self.epoch, ctag), "lease-lost")
        self._wake.set()

    # ------------------------------------------------------------------ for the bridge
    async def want(self, hw: str, *, attach: bool) -> bool:
        """An attach or detach command for a device held here: start or stop its runner (a stop
        is waited for), and replace the token with one of the next generation saying so. False
        if the lease is not held here (it moved while the command waited)."""
        lease = self.leases.get(hw)
        if lease is None or not lease.holding:
            return False
        acts = lease.want(attach)
        stops = [a for a in acts if isinstance(a, StopRunner)]
        await self._do(lease, [a for a in acts if not isinstance(a, StopRunner)], "command")
        for a in stops:
            self._stop_runner(a, "command")
            task = self._stopping_runner.get(hw)
            if task is not None:
                await asyncio.shield(task)
        return True

    def _rules_of(self, hw: str) -> list[Any]:
        return list(self.rules.command.get(hw, ())) if self.rules is not None else []

    def _take_rules(self, lease: Lease, token: Token) -> None:
        """The token held now says the device's intercept rules, unless a newer token of this
        replica's (which says what it has now) is on its way."""
        if (self.rules is None or lease.pending is not None or lease.token is None
                or lease.token.gen != token.gen):
            return
        rules: list[Rule] = []
        if token.intercept:
            try:
                rules = msgspec.convert(token.intercept, list[Rule])
            except msgspec.ValidationError as e:
                log.warning("device %s: the lease token's intercept rules are not readable (%s); "
                            "none set by command", lease.hw, e)
        self.rules.set_command(lease.hw, rules)

    async def republish(self, hw: str) -> bool:
        """``hw``'s intercept rules changed here: replace its token by one saying so. False if
        the lease is not held here."""
        lease = self.leases.get(hw)
        if lease is None or not lease.holding:
            return False
        await self._do(lease, lease.republish(), "command")
        return True

    async def adopt(self, hw: str) -> str:
        """A command for a device without a lease queue (not configured, or its queue is gone):
        make the queue (with a token), line up for it; the queue to move the command to. Raises
        when the queue cannot be made (no lease channel, the declare refused): the command is
        refused then, and the device is not adopted (moved to a queue that does not exist, the
        command would come back through the alternate exchange, again and again)."""
        ch = self._usable()
        if ch is None:
            raise ConnectionError("no lease channel")
        new = hw not in self.devices()
        if hw not in self.configured:
            self.dynamic.add(hw)
        lease = self._lease(hw)
        try:
            # declared (and bound) again even if declared before: the command came here because
            # no binding took it (a bridge with leases off retired the queue, or it expired)
            self._declared.discard(hw)
            if lease.state is State.OUT:
                await self._do(lease, lease.line_up(self.epoch, self._new_ctag(hw)))
            if hw not in self._declared:  # (a line-up that failed says so quietly: OUT again)
                await self._declare(hw)
        except BaseException:
            if new and lease.state is State.OUT:  # forgotten: no round lines up for it again
                self.dynamic.discard(hw)
                self.leases.pop(hw, None)
            raise
        return t.lease_queue(self.s, hw)

    def pause(self) -> None:
        """Graceful stop, first step: commands that arrive now wait, unacknowledged, for the
        channel to close (they go to the next holder then)."""
        self._stopping = True

    async def stop(self) -> None:
        """Graceful stop, after the runners were stopped: say goodbye, close the channel (the
        broker hands every token to the next in line)."""
        self._stopping = True
        tasks = [t_ for t_ in (self._task, self._beat) if t_ is not None]
        for t_ in tasks:
            t_.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._announce(bye=True)
        except Exception:
            pass
        for ch in (self._usable(), self._decl):
            if ch is not None and not ch.is_closed:
                with contextlib.suppress(Exception):
                    await ch.close()
        self._ch = self._decl = None
        for task in list(self._bg):
            task.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)


# ====================================================================== leases off: retire the queues
#: with leases off, lease queues a replica with leases on still consumes (a rolling change) are
#: looked at again this often, until none is left
RETIRE_EVERY_S = 10.0


class LeaseRetirer:
    """With leases off (EPSIGNAL_LEASES=false) the shared commands queue takes every command
    (bound with ``#``), but a lease queue left from a time with leases on would still be bound and
    take a copy nobody consumes, for a holder to carry out, stale, when leases are turned on again
    (issue 20). So, for each configured device whose lease queue exists and has **no consumer**:
    unbind it (no more copies), refuse what waits in it (answered, dead-lettered with the reason:
    never carried out, it may be stale or a copy of one this bridge took), drop the token (with
    leases off no wanted state is kept) and delete the queue. A queue with a consumer belongs to
    a replica still running with leases on (a rolling change): it is left to it and looked at
    again every RETIRE_EVERY_S until it is gone. Queues of devices not configured here expire by
    themselves (x-expires). Nothing is done on a broker where leases were never used (no
    presence exchange)."""

    def __init__(self, link: BrokerLink, devices: list[str],
                 refuse: Callable[[AbstractIncomingMessage, str], Awaitable[None]]) -> None:
        self.link = link
        self.s = link.s
        self.pending = set(devices)
        self._refuse = refuse
        self._task: asyncio.Task | None = None
        self._left: set[str] = set()  # in use by a replica with leases on (said once)
        self._stopped = False
        self.retired = 0
        self.refused = 0
        link.on_ready(self._start)

    async def _start(self, conn: AbstractConnection, topo: t.Topology) -> None:
        old, self._task = self._task, None
        if old is not None:  # a pass on the previous connection: ended before this one begins
            old.cancel()
            await asyncio.gather(old, return_exceptions=True)
        if self.pending and not self._stopped:
            self._task = asyncio.create_task(self._run(conn), name="lease retirer")

    async def _run(self, conn: AbstractConnection) -> None:
        """One pass, on a channel of its own (a passive declare of a missing queue closes it:
        opened again, never shared with a pass that may be ending)."""
        ch = None
        try:
            ch = await conn.channel()
            try:
                await ch.declare_exchange(t.presence_exchange(self.s), passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                self.pending.clear()  # leases never ran against this broker and vhost
                return
            while self.pending and not conn.is_closed:
                for hw in sorted(self.pending):
                    if ch.is_closed:
                        ch = await conn.channel()
                    if await self._retire(ch, hw):
                        self.pending.discard(hw)
                if self.pending:
                    await asyncio.sleep(RETIRE_EVERY_S)
        except Exception as e:  # AMQP errors, a lost connection; aiormq fails what was pending on
            # a connection closed without a reason with a bare Exception(): none may end the task
            log.debug("retiring lease queues interrupted (%r); again at the next connection", e)
        finally:
            if ch is not None and not ch.is_closed:
                with contextlib.suppress(Exception):
                    await ch.close()

    async def _retire(self, ch: aio_pika.abc.AbstractChannel, hw: str) -> bool:
        """True when ``hw`` has no lease queue any more."""
        name = t.lease_queue(self.s, hw)
        try:
            q = await ch.declare_queue(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return True
        if q.declaration_result.consumer_count:
            if hw not in self._left:
                self._left.add(hw)
                log.info("device %s: its lease queue is consumed by a replica with leases on; "
                         "left to it (looked at again every %gs)", hw, RETIRE_EVERY_S)
            return False
        await q.unbind(self.s.commands_exchange, t.lease_key(hw))
        async for msg in t.take_waiting(q, _counts(q.declaration_result).ready):
            if msg.type == t.LEASE_TOKEN:
                await msg.ack()
                continue
            self.refused += 1
            await self._refuse(msg, f"leases are off (EPSIGNAL_LEASES=false): the command waited in "
                                    f"the lease queue of {hw} and was not carried out; send it again")
        # no if-unused (quorum queues refuse it): a replica lining up in this instant has its
        # consumer cancelled by the broker and declares the queue again (broker_cancel)
        await q.delete(if_unused=False, if_empty=False)
        self.retired += 1
        log.info("device %s: lease queue %s removed (leases are off)", hw, name)
        return True

    async def stop(self) -> None:
        self._stopped = True  # a connection restored while stopping starts no new pass
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def _returns(msg: aiormq.abc.DeliveredMessage) -> int:
    """How often the broker says this message was given back (quorum queues; 0 elsewhere)."""
    headers = msg.header.properties.headers or {}
    count = headers.get("x-delivery-count", 0)
    return count if isinstance(count, int) else 0
