"""Fuzzing a running bridge from both sides: 100,000 malformed frames from the PBX into a live
session, and malformed commands into the live command consumer (10,000 in the suite, 100,000
with ``EPSIGNAL_FUZZ_COMMANDS=100000``), each interleaved with good traffic that must come
through untouched. The bugs found (all fixed) are the regression tests in the middle of the file.

The generators are seeded (``EPSIGNAL_FUZZ_SEED``, see tests/faults/fuzzgen.py); the figures of
each run are printed (``pytest -s``) for docs/RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import aio_pika
import aiohttp
import pytest
from pamqp.commands import Basic

from bridge.metrics import FRAMES
from bridge.protocol import messages as m
from bridge.protocol.errors import FrameError
from tests.faults.fakepbx import FakePbx, attached_session
from tests.faults.fuzzgen import SEED, CommandGen, FrameGen
from tests.faults.helpers import (
    bridge_env, BridgeProcess, eventually, metric, need_rabbitmqctl, publish_command,
    queue_counts, rabbitmq_queue, Replies,
)
from tests.ports import free_port

pytestmark = pytest.mark.broker

HW = "009033400001"
PASSWORD = "fake-pbx-pw"
N_BAD_FRAMES = int(os.environ.get("EPSIGNAL_FUZZ_FRAMES", "100000"))
#: 100,000 (what issue 4 asks) takes about 80-100 s on the 2-core CI machine: the bridge refuses
#: about 1,100 bad commands a second, each dead-lettered with a publisher confirm. A quicker local
#: run: EPSIGNAL_FUZZ_COMMANDS=10000 (figures in docs/RELIABILITY.md)
N_BAD_COMMANDS = int(os.environ.get("EPSIGNAL_FUZZ_COMMANDS", "100000"))


def check_corpus(items):
    """The generator's classes against the frame codec: a mismatch is a generator bug or a codec
    bug, and either must stop the run before it is misread as a session fault."""
    for cls, frame, _ in items:
        try:
            msg = m.decode(frame)
        except FrameError:
            if cls != "bad":
                pytest.fail(f"seed {SEED}: a {cls} frame was rejected by the codec: {frame[:300]!r}")
            continue
        if cls == "bad":
            pytest.fail(f"seed {SEED}: a malformed frame was accepted as {type(msg).__name__}: {frame[:300]!r}")
        assert type(msg) is m.Signaling and (msg.call >= 0) == (cls == "fwd"), frame[:300]


@pytest.fixture
async def fake_pbx():
    fake = await FakePbx(PASSWORD).start()
    yield fake
    await fake.stop()


# ------------------------------------------------------------------------------- PBX side
@pytest.mark.timeout(240)
async def test_100k_malformed_frames_from_the_pbx_do_not_disturb_the_session(
        fake_pbx, bus, settings_for, start_bridge):
    gen = FrameGen(SEED, HW, max_bytes=256 * 1024)
    items: list[tuple[str, bytes, bool]] = []
    for i in range(N_BAD_FRAMES):
        r = gen.r.random()
        items.append(("bad", gen.overlong_bad(gen.r.randint(128 * 1024, 256 * 1024 - 64))
                      if i % 5000 == 4999 else gen.bad(), r < 0.05))
        if i % 20 == 0:
            items.append(("fwd", gen.forwarded(), gen.r.random() < 0.05))
        if i % 200 == 0:
            items.append(("app", gen.app_call(), False))
    check_corpus(items)
    expected = [f for cls, f, _ in items if cls == "fwd"]
    expected_binary = [b for cls, _, b in items if cls == "fwd"]
    n_bad = sum(1 for cls, _, _ in items if cls == "bad")
    n_app = sum(1 for cls, _, _ in items if cls == "app")

    bridge = await start_bridge(settings_for(None, pbx_url=fake_pbx.url, pbx_password=PASSWORD, devices=HW))
    sess = await fake_pbx.wait_session()
    runner = bridge.pbx.runners[HW]
    await eventually(lambda: runner.device.attached, 5, "the device attached")
    bad0, fwd0 = FRAMES.bad_frames, FRAMES.forwarded
    t0 = time.monotonic()
    for _, frame, binary in items:
        await sess.send(frame, text=not binary)
    sentinel = gen.signaling(424242, b'{"type":"info","end":true}')
    await sess.send(sentinel)
    await sess.until_received(len(expected) + 1, timeout=120)
    took = time.monotonic() - t0

    assert sess.received[-1] == sentinel
    got = sess.received[:-1]
    assert len(got) == len(expected)
    mismatch = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None)
    assert mismatch is None, (f"seed {SEED}: forward {mismatch} differs: "
                              f"{got[mismatch][:200]!r} != {expected[mismatch][:200]!r}")
    assert sess.binary[:-1] == expected_binary  # each forward is the kind of frame that came
    assert FRAMES.bad_frames - bad0 == n_bad
    assert FRAMES.forwarded - fwd0 == len(expected) + 1
    # the session is the one from the start: no reconnect, still up, still read
    assert fake_pbx.connections == 1 and not sess.closed.is_set()
    assert runner.reconnects == 0 and runner.session is not None and runner.session.ws.serving
    assert runner.device.attached and not runner.task.done()
    # and it still works both ways: a command goes out on it
    reply = await bus.command(HW, "signaling", {"call": -7, "sig": {"type": "setup", "cd": {"num": "201"}}})
    assert reply["ok"] is True
    await sess.until_received(len(expected) + 2, timeout=5)
    assert json.loads(sess.received[-1])["call"] == -7
    assert await bridge.publisher.flush(30)
    print(f"\nFIGURES fuzz-frames: seed={SEED} malformed={n_bad} forwarded={len(expected)} "
          f"(+1 sentinel) app-calls={n_app} bad_sig={runner.device.bad_sig} "
          f"reconnects={runner.reconnects} events_confirmed={bridge.publisher.stats.confirmed} "
          f"failed={bridge.publisher.stats.failed} seconds={took:.1f}")


# ------------------------------------------------------------------------------- findings (fixed bugs)
async def _session(fake_pbx, settings_for, start_bridge, **kw):
    return await attached_session(fake_pbx, settings_for, start_bridge, HW, **kw)


def _sig(call: int | str, sig: bytes = b'{"type":"alert"}') -> bytes:
    return b'{"api":"EpSignal","mt":"Signaling","src":"%s","call":%s,"sig":%s}' % (HW.encode(), str(call).encode(), sig)


DEPTH = 1000
DEEP = {
    "sig": _sig(1, b'{"type":"alert","x":' + b"[" * DEPTH + b"]" * DEPTH + b"}"),
    "unknown-field": b'{"api":"EpSignal","mt":"Attached","x":' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    "attach-err": b'{"api":"EpSignal","mt":"AttachResult","err":' + b"[" * DEPTH + b"]" * DEPTH + b"}",
    "sync-info": b'{"api":"EpSignal","mt":"Sync","call":1,"info":{"x":' + b"[" * DEPTH + b"]" * DEPTH + b"}}",
    "top-level-array": b"[" * DEPTH + b"]" * DEPTH,
}


@pytest.mark.parametrize("where", list(DEEP))
def test_deeply_nested_frame_is_a_frame_error(where):
    """The root cause, without a session: decode must raise FrameError (a bad frame), nothing else."""
    with pytest.raises(FrameError):
        m.decode(DEEP[where])


async def test_deeply_nested_frame_is_a_bad_frame_not_a_dead_session(fake_pbx, names, bus, tmp_path):
    """The effect on a live session. Run in a bridge process of its own: in pytest's process the
    RecursionError was followed by a SystemError ("AST constructor recursion depth mismatch") when
    pytest next compiled a module, which took the whole run down with an INTERNALERROR."""
    proc = BridgeProcess(bridge_env(names, pbx_url=fake_pbx.url, pbx_password=PASSWORD, devices=HW,
                                    http_port=free_port()), tmp_path).start()
    try:
        sess = await fake_pbx.wait_session(timeout=15)
        await asyncio.sleep(0.3)
        await sess.send(DEEP["sig"])
        after = _sig(2)
        await sess.send(after)
        try:
            await sess.until_received(1, timeout=2)
        finally:
            await asyncio.sleep(0.3)
            crashed = "RecursionError" in proc.stderr() or "session lost" in proc.stderr()
        assert sess.received == [after]
        assert fake_pbx.connections == 1 and not sess.closed.is_set()
        assert not crashed, proc.stderr()[-2000:]
        assert proc.running()
    finally:
        await proc.stop()
        proc.close_files()


async def test_over_long_frame_is_a_bad_frame_not_a_dead_session(fake_pbx, bus, settings_for, start_bridge):
    limit = 64 * 1024
    _, sess, runner = await _session(fake_pbx, settings_for, start_bridge, max_frame_bytes=limit)
    bad0 = FRAMES.bad_frames
    await sess.send(b'{"api":"EpSignal","mt":"Attached","x":"' + b"a" * limit + b'"}')  # limit + 40 bytes
    after = _sig(3)
    await sess.send(after)
    await sess.until_received(1, timeout=3)
    assert sess.received == [after] and FRAMES.bad_frames - bad0 == 1
    assert fake_pbx.connections == 1 and runner.reconnects == 0


async def test_unpublishable_event_does_not_spin_the_publisher(fake_pbx, bus, settings_for, start_bridge):
    bridge, sess, _ = await _session(fake_pbx, settings_for, start_bridge)
    q = await bus.bind("device.#")
    await sess.send(_sig("9" * 250))
    await sess.send(_sig(5))
    await sess.until_received(2, timeout=3)  # both forwarded: calls come first, that part works
    await q.until(lambda e: e.body.get("call") == 5)  # later events still get through
    await asyncio.sleep(1.0)
    ps = bridge.publisher.stats
    assert ps.failed <= 5, f"{ps.failed} failed publish attempts in about a second"
    assert len(bridge.publisher.buffer) == 0  # dropped with a reason (counted), not retried forever
    assert await bridge.publisher.flush(1)


async def test_a_bug_on_a_frame_closes_the_session_which_comes_back(fake_pbx, bus, settings_for, start_bridge,
                                                                   monkeypatch, caplog):
    """Frames are handled in the event loop's callback that read them (bridge/pbx/connection.py):
    a bug there must neither take the event loop's reading down nor leave the PBX's calls waiting
    on a session nobody serves. The frame was forwarded already (forward first); the session is
    closed with 1011, the device reconnects, and forwarding goes on on the new session."""
    from bridge.device import Device

    _, sess, runner = await _session(fake_pbx, settings_for, start_bridge)
    on_frame = Device.on_frame

    def buggy(self, msg):
        if type(msg) is m.Signaling and msg.call == 66:
            raise RuntimeError("a bug on frame 66")
        return on_frame(self, msg)

    monkeypatch.setattr(Device, "on_frame", buggy)
    await sess.send(_sig(66))
    await asyncio.wait_for(sess.closed.wait(), 10)
    assert sess.close_code == 1011
    assert sess.received == [_sig(66)]  # forwarded before the bug
    assert "PBX session failed on a frame" in caplog.text and "a bug on frame 66" in caplog.text
    again = await fake_pbx.wait_session(2, timeout=15)
    await eventually(lambda: runner.device.attached, 5, "the device attached again")
    await again.send(_sig(7))
    await again.until_received(1, timeout=3)
    assert again.received == [_sig(7)]


async def test_events_are_valid_json_even_when_the_sig_is_not_valid_utf8(fake_pbx, bus, settings_for, start_bridge):
    _, sess, _ = await _session(fake_pbx, settings_for, start_bridge)
    q = await bus.channel.declare_queue(exclusive=True)
    await q.bind(bus.events, "device.*.call.*.signaling")
    frame = _sig(6, b'{"type":"alert","dn":"caf\xe9 \xff"}')
    await sess.send(frame)
    await sess.until_received(1, timeout=3)
    assert sess.received == [frame]  # the forward is byte for byte, as it must be
    msg = await eventually(lambda: q.get(no_ack=True, fail=False), 5, "the signaling event")
    body = json.loads(msg.body)  # raises on invalid UTF-8
    assert body["call"] == 6 and body["sig"]["type"] == "alert"


# ------------------------------------------------------------------------------- bus side
def reason_class(err: str) -> str:
    for needle, name in (("rate limit", "rate-limit"), ("unknown command", "unknown-verb"), ("hw id", "bad-hw"),
                         ("not valid UTF-8", "not-utf8"), ("routing key", "bad-key"),
                         ("exceeds the limit", "too-large"), ("not JSON", "not-json"), ("invalid", "invalid-body"),
                         ("not attached", "not-attached"), ("refused to attach", "pbx-refused-attach")):
        if needle in err:
            return name
    return "other: " + err[:60]


@pytest.mark.timeout(400)
async def test_100k_malformed_commands_are_all_dead_lettered_and_good_ones_answered(sim, bus, names, tmp_path):
    """The bridge runs as its own process (its own core: the test's publisher and RabbitMQ take
    the other), with prefetch 256 and the per-device rate limit raised out of the way."""
    need_rabbitmqctl()
    hw = sim.hw(1)
    n_bad = N_BAD_COMMANDS
    every = 1000
    port = free_port()
    from tests.conftest import PASSWORD as SIM_PASSWORD
    proc = BridgeProcess(bridge_env(names, pbx_url=sim.url, pbx_password=SIM_PASSWORD, devices=hw, prefetch=256,
                                    command_rate=1e6, command_burst=10**6, http_port=port, log_level="WARNING"),
                         tmp_path).start()
    conn = await aio_pika.connect("amqp://guest:guest@127.0.0.1/")
    try:
        await eventually(lambda: sim.stats()["attached_devices"] == 1, 15, "the device attached")
        await eventually(lambda: queue_counts(conn, names["commands_queue"]), 10, "the command queue")
        gen = CommandGen(SEED, hw)
        corpus = [gen.next() for _ in range(n_bad)]
        kinds: dict[str, int] = {}
        for _, _, kind in corpus:
            kinds[kind] = kinds.get(kind, 0) + 1

        replies = await Replies(conn).open()
        pub = await conn.channel(publisher_confirms=False)
        ex = await pub.get_exchange(names["commands_exchange"], ensure=False)
        # the bad ones straight on aiormq's channel (the same one, in order): aio-pika's message
        # objects cost the test's process as much CPU as the bridge spends refusing them
        raw_pub = await pub.get_underlay_channel()
        good_ids, bad_reply_ids = [], []
        t0 = time.monotonic()
        for i, (key, body, _) in enumerate(corpus):
            reply_to = None
            cid = f"bad-{i}"
            if i % 100 == 37:  # some bad commands ask for an answer
                reply_to = replies.name
                bad_reply_ids.append(cid)
            await raw_pub.basic_publish(body, exchange=ex.name, routing_key=key, properties=Basic.Properties(
                message_id=cid, correlation_id=cid, reply_to=reply_to))
            if i % every == every - 1:
                n = len(good_ids)
                sig = ({"type": "setup", "cd": {"num": "201"}} if n % 2 == 0 else {"type": "rel", "cau": {"num": 16}})
                gid = f"good-{n}"
                good_ids.append(gid)
                await ex.publish(aio_pika.Message(json.dumps({"call": -(n // 2 + 1), "sig": sig}).encode(),
                                                  message_id=gid, correlation_id=gid, reply_to=replies.name),
                                 f"device.{hw}.signaling")
        published_s = time.monotonic() - t0
        await replies.wait_count(len(good_ids) + len(bad_reply_ids), timeout=300)
        dead_name = names["dead_queue"]

        async def all_dead():
            return (await queue_counts(conn, dead_name))[0] >= n_bad
        await eventually(all_dead, 120, "every bad command in the dead-letter queue", interval=0.5)
        processed_s = time.monotonic() - t0

        for gid in good_ids:
            want = [{"ok": True, "v": 1, "command": "signaling", "hw": hw}]
            assert replies.by_id[gid] == want, (gid, replies.by_id[gid])
        for cid in bad_reply_ids:
            [r] = replies.by_id[cid]
            assert r["ok"] is False and r["error"], r
        assert replies.count == len(good_ids) + len(bad_reply_ids)  # no duplicate answers

        # every bad command exactly once, with the reason in x-epsignal-error
        ch = await conn.channel()
        await ch.set_qos(prefetch_count=2000)
        dq = await ch.declare_queue(dead_name, passive=True)
        seen: set[str] = set()
        reasons: dict[str, int] = {}
        kind_of = {f"bad-{i}": kind for i, (_, _, kind) in enumerate(corpus)}
        dup = no_header = 0
        done = asyncio.Event()

        async def on_dead(msg):  # aiormq's delivery (read as it is: no aio-pika message per copy)
            nonlocal dup, no_header
            props = msg.header.properties
            err = (props.headers or {}).get("x-epsignal-error")
            orig = (props.headers or {}).get("x-original-message-id")  # the command's message_id
            if not isinstance(err, str) or not err:
                no_header += 1
            else:
                c = f"{kind_of.get(orig)}->{reason_class(err)}"
                reasons[c] = reasons.get(c, 0) + 1
            if orig in seen:
                dup += 1
            seen.add(orig)
            if len(seen) + dup >= n_bad:
                done.set()
        raw_ch = await ch.get_underlay_channel()
        tag = (await raw_ch.basic_consume(dead_name, on_dead, no_ack=True)).consumer_tag
        await asyncio.wait_for(done.wait(), 60)
        await raw_ch.basic_cancel(tag)
        assert no_header == 0 and dup == 0
        assert seen == {f"bad-{i}" for i in range(n_bad)}
        assert not [r for r in reasons if "->other" in r or r.endswith("rate-limit")], reasons
        await dq.purge()
        # nothing left in the command queue, ready or unacked
        q = await eventually(lambda: (lambda c: c if c["unacked"] == 0 else None)(
            rabbitmq_queue(names["commands_queue"])), 10, "no unacked command", interval=0.5)
        # the bridge still consumes: from the queue itself (queue.declare-ok), not rabbitmqctl's
        # consumers column, which a quorum queue updates every 5 s (a short run reads 0)
        cq = await ch.declare_queue(names["commands_queue"], passive=True)
        assert q["ready"] == 0 and cq.declaration_result.consumer_count == 1
        # the bridge process still serves
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                assert r.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        assert metric(text, "epsignal_commands_total", outcome="refused") == n_bad
        assert metric(text, "epsignal_commands_total", command="signaling", outcome="ok") == len(good_ids)
        cid = await publish_command(ex, f"device.{sim.hw(2)}.attach", b"", reply_to=replies.name)
        assert (await replies.get(cid))["ok"] is True
        assert proc.running() and sim.stats()["calls_stalled"] == 0
        print(f"\nFIGURES fuzz-commands: seed={SEED} bad={n_bad} good={len(good_ids)} "
              f"bad_with_reply={len(bad_reply_ids)} dead_lettered={len(seen)} duplicates={dup} lost=0 "
              f"answered_ok={len(good_ids)} kinds={kinds} reasons={reasons} publish_s={published_s:.1f} "
              f"processed_s={processed_s:.1f} rate={n_bad / processed_s:.0f}/s")
    finally:
        await proc.stop()
        proc.close_files()
        await conn.close()
