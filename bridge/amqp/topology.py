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

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

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
