"""The cluster recipes of docs/CONSUMERS.md run as written, in Python and Node.js, on the local
RabbitMQ: "Queues on a cluster: quorum queues" (the declaration, its delivery limit and
dead-letter queue) and "Replaying events from a stream" (declaration, consumption from an
interval, dedupe by seq). The blocks are taken from the document by what they declare; the only
change is the names (`epsignal.events`, `epsignal.events.replay`, `my-call-states` become the
test's own, since the broker is shared); everything is deleted afterwards."""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
import uuid
from pathlib import Path

import aio_pika
import pytest

from tests.contracts.helpers import NODE_DIR, node_ready

pytestmark = pytest.mark.broker

DOC = Path(__file__).resolve().parents[2] / "docs" / "CONSUMERS.md"


def doc_block(lang: str, needle: str, doc_names: dict) -> str:
    """The one ``lang`` block of CONSUMERS.md containing ``needle``, with the test's names."""
    found = [code for lg, code in re.findall(r"^```(\w+)\n(.*?)^```", DOC.read_text(), re.M | re.S)
             if lg == lang and needle in code]
    assert len(found) == 1, f"docs/CONSUMERS.md: {len(found)} {lang} blocks with {needle!r}"
    code = found[0]
    for old in ("epsignal.events.replay", "epsignal.events", "my-call-states"):  # longest first
        code = code.replace(old, doc_names[old])
    return code


@pytest.fixture
async def doc_names(amqp):
    tag = uuid.uuid4().hex[:8]
    n = {"epsignal.events": f"d{tag}.events", "epsignal.events.replay": f"d{tag}.replay",
         "my-call-states": f"d{tag}.mcs"}
    yield n
    ch = await amqp.channel()
    for q in (n["epsignal.events.replay"], n["my-call-states"], n["my-call-states"] + ".parked"):
        await ch.queue_delete(q)
    for x in (n["epsignal.events"], n["my-call-states"] + ".parked"):
        await ch.exchange_delete(x)
    await ch.close()


async def run_python(code: str, ch, events, **extra) -> None:
    scope = {"ch": ch, "events": events, "json": json, **extra}
    exec("async def _block():\n" + textwrap.indent(code, "    "), scope)  # runs the doc's code
    await scope["_block"]()


async def run_node(code: str, doc_names: dict, expect: int = 0) -> list:
    """The block in an ES module with `ch` (amqplib) and a `handle` that prints what it gets;
    it ends once ``expect`` events were handled (and 0.2 s more, for any extra one)."""
    amqplib = (NODE_DIR / "node_modules" / "amqplib" / "channel_api.js").as_posix()
    src = f"""import amqp from "{amqplib}";
const conn = await amqp.connect("amqp://guest:guest@127.0.0.1:5672/");
const ch = await conn.createChannel();
await ch.assertExchange("{doc_names["epsignal.events"]}", "topic", {{ durable: true }});
let handled = 0, enough;
const done = new Promise((resolve) => {{ enough = resolve; if (!{expect}) resolve(); }});
const handle = (ev, offset) => {{
  console.log(JSON.stringify([ev.seq, offset]));
  if (++handled >= {expect}) enough();
}};
{code}
await done;
await new Promise((r) => setTimeout(r, 200));
await conn.close();
"""
    p = await asyncio.create_subprocess_exec(node_ready(), "--input-type=module", "-e", src,
                                             stdout=asyncio.subprocess.PIPE,
                                             stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 20)
    assert p.returncode == 0 and not err, (out, err)
    return [json.loads(line) for line in out.decode().splitlines()]


@pytest.mark.parametrize("lang", ["python", "js"])
async def test_the_quorum_queue_recipe_parks_a_poison_message(amqp, doc_names, lang):
    code = doc_block(lang, '"x-queue-type": "quorum"', doc_names)
    ch = await amqp.channel()
    events = await ch.declare_exchange(doc_names["epsignal.events"], "topic", durable=True)
    if lang == "python":
        await run_python(code, ch, events)
    else:
        await run_node(code, doc_names)
    ch = await amqp.channel()  # a quorum queue with a delivery limit of 20, and a parking queue
    await events.publish(aio_pika.Message(b'{"poison": true}'), "device.x.call.1.state")
    q = await ch.get_queue(doc_names["my-call-states"], ensure=False)
    parked = await ch.get_queue(doc_names["my-call-states"] + ".parked", ensure=False)
    deliveries = 0
    async with asyncio.timeout(20):
        while (dead := await parked.get(no_ack=True, fail=False)) is None:
            if msg := await q.get(fail=False):
                deliveries += 1
                await msg.nack(requeue=True)  # a consumer that cannot handle it, again and again
            else:
                await asyncio.sleep(0.02)
    assert deliveries == 21  # the first delivery and 20 returns, then the dead-letter exchange
    assert dead.body == b'{"poison": true}' and dead.headers["x-first-death-reason"] == "delivery_limit"


@pytest.mark.parametrize("lang", ["python", "js"])
async def test_the_stream_recipe_replays_once_per_seq(amqp, doc_names, lang):
    ch = await amqp.channel()
    events = await ch.declare_exchange(doc_names["epsignal.events"], "topic", durable=True)
    await run_python(doc_block("python", '"x-queue-type": "stream"', doc_names), ch, events)
    # events published before anyone consumes: one device's seq 1, 2, 2 (a republish), 3
    for seq in (1, 2, 2, 3):
        body = json.dumps({"type": "call.state", "instance": "b1", "hw": "h1", "seq": seq})
        await events.publish(aio_pika.Message(body.encode()), "device.h1.call.1.state")
    consume = doc_block(lang, "x-stream-offset", doc_names)
    if lang == "js":
        handled = await run_node(consume, doc_names, expect=3)
    else:
        handled = []
        ch = await amqp.channel()
        stream = await ch.get_queue(doc_names["epsignal.events.replay"], ensure=False)
        await run_python(consume, ch, events, stream=stream,
                         handle=lambda ev, offset: handled.append([ev["seq"], offset]))
        async with asyncio.timeout(10):
            while len(handled) < 3:
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # and nothing more
    assert handled == [[1, 0], [2, 1], [3, 3]]  # offset 2, the repeat, skipped
