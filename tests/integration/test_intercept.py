"""Intercept mode end to end (docs/INTERCEPT.md): the real broker, the real simulator (a fake PBX
where a test must send two messages of one call at once), a decider in the test bound to
``device.*.call.*.intercept`` answering through the request's ``reply_to``."""

from __future__ import annotations

import asyncio
import time
import json

import aio_pika
import pytest

from bridge.protocol import messages as m
from bridge.sim import hw_id
from tests.conftest import PASSWORD
from tests.faults.fakepbx import FakePbx
from tests.faults.helpers import eventually
from tests.integration.conftest import N

pytestmark = pytest.mark.broker

REQUESTS = "device.*.call.*.intercept"


class Decider:
    """A consumer that answers intercept requests with ``answer(request) -> verdict dict | bytes
    | None`` (None: no answer), optionally after ``delay`` seconds."""

    def __init__(self, bus, answer, delay: float = 0.0) -> None:
        self.bus, self.answer, self.delay = bus, answer, delay
        self.requests: list[dict] = []
        self.messages: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def start(self, pattern: str = REQUESTS) -> Decider:
        self.ch = await self.bus.conn.channel()
        self.queue = await self.ch.declare_queue(exclusive=True, auto_delete=True)
        await self.queue.bind(self.bus.s.events_exchange, pattern)
        await self.queue.consume(self._on, no_ack=True)
        return self

    async def _on(self, msg) -> None:
        req = json.loads(msg.body)
        self.requests.append(req)
        self.messages.append(msg)
        if self.delay:
            await asyncio.sleep(self.delay)
        verdict = self.answer(req)
        if verdict is None:
            return
        body = verdict if isinstance(verdict, bytes) else json.dumps(verdict).encode()
        await self.ch.default_exchange.publish(
            aio_pika.Message(body, correlation_id=msg.correlation_id), routing_key=msg.reply_to)

    async def stop(self) -> None:
        await self.ch.close()


def renamed(req: dict, name: str) -> dict:
    sig = dict(req["sig"])
    fty = [f for f in sig.get("fty", []) if f.get("type") != "name_identification"]
    sig["fty"] = [*fty, {"type": "name_identification", "name": name}]
    return {"id": req["id"], "verdict": "forward", "sig": sig}


def of_call(events, call, *types):
    return [e.body for e in events if e.body.get("call") == call and e.body["type"] in types]


async def bridge_with(sim, bus, settings_for, start_bridge, hw, **kw):
    kw.setdefault("intercept", f"{hw}=setup:device")
    # not device.<hw>.#: a queue bound to the requests' keys makes them routable (no unroutable)
    q = await bus.bind(f"device.{hw}.*", f"device.{hw}.call.*.state", f"device.{hw}.call.*.signaling",
                       f"device.{hw}.call.*.intercepted")
    bridge = await start_bridge(settings_for(sim, devices=hw, **kw))
    await q.until(lambda e: e.body["type"] == "attached")
    return bridge, q


async def released(q, call):
    return await q.until(lambda e: e.body["type"] == "call.state" and e.body["call"] == call
                         and e.body["state"] == "released")


# ------------------------------------------------------------------------------- verdicts
async def test_a_renamed_caller_reaches_the_phone(sim, bus, settings_for, start_bridge):
    hw = sim.hw(1)
    decider = await Decider(bus, lambda req: renamed(req, "Ada from the CRM")).start()
    bridge, q = await bridge_with(sim, bus, settings_for, start_bridge, hw)
    call = await sim.place_call(hw, direction="in", remote="201", hold_s=0.1)
    evs = await released(q, call)
    got = sim.received(call)
    assert got["device"][0]["type"] == "setup"
    assert {"type": "name_identification", "name": "Ada from the CRM"} in got["device"][0]["fty"]
    assert [s["type"] for s in got["device"]] == ["setup", "disc"]  # only the setup was held
    [req] = decider.requests
    assert req["type"] == "call.intercept" and req["hw"] == hw and req["call"] == call and req["to"] is True
    assert req["sig"]["type"] == "setup" and req["deadline_ms"] == 250 and req["fail"] == "open"
    msg = decider.messages[0]
    assert msg.routing_key == f"device.{hw}.call.{call}.intercept" and msg.type == "call.intercept"
    assert msg.correlation_id == req["id"] == msg.message_id and msg.expiration is not None
    mine = of_call(evs, call, "call.intercepted", "call.signaling")
    assert mine[0]["type"] == "call.intercepted" and mine[0]["outcome"] == "replace"
    assert mine[0]["action"] == "replaced" and mine[0]["id"] == req["id"] and mine[0]["sig_type"] == "setup"
    assert mine[1]["type"] == "call.signaling" and mine[1]["sig"]["fty"][-1]["name"] == "Ada from the CRM"
    assert sim.stats()["calls_completed"] == 1
    assert bridge.intercept.outcomes["replace"] == 1 and bridge.intercept.held == 0


async def test_a_rejected_call_never_rings_and_the_caller_gets_cause_21(sim, bus, settings_for, start_bridge):
    hw = sim.hw(2)
    await Decider(bus, lambda req: {"id": req["id"], "verdict": "reject"}).start()
    _, q = await bridge_with(sim, bus, settings_for, start_bridge, hw)
    call = await sim.place_call(hw, direction="in", remote="666", hold_s=0.1)
    evs = await released(q, call)
    got = sim.received(call)
    assert got["device"] == []  # the phone never saw the setup
    assert got["pbx"] == [{"type": "rel", "cau": {"num": 21}}]
    mine = of_call(evs, call, "call.intercepted", "call.signaling", "call.state")
    assert [(e["type"], e.get("origin"), e.get("state")) for e in mine] == [
        ("call.intercepted", None, None), ("call.signaling", "pbx", None), ("call.state", None, "setup"),
        ("call.signaling", "intercept", None), ("call.state", None, "released")]
    assert mine[0]["outcome"] == "reject" and mine[0]["cause"] == 21 and mine[0]["action"] == "rejected"
    assert mine[-1]["cause"]["num"] == 21
    await eventually(lambda: sim.stats()["calls_completed"] == 1, 5, "the call ended")


async def test_nobody_bound_is_unroutable_and_the_call_goes_on_at_once(sim, bus, settings_for, start_bridge):
    hw = sim.hw(3)
    _, q = await bridge_with(sim, bus, settings_for, start_bridge, hw, intercept_deadline_ms=4000)
    call = await sim.place_call(hw, direction="in", hold_s=0.1)
    evs = await released(q, call)
    [ev] = of_call(evs, call, "call.intercepted")
    assert ev["outcome"] == "unroutable" and ev["action"] == "forwarded"
    assert ev["waited_ms"] < 4000  # not the deadline's wait (the margin is the whole deadline)
    assert sim.received(call)["device"][0]["type"] == "setup"
    assert sim.stats()["calls_completed"] == 1


@pytest.mark.parametrize("fail", ["open", "closed"])
async def test_a_silent_decider_costs_the_deadline_then_the_fail_policy(fail, sim, bus, settings_for, start_bridge):
    hw = sim.hw(4)
    decider = await Decider(bus, lambda req: None).start()
    _, q = await bridge_with(sim, bus, settings_for, start_bridge, hw, intercept_deadline_ms=300,
                             intercept_fail=fail, intercept_cause=17)
    call = await sim.place_call(hw, direction="in", hold_s=0.1)
    evs = await released(q, call)
    [ev] = of_call(evs, call, "call.intercepted")
    assert ev["outcome"] == "timeout" and ev["waited_ms"] >= 300
    assert len(decider.requests) == 1
    got = sim.received(call)
    if fail == "open":
        assert ev["action"] == "forwarded" and got["device"][0]["type"] == "setup"
        await eventually(lambda: sim.stats()["calls_completed"] == 1, 5, "the call completed")
    else:
        assert ev["action"] == "rejected" and ev["cause"] == 17
        assert got == {"device": [], "pbx": [{"type": "rel", "cau": {"num": 17}}]}


@pytest.mark.parametrize("verdict, reason", [
    (lambda req: {"id": req["id"], "verdict": "forward", "sig": {"type": "alert"}}, "is not the held message's"),
    (lambda req: {"id": req["id"], "verdict": "reject", "cause": 300}, "$.cause"),
    (lambda req: {"id": req["id"], "verdict": "forward", "extra": True}, "unknown field `extra`"),
    (lambda req: b"not json", "not JSON"),
])
async def test_a_bad_verdict_is_refused_and_the_message_forwarded_unchanged(
        verdict, reason, sim, bus, settings_for, start_bridge):
    hw = sim.hw(5)
    await Decider(bus, verdict).start()
    _, q = await bridge_with(sim, bus, settings_for, start_bridge, hw, intercept_fail="closed")
    call = await sim.place_call(hw, direction="in", hold_s=0.1)
    evs = await released(q, call)
    [ev] = of_call(evs, call, "call.intercepted")
    assert ev["outcome"] == "bad-verdict" and ev["action"] == "forwarded" and reason in ev["error"]
    setup = sim.received(call)["device"][0]
    assert setup["type"] == "setup" and setup["fty"][0]["name"] != "x"
    await eventually(lambda: sim.stats()["calls_completed"] == 1, 5, "the call completed")


# ------------------------------------------------------------------------------- order, outages, stop
@pytest.fixture
async def fake_pbx():
    fake = await FakePbx(PASSWORD).start()
    yield fake
    await fake.stop()


def sig_frame(call: int, sig: str, to: bool = True, src: str = "FAKE1") -> bytes:
    return m.encode(m.Signaling(call=call, sig=m.Raw(sig.encode()), to=True if to else m.UNSET, src=src))


async def test_a_call_s_later_messages_wait_in_order_other_calls_do_not(fake_pbx, bus, settings_for, start_bridge):
    held = asyncio.Event()
    answers: list = []

    def answer(req):
        answers.append(req)
        held.set()
        return None  # answered by the test below, when it has checked what passed meanwhile

    decider = await Decider(bus, answer).start()
    bridge = await start_bridge(settings_for(None, pbx_url=fake_pbx.url, devices="FAKE1",
                                             intercept="*=setup:device,conn:device",
                                             intercept_deadline_ms=4000))
    sess = await fake_pbx.wait_session()
    await sess.send(sig_frame(7, '{"type":"setup","cg":{"num":"1"}}'))
    await asyncio.wait_for(held.wait(), 10)
    await sess.send(sig_frame(7, '{"type":"info"}', to=False))  # same call, other direction
    await sess.send(sig_frame(7, '{"type":"conn"}'))  # same call: intercepted too, after the setup
    await sess.send(sig_frame(8, '{"type":"alert"}'))  # another call: at once
    await sess.until_received(1, 5)
    assert [json.loads(f)["call"] for f in sess.received] == [8]
    req = answers[0]
    await decider.ch.default_exchange.publish(aio_pika.Message(
        json.dumps({"id": req["id"], "verdict": "forward"}).encode(), correlation_id=req["id"]),
        routing_key=decider.messages[0].reply_to)
    await eventually(lambda: len(answers) == 2, 5, "the conn was held in its turn")
    assert [json.loads(f)["sig"]["type"] for f in sess.received] == ["alert", "setup", "info"]
    req = answers[1]
    await decider.ch.default_exchange.publish(aio_pika.Message(
        json.dumps({"id": req["id"], "verdict": "forward"}).encode(), correlation_id=req["id"]),
        routing_key=decider.messages[1].reply_to)
    await sess.until_received(4, 5)
    assert [json.loads(f)["sig"]["type"] for f in sess.received] == ["alert", "setup", "info", "conn"]
    assert sess.received[1] == sig_frame(7, '{"type":"setup","cg":{"num":"1"}}')  # byte for byte
    assert bridge.intercept.outcomes["forward"] == 2


async def test_a_broker_cut_while_held_forwards_at_once(fake_pbx, bus, proxy, settings_for, start_bridge):
    held = asyncio.Event()
    await Decider(bus, lambda req: held.set()).start()
    bridge = await start_bridge(settings_for(None, pbx_url=fake_pbx.url, devices="FAKE1",
                                             intercept="*=setup:device", intercept_deadline_ms=4000,
                                             amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
                                             heartbeat_s=1))
    sess = await fake_pbx.wait_session()
    await sess.send(sig_frame(9, '{"type":"setup"}'))
    await asyncio.wait_for(held.wait(), 10)
    assert sess.received == []
    proxy.cut()
    await sess.until_received(1, 3.5)  # before the 4 s deadline: the link's loss ended the hold
    assert json.loads(sess.received[0])["sig"]["type"] == "setup"
    assert bridge.intercept.outcomes["broker-down"] == 1 and bridge.intercept.outcomes["timeout"] == 0
    # while the broker is away a new hold ends at once too
    await sess.send(sig_frame(10, '{"type":"setup"}'))
    await sess.until_received(2, 3)
    assert bridge.intercept.outcomes["broker-down"] == 2
    proxy.restore()


async def test_a_stop_while_held_forwards(fake_pbx, bus, settings_for, start_bridge):
    held = asyncio.Event()
    await Decider(bus, lambda req: held.set()).start()
    bridge = await start_bridge(settings_for(None, pbx_url=fake_pbx.url, devices="FAKE1",
                                             intercept="*=setup:device", intercept_deadline_ms=4000))
    sess = await fake_pbx.wait_session()
    await sess.send(sig_frame(11, '{"type":"setup"}'))
    await asyncio.wait_for(held.wait(), 10)
    stopping = asyncio.create_task(bridge.stop(5))
    await sess.until_received(1, 3)
    assert json.loads(sess.received[0])["sig"]["type"] == "setup"
    await stopping
    assert bridge.intercept.outcomes["stopping"] == 1


# ------------------------------------------------------------------------------- the command
async def test_the_intercept_command_switches_a_device_on_and_off(sim, bus, settings_for, start_bridge):
    hw = sim.hw(6)
    decider = await Decider(bus, lambda req: {"id": req["id"], "verdict": "forward"}).start()
    _, q = await bridge_with(sim, bus, settings_for, start_bridge, hw, intercept="")
    reply = await bus.command(hw, "intercept", {"rules": [{"type": "setup", "to": True, "deadline_ms": 500}]})
    assert reply == {"ok": True, "v": 1, "command": "intercept", "hw": hw, "rules": [
        {"type": "setup", "to": True, "deadline_ms": 500, "fail": "open", "cause": 21, "source": "command"}]}
    call = await sim.place_call(hw, direction="in", hold_s=0.1)
    await released(q, call)
    assert len(decider.requests) == 1
    reply = await bus.command(hw, "intercept", {"rules": []})
    assert reply["ok"] is True and reply["rules"] == []
    call = await sim.place_call(hw, direction="in", hold_s=0.1)
    await released(q, call)
    assert len(decider.requests) == 1
    bad = await bus.command(hw, "intercept", {"rules": [{"type": "setup", "to": True, "deadline_ms": 10}]})
    assert bad["ok"] is False and "$.rules[0].deadline_ms" in bad["error"]


@pytest.mark.parametrize("how", ["stop", "broker-cut"])
async def test_command_rules_survive_failover_with_leases(how, sim, bus, proxy, start_bridge, lease_settings):
    decider = await Decider(bus, lambda req: {"id": req["id"], "verdict": "forward"}).start()
    a = await start_bridge(lease_settings(1, amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
                                          heartbeat_s=1))
    await eventually(lambda: len(a.leases.tokens) == N, 15, "one replica holds every device")
    hw = hw_id(3)
    reply = await bus.command(hw, "intercept", {"rules": [{"type": "setup", "to": True}]})
    assert reply["ok"] is True and [r["type"] for r in reply["rules"]] == ["setup"]
    b = await start_bridge(lease_settings(2))
    await eventually(lambda: len(b.leases.members.live) == 2, 10, "the replicas hear each other")
    if how == "stop":
        await a.stop(3)
    else:  # the holder loses the broker: its lease channel with it (the tokens go to b)
        proxy.cut()
    await eventually(lambda: b.leases.holds(hw) and b.pbx.runners.get(hw) is not None
                     and b.pbx.runners[hw].device.attached, 15, "the survivor attached the device")
    assert [r.type for r in b.rules.effective(hw)] == ["setup"]
    call = await sim.place_call(hw, direction="in", hold_s=0.1)
    await eventually(lambda: any(r["call"] == call for r in decider.requests), 10, "the setup was intercepted")
    assert b.intercept.outcomes["forward"] >= 1 or b.intercept.held


# ------------------------------------------------------------------------------- tracing, metrics
async def test_the_round_trip_is_in_the_call_s_trace_and_counted(sim, bus, settings_for, start_bridge):
    from opentelemetry import propagate
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from bridge import tracing
    from tests.integration.test_observability import _get, http_port

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.configure(provider)
    try:
        hw = sim.hw(7)
        decided = []

        class Continuing(Decider):  # continues the request's trace, its verdict carries its own
            async def _on(self, msg):
                req = json.loads(msg.body)
                ctx = propagate.extract({k: v for k, v in msg.headers.items() if isinstance(v, str)})
                with provider.get_tracer("decider").start_as_current_span("decide", context=ctx) as span:
                    headers: dict = {}
                    propagate.inject(headers)
                    decided.append(span.get_span_context())
                await self.ch.default_exchange.publish(aio_pika.Message(
                    json.dumps({"id": req["id"], "verdict": "forward"}).encode(),
                    correlation_id=msg.correlation_id, headers=headers), routing_key=msg.reply_to)

        await Continuing(bus, None).start()
        bridge, q = await bridge_with(sim, bus, settings_for, start_bridge, hw)
        call = await sim.place_call(hw, direction="in", hold_s=0.05)
        evs = await released(q, call)
        [span] = [s for s in exporter.get_finished_spans() if s.name.startswith("intercept ")]
        assert span.name == "intercept device.{hw}.call.{call}.intercept"
        assert span.attributes["epsignal.intercept.outcome"] == "forward"
        assert span.attributes["epsignal.call"] == call and span.attributes["epsignal.sig.type"] == "setup"
        [d] = decided
        assert d.trace_id == span.context.trace_id  # the decider continued the call's trace
        assert [link.context.span_id for link in span.links] == [d.span_id]
        [ev] = [e for e in evs if e.body["type"] == "call.intercepted"]
        assert int(ev.message.headers["traceparent"].split("-")[2], 16) == span.context.span_id
        status, text = await _get(f"http://127.0.0.1:{http_port(bridge)}/metrics")
        assert status == 200
        assert 'epsignal_intercept_outcomes_total{outcome="forward"} 1.0' in text
        assert "epsignal_intercept_held 0.0" in text and "epsignal_intercept_wait_seconds_count" in text
    finally:
        tracing.disable()


async def test_late_and_unknown_verdicts_are_counted_and_change_nothing(sim, bus, settings_for, start_bridge):
    """A decider that answers twice (the second answer comes after the hold ended: late) and one
    that answers an id the bridge never asked (unknown): both are counted in
    ``epsignal_intercept_verdicts_ignored``, and the call goes on as the first verdict said."""
    from tests.integration.test_observability import _get, http_port

    hw = sim.hw(8)

    class Twice(Decider):
        async def _on(self, msg):
            req = json.loads(msg.body)
            self.requests.append(req)
            answers = [{"id": req["id"], "verdict": "forward"},  # decides the hold
                       {"id": req["id"], "verdict": "reject", "cause": 21},  # late
                       {"id": "not-a-request-of-this-bridge", "verdict": "reject", "cause": 21}]  # unknown
            for a in answers:
                await self.ch.default_exchange.publish(aio_pika.Message(
                    json.dumps(a).encode(), correlation_id=a["id"]), routing_key=msg.reply_to)

    decider = await Twice(bus, None).start()
    bridge, q = await bridge_with(sim, bus, settings_for, start_bridge, hw)
    call = await sim.place_call(hw, direction="in", hold_s=0.05)
    evs = await released(q, call)
    [ev] = of_call(evs, call, "call.intercepted")
    assert ev["outcome"] == "forward" and ev["action"] == "forwarded"
    assert len(decider.requests) == 1
    assert sim.received(call)["device"][0]["type"] == "setup"  # the first verdict, not the reject
    await eventually(lambda: bridge.intercept.ignored == {"late": 1, "unknown": 1}, 5,
                     "both ignored verdicts counted")
    status, text = await _get(f"http://127.0.0.1:{http_port(bridge)}/metrics")
    assert status == 200
    assert 'epsignal_intercept_verdicts_ignored_total{reason="late"} 1.0' in text
    assert 'epsignal_intercept_verdicts_ignored_total{reason="unknown"} 1.0' in text
    assert 'epsignal_intercept_outcomes_total{outcome="forward"} 1.0' in text


async def test_the_intercept_channel_closed_alone_is_opened_again(sim, bus, settings_for, start_bridge, caplog):
    """The broker closes the intercept channel alone (a channel error; the connection lives):
    holds end broker-down, and the channel is opened again on the same connection. Before, every
    later request ended broker-down (the fail policy, no decider asked) until the next reconnect."""
    hw = sim.hw(6)
    decider = await Decider(bus, lambda req: renamed(req, "Grace")).start()
    bridge, q = await bridge_with(sim, bus, settings_for, start_bridge, hw)
    reconnects = bridge.link.reconnects
    ch = bridge.intercept._ch
    await ch.basic_nack(999_999)  # PRECONDITION_FAILED - unknown delivery tag: the channel closes
    await eventually(lambda: bridge.intercept._ch not in (None, ch), 10, "the intercept channel opened again")
    call = await sim.place_call(hw, direction="in", remote="201", hold_s=0.1)
    evs = await released(q, call)
    [ev] = of_call(evs, call, "call.intercepted")
    assert ev["outcome"] == "replace", ev
    assert {"type": "name_identification", "name": "Grace"} in sim.received(call)["device"][0]["fty"]
    assert len(decider.requests) == 1 and bridge.link.reconnects == reconnects, "the connection was not lost"
    assert any("intercept channel closed by the broker" in r.getMessage() for r in caplog.records)


async def test_an_intercept_channel_closed_again_and_again_is_opened_again_ever_later(
        sim, bus, settings_for, start_bridge, caplog):
    """A broker that closes the intercept channel again soon after each reopening (say, every
    request to a deleted exchange): it is opened again after 0.1 s, 0.2 s, 0.4 s, ... (at most
    5 s), not at once every time (a new channel and a WARNING per request); once it stays up it
    serves as before."""
    hw = sim.hw(7)
    decider = await Decider(bus, lambda req: renamed(req, "Ada")).start()
    bridge, q = await bridge_with(sim, bus, settings_for, start_bridge, hw)
    reconnects = bridge.link.reconnects
    t0 = time.monotonic()
    for _ in range(5):  # closed at once after each reopening: five in a row
        ch = bridge.intercept._ch
        await ch.basic_nack(999_999)  # PRECONDITION_FAILED - unknown delivery tag: the channel closes
        await eventually(lambda ch=ch: bridge.intercept._ch not in (None, ch), 15, "the intercept channel opened again")
    took = time.monotonic() - t0
    said = [r.getMessage() for r in caplog.records if "intercept channel closed by the broker" in r.getMessage()]
    assert len(said) == 5 and "opening it again in" not in said[0]
    assert [m.split("opening it again in ")[1].split(" s")[0] for m in said[1:]] == ["0.1", "0.2", "0.4", "0.8"]
    assert took >= 1.5  # the pauses were made: 0.1 + 0.2 + 0.4 + 0.8
    call = await sim.place_call(hw, direction="in", remote="202", hold_s=0.1)
    [ev] = of_call(await released(q, call), call, "call.intercepted")
    assert ev["outcome"] == "replace", ev
    assert len(decider.requests) == 1 and bridge.link.reconnects == reconnects, "the connection was not lost"


async def test_a_renew_pausing_for_a_lost_connection_does_not_swallow_the_next_one_s(
        sim, bus, settings_for, start_bridge):
    """The intercept channel closed again and again: its reopening waits (0.1 s, 0.2 s, ...).
    The connection is lost during such a pause and the new one's intercept channel is closed
    at once too: that close must be answered on the new connection, not dropped as "being
    reopened already" (the pausing reopen is for the old connection and gives up)."""
    hw = sim.hw(8)
    bridge, _ = await bridge_with(sim, bus, settings_for, start_bridge, hw)
    for _ in range(4):  # in a row: the next reopening waits 0.8 s
        ch = bridge.intercept._ch
        await ch.basic_nack(999_999)  # PRECONDITION_FAILED - unknown delivery tag: the channel closes
        await eventually(lambda ch=ch: bridge.intercept._ch not in (None, ch), 15, "the intercept channel opened again")
    ch = bridge.intercept._ch
    await ch.basic_nack(999_999)  # the fifth: its reopening waits 0.8 s ...
    await eventually(lambda: ch.is_closed, 5, "the intercept channel closed")
    before = bridge.link.connection
    bridge.link.reset("test: a new connection", bridge.link.lost)  # ... and the connection goes meanwhile
    await eventually(lambda: bridge.link.ready and bridge.link.connection is not before
                     and bridge.intercept._ch is not None and not bridge.intercept._ch.is_closed,
                     15, "the new connection's intercept channel")
    new = bridge.intercept._ch
    await new.basic_nack(999_999)  # closed at once on the new connection, while the old reopening still waits
    await eventually(lambda: bridge.intercept._ch is not None and bridge.intercept._ch is not new
                     and not bridge.intercept._ch.is_closed, 15, "the intercept channel opened again")
    assert bridge.link.connection is not before
