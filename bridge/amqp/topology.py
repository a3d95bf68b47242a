"""The AMQP topology of the bridge, in one place.

::

    epsignal.events    topic, durable   events; keys in bridge.routing
    epsignal.commands  topic, durable   commands: device.<hw>.attach|detach|signaling
      -> epsignal.commands.bridge  durable queue, bound with "#" (every command is taken, so
                                   a command with a bad key is dead-lettered, not lost),
                                   x-dead-letter-exchange = epsignal.dead
    epsignal.dead      topic, durable   dead-lettered commands, header x-epsignal-error
      -> epsignal.commands.dead    durable queue, bound with "#"

Names are settings (``EPSIGNAL_*_EXCHANGE`` / ``_QUEUE``). Declaring is idempotent and runs on
every (re)connect, so a deleted queue or a restarted broker gets the topology back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue

from bridge.config import Settings

TOPIC = aio_pika.ExchangeType.TOPIC


@dataclass
class Topology:
    events: AbstractExchange
    commands: AbstractExchange
    dead: AbstractExchange
    commands_queue: AbstractQueue | None = None


async def declare_exchanges(ch: AbstractChannel, s: Settings) -> Topology:
    events = await ch.declare_exchange(s.events_exchange, TOPIC, durable=True)
    commands = await ch.declare_exchange(s.commands_exchange, TOPIC, durable=True)
    dead = await ch.declare_exchange(s.dead_exchange, TOPIC, durable=True)
    dead_q = await ch.declare_queue(s.dead_queue, durable=True)
    await dead_q.bind(dead, "#")
    return Topology(events=events, commands=commands, dead=dead)


async def declare_commands_queue(ch: AbstractChannel, s: Settings, topo: Topology) -> AbstractQueue:
    q = await ch.declare_queue(
        s.commands_queue, durable=True, arguments={"x-dead-letter-exchange": s.dead_exchange}
    )
    await q.bind(topo.commands, "#")
    return q


async def delete(conn: AbstractConnection, exchanges: Iterable[str], queues: Iterable[str]) -> None:
    """Delete exchanges and queues (tests and the benchmark clean up after a run). Each on a
    channel of its own: a failed delete closes its channel; what does not exist is skipped."""
    for kind, names in (("exchange_delete", exchanges), ("queue_delete", queues)):
        for name in names:
            ch = await conn.channel()
            try:
                await getattr(ch, kind)(name)
            except aio_pika.exceptions.AMQPError:
                pass
            finally:
                if not ch.is_closed:
                    await ch.close()


async def delete_for(conn: AbstractConnection, s: Settings, extra_queues: Iterable[str] = ()) -> None:
    """Delete everything :func:`declare_exchanges` and :func:`declare_commands_queue` make."""
    await delete(conn, (s.events_exchange, s.commands_exchange, s.dead_exchange),
                 (s.commands_queue, s.dead_queue, *extra_queues))
