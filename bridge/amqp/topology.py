"""The AMQP topology of the bridge, in one place.

::

    epsignal.events    topic, durable   events; keys in bridge.routing
    epsignal.commands  topic, durable   commands: device.<hw>.<verb>; keys in bridge.routing
                       alternate-exchange = epsignal.commands.unrouted
      -> epsignal.commands.bridge  durable queue, x-dead-letter-exchange = epsignal.dead; bound
                                   with "#" (every command is taken, so a command with a bad key
                                   is dead-lettered, not lost); with leases, bound to the
                                   alternate exchange instead: it takes what no lease queue takes
      -> epsignal.commands.bridge.<hw>   with leases (EPSIGNAL_LEASES), one per device: durable,
                                   x-single-active-consumer, bound with device.<hw>.*; holds the
                                   device's lease token and its commands (docs/SCALING.md);
                                   x-message-ttl: a command waits at most LEASE_COMMAND_TTL_S
                                   for a holder, then is dead-lettered (x-death reason expired);
                                   x-expires: gone LEASE_QUEUE_EXPIRES_S after its last consumer
    epsignal.commands.unrouted  fanout, durable   commands no binding matched
    epsignal.commands.presence  fanout, durable   with leases: the replicas' heartbeats, each
                                   replica reads them on an exclusive queue of its own
    epsignal.dead      topic, durable   dead-lettered commands, header x-epsignal-error
      -> epsignal.commands.dead    durable queue, bound with "#"

Names are settings (``EPSIGNAL_*_EXCHANGE`` / ``_QUEUE``; their defaults shown, from
bridge.config); the unrouted and presence exchanges and the lease queues are named after them.
Every durable queue the bridge owns (commands, dead letters, lease queues) is of the type
``EPSIGNAL_QUEUE_TYPE`` (quorum by default: replicated over a cluster's nodes), its arguments made
by :func:`queue_arguments` alone. The presence queues stay classic, exclusive and auto-delete (a
replica's own, gone with its connection; a quorum queue cannot be exclusive). A queue that exists
with other arguments (a classic queue from before, now quorum wanted) is refused by the broker
(PRECONDITION_FAILED): :class:`QueueMismatch` says which queue, what it is, what is wanted and
what to do. Declaring is idempotent and runs on every (re)connect, so a deleted queue or a
restarted broker gets the topology back. Declare the commands exchange only through
:func:`declare_commands_exchange` (its arguments must match).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
import aiormq.abc
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from bridge.config import Settings
from bridge.routing import commands_of, word

TOPIC = aio_pika.ExchangeType.TOPIC
FANOUT = aio_pika.ExchangeType.FANOUT
#: the message type of a lease token (in a lease queue, among the device's commands)
LEASE_TOKEN = "lease"


def unrouted_exchange(s: Settings) -> str:
    return f"{s.commands_exchange}.unrouted"


def presence_exchange(s: Settings) -> str:
    return f"{s.commands_exchange}.presence"


def lease_queue(s: Settings, hw: str) -> str:
    return f"{s.commands_queue}.{word(hw)}"


def lease_key(hw: str) -> str:
    return commands_of(hw)


class QueueMismatch(ConnectionError):
    """A queue exists with arguments other than the bridge's (RabbitMQ: PRECONDITION_FAILED,
    inequivalent arg). The bridge keeps retrying, so a fix (the queue deleted, the setting
    changed and the bridge restarted) takes effect by itself."""

    def __init__(self, queue: str, arg: str, current: str, wanted: str) -> None:
        self.queue, self.arg, self.current, self.wanted = queue, arg, current, wanted
        if arg == "x-queue-type":
            todo = (f"set EPSIGNAL_QUEUE_TYPE={current} to keep it, or migrate: stop the bridges, "
                    f"let the queue drain, delete it (rabbitmqctl delete_queue {queue}) and start "
                    "them again (docs/SCALING.md: changing the type of existing queues)")
            what = f"is a {current} queue, EPSIGNAL_QUEUE_TYPE wants {wanted}"
        else:
            todo = "delete the queue (after draining it) for the bridge to declare it again"
            what = f"has {arg} {current}, the bridge declares {wanted}"
        super().__init__(f"queue {queue!r} {what}: {todo}")


_INEQUIVALENT = re.compile(r"inequivalent arg '([^']+)' for queue '([^']*)'.*: received (.*) but current is (.*)$")


def _value(text: str) -> str:
    """``the value 'quorum' of type 'longstr'`` / ``'classic'`` / ``none`` -> quorum / classic / none."""
    m = re.search(r"'([^']*)'", text)
    return m.group(1) if m else text.strip().strip('"')


def mismatch(exc: BaseException) -> QueueMismatch | None:
    """The :class:`QueueMismatch` a PRECONDITION_FAILED of a queue declare means, else None."""
    if not isinstance(exc, aiormq.exceptions.ChannelPreconditionFailed):
        return None
    m = _INEQUIVALENT.search(str(exc).rstrip('"'))
    if m is None:
        return None
    arg, queue, received, current = m.groups()
    current, wanted = _value(current), _value(received)
    if arg == "x-queue-type" and current == "none":
        current = "classic"  # declared without the argument: RabbitMQ's default type
    return QueueMismatch(queue, arg, current, wanted)


def queue_arguments(s: Settings, **extra) -> dict:
    """The arguments of every durable queue the bridge owns: its type, and ``extra``."""
    return {"x-queue-type": s.queue_type, **extra}


async def _declare(ch: AbstractChannel, name: str, arguments: dict) -> AbstractQueue:
    try:
        return await ch.declare_queue(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed as e:
        raise (mismatch(e) or e) from None


@dataclass
class Topology:
    events: AbstractExchange
    commands: AbstractExchange
    dead: AbstractExchange
    commands_queue: AbstractQueue | None = None


async def declare_commands_exchange(ch: AbstractChannel, s: Settings) -> AbstractExchange:
    await ch.declare_exchange(unrouted_exchange(s), FANOUT, durable=True)
    return await ch.declare_exchange(s.commands_exchange, TOPIC, durable=True,
                                     arguments={"alternate-exchange": unrouted_exchange(s)})


async def declare_exchanges(ch: AbstractChannel, s: Settings) -> Topology:
    events = await ch.declare_exchange(s.events_exchange, TOPIC, durable=True)
    commands = await declare_commands_exchange(ch, s)
    dead = await ch.declare_exchange(s.dead_exchange, TOPIC, durable=True)
    await declare_dead_queue(ch, s, dead)
    return Topology(events=events, commands=commands, dead=dead)


async def declare_dead_queue(ch: AbstractChannel, s: Settings, dead: AbstractExchange | str) -> None:
    """The dead-letter queue, bound to the dead-letter exchange with ``#`` (again, when a
    dead-letter copy came back unroutable: the queue was deleted or unbound meanwhile)."""
    q = await _declare(ch, s.dead_queue, queue_arguments(s))
    await q.bind(dead, "#")


async def declare_commands_queue(ch: AbstractChannel, s: Settings, topo: Topology) -> AbstractQueue:
    q = await _declare(ch, s.commands_queue, queue_arguments(s, **{"x-dead-letter-exchange": s.dead_exchange}))
    if s.leases:  # what a lease queue takes must not come here too
        await q.unbind(topo.commands, "#")
        await q.bind(unrouted_exchange(s))
    else:
        await q.bind(topo.commands, "#")
    return q


#: a command waits this long in a lease queue for a holder, then is dead-lettered (reason
#: ``expired``). The token is a message of the queue too and the TTL counts from its publish
#: (a requeue keeps it): holders renew it every RENEW_S (bridge.amqp.leases, <= a fifth of this),
#: so a token is never older than that when it goes back to the queue, and survives at least
#: 4/5 of this with no replica consuming (then the wanted state is forgotten: the next replica
#: mints a token from its configuration). docs/SCALING.md, "Queue lifetimes".
LEASE_COMMAND_TTL_S = 300
#: a lease queue nobody consumes (leases turned off, device no longer configured, every replica
#: gone) is deleted this long after its last consumer left; longer than the command TTL, so
#: every waiting command has been dead-lettered first (an expiring queue drops its messages)
LEASE_QUEUE_EXPIRES_S = 900


async def declare_lease_queue(ch: aiormq.abc.AbstractChannel, s: Settings, hw: str) -> tuple[int, int]:
    """Declare ``hw``'s lease queue and its binding; (messages ready, consumers) in it."""
    name = lease_queue(s, hw)
    try:
        ok = await ch.queue_declare(name, durable=True, arguments=queue_arguments(s, **{
            "x-single-active-consumer": True, "x-dead-letter-exchange": s.dead_exchange,
            "x-message-ttl": int(LEASE_COMMAND_TTL_S * 1000), "x-expires": int(LEASE_QUEUE_EXPIRES_S * 1000)}))
    except aiormq.exceptions.ChannelPreconditionFailed as e:
        raise (mismatch(e) or e) from None
    await ch.queue_bind(name, s.commands_exchange, lease_key(hw), nowait=True)
    return ok.message_count or 0, ok.consumer_count or 0  # never None in a DeclareOk


async def take_waiting(queue: AbstractQueue, count: int, wait_s: float = 2.0):
    """The ``count`` messages waiting in ``queue`` (a passive declare's count), one by one, for
    the caller to ack. Consumed, not fetched: a quorum queue with a single active consumer (a
    lease queue) refuses basic.get. Ends early when one does not come within ``wait_s`` (it
    expired meanwhile)."""
    if count <= 0:
        return
    async with queue.iterator() as messages:
        for _ in range(count):
            try:
                async with asyncio.timeout(wait_s):
                    msg = await anext(messages)
            except TimeoutError:
                return
            yield msg


async def delete(conn: AbstractConnection, exchanges: Iterable[str], queues: Iterable[str]) -> None:
    """Delete exchanges and queues (tests and the benchmark clean up after a run). What does
    not exist is skipped; a failed delete closes its channel, the next one opens another."""
    ch = None
    for kind, names in (("exchange_delete", exchanges), ("queue_delete", queues)):
        for name in names:
            if ch is None or ch.is_closed:
                ch = await conn.channel()
            try:
                await getattr(ch, kind)(name)
            except aio_pika.exceptions.AMQPError:
                pass
    if ch is not None and not ch.is_closed:
        await ch.close()


async def delete_for(conn: AbstractConnection, s: Settings, extra_queues: Iterable[str] = ()) -> None:
    """Delete everything :func:`declare_exchanges` and :func:`declare_commands_queue` make, and
    the lease queues of the configured devices."""
    await delete(conn, (s.events_exchange, s.commands_exchange, s.dead_exchange, unrouted_exchange(s),
                        presence_exchange(s)),
                 (s.commands_queue, s.dead_queue, *(lease_queue(s, hw) for hw in s.device_list),
                  *extra_queues))
