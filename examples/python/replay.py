"""Replay the bridge's events from a RabbitMQ stream: a consumer that starts late reads the last
hours of call events, then follows the live ones (docs/CONSUMERS.md, "Replaying events from a
stream").

    python examples/python/replay.py --declare          # once, before the events you want kept
    python examples/python/replay.py --from first       # everything the stream still holds
    python examples/python/replay.py --from 1h          # the last hour
    python examples/python/replay.py --from 2026-11-30T09:00:00Z --idle 2

--from is the stream offset to start at (the consumer argument `x-stream-offset`): `first`,
`last` (the last chunk written), `next` (only new events; the default), a number (an offset in the
stream), a time (ISO 8601, UTC unless it has an offset; seconds are the unit, and the broker
starts at the chunk holding that time, so a few earlier events may come first), or an interval
back from now (`30m`, `6h`, `1D`).

The stream `STREAM` (default `epsignal.events.replay`) keeps what the events exchange routes to
`device.#` and `bridge.*.gap` for `MAX_AGE` (6h); the first run declares and binds it. A stream
only holds events published while it exists. Every device event is printed once: a repeat
(same instance and device, `seq` not above the last one printed) is counted, not printed.

Env: EPSIGNAL_AMQP_URL, EPSIGNAL_EVENTS_EXCHANGE (the bridge's defaults), STREAM, MAX_AGE.
Exit: after --count events, after --idle seconds without one, or on Ctrl-C. Needs aio-pika.
"""

import argparse
import asyncio
import json
import os
import re
from datetime import datetime

import aio_pika

AMQP_URL = os.environ.get("EPSIGNAL_AMQP_URL", "amqp://guest:guest@localhost/")
EXCHANGE = os.environ.get("EPSIGNAL_EVENTS_EXCHANGE", "epsignal.events")
STREAM = os.environ.get("STREAM", "epsignal.events.replay")
STREAM_ARGS = {
    "x-queue-type": "stream",
    "x-max-age": os.environ.get("MAX_AGE", "6h"),  # retention: Y M D h m s
    # retention drops whole segments: small ones keep the stream close to MAX_AGE
    "x-stream-max-segment-size-bytes": 50_000_000,
    "x-max-length-bytes": 20_000_000_000,  # and a bound on the disk it takes, whatever the age
}
BINDINGS = ("device.#", "bridge.*.gap")


def offset(spec: str) -> str | int | datetime:
    """The value of `x-stream-offset` for --from."""
    if spec in ("first", "last", "next") or re.fullmatch(r"\d+[YMDhms]", spec):
        return spec  # an interval is passed as a string, e.g. "1h"
    if spec.isdigit():
        return int(spec)
    return datetime.fromisoformat(spec)  # sent as an AMQP timestamp


async def declare(ch: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
    events = await ch.declare_exchange(EXCHANGE, "topic", durable=True)
    stream = await ch.declare_queue(STREAM, durable=True, arguments=STREAM_ARGS)
    for key in BINDINGS:
        await stream.bind(events, key)
    return stream


async def replay(start: str | int | datetime, count: int | None, idle: float | None) -> int:
    async with await aio_pika.connect(AMQP_URL) as conn:
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=200)  # a stream needs a prefetch, and manual acks
        stream = await declare(ch)
        last: dict[tuple[str, str], int] = {}  # (instance, hw) -> last seq printed
        seen = repeats = 0
        # a callback into our own queue, not stream.iterator(): stopping, the iterator nacks what it
        # holds, and a stream answers a nack or reject by closing the connection (NOT_IMPLEMENTED)
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await stream.consume(inbox.put, arguments={"x-stream-offset": start})
        while count is None or seen < count:
            try:
                msg = await asyncio.wait_for(inbox.get(), idle)
            except TimeoutError:
                break  # --idle seconds without an event: caught up
            ev = json.loads(msg.body)
            where = f"offset={msg.headers['x-stream-offset']} {msg.routing_key}"
            if ev["type"] == "gap":
                print(f"{where} gap {ev['reason']} {json.dumps(ev['dropped'], separators=(',', ':'))}",
                      flush=True)
            elif ev["seq"] <= last.get((ev["instance"], ev["hw"]), 0):
                repeats += 1
            else:
                last[ev["instance"], ev["hw"]] = ev["seq"]
                what = ev.get("state") or ev.get("reason") or ev.get("sig", {}).get("type")
                print(f"{where} seq={ev['seq']} {what or ''}".rstrip(), flush=True)
            seen += 1
            await msg.ack()  # acks are credit: the stream sends more as they come
        print(f"end: {seen} events, {repeats} repeats skipped", flush=True)
    return 0


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="start", default="next", help="first|last|next|OFFSET|TIME|INTERVAL")
    p.add_argument("--count", type=int, help="exit after this many events")
    p.add_argument("--idle", type=float, help="exit after this many seconds without an event")
    p.add_argument("--declare", action="store_true", help="declare and bind the stream, then exit")
    args = p.parse_args()
    try:
        start = offset(args.start)
    except ValueError:
        p.error(f"--from {args.start!r}: not first, last, next, an offset, a time or an interval")
    if args.declare:
        async with await aio_pika.connect(AMQP_URL) as conn:
            await declare(await conn.channel())
        print(f"stream {STREAM} bound to {', '.join(BINDINGS)} of {EXCHANGE}", flush=True)
        return 0
    return await replay(start, args.count, args.idle)


if __name__ == "__main__":
    try:
        raise SystemExit(asyncio.run(main()))
    except KeyboardInterrupt:
        pass
