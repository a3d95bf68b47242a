"""The benchmark's pure parts: frames, stamps, percentiles, the codec comparison, profiles."""

from __future__ import annotations

import asyncio
import json
import time

from bridge.bench import codec, profiling, stats
from bridge.bench.frames import EVENTS_PER_FRAME, FrameMaker, hw_id, sample_frames, stamp_of
from bridge.device import Device
from bridge.events import EventFactory
from bridge.protocol import messages as m


def test_frames_decode_and_carry_the_stamp_through_the_sig():
    mk = FrameMaker(hw_id(7), 7)
    seen = []
    for i in range(10):
        f = mk.next(1_000_000 + i)
        msg = m.decode(f)
        assert type(msg) is m.Signaling and msg.src == hw_id(7) and msg.call >= 1
        assert stamp_of(f) == 1_000_000 + i
        assert stamp_of(bytes(msg.sig)) == 1_000_000 + i  # inside the sig: published as is
        seen.append((msg.call, msg.signal.type, msg.to is True))
    assert seen[:6] == [(1, "setup", True), (1, "alert", False), (1, "conn", False),
                        (1, "disc", True), (1, "rel", False), (2, "setup", True)]
    assert stamp_of(mk.next(None)) is None


def test_every_frame_makes_two_events():
    dev = Device(hw_id(1), EventFactory("t"))
    frames = [f for f in sample_frames(devices=1, calls=3)]
    counts = [len(dev.on_frame(m.decode(f))) for f in frames]
    assert counts == [EVENTS_PER_FRAME] * len(frames)
    assert len(dev.tracker) == 0  # every call ended


def test_stamp_of_reads_digits_only():
    assert stamp_of(b'{"sig":{"bench_t":123,"type":"x"}}') == 123
    assert stamp_of(b'{"bench_c":9}', b'"bench_c":') == 9
    assert stamp_of(b'{"bench_t":"x"}') is None


def test_percentiles_nearest_rank():
    data = list(range(1, 1001))  # ns
    s = stats.summary([x * 1000 for x in data], "us")
    assert s["count"] == 1000 and s["p50"] == 500 and s["p99"] == 990 and s["p99.9"] == 999
    assert s["max"] == 1000
    assert stats.summary([], "ms")["p99"] is None
    xs, ys = stats.cdf_points(data, 1.0, points=50)
    assert xs == sorted(xs) and ys[-1] == 1.0


def test_codec_paths_make_the_same_events():
    assert codec.equivalent(devices=3, calls=5)
    r = codec.run(messages=500, repeats=1)
    assert r["events_per_message"] == EVENTS_PER_FRAME and r["msgspec_full_us"] > 0


def test_dict_tracker_follows_the_call_state_rules():
    t = codec.DictTracker()
    assert t.signaling(5, True, {"type": "setup", "cg": {"num": "201"}})["state"] == "setup"
    assert t.signaling(5, False, {"type": "alert"})["state"] == "alert"
    held = t.signaling(5, False, {"type": "facility", "fty": [{"type": "hold_notify"}]})
    assert held["held"] is True and held["remote"] == {"num": "201"}
    assert t.signaling(5, False, {"type": "facility"}) is None  # nothing changed
    assert t.signaling(5, False, {"type": "rel", "cau": {"num": 16}})["cause"] == {"num": 16}
    assert t.calls == {}


def test_profile_analysis_of_collapsed_stacks():
    text = "\n".join([
        "main (/x/bridge/cli.py:1);run (/x/bridge/pbx/session.py:100);decode (/x/bridge/protocol/messages.py:9) 30",
        "main (/x/bridge/cli.py:1);_publish (/x/bridge/amqp/publisher.py:5);"
        "publish (/v/site-packages/aio_pika/exchange.py:7) 60",
        "main (/x/bridge/cli.py:1);select (/usr/lib/python3.11/selectors.py:3) 10",
    ])
    a = profiling.analyse(text)
    assert a["samples"] == 100
    assert a["top_self"][0] == {"function": "publish (aio_pika/exchange.py)", "pct": 60.0}
    assert {"function": "main (bridge/cli.py)", "pct": 100.0} in a["top_total"]
    comps = {c["component"]: c["pct"] for c in a["self_by_component"]}
    assert comps == {"aio-pika": 60.0, "bridge: protocol (decode)": 30.0, "stdlib other": 10.0}
    json.dumps(a)


def test_traced_bridge_setup_reports_why_tracing_is_unavailable(monkeypatch):
    from bridge import tracing
    from bridge.bench import bridge_proc

    monkeypatch.delattr(tracing, "configure", raising=False)
    status: dict = {}
    assert bridge_proc._setup_tracing(status) == (None, None)
    assert status["tracing"].startswith("unavailable")


def test_traced_bridge_setup_counts_spans(monkeypatch):
    from bridge import tracing
    from bridge.bench import bridge_proc

    if not hasattr(tracing, "configure"):
        return
    for name in ("configure", "ENABLED", "_tracer"):  # restored after the test
        if hasattr(tracing, name):
            monkeypatch.setattr(tracing, name, getattr(tracing, name))
    status: dict = {}
    provider, exporter = bridge_proc._setup_tracing(status)
    assert status["tracing"] == "on"
    assert tracing.configure() is True  # run()'s configure() from OTEL_* keeps the SDK on
    provider.get_tracer("t").start_span("x").end()
    provider.force_flush()
    assert exporter.spans >= 1
    provider.shutdown()


def test_events_per_frame_follows_the_event_kinds():
    from bridge.bench.frames import event_kinds, events_per_frame
    from bridge.events import KINDS

    assert event_kinds(None) == KINDS and events_per_frame(event_kinds({})) == EVENTS_PER_FRAME == 2
    assert events_per_frame(event_kinds({"EPSIGNAL_EVENT_KINDS": "call.state"})) == 1
    assert events_per_frame(event_kinds({"EPSIGNAL_EVENT_KINDS": " call.signaling , attached"})) == 1
    assert events_per_frame(event_kinds({"EPSIGNAL_EVENT_KINDS": "attached,detached"})) == 0
    # what the bridge's device really makes per frame with call states only
    dev = Device(hw_id(2), EventFactory("t", ("call.state",)))
    counts = [len(dev.on_frame(m.decode(f))) for f in sample_frames(devices=1, calls=2)]
    assert counts == [1] * len(counts)


def test_stamp_of_allows_the_space_stdlib_json_writes():
    assert stamp_of(json.dumps({"sig": {"bench_t": 42, "type": "x"}}).encode()) == 42


def test_load_generator_hands_out_send_stamps_per_device_in_order():
    from collections import deque

    from bridge.bench.loadgen import LoadGen

    lg = LoadGen("pw")
    s = type("S", (), {})()
    s.stamps = deque([5, 7])
    lg.sessions[hw_id(3)] = s
    key = f"device.{hw_id(3)}.call.12.state"
    assert [lg.stamp_by_key(key), lg.stamp_by_key(key), lg.stamp_by_key(key)] == [5, 7, None]
    assert lg.stamp_by_key(f"device.{hw_id(4)}.call.1.state") is None


def test_the_hand_written_peer_stays_an_afternoon_s_work():
    from pathlib import Path

    from bridge.bench import peer

    code = [ln for ln in Path(peer.__file__).read_text().splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")]
    doc_end = next(i for i, ln in enumerate(code) if ln.startswith("import"))
    assert len(code) - doc_end <= 50  # about 40 lines of code



async def test_the_per_frame_workload_runs_the_real_path():
    """bench/perframe (callgrind's workload): every frame forwarded and its event confirmed,
    on the fast path and in slices alike."""
    from bridge.bench import perframe

    for kinds, epf in ((("call.state",), 1), (perframe.KINDS, 2)):
        out = await perframe.run(400, kinds)
        assert out["forwarded"] == 400 and out["events"] == 400 * epf


def test_gcpause_reports_a_full_collection_with_the_buffer_filled():
    """bench/gcpause (docs/PERFORMANCE.md, GC pauses) as a developer runs it: its own process,
    since it sets the GC up as the bridge does (a frozen heap)."""
    import re
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bridge.bench.gcpause", "1000", "3000"], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    pauses = re.findall(r"([\d,]+) events: ([\d.]+) ms", out)
    assert [n for n, _ in pauses] == ["1,000", "3,000"], out
    assert all(float(ms) >= 0 for _, ms in pauses)
    # what the collector still walks: not the buffer (untracked events), not the frozen start
    assert int(re.search(r"tracks: ([\d,]+)", out).group(1).replace(",", "")) < 1000, out


def test_the_consumer_s_read_clock_finds_each_stamp_once_even_split_across_reads(monkeypatch):
    from bridge.bench import consumer

    times = iter(range(100, 10_000, 100))
    monkeypatch.setattr(consumer, "now_ns", lambda: next(times))
    clock = consumer.ReadClock(state_only=False)
    clock._read(b'xx{"sig":{"bench_t":11,"a":1}}yy{"bench_t":')  # t=100: 11 whole, 22 cut off
    clock._read(b'22}zz' + b"." * 300)  # t=200: 22 completed here
    clock._read(b'{"bench_t": 11}')  # t=300: stdlib json's space; a second event with stamp 11
    assert clock.take(b"11", -1) == 100 and clock.take(b"22", -1) == 200
    assert clock.take(b"11", -1) == 300 and clock.take(b"11", -1) == -1  # oldest first, then none
    assert clock.read_at == {}


def test_the_consumer_s_read_clock_keeps_call_state_keys_in_order(monkeypatch):
    from bridge.bench import consumer

    times = iter(range(100, 10_000, 100))
    monkeypatch.setattr(consumer, "now_ns", lambda: next(times))
    clock = consumer.ReadClock(state_only=True)
    key = f"device.{hw_id(3)}.call.7.state".encode()
    clock._read(b"\x01" + key + b"\xce" + key[:10])  # t=100: one key, and the start of the next
    clock._read(key[10:] + b"\xce")  # t=200
    assert clock.take(key, -1) == 100 and clock.take(key, -1) == 200 and clock.take(key, -1) == -1
    clock._read(f"device.{hw_id(3)}.call.7.signaling".encode())  # not a stamped event's key
    assert clock.read_at == {}


async def test_the_consumer_s_read_clock_takes_the_kernel_s_receive_time_not_the_read_s():
    """A consumer busy when an event arrives reads it late; the hop ends when it arrived (the
    kernel's receive time of the read), and the bytes reach aiormq's reader unchanged."""
    from bridge.bench import consumer

    sent = asyncio.Event()

    async def serve(reader, writer):
        while (cmd := await reader.readexactly(1)) == b"w":
            writer.write(b"warm")
        assert cmd == b"g"  # the client reads with its clock now
        writer.write(b'{"sig":{"bench_t":42}}')
        await writer.drain()
        sent.set()
        await reader.read()  # until the client closes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
    try:
        clock = consumer.ReadClock(state_only=False)
        clock._read_myself(reader, writer)
        # Linux turns receive timestamps on for the whole machine a moment after the first
        # socket asks (a deferred switch): until then a read comes without one (seen once in
        # CI, the first such socket on the machine). Warm up until a read has its time.
        for _ in range(200):
            writer.write(b"w")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"warm"
            if clock.kernel_times:
                break
            await asyncio.sleep(0.01)
        kernel0, read0 = clock.kernel_times, clock.read_times
        assert kernel0 > 0, "no read with the kernel's receive time in 2 s"
        writer.write(b"g")
        await asyncio.wait_for(sent.wait(), 5)
        t_sent = consumer.now_ns()
        time.sleep(0.05)  # busy: the event waits in the socket
        assert await asyncio.wait_for(reader.readexactly(22), 5) == b'{"sig":{"bench_t":42}}'
        t = clock.take(b"42", -1)
        assert (clock.kernel_times, clock.read_times) == (kernel0 + 1, read0)
        assert t_sent - 5_000_000 < t < t_sent + 5_000_000, (t - t_sent) / 1e6  # not 50 ms later
        writer.write(b"more")  # the transport still writes
        await writer.drain()
    finally:
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
