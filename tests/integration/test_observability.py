"""Tracing across hops, metrics and health, against the real broker and simulator."""

from __future__ import annotations

import asyncio
import json
import re

import aio_pika
import aiohttp
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from bridge import tracing
from tests.faults.helpers import http_port
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.broker


@pytest.fixture
def spans():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    exporter.tracer = provider.get_tracer("test")  # the consumer's / producer's own tracer
    yield exporter
    tracing.disable()


def trace_id_of(msg: aio_pika.abc.AbstractIncomingMessage) -> int:
    ctx = propagate.extract({k: v for k, v in msg.headers.items() if isinstance(v, str)})
    return trace.get_current_span(ctx).get_span_context().trace_id


def parent_of(msg: aio_pika.abc.AbstractIncomingMessage) -> int:
    """The span id an event's traceparent names (its creation context)."""
    return int(msg.headers["traceparent"].split("-")[2], 16)


def released(call):
    return lambda e: e.body["type"] == "call.state" and e.body["call"] == call and e.body["state"] == "released"


async def test_span_tree_of_an_incoming_call(spans, sim, bus, settings_for, start_bridge):
    hw = sim.hw(1)
    bridge = await start_bridge(settings_for(sim, devices=hw))
    q = await bus.bind(f"device.{hw}.call.*.#")
    await asyncio.sleep(0.3)
    call = await sim.place_call(hw, direction="in", hold_s=0.05)
    evs = await q.until(released(call))
    await bridge.publisher.flush(5)
    done = spans.get_finished_spans()
    frames = [s for s in done if s.name == "receive EpSignal Signaling" and s.attributes["epsignal.call"] == call]
    assert len(frames) >= 5  # setup, alert, conn, disc, rel
    root = frames[0]
    assert root.parent is None and root.kind is SpanKind.CONSUMER
    assert root.attributes["epsignal.hw"] == hw and root.attributes["epsignal.sig.type"] == "setup"
    assert root.attributes["epsignal.to_device"] is True
    tid = root.context.trace_id
    assert all(f.context.trace_id == tid for f in frames)  # one trace per call
    assert all(f.parent.span_id == root.context.span_id for f in frames[1:])
    assert root.attributes["epsignal.forward_us"] >= 0  # forwarded: the time it took is on the span
    # every event carries the context of the frame span that made it: consumers continue the call
    state_frames = {f.context.span_id for f in frames}
    assert all(trace_id_of(e.message) == tid for e in evs)
    assert {parent_of(e.message) for e in evs} <= state_frames
    # confirmed publishes make no span (the publish latency histogram covers them)
    assert not [s for s in done if s.name.startswith("publish")]
    ctx = propagate.extract({k: v for k, v in evs[0].message.headers.items() if isinstance(v, str)})
    with spans.tracer.start_as_current_span("handle", context=ctx) as s:
        assert s.get_span_context().trace_id == tid and s.parent.span_id in state_frames


async def test_an_event_made_outside_a_frame_gets_a_create_span(spans, sim, bus, settings_for, start_bridge):
    """``detached(session-lost)`` is made by the runner, with no frame span current: its context
    is a short ``create`` span's, so every event carries one."""
    hw = sim.hw(3)
    q = await bus.bind(f"device.{hw}.detached")
    bridge = await start_bridge(settings_for(sim, devices=hw))
    await asyncio.sleep(0.3)
    await sim.drop_sessions()
    ev = (await q.until(lambda e: e.body["reason"] == "session-lost"))[-1]
    await bridge.publisher.flush(5)
    made_by = {s.context.span_id: s for s in spans.get_finished_spans()}[parent_of(ev.message)]
    assert made_by.name == f"create {bridge.s.events_exchange} device.{{hw}}.detached"
    assert made_by.context.trace_id == trace_id_of(ev.message) and made_by.parent is None
    assert made_by.attributes["messaging.operation.type"] == "create"
    assert made_by.attributes["messaging.message.id"] == ev.message.message_id


async def test_a_publish_not_confirmed_is_a_span_linked_to_the_frames(spans, sim, bus, settings_for, start_bridge):
    """The broker stops answering: the slices in flight time out, each becomes an ERROR
    ``publish`` span linked to the frames whose events it carried; they are sent again later."""
    hw = sim.hw(4)
    q = await bus.bind(f"device.{hw}.call.*.state")
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    try:
        bridge = await start_bridge(settings_for(sim, devices=hw, publish_timeout_s=0.3, heartbeat_s=30,
                                                 amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
        await asyncio.sleep(0.3)
        await bridge.publisher.flush(5)
        proxy.stall()
        call = await sim.place_call(hw, direction="in", hold_s=0.05)
        async with asyncio.timeout(5):
            while not [s for s in spans.get_finished_spans() if s.name.startswith("publish")]:
                await asyncio.sleep(0.05)
        proxy.unstall()
        evs = await q.until(released(call))  # sent again and delivered
        done = spans.get_finished_spans()
        frames = {s.context.span_id for s in done if s.name == "receive EpSignal Signaling"
                  and s.attributes["epsignal.call"] == call}
        failed = [s for s in done if s.name == f"publish {bridge.s.events_exchange}"]
        # the first slice that times out replaces the connection; the slices still in flight on it
        # fail with the connection
        assert failed and "not confirmed (TimeoutError)" in failed[0].status.description
        assert all(not s.status.is_ok and ("not confirmed (TimeoutError)" in s.status.description
                                           or "not confirmed (ConnectionError)" in s.status.description)
                   for s in failed)
        assert {link.context.span_id for s in failed for link in s.links} & frames
        assert failed[0].attributes["messaging.batch.message_count"] >= 1
        assert {parent_of(e.message) for e in evs} <= frames
    finally:
        await proxy.stop()


async def test_click_to_dial_is_one_trace_from_command_to_final_state(spans, sim, bus, settings_for, start_bridge):
    hw = sim.hw(2)
    bridge = await start_bridge(settings_for(sim, devices=hw))
    q = await bus.bind(f"device.{hw}.call.*.state")
    await asyncio.sleep(0.3)
    with spans.tracer.start_as_current_span("click to dial", kind=SpanKind.PRODUCER) as producer:
        headers: dict = {}
        propagate.inject(headers)
        body = json.dumps({"call": -1, "sig": {"type": "setup", "cd": {"num": "201"}}}).encode()
        await bus.commands.publish(aio_pika.Message(body, headers=headers, message_id="m-1"), f"device.{hw}.signaling")
    tid = producer.get_span_context().trace_id
    evs = await q.until(lambda e: e.body["call"] == -1 and e.body["state"] == "connected")
    assert [e.body["state"] for e in evs if e.body["call"] == -1][-3:] == ["call-proc", "alert", "connected"]
    assert [(e.body["state"], trace_id_of(e.message)) for e in evs if e.body["call"] == -1] == [
        (e.body["state"], tid) for e in evs if e.body["call"] == -1]
    await bridge.publisher.flush(5)
    done = spans.get_finished_spans()
    proc = next(s for s in done if s.kind is SpanKind.CONSUMER and s.name.startswith("process"))
    assert proc.name == f"process {bridge.s.commands_exchange} device.{{hw}}.signaling"
    assert proc.parent.span_id == producer.get_span_context().span_id
    assert [link.context.span_id for link in proc.links] == [producer.get_span_context().span_id]
    assert proc.attributes["messaging.operation.type"] == "process"
    assert proc.attributes["messaging.message.id"] == "m-1"
    send = next(s for s in done if s.name == "send EpSignal Signaling")
    assert send.parent.span_id == proc.context.span_id and send.attributes["epsignal.call"] == -1
    frames = [s for s in done if s.name.startswith("receive EpSignal") and s.attributes.get("epsignal.call") == -1]
    assert frames and all(f.context.trace_id == tid for f in frames)


async def test_tracing_off_makes_no_spans_and_no_headers(sim, bus, settings_for, start_bridge):
    assert not tracing.ENABLED
    hw = sim.hw(3)
    q = await bus.bind(f"device.{hw}.#")
    await start_bridge(settings_for(sim, devices=hw))
    ev = await q.get()
    assert "traceparent" not in (ev.message.headers or {})


async def _get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.text()


async def test_metrics_after_a_scripted_run(sim, bus, settings_for, start_bridge):
    hws = [sim.hw(4), sim.hw(5)]
    bridge = await start_bridge(settings_for(sim, devices=",".join(hws)))
    q = await bus.bind("device.#")
    await asyncio.sleep(0.3)
    call = await sim.place_call(hws[0], direction="in", hold_s=0.05)
    await q.until(released(call))
    await bus.command("x", "signaling", b"{bad")
    await bridge.publisher.flush(5)
    status, text = await _get(f"http://127.0.0.1:{http_port(bridge)}/metrics")
    assert status == 200

    def value(name: str, **labels) -> float:
        lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
        m = re.search(rf"^{re.escape(name)}{{{re.escape(lab)}}} (\S+)$" if lab else rf"^{re.escape(name)} (\S+)$",
                      text, re.M)
        assert m, f"{name} {labels} not in metrics"
        return float(m.group(1))

    assert value("epsignal_devices_attached") == 2
    assert value("epsignal_pbx_sessions", state="attached") == 2
    assert value("epsignal_broker_connected") == 1
    assert value("epsignal_events_total", outcome="confirmed") == bridge.publisher.stats.confirmed >= 10
    assert value("epsignal_commands_total", command="signaling", outcome="refused") == 1
    assert value("epsignal_forward_latency_seconds_count") >= 5
    assert value("epsignal_publish_latency_seconds_count") >= 10
    assert value("epsignal_buffer_events") == 0
    # labels never carry ids
    assert not any(hw in line for hw in hws for line in text.splitlines() if not line.startswith("#"))


async def test_health_with_the_broker_up_down_and_back(sim, settings_for, start_bridge):
    proxy = await TcpProxy("127.0.0.1", 5672).start()
    try:
        bridge = await start_bridge(settings_for(sim, devices=sim.hw(6), heartbeat_s=1,
                                                 amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
        base = f"http://127.0.0.1:{http_port(bridge)}"
        async with asyncio.timeout(5):
            while (await _get(base + "/readyz"))[0] != 200:
                await asyncio.sleep(0.05)
        proxy.cut()
        async with asyncio.timeout(10):
            while (r := await _get(base + "/readyz"))[0] != 503:
                await asyncio.sleep(0.05)
        assert "broker not connected" in r[1]
        assert (await _get(base + "/healthz")) == (200, '{"status":"ok"}')
        proxy.restore()
        async with asyncio.timeout(15):
            while (await _get(base + "/readyz"))[0] != 200:
                await asyncio.sleep(0.1)
        assert bridge.link.reconnects >= 1
    finally:
        await proxy.stop()


async def test_readiness_reports_an_unreachable_pbx(settings_for, start_bridge):
    bridge = await start_bridge(settings_for(None, devices="009033400001", pbx_url="ws://127.0.0.1:1/PBX0/APPS/websocket"))
    status, body = await _get(f"http://127.0.0.1:{http_port(bridge)}/readyz")
    assert status == 503 and "PBX not reachable" in body and "broker" not in body
