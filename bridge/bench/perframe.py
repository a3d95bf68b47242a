"""The bridge's per-frame path in one process, without sockets: a fixed workload to count
instructions on (``valgrind --tool=callgrind``) or to profile (cProfile), where a busy machine
cannot blur the figure as it blurs CPU seconds and rates.

``python -m bridge.bench.perframe FRAMES [KINDS]`` runs the real code of everything between a
frame's receive and its event's write to the broker: :meth:`PbxSession._frame` (decode, forward,
``Device.on_frame``: call state and the events encoded) with a stand-in WebSocket that hands it
the load generator's frames (:mod:`bridge.bench.frames`, 100 devices) and drops the forwards
(``forward``, and ``send`` for an intercept release), and :class:`EventPublisher` (buffer,
slices, ``Wire`` frames, confirmation futures and their callbacks) on a stand-in aiormq channel
that takes each written slice and acknowledges it at once (``basic.ack`` with ``multiple``, as
RabbitMQ answers a burst). Not
measured: the socket system calls, websockets' framing and aiormq's reading of the acks (the
real process's CPU seconds include them).

Instructions per frame = (instructions of a run of 2N frames - those of a run of N) / N, so the
interpreter's start and the imports cancel out::

    for n in 4000 8000; do valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        python -m bridge.bench.perframe $n 2>&1 | grep 'Collected'; done

``--profile`` prints a cProfile of the run too (top functions by own time);
``--service-loop`` runs it on the service's event loop (uvloop, :func:`bridge.main.loop_factory`)
instead of asyncio's. ``--intercept=off`` gives the session an intercept gate with no rules (as
the bridge runs it), ``--intercept=other`` one with a rule for a device not in the load (no
frame is held: the cost of intercept mode to the traffic it does not touch); without it the
session has no gate.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from typing import cast

from aiormq.base import FutureStore

from bridge.amqp.link import BrokerLink
from bridge.amqp.publisher import EventPublisher
from bridge.bench.frames import FrameMaker, hw_id
from bridge.device import Device
from bridge.events import KINDS, EventFactory
from bridge.intercept import Gate, Rules, parse_config
from bridge.pbx.session import PbxSession
from bridge.main import loop_factory

DEVICES = 100


class _Ws:
    """The WebSocket side: frames from the load generator's makers, forwards dropped."""

    def __init__(self, frames: int) -> None:
        makers = [FrameMaker(hw_id(i), i) for i in range(DEVICES)]
        self.frames = [makers[i % DEVICES].next(1_000_000_000 + i) for i in range(frames)]
        self.frames.reverse()
        self.forwarded = 0

    def take(self, taker) -> None:
        self.taker = taker

    async def wait_closed(self) -> None:
        """The frames handed to the session as the connection's callback would, then the end."""
        frames, taker = self.frames, self.taker
        while frames:
            if len(frames) % 8 == 0:  # the socket has no more data every few frames: a real wait
                await asyncio.sleep(0)
            taker(frames.pop(), False)

    def forward(self, data: bytes, binary: bool) -> bool:
        self.forwarded += 1
        return True

    async def send(self, data, text=None) -> None:  # an intercept release
        self.forwarded += 1

    def fail(self, code: int, reason: str) -> None:
        raise AssertionError(f"the session failed the connection: {code} {reason}")


class _Raw:
    """An aiormq channel as the publisher uses it; the broker acks every slice it is written."""

    number = 1
    max_content_size = 131_072 - 8
    is_closed = False

    def __init__(self) -> None:
        self.lock = self._Channel__lock = asyncio.Lock()
        self.delivery_tag = 0
        self.confirmations: dict = {}
        self.message_id_delivery_tag: dict = {}
        self.write_queue = self
        self.bytes = 0
        self._loop = asyncio.get_running_loop()
        self.create_future = FutureStore(self._loop).create_future  # aiormq's, as the channel's

    async def put(self, frame) -> None:
        self.put_nowait(frame)

    def put_nowait(self, frame) -> None:
        self.bytes += len(frame.payload)
        self._loop.call_soon(self._ack, self.delivery_tag)

    def full(self) -> bool:
        return False

    def _ack(self, upto: int) -> None:
        conf = self.confirmations
        for tag in [t for t in conf if t <= upto]:
            conf.pop(tag).set_result(True)


class _Intercept:
    """What a session asks of the intercept adapter (bridge.amqp.intercept.Interceptor)."""

    def __init__(self, rules: Rules) -> None:
        self.rules = rules
        self.sessions: set[PbxSession] = set()
        self._n = itertools.count(1)

    def gate(self) -> Gate:
        return Gate(self.rules, "bench-perframe", self._n)


#: --intercept=...: the rules of the session's gate
INTERCEPT = {"off": "", "other": "not-in-the-load=setup:device,conn:pbx"}


class _Link:
    ready = True
    blocked = None
    heard_at = 0.0

    def __init__(self, raw: _Raw) -> None:
        self.lost = asyncio.get_running_loop().create_future()
        self.raw = raw
        self.channel = self
        self.topology = type("T", (), {"events": type("E", (), {"name": "epsignal.events"})})()

    async def get_underlay_channel(self):
        return self.raw


async def run(frames: int, kinds: tuple[str, ...] = KINDS, intercept: str | None = None) -> dict:
    raw = _Raw()
    link = _Link(raw)
    factory = EventFactory("bench-perframe", kinds)
    # a stand-in for the broker link: the parts EventPublisher uses, on the fake channel above
    pub = EventPublisher(cast(BrokerLink, link), factory, window=1024, timeout_s=30.0, max_events=1_000_000,
                         max_age_s=3600.0)
    drain = asyncio.create_task(pub.run())
    ws = _Ws(frames)
    ix = _Intercept(Rules(parse_config(INTERCEPT[intercept]))) if intercept else None
    session = PbxSession(ws, pub.publish_nowait, 256 * 1024, ix)  # type: ignore[arg-type]
    for i in range(DEVICES):
        dev = Device(hw_id(i), factory)
        session.devices[dev.hw] = dev
    await session.run()
    await pub.flush(30.0)
    drain.cancel()
    await asyncio.gather(drain, return_exceptions=True)
    return {"frames": frames, "forwarded": ws.forwarded, "events": pub.stats.confirmed, "bytes": raw.bytes}


def main(argv: list[str]) -> None:
    profile = "--profile" in argv
    factory = loop_factory() if "--service-loop" in argv else None
    intercept = next((a.split("=", 1)[1] for a in argv if a.startswith("--intercept=")), None)
    args = [a for a in argv if not a.startswith("--")]
    frames = int(args[0]) if args else 10_000
    kinds = tuple(args[1].split(",")) if len(args) > 1 else KINDS
    with asyncio.Runner(loop_factory=factory) as runner:
        if profile:
            import cProfile
            import pstats

            prof = cProfile.Profile()
            prof.enable()
            out = runner.run(run(frames, kinds, intercept))
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        else:
            out = runner.run(run(frames, kinds, intercept))
    print(out)


if __name__ == "__main__":
    main(sys.argv[1:])
