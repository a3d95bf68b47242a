"""The consumer of the benchmark: one queue bound with ``#`` to an events exchange, in a process
of its own.

Used the same way for the bridge, the hand-written peer and the raw aio-pika ceiling: an
exclusive queue, consumed with ``no_ack`` on an aiormq channel (what aio-pika runs on; the
cheapest consumer there is in Python). For every ``call.signaling`` / ``call.state`` delivery it
counts the event and its distinct ``message_id``; for a ``call.signaling`` that carries a
``bench_t`` stamp it records the hop latency (send stamp to the kernel's receive time of the
consumer's read that held the event: :class:`ReadClock`; on the machine's CLOCK_MONOTONIC, which
every process shares) and gives the load generator one credit.

It runs in its own process (``python -m bridge.bench.consumer``, driven by :class:`SinkProc`
over its stdin/stdout): in the load generator's process its AMQP work (aiormq and pamqp parse
each delivery in Python, ~200 us of CPU each on a slow VM) delayed the load generator's own
reading of the forwarded frames, twice as much with a bridge that publishes two events per
frame: the harness measured its own load into the forwarding latency of exactly the process
that makes more events (docs/PERFORMANCE.md, "A fifth VM").

A bridge that does not publish ``call.signaling`` (``EPSIGNAL_EVENT_KINDS=call.state``) has no
stamp in its events: then every ``call.state`` is the stamped event; the consumer keeps its
routing key and read time, and the hop is computed afterwards from the load generator's send
times per device, oldest first (:class:`Stamps`: the bridge makes one ``call.state`` per frame of
the cycle and publishes a device's events in order).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import struct
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import aiormq
import msgspec
from aiormq.connection import TCPTransportFactory

from bridge.bench.frames import STAMP, stamp_of

DATA_TYPES = frozenset({"call.signaling", "call.state"})
now_ns = time.monotonic_ns


class Run:
    """One measured run, as the consumer process sees it: how many data events are expected,
    what arrived, and when."""

    def __init__(self, target: int | None, store: bool, record_from: int) -> None:
        self.target = target
        self.count = 0
        self.ids: set[str] = set()
        self.by_type: Counter = Counter()
        self.hop_ns: list[int] = []
        #: (routing key, read ns) of each stamped event without a stamp of its own (call.state only)
        self.keyed: list[tuple[str, int]] = []
        self.record_from = record_from
        self.t_first: int | None = None
        self.t_last: int | None = None
        self.store = store
        #: (routing key, body, type, message_id, timestamp) as delivered, for the ceiling replay
        self.messages: list[tuple] = []
        self.done = asyncio.Event()
        if target == 0:
            self.done.set()

    def set_target(self, n: int) -> None:
        self.target = n
        if self.count >= n:
            self.done.set()

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.done.wait(), timeout)
            return True
        except TimeoutError:
            return False


#: events a paused sink keeps (the oldest are dropped by the broker)
PARKED = 1000

#: what marks a stamped event in the bytes read: its stamp (call.signaling), or its routing key
#: (call.state only: the stamp is the load generator's, by device)
_STAMP_RE = re.compile(rb'"bench_t": ?(\d+)')
_STATE_KEY_RE = re.compile(rb"(device\.[0-9A-Za-z]+\.call\.\d+\.state)")

#: Linux's SO_TIMESTAMPNS (the socket module does not name it): each read's ancillary data
#: carries the kernel's receive time (CLOCK_REALTIME, a struct timespec)
SO_TIMESTAMPNS = 35
_ANC_SPACE = socket.CMSG_SPACE(16)
_TIMESPEC = struct.Struct("qq")


def _kernel_time(anc: list[tuple[int, int, bytes]]) -> int | None:
    """The kernel's receive time of a read, on this process's monotonic clock (None: none)."""
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return sec * 1_000_000_000 + nsec - (time.time_ns() - now_ns())
    return None


class ReadClock(TCPTransportFactory):
    """When each stamped event's bytes reached the consumer's socket: the end of its hop.

    Not when a Python callback ran, nor when the consumer process got round to reading: aiormq
    parses every frame of a read before the first delivery's callback runs, and a read waits
    while the process parses the reads before it, ~170-190 us per frame on a slow VM (docs/
    PERFORMANCE.md, "A fifth VM"), twice as often for a bridge that sends two events per frame:
    the harness would measure its own consuming. So the consumer reads its socket itself, with
    ``recvmsg``, and takes the kernel's receive time of the read (``SO_TIMESTAMPNS``: on
    loopback, when the broker's write reached this socket; for a read of several packets, the
    last one's), falling back to the time of the read where the kernel gives none. The bytes go
    on to aiormq's stream reader unchanged (an aiormq transport factory: its extension point)."""

    #: bytes of a read kept for the next one: a marker split across two reads is found once
    TAIL = 128
    #: bytes read at once (asyncio's transports read 256 KiB)
    READ = 256 * 1024

    def __init__(self, state_only: bool) -> None:
        self._re = _STATE_KEY_RE if state_only else _STAMP_RE
        self._tail = b""
        #: stamp (or routing key) -> read times, oldest first
        self.read_at: dict[bytes, deque[int]] = {}
        #: reads the kernel gave a receive time for, and reads it gave none
        self.kernel_times = self.read_times = 0

    async def create(self, url: Any, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await super().create(url, **kwargs)
        self._read_myself(reader, writer)
        return reader, writer

    def _read_myself(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The transport stops reading (it keeps writing); a duplicate of its socket is read
        with recvmsg (a loop refuses a reader on a transport's own descriptor), until the end
        of the stream or the transport's close (its protocol's connection_lost). Without the
        stream reader's flow control (it would resume the transport's reads): the bench's
        consumer keeps up, and a run's events are bounded."""
        loop = asyncio.get_running_loop()
        transport = cast(asyncio.Transport, writer.transport)
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        transport.pause_reading()
        reader._transport = None  # type: ignore[attr-defined]  # its flow control would resume the transport's reads
        fd = sock.fileno()
        feed = reader.feed_data
        protocol = transport.get_protocol()
        lost = protocol.connection_lost

        def done() -> None:
            if sock.fileno() != -1:  # not closed yet
                loop.remove_reader(fd)
                sock.close()

        def ready() -> None:
            try:
                data, anc, _flags, _addr = sock.recvmsg(self.READ, _ANC_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                done()
                reader.set_exception(e)
                transport.abort()
                return
            if not data:
                done()
                reader.feed_eof()
                transport.close()
                return
            self._read(data, _kernel_time(anc))
            feed(data)

        def connection_lost(exc: Exception | None) -> None:
            done()
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        loop.add_reader(fd, ready)

    def _read(self, data: bytes, t: int | None = None) -> None:
        if t is None:
            t = now_ns()
            self.read_times += 1
        else:
            self.kernel_times += 1
        buf = self._tail + data
        n = len(self._tail)
        for m in self._re.finditer(buf):
            if m.end() > n:  # not all in the tail: not found in the read before
                self.read_at.setdefault(m.group(1), deque()).append(t)
        self._tail = buf[-self.TAIL:]

    def take(self, marker: bytes, default: int) -> int:
        """The hop end (receive time) of the oldest event with ``marker`` not taken yet
        (``default``: none)."""
        q = self.read_at.get(marker)
        if not q:
            return default
        t = q.popleft()
        if not q:
            del self.read_at[marker]
        return t


class Sink:
    """The consumer of the module docstring, inside its process: one exclusive queue bound with
    ``#``; a :class:`Run` counts what arrives for one measured run. On aiormq directly (not
    aio-pika, which does not pass a transport factory on): :class:`ReadClock`."""

    def __init__(self, url: str, exchange: str, on_stamp: Callable[[], None] | None = None,
                 state_only: bool = False) -> None:
        self.url = url
        self.exchange = exchange
        self.on_stamp = on_stamp
        #: the event type that stands for a frame (hop latency, credit)
        self.stamp_type = "call.state" if state_only else "call.signaling"
        self.state_only = state_only
        self.clock = ReadClock(state_only)
        self.conn: aiormq.abc.AbstractConnection | None = None
        self._ch: aiormq.abc.AbstractChannel | None = None
        #: the consumer's queue (exclusive), bound to every event
        self.queue: str | None = None
        self._tag: str | None = None
        #: while paused: the queue the events pile up in
        self._parking: str | None = None
        self.by_type: Counter = Counter()
        self.total = 0
        self.run: Run | None = None

    async def open(self) -> None:
        self.conn = await aiormq.connect(self.url, transport_factory=self.clock)
        ch = self._ch = await self.conn.channel()
        await ch.exchange_declare(self.exchange, exchange_type="topic", durable=True)
        # exclusive (gone with the connection), not auto-delete: pause() cancels the consumer
        queue = self.queue = (await ch.queue_declare(exclusive=True)).queue
        assert queue is not None  # the broker names it
        await ch.queue_bind(queue, self.exchange, routing_key="#")
        self._tag = (await ch.basic_consume(queue, self._on, no_ack=True)).consumer_tag
        self._parking = None

    def _opened(self) -> tuple[aiormq.abc.AbstractChannel, str]:
        if self._ch is None or self.queue is None:
            raise RuntimeError("the consumer is not open")
        return self._ch, self.queue

    async def pause(self) -> None:
        """Stop consuming, without the events going unroutable: they go to a parking queue
        nobody reads (so that the harness does no consumer work, and the bridge's publishing is
        unchanged) that keeps the last :data:`PARKED` of them (the broker drops the oldest: a
        queue growing by 1,000 events a second would be broker work the other runs do not
        have). :meth:`resume` drops them."""
        ch, queue = self._opened()
        parking = self._parking = (await ch.queue_declare(
            exclusive=True, arguments={"x-max-length": PARKED, "x-overflow": "drop-head"})).queue
        assert parking is not None
        await ch.queue_bind(parking, self.exchange, routing_key="#")
        await ch.queue_unbind(queue, self.exchange, routing_key="#")
        assert self._tag is not None
        await ch.basic_cancel(self._tag)

    async def resume(self) -> None:
        ch, queue = self._opened()
        await ch.queue_bind(queue, self.exchange, routing_key="#")
        self._tag = (await ch.basic_consume(queue, self._on, no_ack=True)).consumer_tag
        if self._parking is not None:
            await ch.queue_delete(self._parking)
            self._parking = None

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()
        print(f"consumer: {self.clock.kernel_times} reads with the kernel's receive time, "
              f"{self.clock.read_times} without (timed when read)", file=sys.stderr)

    def begin(self, target: int | None, *, store: bool = False, record_from: int = 0) -> Run:
        self.run = Run(target, store, record_from)
        return self.run

    async def wait_type(self, typ: str, n: int, timeout: float) -> bool:
        """Until ``n`` events of type ``typ`` have arrived since the sink opened."""
        try:
            async with asyncio.timeout(timeout):
                while self.by_type[typ] < n:
                    await asyncio.sleep(0.05)
            return True
        except TimeoutError:
            return False

    async def _on(self, msg) -> None:
        t = now_ns()
        self.total += 1
        props = msg.header.properties
        typ = props.message_type
        self.by_type[typ] += 1
        body = msg.body
        stamp: int | None = None
        if typ == self.stamp_type:  # its read time is taken whether a run counts it or not
            if self.state_only:
                key = msg.delivery.routing_key
                t = self.clock.take(key.encode(), t)
            else:
                stamp = stamp_of(body, STAMP)
                if stamp is not None:
                    t = self.clock.take(str(stamp).encode(), t)
        run = self.run
        if run is None or typ not in DATA_TYPES:
            return
        if run.t_first is None:
            run.t_first = t
        run.t_last = t
        run.count += 1
        run.by_type[typ] += 1
        run.ids.add(props.message_id)
        if typ == self.stamp_type:
            if self.state_only:
                run.keyed.append((key, t))
                if self.on_stamp is not None:
                    self.on_stamp()
            elif stamp is not None:
                if stamp >= run.record_from:
                    run.hop_ns.append(t - stamp)
                if self.on_stamp is not None:
                    self.on_stamp()
        if run.store:
            ts = props.timestamp
            run.messages.append((msg.delivery.routing_key, body, typ, props.message_id,
                                 ts.timestamp() if ts is not None else None))
        if run.target is not None and run.count >= run.target:
            run.done.set()


# ------------------------------------------------------------------ the consumer's process
_messages = msgspec.msgpack.Encoder()


async def serve(url: str, exchange: str, state_only: bool, credits_on: bool, files: Path) -> None:
    """The consumer process: a :class:`Sink`, driven by one JSON request per stdin line (with an
    ``id``), each answered by one ``r <json>`` line (the same ``id``); between them, with
    ``credits_on``, ``c <run> <credits> <count>`` lines: credits for the load generator, batched
    per turn of the loop, and the count of run number ``run`` so far. The lines go to what
    was stdout; stdout itself is pointed at stderr (the log), so that nothing printed can mix
    into them."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    credits = 0
    number = 0  # of the current run (begin)

    def flush() -> None:
        nonlocal credits
        run = sink.run
        out.write(b"c %d %d %d\n" % (number, credits, run.count if run is not None else 0))
        out.flush()
        credits = 0

    def credit() -> None:
        nonlocal credits
        if not credits:
            loop.call_soon(flush)
        credits += 1

    def answer(rid: int | None, **kw: Any) -> None:
        if credits:
            flush()  # credits before the answer: a run's last credits come before its result
        out.write(b"r " + json.dumps({"id": rid, **kw}).encode() + b"\n")
        out.flush()

    sink = Sink(url, exchange, on_stamp=credit if credits_on else None, state_only=state_only)
    await sink.open()
    answer(None, ready=True)
    while line := await reader.readline():
        req = json.loads(line)
        op, rid = req.pop("op"), req.pop("id")
        run = sink.run
        if op == "begin":
            number = req["number"]
            sink.begin(req["target"], store=req["store"], record_from=req["record_from"])
            answer(rid)
        elif op == "set_target" and run is not None:
            run.set_target(req["n"])
            answer(rid)
        elif op == "wait" and run is not None:
            ok = await run.wait(req["timeout"])
            answer(rid, ok=ok, count=run.count, distinct=len(run.ids), by_type=run.by_type,
                   t_first=run.t_first, t_last=run.t_last)
        elif op == "samples" and run is not None:
            res: dict[str, Any] = {"hop_ns": run.hop_ns, "keyed": run.keyed}
            if run.store:
                path = files / f"consumer-{os.getpid()}-run-{number}.msgpack"
                path.write_bytes(_messages.encode(run.messages))
                res["messages_file"] = str(path)
            answer(rid, **res)
        elif op == "wait_type":
            ok = await sink.wait_type(req["type"], req["n"], req["timeout"])
            answer(rid, ok=ok, by_type=sink.by_type)
        elif op == "pause":
            await sink.pause()
            answer(rid)
        elif op == "resume":
            await sink.resume()
            answer(rid)
        elif op == "close":
            break
        else:
            answer(rid, error="no run begun" if op in ("set_target", "wait", "samples") else "no such request")
    await sink.close()
    answer(None, closed=True)


#: the longest line the consumer may answer with (a run's hop times: ~0.5 MB for 30,000)
_LINE_LIMIT = 256 * 2**20


class Stamps(Protocol):
    """The load generator's send times per device (call.state only: the events carry none)."""

    def stamp_by_key(self, key: str) -> int | None:
        """The send stamp of the oldest frame not claimed yet of the device in routing key ``key``."""

    def forget_stamps(self) -> None:
        """Drop every stamp not claimed (a new run begins: nothing of the last one is in flight)."""


class RemoteRun:
    """One measured run, as the harness sees it (:meth:`SinkProc.begin`): ``count`` follows the
    run live; :meth:`wait` fills in the counts, :meth:`samples` the hop times and stored messages."""

    def __init__(self, proc: SinkProc, number: int, record_from: int) -> None:
        self._proc = proc
        self.number = number
        self.record_from = record_from
        #: the run's count, live until :meth:`wait` answered
        self.count = 0
        self.finished = False
        self.distinct = 0
        self.by_type: Counter = Counter()
        self.t_first: int | None = None
        self.t_last: int | None = None
        self.hop_ns: list[int] = []
        self.messages: list[tuple] = []
        self._sampled = False

    async def set_target(self, n: int) -> None:
        await self._proc.call("set_target", n=n)

    async def wait(self, timeout: float) -> bool:
        """Until every expected event arrived (False: ``timeout`` ran out); then the counts."""
        r = await self._proc.call("wait", timeout=timeout)
        self.finished = True
        self.count, self.distinct = r["count"], r["distinct"]
        self.by_type = Counter(r["by_type"])
        self.t_first, self.t_last = r["t_first"], r["t_last"]
        return bool(r["ok"])

    async def samples(self) -> None:
        """After :meth:`wait` (and after any CPU measured over the run): the hop times and, for a
        run begun with ``store``, the messages. Once: the load generator's stamps are claimed."""
        if self._sampled:
            return
        self._sampled = True
        r = await self._proc.call("samples")
        self.hop_ns = r["hop_ns"]
        stamps = self._proc.stamps
        if stamps is not None:  # call.state only: the stamps are the load generator's
            for key, t in r["keyed"]:
                stamp = stamps.stamp_by_key(key)
                if stamp is not None and stamp >= self.record_from:
                    self.hop_ns.append(t - stamp)
        if "messages_file" in r:
            path = Path(r["messages_file"])
            try:
                self.messages = [tuple(m) for m in msgspec.msgpack.decode(path.read_bytes())]
            finally:
                path.unlink(missing_ok=True)


class SinkProc:
    """The consumer (:class:`Sink`) in a process of its own, for the harness: the same calls,
    over the process's stdin and stdout (:func:`serve`). ``on_stamp`` is called once per credit
    (None: the process sends none); ``stamps`` (call.state only) are the load generator's."""

    def __init__(self, url: str, exchange: str, out: Path, on_stamp: Callable[[], None] | None = None,
                 stamps: Stamps | None = None) -> None:
        self.url = url
        self.exchange = exchange
        self.out = out
        self.log = out / f"consumer-{exchange}.log"
        self.on_stamp = on_stamp
        self.stamps = stamps
        self.by_type: Counter = Counter()
        self.run: RemoteRun | None = None
        self._runs = 0
        self._seq = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task | None = None
        self._answers: asyncio.Queue[dict | None] = asyncio.Queue()
        #: why its output could not be read (None: it could, or it ended)
        self._error: str | None = None
        self._lock = asyncio.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def ended(self) -> asyncio.Task | None:
        """Done when the process's output ended (it exited, or said what cannot be read)."""
        return self._reader

    def why(self) -> str:
        """Why it ended, for an error message."""
        what = "exited" if self._error is None else f"said what the harness cannot read ({self._error})"
        return f"the benchmark's consumer {what} (see {self.log})"

    async def open(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "bridge.bench.consumer", self.url, self.exchange, str(self.out)]
        if self.stamps is not None:
            args.append("--state-only")
        if self.on_stamp is None:
            args.append("--no-credits")
        with open(self.log, "ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                limit=_LINE_LIMIT)
        self._reader = asyncio.create_task(self._read(), name="bench consumer reader")
        await self._answer(60)

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while line := await stdout.readline():
                if line.startswith(b"c "):
                    _, number, n, count = line.split()
                    run = self.run
                    if run is not None and run.number == int(number) and not run.finished:
                        run.count = int(count)
                    on_stamp = self.on_stamp
                    if on_stamp is not None:
                        for _ in range(int(n)):
                            on_stamp()
                elif line.startswith(b"r "):
                    self._answers.put_nowait(json.loads(line[2:]))
        except Exception as e:  # what it said cannot be read: no answer will come either
            self._error = f"{type(e).__name__}: {e}"
        finally:
            self._answers.put_nowait(None)  # the process is gone: no answer will come

    async def _answer(self, timeout: float) -> dict:
        try:
            r = await asyncio.wait_for(self._answers.get(), timeout)
        except TimeoutError:
            raise RuntimeError(f"the benchmark's consumer did not answer within {timeout:g}s "
                               f"(see {self.log})") from None
        if r is None:
            self._answers.put_nowait(None)  # for whoever asks next
            raise RuntimeError(self.why())
        return r

    async def call(self, op: str, **kw: Any) -> dict:
        """One request, and its answer (the request's own time plus a minute at most). The
        answer of an earlier request given up (cancelled, timed out) is passed over."""
        async with self._lock:
            proc, reader = self._proc, self._reader
            if proc is None or proc.stdin is None or reader is None:
                raise RuntimeError("the consumer is not open")
            if reader.done():
                raise RuntimeError(self.why())
            self._seq += 1
            rid = self._seq
            proc.stdin.write(json.dumps({"op": op, "id": rid, **kw}).encode() + b"\n")
            await proc.stdin.drain()
            while True:
                r = await self._answer(kw.get("timeout", 0) + 60)
                if r.get("id") == rid:
                    break
            if "error" in r:
                raise RuntimeError(f"the benchmark's consumer refused {op!r}: {r['error']}")
            return r

    async def begin(self, target: int | None, *, store: bool = False, record_from: int = 0) -> RemoteRun:
        """A new run (the last one's late events and unclaimed stamps do not count in it)."""
        self._runs += 1
        if self.stamps is not None:
            self.stamps.forget_stamps()
        run = self.run = RemoteRun(self, self._runs, record_from)
        await self.call("begin", number=run.number, target=target, store=store, record_from=record_from)
        return run

    async def wait_type(self, typ: str, n: int, timeout: float) -> bool:
        r = await self.call("wait_type", type=typ, n=n, timeout=timeout)
        self.by_type = Counter(r["by_type"])
        return bool(r["ok"])

    async def pause(self) -> None:
        await self.call("pause")

    async def resume(self) -> None:
        await self.call("resume")

    async def close(self) -> None:
        proc, reader = self._proc, self._reader
        if proc is None:
            return
        if reader is not None and not reader.done():
            with contextlib.suppress(Exception):
                await self.call("close")
        elif proc.returncode is None:  # its output is not read any more: it cannot be asked
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        if reader is not None:
            await reader  # it keeps what went wrong in _error
        self._proc = None


def main() -> None:
    import argparse

    import bridge.main

    p = argparse.ArgumentParser(prog="python -m bridge.bench.consumer",
                                description="the benchmark's consumer process (driven by the harness)")
    p.add_argument("url")
    p.add_argument("exchange")
    p.add_argument("files", type=Path, help="where a run's stored messages are written")
    p.add_argument("--state-only", action="store_true", help="call.state is the stamped event")
    p.add_argument("--no-credits", action="store_true", help="send no credits (nobody takes them)")
    a = p.parse_args()
    with asyncio.Runner(loop_factory=bridge.main.loop_factory()) as runner:
        runner.run(serve(a.url, a.exchange, a.state_only, not a.no_credits, a.files))


if __name__ == "__main__":
    main()
