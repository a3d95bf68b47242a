"""One bridge process under test (:class:`Env`: the bridge, its load generator as the PBX and its
consumer) and the CPU meter of a measured window. What they need of the benchmark run is
:class:`Harness` (:class:`bridge.bench.measure.Bench` is one)."""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path
from collections.abc import Awaitable
from typing import Protocol, TypeVar

from bridge.bench.consumer import SinkProc
from bridge.bench.frames import event_kinds, events_per_frame, hw_id
from bridge.bench.loadgen import LoadGen
from bridge.bench.proc import (
    BridgeProc, Names, base_env, closed_port, cpu_of, machine_cpu, spawn_bridge,
)
from bridge.bench.stats import rounded

PASSWORD = "bench-secret-pw"
now_ns = time.monotonic_ns
T = TypeVar("T")


class BenchError(Exception):
    """The benchmark cannot go on (a broker not reachable, a bridge that died or stalled)."""


class Harness(Protocol):
    """What a bridge process under test needs of the benchmark run."""

    #: the options (bridge.bench.options)
    o: argparse.Namespace
    amqp: str
    #: where logs and files go
    out: Path
    #: the local broker's process, for its CPU (None: not found)
    broker_pid: int | None


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """CPU of the bridge, the consumer's process, the harness (this process: the load
    generator) and the local broker over a window."""

    def __init__(self, bench: Harness, pid: int | None, consumer: int | None = None) -> None:
        self.pids = {"bridge": pid, "consumer": consumer, "broker": bench.broker_pid}
        self.t0 = now_ns()
        self.c0 = {k: cpu_of(p) if p else None for k, p in self.pids.items()}
        self.own0 = _own_cpu()
        self.m0 = machine_cpu()

    def stop(self) -> dict:
        """Every figure over the same window, from the meter's start to now (a process's share
        over a shorter span, the run's first frame to its last event, beside the machine's over
        the whole window made the machine read low)."""
        wall = (now_ns() - self.t0) / 1e9
        out: dict[str, float | None] = {}
        for k, p in self.pids.items():
            c1 = cpu_of(p) if p else None
            c0 = self.c0[k]
            out[f"{k}_cpu_pct"] = (rounded(100 * (c1 - c0) / wall)
                                   if c0 is not None and c1 is not None and wall > 0 else None)
        out["harness_cpu_pct"] = rounded(100 * (_own_cpu() - self.own0) / wall) if wall > 0 else None
        busy, total = machine_cpu()
        db, dt = busy - self.m0[0], total - self.m0[1]
        #: all cores together, everything on the machine (other users' work included)
        out["machine_busy_pct"] = rounded(100 * db / dt) if dt > 0 else None
        return out


class Env:
    """One bridge process, its load generator ("PBX") and, with the broker up, its consumer."""

    def __init__(self, bench: Harness, name: str, devices: int, *, broker: bool = True,
                 wrapper: bool = False, extra_env: dict[str, str] | None = None,
                 args: list[str] | None = None, command: list[str] | None = None,
                 peer: bool = False) -> None:
        self.bench = bench
        self.name = name
        self.devices = devices
        self.broker = broker
        self.wrapper = wrapper
        self.extra_env = extra_env or {}
        self.args = args
        self.command = command
        self.names = Names()
        self._lg: LoadGen | None = None
        #: the consumer of the bridge's events (None without the broker)
        self.sink: SinkProc | None = None
        self._proc: BridgeProc | None = None
        self.t_attached: int | None = None
        self.t_attached_events: int | None = None
        #: the hand-written peer (bridge.bench.peer): one call.signaling per frame, no commands
        #: queue, no attached events
        self.peer = peer
        merged = {**dict(bench.o.bridge_env), **self.extra_env}
        self.kinds = ("call.signaling",) if peer else event_kinds(merged)
        #: events per frame of the cycle: what a run waits for at the consumer
        self.epf = events_per_frame(self.kinds)
        if self.epf == 0 and broker:
            raise BenchError(f"{name}: EPSIGNAL_EVENT_KINDS {merged.get('EPSIGNAL_EVENT_KINDS')!r} publishes "
                             "neither call.signaling nor call.state: nothing to measure")

    async def start(self, attach_timeout: float = 60.0) -> None:
        b = self.bench
        lg = self._lg = LoadGen(PASSWORD)
        url = await lg.start()
        sink = None
        if self.broker:
            # no call.signaling events: the stamps come from the load generator, per device
            state_only = "call.signaling" not in self.kinds
            lg.keep_stamps = state_only
            sink = self.sink = SinkProc(b.amqp, self.names.events, b.out, on_stamp=lg.release,
                                        stamps=lg if state_only else None)
            await sink.open()
            amqp = b.amqp
        else:
            amqp = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"  # nothing listens there
        env = {
            "EPSIGNAL_PBX_URL": url,
            "EPSIGNAL_PBX_PASSWORD": PASSWORD,
            "EPSIGNAL_AMQP_URL": amqp,
            "EPSIGNAL_DEVICES": ",".join(hw_id(i) for i in range(self.devices)),
            "EPSIGNAL_PUBLISH_WINDOW": str(b.o.publish_window),
            "EPSIGNAL_HTTP_HOST": "127.0.0.1",
            "EPSIGNAL_HTTP_PORT": "0",
            **self.names.env(),
            # tracing off unless a scenario turns it on
            "OTEL_SDK_DISABLED": "true",
            "OTEL_TRACES_EXPORTER": "none",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_LOGS_EXPORTER": "none",
        }
        env.update(dict(b.o.bridge_env))
        env.update(self.extra_env)
        log = b.out / f"bridge-{self.name}-{self.names.tag}.log"
        self._proc = await spawn_bridge(base_env(env), log, wrapper=self.wrapper, args=self.args,
                                       command=self.command)
        ok = await self.until(self.lg.wait_attached(self.devices, attach_timeout))
        if not ok:
            raise BenchError(f"{self.name}: {len(self.lg.sessions)}/{self.devices} devices attached "
                             f"within {attach_timeout:g}s; bridge log {log}:\n{self.proc.log_tail()}")
        self.t_attached = self.lg.t_last_attached if self.devices else now_ns()
        if self.broker and self.peer:
            # the peer connects to the broker and declares the exchange before its sessions
            self.t_attached_events = now_ns()
        elif self.broker:
            if not await self.until(self.names.wait_declared(b.amqp, attach_timeout)):
                raise BenchError(f"{self.name}: the bridge did not connect to the broker within "
                                 f"{attach_timeout:g}s; bridge log {log}:\n{self.proc.log_tail()}")
            # broker link up + every session attached; the attached events only if published
            assert sink is not None
            ok = "attached" not in self.kinds or await self.until(
                sink.wait_type("attached", self.devices, attach_timeout))
            if not ok:
                raise BenchError(f"{self.name}: {sink.by_type['attached']}/{self.devices} attached "
                                 f"events reached the consumer; bridge log {log}:\n{self.proc.log_tail()}")
            self.t_attached_events = now_ns()

    @property
    def lg(self) -> LoadGen:
        """The load generator (the PBX side), once started."""
        if self._lg is None:
            raise BenchError(f"{self.name}: not started")
        return self._lg

    @property
    def proc(self) -> BridgeProc:
        """The process under test, once started."""
        if self._proc is None:
            raise BenchError(f"{self.name}: not started")
        return self._proc

    def consumer(self) -> SinkProc:
        """The consumer of the events (a scenario that needs the broker)."""
        if self.sink is None:
            raise BenchError(f"{self.name}: runs without the broker: no events to consume")
        return self.sink

    async def until(self, coro: Awaitable[T]) -> T:
        """Await ``coro`` unless the bridge process or the consumer's dies first (then BenchError)."""
        task = asyncio.ensure_future(coro)
        dead = asyncio.ensure_future(self.proc.proc.wait())
        ended = self.sink.ended if self.sink is not None else None  # (not cancelled here)
        done, _ = await asyncio.wait({task, dead} | ({ended} if ended is not None else set()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            dead.cancel()
            return task.result()
        task.cancel()
        if dead not in done and self.sink is not None:
            dead.cancel()
            raise BenchError(f"{self.name}: {self.sink.why()}")
        raise BenchError(f"bridge {self.name} exited with {self.proc.proc.returncode}:\n{self.proc.log_tail()}")

    async def stop(self) -> None:
        if self._proc is not None:
            await self._proc.stop(timeout=60)
        if self._lg is not None:
            await self._lg.stop()
        if self.sink is not None:
            await self.sink.close()
        await self.names.cleanup(self.bench.amqp)
