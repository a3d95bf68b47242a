"""A consumer of epsignal-bridge in Python: prints every event of one device, each validated
against its published contract (contracts/v1/events/<type>.json).

    EPSIGNAL_AMQP_URL=amqp://guest:guest@localhost/ python examples/python/consumer.py 009033400001

Env: EPSIGNAL_AMQP_URL, EPSIGNAL_EVENTS_EXCHANGE (the bridge's defaults), COUNT (exit after N
events; default: run until interrupted). Needs aio-pika and jsonschema.
"""

import asyncio
import json
import os
import re
import sys
from pathlib import Path

import aio_pika
from jsonschema import Draft202012Validator

CONTRACTS = Path(__file__).resolve().parents[2] / "contracts" / "v1" / "events"
VALIDATORS = {p.stem: Draft202012Validator(json.loads(p.read_text()))  # by event type
              for p in CONTRACTS.glob("*.json")}
AMQP_URL = os.environ.get("EPSIGNAL_AMQP_URL", "amqp://guest:guest@localhost/")
EXCHANGE = os.environ.get("EPSIGNAL_EVENTS_EXCHANGE", "epsignal.events")


def word(hw: str) -> str:
    """A routing-key word: every byte outside [A-Za-z0-9_-] percent-encoded, as the bridge does."""
    return re.sub(rb"[^A-Za-z0-9_-]", lambda m: b"%%%02X" % m[0][0], hw.encode()).decode()


async def main(hw: str, count: int | None) -> int:
    async with await aio_pika.connect(AMQP_URL) as conn:
        ch = await conn.channel()
        events = await ch.declare_exchange(EXCHANGE, "topic", durable=True)
        q = await ch.declare_queue(exclusive=True)
        await q.bind(events, f"device.{word(hw)}.#")  # every event of the device
        print(f"listening on device.{word(hw)}.#", flush=True)
        seen, invalid = 0, 0
        async with q.iterator(no_ack=True) as it:
            async for msg in it:
                ev = json.loads(msg.body)
                errors = [e.message for e in VALIDATORS[msg.type].iter_errors(ev)]
                invalid += bool(errors)
                what = ev.get("state") or ev.get("reason") or ev.get("sig", {}).get("type")
                print(f"{'INVALID ' + '; '.join(errors) if errors else 'valid'}: {msg.routing_key} "
                      f"seq={ev['seq']} {what or ''}".rstrip(), flush=True)
                seen += 1
                if count is not None and seen >= count:
                    break
    return 2 if invalid else 0


if __name__ == "__main__":
    n = os.environ.get("COUNT")
    hw = sys.argv[1] if len(sys.argv) > 1 else "009033400001"
    sys.exit(asyncio.run(main(hw, int(n) if n else None)))
