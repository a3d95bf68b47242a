"""The raw aio-pika ceiling: a plain publisher with confirms, in a process of its own.

``python -m bridge.bench.ceiling --url URL --exchange X --window W --input FILE`` publishes the
messages in FILE (msgpack list of ``[routing key, body, type, message_id, timestamp]``, the
bodies the bridge published in the same run, captured by the consumer) to a topic exchange
declared like the bridge's events exchange (durable), with publisher confirms, ``mandatory``,
persistent, the same properties the bridge sets, and at most ``W`` publishes unconfirmed
(``EPSIGNAL_PUBLISH_WINDOW`` of the bridge): the same pattern as the bridge's
``EventPublisher._publish``, without a buffer and without any PBX in front.

Protocol with the benchmark (stdout lines): it connects, publishes the first ``--warmup``
messages (not timed), prints ``ready``; on a line on stdin it publishes everything and prints
one JSON line ``{"published": n, "failed": n, "elapsed_s": s, "cpu_s": s}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime, UTC

import aio_pika
import msgspec
from aio_pika import DeliveryMode


async def publish_all(exchange, items: list, window: int, timeout: float) -> tuple[int, int]:
    slots = asyncio.Semaphore(window)
    pending: set[asyncio.Task] = set()
    failed = 0

    async def one(key: str, body: bytes, typ: str, mid: str, ts: float | None) -> None:
        nonlocal failed
        msg = aio_pika.Message(
            body, content_type="application/json", delivery_mode=DeliveryMode.PERSISTENT,
            message_id=mid, timestamp=datetime.fromtimestamp(ts, UTC) if ts else None,
            type=typ, app_id="epsignal-bridge", headers={},
        )
        try:
            await exchange.publish(msg, key, mandatory=True, timeout=timeout)
        except Exception:
            failed += 1
        finally:
            slots.release()

    for item in items:
        await slots.acquire()
        t = asyncio.ensure_future(one(*item))
        pending.add(t)
        t.add_done_callback(pending.discard)
    if pending:
        await asyncio.wait(set(pending))
    return len(items), failed


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bridge.bench.ceiling")
    p.add_argument("--url", required=True)
    p.add_argument("--exchange", required=True)
    p.add_argument("--window", type=int, required=True)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--input", required=True)
    p.add_argument("--warmup", type=int, default=0)
    a = p.parse_args(argv)
    with open(a.input, "rb") as f:
        items = msgspec.msgpack.decode(f.read())
    conn = await aio_pika.connect(a.url)
    try:
        ch = await conn.channel(publisher_confirms=True, on_return_raises=False)
        ex = await ch.declare_exchange(a.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        if a.warmup:
            await publish_all(ex, items[: a.warmup], a.window, a.timeout)
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        t0, c0 = time.monotonic(), time.process_time()
        n, failed = await publish_all(ex, items, a.window, a.timeout)
        print(json.dumps({"published": n, "failed": failed, "elapsed_s": time.monotonic() - t0,
                          "cpu_s": time.process_time() - c0}), flush=True)
    finally:
        await conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
