"""An intercept decider for epsignal-bridge (docs/INTERCEPT.md): shows the caller's name from a
CRM on the phone, and screens blocked numbers.

For each intercepted `setup` the bridge holds, it answers a verdict within the deadline:
- toward the device (an incoming call) from a number in the CRM file: `forward` with the setup
  renamed, its `name_identification` facility in `fty` replaced (or one added) with the CRM
  name; every other field of the setup is sent back as it came, unknown ones included;
- from a number in the block list (toward the device: the caller `cg`; from the device: the
  number dialled `cd`): `reject`, cause 21 (call rejected): the phone never rings, the caller
  gets a release;
- anything else: `forward` unchanged.

Run it (the bridge holds setups toward the devices either by its configuration,
EPSIGNAL_INTERCEPT='*=setup:device', or because this program asks, --enable HW):

    python examples/python/intercept.py --crm examples/crm.csv --block examples/blocked.txt
    python examples/python/intercept.py --crm examples/crm.csv --enable 009033400001

It declares an exclusive, auto-delete queue bound to `device.*.call.*.intercept` on the events
exchange: while it runs it gets every request; once it is gone nobody is bound, the bridge's
requests are unroutable and the calls go on unchanged at once (fail-open) instead of each
waiting for its deadline. Verdicts go to the request's `reply_to` with its `correlation_id`.
A request's `traceparent` header is continued (with OpenTelemetry installed: a span of this
program, child of the bridge's; without it: the header is passed back as it came).

CRM file: CSV `number,name` (a header line `number,name` and lines starting with # are skipped).
Block list: one number per line (# starts a comment). Numbers are compared as written.
Options also from the environment: EPSIGNAL_AMQP_URL, EPSIGNAL_EVENTS_EXCHANGE,
EPSIGNAL_COMMANDS_EXCHANGE. Prints one line per verdict. Needs aio-pika.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import re
import sys
import uuid

import aio_pika

try:  # optional: continue the bridge's trace with a span of our own
    from opentelemetry import propagate, trace
except ImportError:
    propagate = trace = None

REJECTED = 21  # Q.931 cause 21: call rejected


def word(hw: str) -> str:
    """A routing-key word: every byte outside [A-Za-z0-9_-] percent-encoded, as the bridge does."""
    return re.sub(rb"[^A-Za-z0-9_-]", lambda m: b"%%%02X" % m[0][0], hw.encode()).decode()


def load_crm(path: str | None) -> dict[str, str]:
    if not path:
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["number", "name"]:
        rows = rows[1:]
    return {r[0].strip(): r[1].strip() for r in rows if len(r) >= 2 and r[0].strip()}


def load_blocked(path: str | None) -> set[str]:
    if not path:
        return set()
    with open(path, encoding="utf-8") as f:
        return {n for n in (line.split("#", 1)[0].strip() for line in f) if n}


def renamed(sig: dict, name: str) -> dict:
    """The setup with its name_identification facility naming ``name``; the rest as it came."""
    fty = [dict(f) for f in sig.get("fty") or []]
    for f in fty:
        if f.get("type") == "name_identification":
            f["name"] = name
            break
    else:
        fty.append({"type": "name_identification", "name": name})
    return {**sig, "fty": fty}


def decide(req: dict, crm: dict[str, str], blocked: set[str], cause: int) -> tuple[dict, str]:
    """The verdict for one request, and what to print."""
    sig, to = req["sig"], req["to"]
    verdict: dict = {"v": 1, "id": req["id"], "verdict": "forward"}
    if sig.get("type") != "setup":
        return verdict, "forward"
    party = sig.get(("cg" if to else "cd")) or {}
    number = party.get("num")
    if number in blocked:
        verdict.update(verdict="reject", cause=cause)
        return verdict, f"reject {number} cause {cause}"
    name = crm.get(number) if to else None
    if name is None:
        return verdict, f"forward {number}"
    verdict["sig"] = renamed(sig, name)
    return verdict, f"rename {number} {name}"


def header(headers: dict, key: str) -> str | None:
    v = (headers or {}).get(key)
    return v.decode() if isinstance(v, bytes) else v


async def enable(ch: aio_pika.abc.AbstractChannel, exchange: str, hws: list[str]) -> None:
    """Ask the bridge to hold the setups toward these devices (an intercept command each)."""
    replies: dict[str, asyncio.Future] = {}
    loop = asyncio.get_running_loop()

    async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        fut = replies.get(msg.correlation_id)
        if fut is not None and not fut.done():
            fut.set_result(json.loads(msg.body))

    reply_q = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
    tag = await reply_q.consume(on_reply, no_ack=True)
    commands = await ch.get_exchange(exchange, ensure=False)
    body = json.dumps({"v": 1, "rules": [{"type": "setup", "to": True}]}).encode()
    for hw in hws:
        cid = uuid.uuid4().hex
        replies[cid] = loop.create_future()
        await commands.publish(aio_pika.Message(
            body, reply_to="amq.rabbitmq.reply-to", correlation_id=cid,
            content_type="application/json"), f"device.{word(hw)}.intercept")
        reply = await asyncio.wait_for(replies[cid], 10)
        print(f"intercept {hw}: {'ok' if reply.get('ok') else reply.get('error')}", flush=True)
        if not reply.get("ok"):
            raise SystemExit(1)
    await reply_q.cancel(tag)


async def main(args: argparse.Namespace) -> int:
    crm, blocked = load_crm(args.crm), load_blocked(args.block)
    tracer = trace.get_tracer("epsignal-intercept-example") if trace else None
    async with await aio_pika.connect(args.amqp_url) as conn:
        ch = await conn.channel()
        events = await ch.declare_exchange(args.exchange, "topic", durable=True)
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        keys = [f"device.{'*' if hw == '*' else word(hw)}.call.*.intercept"
                for hw in args.hw or ["*"]]
        for key in keys:
            await q.bind(events, key)
        if args.enable:
            await enable(ch, args.commands_exchange, args.enable)
        print(f"deciding on {' '.join(keys)}: {len(crm)} CRM names, {len(blocked)} blocked",
              flush=True)
        answered = 0
        async with q.iterator(no_ack=True) as it:
            async for msg in it:
                req = json.loads(msg.body)
                carrier = {k: v for k in ("traceparent", "tracestate")
                           if (v := header(msg.headers, k)) is not None}
                if propagate is not None:
                    with tracer.start_as_current_span(
                            f"decide {msg.routing_key}", context=propagate.extract(carrier),
                            kind=trace.SpanKind.CONSUMER):
                        verdict, what = decide(req, crm, blocked, args.cause)
                        carrier = {}
                        propagate.inject(carrier)  # our span's traceparent
                else:
                    verdict, what = decide(req, crm, blocked, args.cause)
                await ch.default_exchange.publish(aio_pika.Message(
                    json.dumps(verdict, ensure_ascii=False).encode(),
                    correlation_id=msg.correlation_id, content_type="application/json",
                    headers=carrier), routing_key=msg.reply_to,
                    mandatory=False)  # RabbitMQ 3.10 returns a mandatory reply it delivered
                print(f"{req['hw']} call {req['call']} {req['sig'].get('type')}: {what}",
                      flush=True)
                answered += 1
                if args.count and answered >= args.count:
                    break
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amqp-url", default=env("EPSIGNAL_AMQP_URL", "amqp://guest:guest@localhost/"))
    p.add_argument("--exchange", default=env("EPSIGNAL_EVENTS_EXCHANGE", "epsignal.events"),
                   help="the bridge's events exchange (requests are published there)")
    p.add_argument("--commands-exchange",
                   default=env("EPSIGNAL_COMMANDS_EXCHANGE", "epsignal.commands"))
    p.add_argument("--crm", metavar="CSV", help="number,name lines: names shown on the phone")
    p.add_argument("--block", metavar="FILE", help="numbers to reject, one per line")
    p.add_argument("--cause", type=int, default=REJECTED, help="cause of a rejection (21)")
    p.add_argument("--hw", action="append", help="decide for this device only (repeatable)")
    p.add_argument("--enable", action="append", metavar="HW",
                   help="send the device an intercept command for its incoming setups first")
    p.add_argument("--count", type=int, help="exit after this many verdicts")
    return p.parse_args(argv)


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except KeyboardInterrupt:
        sys.exit(130)
