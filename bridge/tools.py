"""The tools for people: ``tail``, ``send`` and ``demo``. Thin clients of the bus."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import aio_pika
import msgspec

from bridge import routing
from bridge.amqp import topology
from bridge.config import Settings

_COLOURS = {
    "setup": "36", "setup-ack": "36", "call-proc": "36", "alert": "33", "connected": "32",
    "disconnected": "35", "disconnecting": "35", "parked": "34", "released": "90", "null": "90",
}


def _paint(text: str, code: str | None, on: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if on and code else text


def format_event(key: str, body: bytes, colour: bool = False) -> str:
    """One readable line for an event."""
    try:
        ev = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return f"{key} <not JSON: {body[:80]!r}>"
    t = ev.get("type", "?")
    clock = str(ev.get("time", ""))[11:23]
    hw = ev.get("hw", "")
    if t == "call.state":
        r = ev.get("remote") or {}
        who = " ".join(x for x in (r.get("num"), f'"{r["dn"]}"' if r.get("dn") else None) if x)
        state = ev.get("state", "?")
        flags = [f for f, on in (("held", ev.get("held")), ("sync", ev.get("sync")), ("app", ev.get("app"))) if on]
        cause = ev.get("cause")
        extra = (f" cause {cause.get('num')}" if cause else "") + (f" [{','.join(flags)}]" if flags else "")
        direction = {True: "in ", False: "out", None: "?  "}[ev.get("in")]
        return (f"{clock} {hw} call {ev.get('call'):>5} {_paint(f'{state:<13}', _COLOURS.get(state), colour)}"
                f" {direction} {who}{extra}")
    if t == "call.signaling":
        sig = ev.get("sig") or {}
        arrow = "->dev" if ev.get("to") else "->pbx"
        return f"{clock} {hw} call {ev.get('call'):>5} {arrow} {sig.get('type', '?'):<10} ({ev.get('origin')})"
    if t in ("attached", "detached", "attach.failed"):
        detail = ev.get("reason") or ev.get("error") or ""
        code = {"attached": "32", "detached": "35", "attach.failed": "31"}[t]
        return f"{clock} {hw} {_paint(t, code, colour)} {detail}".rstrip()
    if t == "gap":
        return f"{clock} {_paint('gap', '31', colour)} {ev.get('reason')}: {ev.get('dropped')}"
    return f"{clock} {key} {body.decode(errors='replace')}"


async def _connect(settings: Settings) -> aio_pika.abc.AbstractConnection:
    return await aio_pika.connect(str(settings.amqp_url), timeout=10)


async def tail(settings: Settings, patterns: list[str], *, raw: bool = False, limit: int | None = None,
               out=None, ready: asyncio.Event | None = None) -> None:
    out = out or sys.stdout
    colour = hasattr(out, "isatty") and out.isatty() and not os.environ.get("NO_COLOR")
    conn = await _connect(settings)
    async with conn:
        ch = await conn.channel()
        ex = await ch.declare_exchange(settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        for p in patterns:
            await q.bind(ex, p)
        if ready is not None:
            ready.set()
        n = 0
        async with q.iterator(no_ack=True) as it:
            async for msg in it:
                line = msg.body.decode() if raw else format_event(msg.routing_key or "", msg.body, colour)
                print(line, file=out, flush=True)
                n += 1
                if limit is not None and n >= limit:
                    return


async def send(settings: Settings, hw: str, verb: str, body: str | bytes, *, timeout: float = 15.0) -> str:
    """Publish one command with a reply_to (direct reply-to) and return the reply body."""
    conn = await _connect(settings)
    async with conn:
        ch = await conn.channel()
        ex = await topology.declare_commands_exchange(ch, settings)
        reply_q = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
        got: asyncio.Future = asyncio.get_running_loop().create_future()
        cid = uuid.uuid4().hex

        async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            if msg.correlation_id == cid and not got.done():
                got.set_result(msg.body.decode())

        await reply_q.consume(on_reply, no_ack=True)
        data = body.encode() if isinstance(body, str) else body
        await ex.publish(
            aio_pika.Message(data, content_type="application/json", reply_to="amq.rabbitmq.reply-to",
                             correlation_id=cid, message_id=cid),
            routing.device_key(hw, verb),
        )
        try:
            return await asyncio.wait_for(got, timeout)
        except TimeoutError:
            return '{"ok":false,"error":"no reply within %gs (is the bridge running?)"}' % timeout


async def demo(*, devices: int, call_rate: float, duration: float | None, amqp_url: str) -> None:
    """Simulator with traffic + bridge for its devices + live events, in one process."""
    from bridge.service import Bridge
    from bridge.sim import PbxSimulator, SimConfig

    sim = PbxSimulator(SimConfig(devices=devices, call_rate=call_rate, password="demo-secret"))
    await sim.start(control_port=0)
    hws = [sim.hw(i) for i in range(1, devices + 1)]
    settings = Settings.from_env(
        {}, pbx_url=sim.url, pbx_app=sim.config.app, pbx_password="demo-secret", amqp_url=amqp_url,
        devices=",".join(hws), instance_id=f"demo-{uuid.uuid4().hex[:4]}",
    )
    print(f"PBX simulator {sim.url} (control {sim.control_url}), {devices} devices, "
          f"{call_rate:g} calls/s; bridge {settings.instance_id}; Ctrl-C to stop", flush=True)
    bridge = Bridge(settings)
    ready = asyncio.Event()
    viewer = asyncio.create_task(tail(settings, ["device.*.call.*.state", "device.*.attached",
                                                 "device.*.detached", "device.*.attach.failed", "bridge.*.gap"],
                                      ready=ready))
    await ready.wait()
    await bridge.start()
    try:
        if duration is None:
            await asyncio.Event().wait()
        else:
            await asyncio.sleep(duration)
    finally:
        await bridge.stop(5)
        viewer.cancel()
        await asyncio.gather(viewer, return_exceptions=True)
        st = sim.stats()
        print(f"calls started {st['calls_started']}, completed {st['calls_completed']}, "
              f"stalled {st['calls_stalled']}; forwarded {st['messages_forwarded']}", flush=True)
        await sim.stop()
