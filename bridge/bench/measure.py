"""The benchmark run's state, and the measured runs the scenarios are made of: a closed-loop
run (as fast as the whole path takes frames), an open-loop run (a fixed rate, latencies), and the
ceiling (the same bodies through a plain aio-pika publisher)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from bridge.bench import stats
from bridge.bench.consumer import SinkProc
from bridge.bench.env import BenchError, CpuMeter, Env, now_ns
from bridge.bench.proc import Names, find_broker_pid, pipes
from bridge.bench.stats import rounded


class Bench:
    """One benchmark run: its options, the results and checks the scenarios put in, the latency
    samples for the plots, and the measured runs every scenario uses (closed loop, open loop,
    the plain aio-pika ceiling)."""

    def __init__(self, opts) -> None:
        self.o = opts
        self.amqp = opts.amqp_url
        self.out = Path(opts.out)
        self.results: dict = {}
        self.checks: dict[str, bool] = {}
        self.errors: dict[str, str] = {}
        #: latency samples (ns) for the plots
        self.samples: dict[str, list[int]] = {}
        self.max_eps: float | None = opts.max_eps
        self._ceiling_sink: SinkProc | None = None
        self._ceiling_names: Names | None = None
        self.broker_pid = find_broker_pid()

    async def timed(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        """Run a scenario (or a part of one): its wall time in the results' meta; an error is
        kept and fails its ``<name>_ran`` check (one broken scenario does not hide the others)."""
        t = time.monotonic()
        try:
            await coro
        except Exception as e:
            self.errors[name] = f"{type(e).__name__}: {e}"
            self.checks[f"{name}_ran"] = False
        finally:
            self.results["meta"].setdefault("wall_s", {})[name] = round(time.monotonic() - t, 1)

    async def close_ceiling(self) -> None:
        """Close the ceiling's consumer (opened by the first ceiling run) and its queue."""
        if self._ceiling_sink is not None:
            await self._ceiling_sink.close()
            assert self._ceiling_names is not None
            await self._ceiling_names.cleanup(self.amqp)

    async def closed_run(self, env: Env, frames: int, *, store: bool = False) -> tuple[dict, list]:
        """``frames`` frames as fast as the whole path takes them; done when every event of
        them reached the consumer."""
        o, lg, sink, proc = self.o, env.lg, env.consumer(), env.proc
        expected = frames * env.epf
        run = await sink.begin(expected, store=store)
        meter = CpuMeter(self, proc.pid, sink.pid)
        cpu0 = proc.cpu_s()
        limit = max(120.0, frames / 100)
        try:
            t_first = await env.until(asyncio.wait_for(lg.run_closed(frames, o.window, o.credit), limit))
        except TimeoutError:
            raise BenchError(f"{env.name}: throughput run stalled: {run.count}/{expected} events "
                             f"received in {limit:g}s (lost events hold the load generator's "
                             f"credit); bridge log:\n{proc.log_tail()}") from None
        ok = await env.until(run.wait(max(60.0, frames / 200)))
        cpu = meter.stop()
        t_end = run.t_last or now_ns()
        cpu_s = proc.cpu_s() - cpu0
        await run.samples()  # after the CPU was read: handing the samples over is not the run's work
        fwd_ok = await lg.wait_forwards(lg.sent, 10)
        elapsed = max(1e-9, (t_end - t_first) / 1e9)
        complete = ok and run.count == expected and run.distinct == expected
        res = {
            "frames": frames, "events_expected": expected, "events_received": run.count,
            "events_distinct": run.distinct, "by_type": dict(run.by_type), "complete": complete,
            "forwards_complete": fwd_ok, "elapsed_s": round(elapsed, 3),
            "frames_per_s": round(frames / elapsed, 1), "events_per_s": round(run.count / elapsed, 1),
            "events_per_frame": env.epf,
            # the process's utime + stime over the run (clock ticks: +-0.01 s)
            "cpu_s_per_10k_frames": rounded(cpu_s * 10_000 / frames, 3),
            **cpu,
            "hop_ms": stats.summary(run.hop_ns, "ms"),
        }
        return res, run.messages

    async def ceiling_run(self, messages: list, input_file: Path) -> dict:
        """The same bodies through a plain aio-pika publisher with confirms (own process)."""
        o = self.o
        if self._ceiling_sink is None:
            self._ceiling_names = Names()
            self._ceiling_sink = SinkProc(self.amqp, f"bench{self._ceiling_names.tag}.ceiling", self.out)
            await self._ceiling_sink.open()
        sink = self._ceiling_sink
        exchange = sink.exchange
        warm = min(len(messages) // 10, 2000)
        wrun = await sink.begin(warm, record_from=1 << 62)
        with open(self.out / "ceiling.log", "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge.bench.ceiling", "--url", self.amqp, "--exchange", exchange,
                "--window", str(o.publish_window), "--input", str(input_file), "--warmup", str(warm),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            )
        stdin, stdout = pipes(proc)
        try:
            line = await asyncio.wait_for(stdout.readline(), 60)
            if line.strip() != b"ready":
                raise BenchError(f"ceiling publisher did not start: {line!r} (see {self.out / 'ceiling.log'})")
            if not await wrun.wait(30):
                raise BenchError("ceiling warm-up messages did not arrive")
            run = await sink.begin(len(messages), record_from=1 << 62)
            meter = CpuMeter(self, proc.pid, sink.pid)
            t0 = now_ns()
            stdin.write(b"go\n")
            await stdin.drain()
            ok = await run.wait(max(60.0, len(messages) / 400))
            cpu = meter.stop()
            t_end = run.t_last or now_ns()
            line = await asyncio.wait_for(stdout.readline(), 30)
            report = json.loads(line) if line.strip() else {}
        finally:
            if proc.returncode is None:
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        elapsed = max(1e-9, (t_end - t0) / 1e9)
        n = len(messages)
        return {
            "events": n, "events_received": run.count, "events_distinct": run.distinct,
            "complete": ok and run.count == n and run.distinct == n, "failed": report.get("failed"),
            "elapsed_s": round(elapsed, 3), "events_per_s": round(run.count / elapsed, 1),
            # the publisher's own process_time over its publishing, over the same wall time
            "publisher_cpu_pct": rounded(100 * report["cpu_s"] / elapsed) if "cpu_s" in report else None,
            **{k: v for k, v in cpu.items() if k != "bridge_cpu_pct"},
        }

    async def paced_run(self, env: Env, eps: float, duration: float, warmup: float,
                        consume: bool = True) -> dict:
        """Open-loop load of ``eps`` events/s (``eps / events per frame`` frames/s) for
        ``duration`` seconds; samples of the first ``warmup`` seconds are left out."""
        lg, sink, proc = env.lg, env.sink, env.proc
        EPF = max(1, env.epf)
        fps = eps / EPF
        t0 = now_ns()
        record_from = t0 + int(warmup * 1e9)
        lg.fwd_rtt = []
        lg.record_from = record_from
        run = await sink.begin(None, record_from=record_from) if sink is not None and consume else None
        keep = lg.keep_stamps
        if not consume:
            lg.keep_stamps = False  # nothing claims the stamps: the events go unread
        base_fwd = lg.forwards

        async def cpu_window() -> tuple[float, float, int, dict]:
            await asyncio.sleep(warmup)
            meter = CpuMeter(self, proc.pid, sink.pid if sink is not None else None)
            c0, s0, w0 = proc.cpu_s(), lg.sent, now_ns()
            await asyncio.sleep(max(0.2, duration - warmup - 0.05))
            return proc.cpu_s() - c0, (now_ns() - w0) / 1e9, lg.sent - s0, meter.stop()

        cpu_task = asyncio.ensure_future(cpu_window())
        try:
            r = await env.until(lg.run_rate(fps, duration))
        finally:
            lg.keep_stamps = keep
        cpu_s, wall_s, win_frames, meter = await cpu_task
        fwd_ok = await lg.wait_forwards(base_fwd + r["sent"], 30)
        lg.record_from = 1 << 62
        res: dict = {
            "offered_events_per_s": eps, "duration_s": duration, "warmup_s": warmup,
            "frames_sent": r["sent"],
            "achieved_events_per_s": rounded(r["sent"] * EPF / ((r["t_end"] - r["t_start"]) / 1e9)),
            "backlog_max_frames": r["backlog_max"], "all_forwards_back": fwd_ok,
            "forward_us": stats.summary(lg.fwd_rtt, "us"),
        }
        eps_window = win_frames * EPF / wall_s if wall_s else 0
        res["bridge_cpu_pct"] = rounded(100 * cpu_s / wall_s) if wall_s else None
        res["cpu_window"] = meter  # bridge, consumer, broker, harness, whole machine (noise indicator)
        res["cpu_pct_per_1000_eps"] = rounded(100 * cpu_s / wall_s / (eps_window / 1000), 2) if eps_window else None
        res["cpu_s_per_10k_frames"] = rounded(cpu_s * 10_000 / win_frames, 3) if win_frames else None
        res["events_per_frame"] = env.epf
        if run is not None:
            await run.set_target(r["sent"] * env.epf)
            ok = await env.until(run.wait(60))
            res["all_events_received"] = ok and run.distinct == r["sent"] * env.epf
            await run.samples()
            res["hop_ms"] = stats.summary(run.hop_ns, "ms")
            res["_hop"] = run.hop_ns
        res["_fwd"] = lg.fwd_rtt
        return res

    def keep(self, label: str, res: dict) -> dict:
        """``res`` without its raw samples, which are kept for the plots under ``label``."""
        hop = res.pop("_hop", None)
        fwd = res.pop("_fwd", None)
        if hop is not None:
            self.samples[f"hop {label}"] = hop
        if fwd is not None:
            self.samples[f"forward {label}"] = fwd
        return res
