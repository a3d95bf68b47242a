"""Contract tests on live traffic: the real bridge, the PBX simulator and RabbitMQ. Every event
and every reply the bridge sends, and every dead letter, is validated against the published
contracts (bodies against their JSON Schemas, AMQP properties and headers and routing keys
against the AsyncAPI document)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter, defaultdict

import aio_pika
import pytest
from opentelemetry.sdk.trace import TracerProvider

from bridge import routing, tracing

from .helpers import asyncapi_errors, body_path, channel_regex, errors, event_channel

pytestmark = pytest.mark.broker
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.fixture(params=[False, True], ids=["untraced", "traced"])
def traced(request):
    if request.param:
        tracing.configure(TracerProvider())  # spans go nowhere; the headers are what counts
    yield request.param
    tracing.disable()


def props(m: aio_pika.abc.AbstractIncomingMessage) -> dict:
    """The AMQP properties and headers of a delivery, named as in the AsyncAPI document."""
    p = {"content_type": m.content_type, "delivery_mode": m.delivery_mode and int(m.delivery_mode),
         "type": m.type, "message_id": m.message_id, "correlation_id": m.correlation_id,
         "reply_to": m.reply_to, "app_id": m.app_id,
         "timestamp": int(m.timestamp.timestamp()) if m.timestamp else None}
    return {**{k: v for k, v in p.items() if v is not None}, **(m.headers or {})}


class Commands:
    """Sends commands with reply_to and keeps every reply delivery."""

    def __init__(self, bus) -> None:
        self.bus = bus
        self.replies: dict[str, tuple[bytes, aio_pika.abc.AbstractIncomingMessage]] = {}
        self._waiting: dict[str, asyncio.Future] = {}

    async def open(self) -> None:
        self.ch = await self.bus.conn.channel()
        rq = await self.ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await rq.consume(self._on_reply, no_ack=True)
        self.ex = await self.ch.get_exchange(self.bus.s.commands_exchange, ensure=False)

    async def _on_reply(self, msg) -> None:
        fut = self._waiting.pop(msg.correlation_id, None)
        if fut is not None:
            fut.set_result(msg)

    async def send(self, key: str, body: bytes | dict) -> dict:
        raw = json.dumps(body).encode() if isinstance(body, dict) else body
        cid = uuid.uuid4().hex
        self._waiting[cid] = fut = asyncio.get_running_loop().create_future()
        msg = aio_pika.Message(raw, reply_to="amq.rabbitmq.reply-to", correlation_id=cid,
                               message_id=f"cmd-{cid[:8]}", headers={"traceparent": TRACEPARENT})
        await self.ex.publish(msg, key)
        msg = await asyncio.wait_for(fut, 15)
        self.replies[cid] = (raw, msg)
        return json.loads(msg.body)


async def test_every_event_reply_and_dead_letter_matches_the_contracts(
    traced, sim, bus, settings_for, start_bridge
):
    hw1, hw2, hw3, hw4 = (sim.hw(i) for i in range(1, 5))
    late = sim.hw(sim.config.devices + 1)  # known to the PBX, not registered
    q = await bus.bind("#")  # waited on
    everything = await bus.bind("#")  # kept whole
    # a call in progress before the bridge attaches hw4: a Sync tells it
    sync_call = await sim.place_call(hw4, direction="in", answer=True, hold_s=30.0)
    await start_bridge(settings_for(sim, devices=f"{hw1},{hw2}"))
    cmd = Commands(bus)
    await cmd.open()
    await q.until(lambda e: e.body["type"] == "attached" and e.body["hw"] == hw2)

    # attach: by command, of a device in a call (Sync), of an unregistered and an unknown device
    assert (await cmd.send(f"device.{hw3}.attach", b""))["attached"] is True
    assert (await cmd.send(f"device.{hw4}.attach", {"v": 1}))["ok"] is True
    assert (await cmd.send(f"device.{late}.attach", {}))["attached"] is False
    assert (await cmd.send("device.009033499999.attach", {}))["ok"] is False

    async def calls_of(hw, *scenarios):  # one after the other, each to its end
        states = await bus.bind(f"device.{hw}.call.*.state")
        for kw in scenarios:
            call = await sim.place_call(hw, remote="201", **kw)
            done = (call, "released")
            await states.until(lambda e, d=done: (e.body["call"], e.body["state"]) == d)

    async def click_to_dial(hw):
        states = await bus.bind(f"device.{hw}.call.-1.state")
        key = f"device.{routing.word(hw)}.signaling"
        setup = {"v": 1, "call": -1, "sig": {"type": "setup", "cd": {"num": "201"}}}
        assert (await cmd.send(key, setup))["ok"]
        await states.until(lambda e: e.body["state"] == "connected")
        assert (await cmd.send(key, {"call": -1, "sig": {"type": "rel", "cau": {"num": 16}}}))["ok"]
        await states.until(lambda e: e.body["state"] == "released")

    await asyncio.gather(
        calls_of(hw1, dict(direction="in", answer=True, hold=True, hold_s=0.3),
                 dict(direction="in", answer=False)),
        calls_of(hw3, dict(direction="out", answer=True, hold_s=0.1, hangup="device"),
                 dict(direction="out", busy=True),
                 dict(direction="in", transfer_to="202", hold_s=0.1)),
        click_to_dial(hw2),
    )

    # refused commands: answered with ok false and dead-lettered
    bad = [
        (f"device.{hw1}.signaling", b"{nope"),
        (f"device.{hw1}.signaling", b'{"call": "x", "sig": {}}'),
        (f"device.{hw1}.explode", b"{}"),
        (f"device.{sim.hw(9)}.signaling", b'{"call": -1, "sig": {"type": "setup"}}'),
        ("totally.wrong", b"{}"),
    ]
    for key, body in bad:
        assert (await cmd.send(key, body))["ok"] is False
    assert (await cmd.send(f"device.{hw3}.detach", b""))["was_attached"] is True
    await q.until(lambda e: e.body["type"] == "detached" and e.body["hw"] == hw3)
    dead = await bus.dead_letters(len(bad) + 1)  # + the unknown device's attach
    await asyncio.sleep(0.2)  # the last events in flight
    seen = everything.drain()
    assert any(e.body.get("call") == sync_call and e.body.get("sync") for e in seen)

    problems = []
    per_device = defaultdict(list)
    for e in seen:
        m, t = e.message, e.body.get("type")
        problems += [f"{e.key} body {x}" for x in errors(body_path("events", t), e.body)]
        problems += [f"{e.key} properties {x}" for x in asyncapi_errors("EventHeaders", props(m))]
        match = channel_regex(event_channel(t)["address"]).fullmatch(e.key)
        if m.type != t or match is None:
            problems.append(f"{e.key}: type property {m.type!r}, body {t!r}, fits: {bool(match)}")
            continue
        if t != "gap":
            per_device[e.body["hw"]].append(e.body["seq"])
            mid = f"{e.body['instance']}/{e.body['hw']}/{e.body['seq']}"
            if routing.unword(match["hw"]) != e.body["hw"] or m.message_id != mid:
                problems.append(f"{e.key}: hw or message_id do not fit {e.body}")
        if ("traceparent" in (m.headers or {})) is not traced:
            problems.append(f"{e.key}: traceparent {m.headers} with tracing {traced}")
    for cid, (_, m) in cmd.replies.items():
        problems += [f"reply {x}" for x in errors(body_path("reply", "reply"), json.loads(m.body))]
        problems += [f"reply properties {x}" for x in asyncapi_errors("ReplyHeaders", props(m))]
        if m.correlation_id != cid:
            problems.append(f"reply correlation_id {m.correlation_id} != {cid}")
    sent = {raw for raw, _ in cmd.replies.values()}
    for m in dead:
        problems += [f"dead letter {x}" for x in asyncapi_errors("DeadLetterHeaders", props(m))]
        # a message_id of its own (the bridge's), the command's in x-original-message-id
        if (m.body not in sent or not m.headers.get("x-epsignal-error") or "/.dead/" not in m.message_id
                or not m.headers.get("x-original-message-id", "").startswith("cmd-")
                or m.headers["traceparent"] != TRACEPARENT):
            problems.append(f"dead letter {m.routing_key}: {m.body!r} {m.headers}")
    assert problems == [], "\n".join(problems)

    # the traffic covered the contracts: every kind of event, state, origin and reply
    bodies = [e.body for e in seen]
    types = Counter(b["type"] for b in bodies)
    assert {"attached", "detached", "attach.failed", "call.state", "call.signaling"} <= set(types)
    states = {b["state"] for b in bodies if b["type"] == "call.state"}
    assert {"setup", "call-proc", "alert", "connected", "disconnected", "disconnecting",
            "released"} <= states
    flags = {k for b in bodies if b["type"] == "call.state" for k in ("sync", "held", "app")
             if b[k]}
    assert flags == {"sync", "held", "app"}
    assert {b["origin"] for b in bodies if b["type"] == "call.signaling"} == {"pbx", "command"}
    replies = [json.loads(m.body) for _, m in cmd.replies.values()]
    assert {(r["ok"], r.get("command")) for r in replies} >= {
        (True, "attach"), (True, "signaling"), (True, "detach"),
        (False, "attach"), (False, "signaling"), (False, None)}
    for hw, seqs in per_device.items():  # per device: 1, 2, 3, ... in order
        assert seqs == list(range(1, len(seqs) + 1)), (hw, seqs)
