"""The benchmark's consumer in its own process (``bridge.bench.consumer.SinkProc``), against the
real broker: what it counts, the credits it gives, the hop times it returns (also for a run too
long for one 64 KiB line), call.state stamps matched afterwards, pause, a refused request, and a
consumer process that dies."""

from __future__ import annotations

import asyncio
import re
import contextlib
import os
import signal
import time
import uuid
from collections import defaultdict, deque

import aio_pika
import pytest

from bridge.bench.consumer import SinkProc
from bridge.bench.frames import hw_id

pytestmark = pytest.mark.broker

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


async def _publisher(exchange: str):
    """A connection publishing to ``exchange`` (declared as the consumer declares it)."""
    conn = await aio_pika.connect(AMQP_URL)
    ch = await conn.channel(publisher_confirms=False)
    ex = await ch.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    return conn, ex


@contextlib.asynccontextmanager
async def _consumer(tmp_path, **kw):
    """An open consumer process on an exchange of its own, and a publisher to that exchange."""
    name = f"test-consumer-{uuid.uuid4().hex[:8]}"
    sink = SinkProc(AMQP_URL, name, tmp_path, **kw)
    conn, ex = await _publisher(name)
    try:
        await sink.open()
        yield sink, ex
    finally:
        await sink.close()
        await ex.delete()
        await conn.close()


async def _publish(ex, key: str, typ: str, mid: str, body: bytes) -> None:
    await ex.publish(aio_pika.Message(body, type=typ, message_id=mid), key)


async def test_counts_credits_and_hop_times_of_a_long_run(tmp_path):
    credits = 0

    def credit() -> None:
        nonlocal credits
        credits += 1

    async with _consumer(tmp_path, on_stamp=credit) as (sink, ex):
        assert sink.pid is not None
        n = 8_000  # the answer's hop times alone (~10 digits each) are over 64 KiB on one line
        t0 = time.monotonic_ns()
        record_from = t0 + 1  # the first frame's stamp is before it: not a sample
        run = await sink.begin(2 * n, store=True, record_from=record_from)
        for i0 in range(0, n, 500):  # 500 frames' events at a time, in order on the one channel
            await asyncio.gather(*(p for i in range(i0, min(n, i0 + 500)) for p in (
                _publish(ex, f"device.{hw_id(1)}.call.{i}.signaling", "call.signaling", f"s{i}",
                         b'{"sig":{"type":"setup","bench_t":%d}}' % (t0 + i)),
                _publish(ex, f"device.{hw_id(1)}.call.{i}.state", "call.state", f"c{i}", b'{"state":"x"}'))))
        await _publish(ex, "device.x.attached", "attached", "a1", b"{}")  # not a data event
        assert await run.wait(60)
        assert run.count == run.distinct == 2 * n
        assert run.by_type == {"call.signaling": n, "call.state": n}
        await run.samples()
        assert len(run.hop_ns) == n - 1 and all(h > 0 for h in run.hop_ns)
        assert credits == n  # every stamped event, also the one before record_from
        assert run.t_first is not None and run.t_last is not None and t0 < run.t_first <= run.t_last
        assert len(run.messages) == 2 * n
        key, body, typ, mid, _ts = run.messages[0]
        assert (key, typ, mid) == (f"device.{hw_id(1)}.call.0.signaling", "call.signaling", "s0")
        assert body == b'{"sig":{"type":"setup","bench_t":%d}}' % t0
        assert not list(tmp_path.glob("consumer-*.msgpack"))  # the stored messages' file is read and gone
    assert sink.pid is None
    # the hop ends at the kernel's receive time of each read (ReadClock), not when it was read
    said = re.search(r"consumer: (\d+) reads with the kernel's receive time, (\d+) without", sink.log.read_text())
    assert said is not None and int(said[1]) > 0 and int(said[2]) <= 2, said


class _Stamps:
    """The load generator's side of call.state-only runs: send stamps per device, oldest first."""

    def __init__(self) -> None:
        self.by_hw: dict[str, deque[int]] = defaultdict(deque)

    def stamp_by_key(self, key: str) -> int | None:
        q = self.by_hw.get(key.split(".", 2)[1])
        return q.popleft() if q else None

    def forget_stamps(self) -> None:
        self.by_hw.clear()


async def test_call_state_stamps_come_from_the_load_generator_afterwards(tmp_path):
    stamps = _Stamps()
    credits = 0

    def credit() -> None:
        nonlocal credits
        credits += 1

    async with _consumer(tmp_path, on_stamp=credit, stamps=stamps) as (sink, ex):
        stamps.by_hw[hw_id(0)].extend((1, 2, 3))  # left over from an earlier run: forgotten at begin
        t0 = time.monotonic_ns()
        run = await sink.begin(None, record_from=t0)
        assert not stamps.by_hw
        for i in range(40):
            hw = hw_id(i % 4)
            # each device's first frame was sent before the run's window; the others are stamped
            # just before their event is published: a stamp paired with another frame's event
            # (out of order) would make a negative hop
            stamps.by_hw[hw].append(t0 - 1 if i < 4 else time.monotonic_ns())
            await _publish(ex, f"device.{hw}.call.1.state", "call.state", f"c{i}", b"{}")
        await run.set_target(40)
        assert await run.wait(30)
        assert run.count == run.distinct == 40 and credits == 40
        assert run.hop_ns == []  # claimed by samples(), once
        await run.samples()
        await run.samples()
        assert len(run.hop_ns) == 36 and all(h > 0 for h in run.hop_ns)
        assert not any(stamps.by_hw.values())  # every stamp claimed


async def test_a_paused_consumer_counts_nothing_until_resumed(tmp_path):
    async with _consumer(tmp_path) as (sink, ex):
        await sink.pause()
        run = await sink.begin(None)
        for i in range(5):
            await _publish(ex, "device.x.call.1.state", "call.state", f"p{i}", b"{}")
        await sink.resume()
        await _publish(ex, "device.x.call.1.state", "call.state", "after", b"{}")
        await run.set_target(1)
        assert await run.wait(30)
        assert run.count == 1 and run.by_type == {"call.state": 1}
        assert await sink.wait_type("call.state", 1, 5) and sink.by_type["call.state"] == 1


async def test_a_request_it_does_not_know_is_refused_and_it_goes_on(tmp_path):
    async with _consumer(tmp_path) as (sink, ex):
        with pytest.raises(RuntimeError, match="refused 'wait': no run begun"):
            await sink.call("wait", timeout=1)
        with pytest.raises(RuntimeError, match="refused 'rewind': no such request"):
            await sink.call("rewind")
        run = await sink.begin(1)
        await _publish(ex, "device.x.call.1.state", "call.state", "one", b"{}")
        assert await run.wait(30) and run.count == 1


async def test_a_consumer_that_dies_ends_the_wait_with_the_reason(tmp_path):
    async with _consumer(tmp_path, on_stamp=lambda: None) as (sink, _ex):
        run = await sink.begin(10)
        assert sink.pid is not None and sink.ended is not None
        os.kill(sink.pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="the benchmark's consumer exited"):
            await run.wait(600)  # not 600 s: the process's end answers it
        assert sink.ended.done()
        with pytest.raises(RuntimeError, match="exited"):  # and every request after it
            await sink.pause()
    assert sink.pid is None
