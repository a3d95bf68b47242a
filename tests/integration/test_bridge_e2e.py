"""The bridge end to end: the real simulator, the real RabbitMQ, a consumer bound to device.#."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import aio_pika
import pytest

from bridge import routing
from bridge.protocol.messages import CallState
from tests.faults.helpers import eventually, queue_counts

pytestmark = pytest.mark.broker


def states(events, call=None):
    return [e.body["state"] for e in events
            if e.body["type"] == "call.state" and (call is None or e.body["call"] == call)]


def is_state(state, call=None):
    return lambda e: e.body["type"] == "call.state" and e.body["state"] == state and (
        call is None or e.body["call"] == call)


async def attached(q, *hws):
    """Every event of ``q`` up to the ``attached`` events of ``hws`` (in any order)."""
    want = {f"device.{routing.word(hw)}.attached" for hw in hws}

    def all_seen(e) -> bool:
        want.discard(e.key)
        return not want
    return await q.until(all_seen)


async def start_attached(bus, start_bridge, settings, *hws):
    """The bridge started with ``hws`` attached: their ``attached`` events came (a queue bound
    before the start sees them)."""
    q = await bus.bind(*(f"device.{routing.word(hw)}.attached" for hw in hws))
    bridge = await start_bridge(settings)
    await attached(q, *hws)
    return bridge


async def everything_so_far(q, bus, bridge, key: str):
    """The events of ``q`` until now, and none of the bridge's still on its way: once the bridge
    has every event confirmed (in the queue), a marker the test publishes after them to ``key``
    (one of ``q``'s patterns) comes last. An absence is proven by that later arrival."""
    assert await bridge.publisher.flush(10)
    marker = uuid.uuid4().hex
    await bus.events.publish(aio_pika.Message(json.dumps({"type": "marker", "marker": marker}).encode()), key)
    evs = await q.until(lambda e: e.body.get("marker") == marker)
    return evs[:-1]


# ------------------------------------------------------------------------------- attach / detach
async def test_attach_at_start_and_events_have_envelope(sim, bus, settings_for, start_bridge):
    hws = [sim.hw(1), sim.hw(2)]
    q = await bus.bind("device.#")
    await start_bridge(settings_for(sim, devices=",".join(hws)))
    got = {}
    async with asyncio.timeout(10):
        while len(got) < 2:
            e = await q.get()
            if e.body["type"] == "attached":
                got[e.body["hw"]] = e
    assert set(got) == set(hws)
    e = got[hws[0]]
    m = e.message
    assert e.key == f"device.{hws[0]}.attached"
    assert m.content_type == "application/json" and m.delivery_mode == 2 and m.type == "attached"
    assert m.message_id == f"{e.body['instance']}/{hws[0]}/{e.body['seq']}" and m.timestamp is not None
    assert e.body["seq"] == 1 and e.body["v"] == 1 and e.body["instance"].startswith("test-")
    assert e.body["attach"]["stun"] == ["stun1.example.net", "stun2.example.net"]
    assert "turnPwd" not in m.body.decode() and "turnPwd" not in e.body["attach"]
    assert sim.stats()["attached_devices"] == 2


async def test_attach_and_detach_by_command(sim, bus, settings_for, start_bridge):
    hw = sim.hw(3)
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(sim))
    reply = await bus.command(hw, "attach")
    assert reply["ok"] is True and reply["hw"] == hw and reply["attached"] is True
    assert reply["attach"]["country"] == "49" and "turnPwd" not in reply["attach"]
    await attached(q, hw)
    # idempotent: attaching again answers ok and opens no second session
    again = await bus.command(hw, "attach")
    assert again["ok"] is True and sim.stats()["attach_conflicts"] == 0
    reply = await bus.command(hw, "detach")
    assert reply == {"ok": True, "v": 1, "command": "detach", "hw": hw, "was_attached": True}
    ev = await q.until(lambda e: e.body["type"] == "detached")
    assert ev[-1].body["reason"] == "command"
    await eventually(lambda: sim.stats()["attached_devices"] == 0, 5, "the PBX session of the device ended")
    # detach of a detached device: ok too
    assert (await bus.command(hw, "detach"))["was_attached"] is False
    assert hw not in bridge.pbx.runners


async def test_late_attach_and_detach_on_unregister(sim, bus, settings_for, start_bridge):
    hw = sim.hw(sim.config.devices + 1)  # known to the PBX, not registered
    q = await bus.bind("device.#")
    await start_bridge(settings_for(sim))
    reply = await bus.command(hw, "attach")
    assert reply["ok"] is True and reply["attached"] is False
    assert q.drain() == []
    sim.register(hw)
    await attached(q, hw)
    sim.unregister(hw)
    ev = await q.until(lambda e: e.body["type"] == "detached")
    assert ev[-1].body["reason"] == "unregistered" and ev[-1].body["hw"] == hw
    sim.register(hw)
    await attached(q, hw)


async def test_unknown_device_attach_fails(sim, bus, settings_for, start_bridge):
    q = await bus.bind("device.#")
    await start_bridge(settings_for(sim))
    reply = await bus.command("nosuchdevice", "attach")
    assert reply["ok"] is False and "unknown device" in reply["error"]
    ev = await q.get()
    assert ev.key == "device.nosuchdevice.attach.failed" and "unknown device" in ev.body["error"]
    dead = await bus.dead_letters(1)
    assert "unknown device" in dead[0].headers["x-epsignal-error"]


# ------------------------------------------------------------------------------- call states
SCENARIOS = {
    "incoming": (dict(direction="in", answer=True, hold_s=0.2),
                 ["setup", "alert", "connected", "disconnected", "released"], True),
    "outgoing": (dict(direction="out", answer=True, hold_s=0.2, hangup="device"),
                 ["setup", "call-proc", "alert", "connected", "disconnecting", "released"], False),
    "busy": (dict(direction="out", busy=True), ["setup", "released"], False),
    "no-answer": (dict(direction="in", answer=False), ["setup", "alert", "released"], True),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_call_states_in_order(name, sim, bus, settings_for, start_bridge):
    kw, expected, incoming = SCENARIOS[name]
    hw = sim.hw(4)
    await start_attached(bus, start_bridge, settings_for(sim, devices=hw), hw)
    q = await bus.bind(f"device.{hw}.call.*.state")
    call = await sim.place_call(hw, remote="201", **kw)
    evs = await q.until(is_state("released", call))
    got = states(evs, call)
    # the order of the expected states holds; intermediate states may be richer than the list
    it = iter(got)
    assert all(s in it for s in expected), (got, expected)
    assert got[-1] == "released"
    first = evs[0].body
    assert first["in"] is incoming and first["remote"]["num"] == "201"
    assert sim.stats()["calls_stalled"] == 0


async def test_hold_retrieve_and_transfer(sim, bus, settings_for, start_bridge):
    hw = sim.hw(5)
    await start_attached(bus, start_bridge, settings_for(sim, devices=hw), hw)
    q = await bus.bind(f"device.{hw}.call.*.state")
    call = await sim.place_call(hw, direction="in", hold=True, hold_s=0.4)
    evs = await q.until(is_state("released", call))
    held = [e.body["held"] for e in evs if e.body["state"] == "connected"]
    assert True in held and held[-1] is False, held
    call = await sim.place_call(hw, direction="in", transfer_to="202", hold_s=0.2)
    evs = await q.until(is_state("released", call))
    assert "connected" in states(evs, call) and evs[-1].body["cause"]["num"] == 16


async def test_sync_states_on_attach(sim, bus, settings_for, start_bridge):
    hw = sim.hw(6)
    call = await sim.place_call(hw, direction="in", answer=True, hold_s=5.0)
    await eventually(lambda: sim.call(call).state is CallState.CONNECTED, 5,
                     "the call connected, not through the bridge yet")
    q = await bus.bind(f"device.{hw}.#")
    await start_bridge(settings_for(sim, devices=hw))
    evs = await q.until(lambda e: e.body["type"] == "call.state")
    ev = evs[-1].body
    assert ev["call"] == call and ev["sync"] is True and ev["state"] == "connected" and ev["in"] is True


async def test_call_placed_by_command_reaches_connected(sim, bus, settings_for, start_bridge):
    hw = sim.hw(7)
    await start_attached(bus, start_bridge, settings_for(sim, devices=hw), hw)
    q = await bus.bind(f"device.{hw}.call.*.state")
    reply = await bus.command(hw, "signaling", {"call": -1, "sig": {"type": "setup", "cd": {"num": "201"}}})
    assert reply == {"ok": True, "v": 1, "command": "signaling", "hw": hw}
    evs = await q.until(is_state("connected", -1))
    assert states(evs, -1)[0] == "setup" and evs[-1].body["app"] is True
    assert evs[-1].body["remote"]["num"] == "201"
    reply = await bus.command(hw, "signaling", {"call": -1, "sig": {"type": "rel", "cau": {"num": 16}}})
    assert reply["ok"] is True
    evs = await q.until(is_state("released", -1))


async def test_random_traffic_every_call_completes(sim, bus, settings_for, start_bridge):
    hws = [sim.hw(i) for i in range(1, 11)]
    q = await bus.bind("device.*.call.*.signaling")
    bridge = await start_attached(bus, start_bridge, settings_for(sim, devices=",".join(hws)), *hws)
    sim.config.call_duration_s = 0.2
    started = sim.stats()["calls_started"]
    for i in range(30):
        await sim.place_call(hws[i % 10], direction="in" if i % 2 else "out", hold_s=0.1,
                             busy=i % 7 == 0, hold=i % 5 == 0)
    await sim.wait_idle(20)
    st = sim.stats()
    assert st["calls_stalled"] == 0
    assert st["calls_completed"] - 0 >= started + 30 - st["calls_stalled"] - started
    sigs = await everything_so_far(q, bus, bridge, "device.marker.call.0.signaling")
    assert len(sigs) == st["messages_forwarded"]  # every forwarded message was published too, once
    assert all(e.body["origin"] == "pbx" for e in sigs)
    # per-device seq: no gaps, no duplicates
    for hw in hws:
        seqs = [e.body["seq"] for e in sigs if e.body["hw"] == hw]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert bridge.publisher.stats.failed == 0


# ------------------------------------------------------------------------------- bad commands
BAD = [
    ("not-json", "signaling", b"{nope", "not JSON"),
    ("schema", "signaling", b'{"call": "x", "sig": {"type": "setup"}}', "Expected `int`"),
    ("sig-not-object", "signaling", b'{"call": 1, "sig": 5}', "$.sig"),
    ("sig-without-type", "signaling", b'{"call": 1, "sig": {}}', "type"),
    ("not-attached", "signaling", b'{"call": -1, "sig": {"type": "setup"}}', "not attached"),
    ("unknown-verb", "explode", b"{}", "unknown command"),
    # a misspelt `to` would send a setup toward the PBX instead of the device (issue 16.2)
    ("misspelt-field", "signaling", b'{"call":-5,"To":true,"sig":{"type":"setup"}}', "unknown field `To`"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
async def test_bad_commands_are_answered_and_dead_lettered(case, sim, bus, settings_for, start_bridge):
    _, verb, body, needle = case
    await start_bridge(settings_for(sim))
    reply = await bus.command(sim.hw(9), verb, body)
    assert reply["ok"] is False and needle in reply["error"], reply
    dead = await bus.dead_letters(1)
    assert needle in dead[0].headers["x-epsignal-error"] and dead[0].body == body


async def test_bad_key_without_reply_is_dead_lettered(sim, bus, settings_for, start_bridge):
    await start_bridge(settings_for(sim))
    await bus.command("", "", b"{}", key="totally.wrong", reply=False)
    dead = await bus.dead_letters(1)
    assert "routing key 'totally.wrong'" in dead[0].headers["x-epsignal-error"]


async def test_a_deleted_dead_letter_queue_is_declared_again_and_no_refusal_is_lost(sim, bus, settings_for,
                                                                                       start_bridge, caplog):
    """An operator deletes the dead-letter queue while the bridge runs (after it dead-lettered
    into it): the next refused commands' copies come back unroutable (the queue's own
    dead-lettering goes to the same exchange, so rejecting would drop them too). The bridge says
    so once, declares the queue again on a channel of its own (the link, carrying the events,
    stays up) and dead-letters the commands there (they were acked as dead-lettered, and lost,
    before)."""
    bridge = await start_bridge(settings_for(sim))
    await bus.command("", "", b"{}", key="before.delete", reply=False)
    assert "before.delete" in (await bus.dead_letters(1))[0].headers["x-epsignal-error"]
    await bus.channel.queue_delete(bus.s.dead_queue)
    reconnects = bridge.link.reconnects
    replies = await asyncio.gather(*(bus.command(sim.hw(9), "explode", f'{{"n": {i}}}'.encode()) for i in range(3)))
    assert all(r["ok"] is False and "unknown command" in r["error"] for r in replies), replies
    # (RabbitMQ 3.10 answers a basic.get on a quorum queue being declared again with a
    # connection error, "noproc": read only once it holds the copies)
    await eventually(lambda: _ready(bus, bus.s.dead_queue, 3), 10,
                     "the dead-letter queue declared again, with the copies")
    dead = await bus.dead_letters(3)
    assert sorted(d.body for d in dead) == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert all("unknown command" in d.headers["x-epsignal-error"] for d in dead)
    said = [r.getMessage() for r in caplog.records
            if r.levelname == "ERROR" and "came back unroutable" in r.getMessage()]
    assert len(said) == 1 and bus.s.dead_queue in said[0], said
    assert bridge.link.ready and bridge.link.reconnects == reconnects  # the events' link never dropped
    # and the next refusal goes straight there
    await bus.command("", "", b"{}", key="totally.wrong", reply=False)
    assert "routing key 'totally.wrong'" in (await bus.dead_letters(1))[0].headers["x-epsignal-error"]


async def test_refusals_of_commands_with_the_same_message_id_are_dead_letters_with_ids_of_their_own(
        sim, bus, settings_for, start_bridge):
    """A client retrying sends the same message_id again: each refusal is answered (by its
    correlation_id) and dead-lettered with a message_id of its own, the command's in the header
    x-original-message-id (aiormq pairs a returned copy with its publish by message_id)."""
    bridge = await start_bridge(settings_for(sim))
    replies = await asyncio.gather(*(bus.command(sim.hw(9), "explode", f'{{"n": {i}}}'.encode(),
                                                 message_id="retry-1") for i in range(2)))
    assert all(r["ok"] is False and "unknown command" in r["error"] for r in replies), replies
    dead = sorted(await bus.dead_letters(2), key=lambda d: d.body)
    assert [d.body for d in dead] == [b'{"n": 0}', b'{"n": 1}']
    assert [d.headers["x-original-message-id"] for d in dead] == ["retry-1", "retry-1"]
    ids = {d.message_id for d in dead}
    assert len(ids) == 2 and all(i.startswith(f"{bridge.s.instance_id}/.dead/") for i in ids), ids
    # the rest of the command as it came: its correlation_id and reply_to (the reply's)
    assert len({d.correlation_id for d in dead}) == 2 and all(d.reply_to for d in dead)
    assert all("unknown command" in d.headers["x-epsignal-error"] for d in dead)


async def test_refusals_with_the_same_message_id_into_a_deleted_dead_letter_queue_are_all_kept(
        sim, bus, settings_for, start_bridge):
    """The dead-letter queue deleted, refusals of commands with the same message_id at once:
    their copies come back unroutable together. Each copy's return must reach its own refusal
    (with the command's id on the copies, one return resolved another copy's confirm: that copy
    was sent again, and the other acked as dead-lettered while the broker had dropped it)."""
    await start_bridge(settings_for(sim))
    await bus.command("", "", b"{}", key="before.delete", reply=False)
    assert "before.delete" in (await bus.dead_letters(1))[0].headers["x-epsignal-error"]
    await bus.channel.queue_delete(bus.s.dead_queue)
    n = 4
    replies = await asyncio.gather(*(bus.command(sim.hw(9), "explode", f'{{"n": {i}}}'.encode(),
                                                 message_id="same") for i in range(n)))
    assert all(r["ok"] is False for r in replies), replies
    await eventually(lambda: _ready(bus, bus.s.dead_queue, n), 10, "every refusal in the dead-letter queue")
    dead = await bus.dead_letters(n)
    assert sorted(d.body for d in dead) == [f'{{"n": {i}}}'.encode() for i in range(n)]
    # dead-lettered by the bridge, or rejected into the queue's own dead-lettering: kept either way
    assert all(d.headers.get("x-original-message-id") == "same" or d.headers.get("x-death") for d in dead)
    await asyncio.sleep(0.5)
    assert (await queue_counts(bus.conn, bus.s.dead_queue))[0] == 0  # none twice


async def _ready(bus, queue: str, n: int = 1) -> bool:
    return (await queue_counts(bus.conn, queue))[0] >= n


# ------------------------------------------------------------------------------- login
async def test_wrong_password_is_reported_and_not_retried_in_a_tight_loop(
        sim, bus, settings_for, start_bridge, caplog):
    caplog.set_level(logging.ERROR, logger="bridge.pbx")
    bridge = await start_bridge(settings_for(sim, devices=sim.hw(1), pbx_password="wrong", login_retry_s=2.0,
                                             attach_timeout_s=1.0))
    # the first refusal, then the retry: after login_retry_s (2 s), not in a tight loop
    await eventually(lambda: sim.stats()["logins_failed"] >= 1, 10, "the first login refused", interval=0.01)
    t1 = time.monotonic()
    await eventually(lambda: sim.stats()["logins_failed"] >= 2, 10, "the login retried", interval=0.01)
    assert time.monotonic() - t1 > 1.5, "the refused login was retried at once"
    st = sim.stats()
    assert st["attached_devices"] == 0 and st["logins_failed"] == 2
    assert any("refused" in r.getMessage() and "EPSIGNAL_PBX_PASSWORD" in r.getMessage() for r in caplog.records)
    assert all("wrong" not in r.getMessage() for r in caplog.records)
    # readiness and an attach command name the real cause, not "PBX unreachable?" (issue 16.5)
    reasons = " ".join(bridge.not_ready_reasons())
    assert "refused" in reasons and "EPSIGNAL_PBX_PASSWORD" in reasons, reasons
    reply = await bus.command(sim.hw(1), "attach")
    assert reply["ok"] is False and "refused" in reply["error"] and "unreachable" not in reply["error"], reply


async def test_server_mode_verifies_the_pbx_login(sim, bus, settings_for, start_bridge):
    hws = [sim.hw(1), sim.hw(2)]
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(sim, pbx_mode="server", pbx_listen="127.0.0.1:0",
                                             devices=",".join(hws)))
    url = f"ws://127.0.0.1:{bridge.pbx.port}/"
    await sim.connect(url, app="epsignal", password="not-the-password")
    await eventually(lambda: bridge.pbx.logins_failed >= 1, 10, "the wrong login refused")
    await sim.connect(url, app="epsignal", password=bridge.s.pbx_password)
    evs = await attached(q, *hws)
    # nothing came of the refused session: the first events are the good session's attaches
    assert [(e.body["type"], e.body["hw"]) for e in evs] in (
        [("attached", hws[0]), ("attached", hws[1])], [("attached", hws[1]), ("attached", hws[0])]), evs
    call = await sim.place_call(hws[0], direction="in", hold_s=0.1)
    evs = await q.until(is_state("released", call))
    assert "connected" in states(evs, call) and sim.stats()["calls_stalled"] == 0


# ------------------------------------------------------------------------------- odd hw ids
async def test_odd_hw_ids_are_escaped_in_keys_and_commands_reach_them(names, bus, settings_for, start_bridge):
    from bridge.sim import PbxSimulator, SimConfig

    from tests.conftest import PASSWORD

    odd = ["00:90:33.40@01", "dev_1:x", "phone-1.lobby@pbx"]  # valid hw ids (bridge.ids), escaped in keys
    sim = PbxSimulator(SimConfig(password=PASSWORD, devices=1, ring_s=0.05, extra_hw=tuple(odd)))
    await sim.start()
    try:
        q = await bus.bind("device.*.call.*.state", "device.*.attached")
        await start_bridge(settings_for(sim, devices=odd[0]))
        e = (await q.until(lambda e: e.body["type"] == "attached"))[-1]
        assert e.key == "device.00%3A90%3A33%2E40%4001.attached" and e.body["hw"] == odd[0]
        assert len(e.key.split(".")) == 3
        for hw in odd[1:]:
            reply = await bus.command(hw, "attach", key=f"device.{routing.word(hw)}.attach")
            assert reply["ok"] is True and reply["hw"] == hw
        call = await sim.place_call(odd[2], direction="in", hold_s=0.05)
        evs = await q.until(is_state("released", call))
        keys = {x.key for x in evs if x.body["type"] == "call.state"}
        assert keys == {f"device.{routing.word(odd[2])}.call.{call}.state"}
        assert all(len(k.split(".")) == 5 for k in keys)
    finally:
        await sim.stop()


async def test_many_commands_in_flight_at_once(sim, bus, settings_for, start_bridge):
    bridge = await start_bridge(settings_for(sim, attach_concurrency=4))
    hws = [sim.hw(i) for i in range(1, 16)]
    replies = await asyncio.gather(*(bus.command(hw, "attach") for hw in hws))
    assert [r["hw"] for r in replies] == hws and all(r["ok"] for r in replies)
    assert sim.stats()["attached_devices"] == 15 and len(bridge.pbx.runners) == 15
    # signaling commands for one device are carried out in the order they were sent
    hw = hws[0]
    q = await bus.bind(f"device.{hw}.call.*.signaling")
    for i in range(1, 21):
        await bus.command(hw, "signaling", {"call": -i, "sig": {"type": "setup", "cd": {"num": "201"}}},
                          reply=False)
    evs = await q.until(lambda e: e.body["origin"] == "command" and e.body["call"] == -20)
    assert [e.body["call"] for e in evs if e.body["origin"] == "command"] == [-i for i in range(1, 21)]


async def test_the_call_limits_set_reach_every_device(sim, settings_for, start_bridge):
    from bridge.protocol.callstate import CallLimits

    b = await start_bridge(settings_for(sim, devices=sim.hw(1), max_calls_per_device=7, call_idle_s=60))
    assert b.pbx.runners[sim.hw(1)].device.tracker.limits == CallLimits(7, 60.0, 86400.0)


async def test_a_deployment_can_publish_call_states_only(sim, bus, settings_for, start_bridge):
    hw = sim.hw(2)
    q = await bus.bind(f"device.{hw}.#")
    bridge = await start_bridge(settings_for(sim, devices=hw, event_kinds="call.state"))
    await eventually(lambda: bridge.pbx.runners[hw].device.attached, 10, "the device attached")
    call = await sim.place_call(hw, direction="in", hold_s=0.05)
    evs = await q.until(lambda e: e.body.get("call") == call and e.body.get("state") == "released")
    assert {e.body["type"] for e in evs} == {"call.state"}
    assert [e.body["seq"] for e in evs] == list(range(1, len(evs) + 1))  # numbered without gaps
    assert sim.stats()["calls_stalled"] == 0 and bridge.publisher.buffer.stats.appended == len(evs)
