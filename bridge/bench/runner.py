"""The benchmark run: every scenario against the real bridge process and the real broker.

See :mod:`bridge.bench` for what each scenario does; docs/PERFORMANCE.md for targets and results.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import aio_pika
import msgspec

from bridge.bench import codec, intercept, profiling, stats
from bridge.bench.consumer import Sink
from bridge.bench.frames import event_kinds, events_per_frame, hw_id
from bridge.bench.loadgen import LoadGen
from bridge.bench.proc import (
    BridgeProc, Names, base_env, closed_port, cpu_of, find_broker_pid, machine_cpu, raise_nofile,
    spawn_bridge,
)

PASSWORD = "bench-secret-pw"
NOISE_NOTE = ("numbers depend on the machine and on what else runs on it (the bridge, the load "
              "generator + consumer and RabbitMQ share its cores); compare runs on the same quiet machine")
now_ns = time.monotonic_ns
#: the sampler the Helm chart sets (values.yaml otel.sampler / samplerArg; a deploy test checks)
DEPLOYED_SAMPLER = ("parentbased_traceidratio", "0.1")


class BenchError(Exception):
    pass


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """CPU of the bridge, the harness (this process) and the local broker over a window."""

    def __init__(self, bench: Bench, pid: int | None) -> None:
        self.pids = {"bridge": pid, "broker": bench.broker_pid}
        self.t0 = now_ns()
        self.c0 = {k: cpu_of(p) if p else None for k, p in self.pids.items()}
        self.own0 = _own_cpu()
        self.m0 = machine_cpu()

    def stop(self, t_end: int | None = None, t_start: int | None = None) -> dict:
        t1 = now_ns()
        wall = ((t_end or t1) - (t_start or self.t0)) / 1e9
        out = {}
        for k, p in self.pids.items():
            c1 = cpu_of(p) if p else None
            c0 = self.c0[k]
            out[f"{k}_cpu_pct"] = _r(100 * (c1 - c0) / wall) if c0 is not None and c1 is not None and wall > 0 else None
        out["harness_cpu_pct"] = _r(100 * (_own_cpu() - self.own0) / wall) if wall > 0 else None
        busy, total = machine_cpu()
        db, dt = busy - self.m0[0], total - self.m0[1]
        #: all cores together, everything on the machine (other users' work included)
        out["machine_busy_pct"] = _r(100 * db / dt) if dt > 0 else None
        return out


def _r(x: float | None, nd: int = 1) -> float | None:
    return None if x is None else round(x, nd)


# ============================================================================ one bridge process
class Env:
    """One bridge process, its load generator ("PBX") and, with the broker up, its consumer."""

    def __init__(self, bench: Bench, name: str, devices: int, *, broker: bool = True,
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
        self.lg: LoadGen | None = None
        self.sink: Sink | None = None
        self.proc: BridgeProc | None = None
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
        self.lg = LoadGen(PASSWORD)
        url = await self.lg.start()
        if self.broker:
            # no call.signaling events: the stamps come from the load generator, per device
            state_only = "call.signaling" not in self.kinds
            self.lg.keep_stamps = state_only
            self.sink = Sink(b.amqp, self.names.events, on_stamp=self.lg.release,
                             stamp_by_key=self.lg.stamp_by_key if state_only else None)
            await self.sink.open()
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
        self.proc = await spawn_bridge(base_env(env), log, wrapper=self.wrapper, args=self.args,
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
            ok = "attached" not in self.kinds or await self.until(
                self.sink.wait_type("attached", self.devices, attach_timeout))
            if not ok:
                raise BenchError(f"{self.name}: {self.sink.by_type['attached']}/{self.devices} attached "
                                 f"events reached the consumer; bridge log {log}:\n{self.proc.log_tail()}")
            self.t_attached_events = now_ns()

    async def until(self, coro):
        """Await ``coro`` unless the bridge process dies first (then BenchError)."""
        task = asyncio.ensure_future(coro)
        dead = asyncio.ensure_future(self.proc.proc.wait())
        done, _ = await asyncio.wait({task, dead}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            dead.cancel()
            return task.result()
        task.cancel()
        raise BenchError(f"bridge {self.name} exited with {self.proc.proc.returncode}:\n{self.proc.log_tail()}")

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop(timeout=60)
        if self.lg is not None:
            await self.lg.stop()
        if self.sink is not None:
            await self.sink.close()
        await self.names.cleanup(self.bench.amqp)


# ============================================================================ the benchmark
class Bench:
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
        self._ceiling_sink: Sink | None = None
        self._ceiling_names: Names | None = None
        self.broker_pid = find_broker_pid()

    # ------------------------------------------------------------------ driver
    async def run(self) -> dict:
        o, S = self.o, self.o.scenario_set
        self.out.mkdir(parents=True, exist_ok=True)
        nofile = raise_nofile()
        self.results["meta"] = await self._meta(nofile)
        if "codec" in S:
            await self._scenario("codec", self.codec)
        if S & {"throughput", "latency", "forwarding", "commands"}:
            await self._scenario("main", self.main_env)
        if "forwarding" in S:
            await self._scenario("forwarding", self.broker_down)
        if "peer" in S:
            await self._scenario("peer", self.peer)
        if "tracing" in S:
            await self._scenario("tracing", self.tracing)
        if "scale" in S:
            await self._scenario("scale", self.scale)
        if "intercept" in S:
            await self._scenario("intercept", lambda: intercept.run(self))
        self.results["meta"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        self.results["targets"] = self.targets()
        self.results["checks"] = self.checks
        if self.errors:
            self.results["errors"] = self.errors
        if not o.no_plots:
            self.results["plots"] = self.plots()
        return self.results

    async def _scenario(self, name: str, fn) -> None:
        t = time.monotonic()
        try:
            await fn()
        except Exception as e:  # one broken scenario does not hide the others
            self.errors[name] = f"{type(e).__name__}: {e}"
            self.checks[f"{name}_ran"] = False
        finally:
            self.results["meta"].setdefault("wall_s", {})[name] = round(time.monotonic() - t, 1)

    async def _meta(self, nofile) -> dict:
        import aio_pika as ap
        import msgspec as ms
        import websockets as ws

        rabbit = None
        try:
            conn = await aio_pika.connect(self.amqp)
            props = conn.transport.connection.server_properties
            rabbit = props.get("version")
            rabbit = rabbit.decode() if isinstance(rabbit, bytes) else rabbit
            await conn.close()
        except Exception as e:
            raise BenchError(f"broker at {self.amqp} not reachable: {e}") from None
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, timeout=5, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
        except Exception:
            commit = None
        return {
            "mode": "smoke" if self.o.smoke else "full",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "commit": commit, "rabbitmq": rabbit,
            "aio_pika": ap.__version__, "websockets": ws.__version__, "msgspec": ms.__version__,
            "rlimit_nofile": list(nofile), "loadavg_before": [round(x, 2) for x in os.getloadavg()],
            "note": NOISE_NOTE,
            "options": {k: v for k, v in vars(self.o).items()
                        if k not in ("func", "scenario_set") and not callable(v)},
        }

    # ------------------------------------------------------------------ scenario 6: codec
    async def codec(self) -> None:
        res = codec.run(self.o.codec_messages, repeats=3 if self.o.smoke else 7)
        self.results["codec"] = res
        self.checks["codec_equivalent"] = bool(res["equivalent_events"])

    # ------------------------------------------------------------------ the main bridge
    async def main_env(self) -> None:
        o, S = self.o, self.o.scenario_set
        env = Env(self, "main", o.devices)
        try:
            await env.start()
            if "throughput" in S:
                await self._sub("throughput", self.throughput(env))
            if S & {"latency", "forwarding"}:
                await self._sub("latency", self.latency(env))
            if "commands" in S:
                await self._sub("commands", self.commands(env))
        finally:
            await env.stop()
            if self._ceiling_sink is not None:
                await self._ceiling_sink.close()
                await self._ceiling_names.cleanup(self.amqp)

    async def _sub(self, name: str, coro) -> None:
        t = time.monotonic()
        try:
            await coro
        except Exception as e:
            self.errors[name] = f"{type(e).__name__}: {e}"
            self.checks[f"{name}_ran"] = False
        finally:
            self.results["meta"].setdefault("wall_s", {})[name] = round(time.monotonic() - t, 1)

    # ------------------------------------------------------------------ scenario 1: throughput
    async def closed_run(self, env: Env, frames: int, *, store: bool = False) -> tuple[dict, list]:
        """``frames`` frames as fast as the whole path takes them; done when every event of
        them reached the consumer."""
        o, lg, sink, proc = self.o, env.lg, env.sink, env.proc
        expected = frames * env.epf
        run = sink.begin(expected, store=store)
        meter = CpuMeter(self, proc.pid)
        cpu0 = proc.cpu_s()
        limit = max(120.0, frames / 100)
        try:
            t_first = await env.until(asyncio.wait_for(lg.run_closed(frames, o.window, o.credit), limit))
        except TimeoutError:
            raise BenchError(f"{env.name}: throughput run stalled: {run.count}/{expected} events "
                             f"received in {limit:g}s (lost events hold the load generator's "
                             f"credit); bridge log:\n{proc.log_tail()}") from None
        ok = await env.until(run.wait(max(60.0, frames / 200)))
        t_end = run.t_last or now_ns()
        cpu = meter.stop(t_end, t_first)
        cpu_s = proc.cpu_s() - cpu0
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
            "cpu_s_per_10k_frames": _r(cpu_s * 10_000 / frames, 3),
            **cpu,
            "hop_ms": stats.summary(run.hop_ns, "ms"),
        }
        return res, run.messages

    async def ceiling_run(self, messages: list, input_file: Path) -> dict:
        """The same bodies through a plain aio-pika publisher with confirms (own process)."""
        o = self.o
        if self._ceiling_sink is None:
            self._ceiling_names = Names()
            self._ceiling_sink = Sink(self.amqp, f"bench{self._ceiling_names.tag}.ceiling")
            await self._ceiling_sink.open()
        sink = self._ceiling_sink
        exchange = sink.exchange
        warm = min(len(messages) // 10, 2000)
        wrun = sink.begin(warm, record_from=1 << 62)
        with open(self.out / "ceiling.log", "ab") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bridge.bench.ceiling", "--url", self.amqp, "--exchange", exchange,
                "--window", str(o.publish_window), "--input", str(input_file), "--warmup", str(warm),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            )
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 60)
            if line.strip() != b"ready":
                raise BenchError(f"ceiling publisher did not start: {line!r} (see {self.out / 'ceiling.log'})")
            if not await wrun.wait(30):
                raise BenchError("ceiling warm-up messages did not arrive")
            run = sink.begin(len(messages), record_from=1 << 62)
            meter = CpuMeter(self, proc.pid)
            t0 = now_ns()
            proc.stdin.write(b"go\n")
            await proc.stdin.drain()
            ok = await run.wait(max(60.0, len(messages) / 400))
            t_end = run.t_last or now_ns()
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            cpu = meter.stop(t_end, t0)
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
            "publisher_cpu_pct": _r(100 * report["cpu_s"] / elapsed) if "cpu_s" in report else None,
            **{k: v for k, v in cpu.items() if k != "bridge_cpu_pct"},
        }

    async def throughput(self, env: Env) -> None:
        o = self.o
        warm = max(200, min(2000, o.frames // 5))
        await self.closed_run(env, warm)  # warm-up, not counted
        rounds, messages = [], None
        input_file = self.out / "ceiling-input.msgpack"
        try:
            for _ in range(o.rounds):
                b, msgs = await self.closed_run(env, o.frames, store=messages is None)
                if messages is None:
                    messages = msgs
                    input_file.write_bytes(msgspec.msgpack.encode(messages))
                c = await self.ceiling_run(messages, input_file)
                rounds.append({"bridge": b, "ceiling": c})
        finally:
            input_file.unlink(missing_ok=True)
        b_eps = stats.median([r["bridge"]["events_per_s"] for r in rounds])
        b_fps = stats.median([r["bridge"]["frames_per_s"] for r in rounds])
        c_eps = stats.median([r["ceiling"]["events_per_s"] for r in rounds])
        ratio = b_eps / c_eps if c_eps else None
        self.max_eps = b_eps
        all_in = all(r["bridge"]["complete"] and r["ceiling"]["complete"] for r in rounds)
        self.results["throughput"] = {
            "devices": o.devices, "frames_per_round": o.frames, "events_per_frame": env.epf,
            "window_per_session": o.window, "credit_frames": o.credit, "publish_window": o.publish_window,
            "bridge_frames_per_s": _r(b_fps), "bridge_events_per_s": _r(b_eps),
            "ceiling_events_per_s": _r(c_eps), "ratio": _r(ratio, 3),
            "all_events_received": all_in, "rounds": rounds,
        }
        self.checks["throughput_all_events_received"] = all_in
        # a sanity range, not a target: it catches a broken measurement (a ceiling that fails, a
        # bridge that drops events), not a fast bridge. The bridge publishes in slices and the
        # ceiling awaits each publish, so on a quiet machine a smoke run saw 3.2
        self.checks["throughput_ratio_sane"] = ratio is not None and 0.1 < ratio < 20
        if o.profile:
            await self._sub("profile", self.profile(env))

    # ------------------------------------------------------------------ profile (scenario 1)
    async def profile(self, env: Env) -> None:
        o = self.o
        tool = o.profiler
        if tool == "auto":
            tool = "py-spy" if profiling.py_spy() else "pyinstrument"
        res: dict = {"tool": tool}
        if tool == "py-spy":
            if not profiling.py_spy():
                raise BenchError("py-spy is not installed (pip install py-spy)")
            path = self.out / "profile-throughput.collapsed.txt"
            spy = profiling.PySpy(env.proc.pid, path)
            try:
                await spy.start()
                r, _ = await self.closed_run(env, o.frames)
            except Exception:
                await spy.stop()
                if o.profiler == "auto" and profiling.pyinstrument_available():
                    tool = "pyinstrument"
                else:
                    raise
            else:
                await spy.stop()
                res.update(file=str(path), run=r, analysis=profiling.analyse(path.read_text(), top=25))
        if tool == "pyinstrument":
            if not profiling.pyinstrument_available():
                raise BenchError("pyinstrument is not installed (pip install pyinstrument)")
            base = self.out / "profile-throughput.pyinstrument"
            penv = Env(self, "profile", o.devices, wrapper=True,
                       extra_env={"EPSIGNAL_BENCH_PYINSTRUMENT": str(base)})
            try:
                await penv.start()
                await self.closed_run(penv, max(200, min(2000, o.frames // 5)))
                r, _ = await self.closed_run(penv, o.frames)
            finally:
                await penv.stop()
            res.update(tool="pyinstrument", file=f"{base}.html", text=f"{base}.txt", run=r)
        self.results["profile"] = res

    # ------------------------------------------------------------------ scenarios 2, 3 (+ CPU)
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
        run = sink.begin(None, record_from=record_from) if sink is not None and consume else None
        keep = lg.keep_stamps
        if not consume:
            lg.keep_stamps = False  # nothing claims the stamps: the events go unread
        base_fwd = lg.forwards

        async def cpu_window() -> tuple[float, float, int, dict]:
            await asyncio.sleep(warmup)
            meter = CpuMeter(self, proc.pid)
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
            "achieved_events_per_s": _r(r["sent"] * EPF / ((r["t_end"] - r["t_start"]) / 1e9)),
            "backlog_max_frames": r["backlog_max"], "all_forwards_back": fwd_ok,
            "forward_us": stats.summary(lg.fwd_rtt, "us"),
        }
        eps_window = win_frames * EPF / wall_s if wall_s else 0
        res["bridge_cpu_pct"] = _r(100 * cpu_s / wall_s) if wall_s else None
        res["cpu_window"] = meter  # bridge, broker, harness, whole machine (noise indicator)
        res["cpu_pct_per_1000_eps"] = _r(100 * cpu_s / wall_s / (eps_window / 1000), 2) if eps_window else None
        res["cpu_s_per_10k_frames"] = _r(cpu_s * 10_000 / win_frames, 3) if win_frames else None
        res["events_per_frame"] = env.epf
        if run is not None:
            run.set_target(r["sent"] * env.epf)
            ok = await env.until(run.wait(60))
            res["all_events_received"] = ok and run.distinct == r["sent"] * env.epf
            res["hop_ms"] = stats.summary(run.hop_ns, "ms")
            res["_hop"] = run.hop_ns
        res["_fwd"] = lg.fwd_rtt
        return res

    def _keep(self, label: str, res: dict) -> dict:
        hop = res.pop("_hop", None)
        fwd = res.pop("_fwd", None)
        if hop is not None:
            self.samples[f"hop {label}"] = hop
        if fwd is not None:
            self.samples[f"forward {label}"] = fwd
        return res

    async def latency(self, env: Env) -> None:
        o = self.o
        if "latency" in o.scenario_set:
            await self._latency_runs(env)
        if "forwarding" in o.scenario_set:
            # forwarding with the broker up, the consumer paused (events pile up unread in the
            # broker): the harness does the same work as in the broker-down and floor runs
            await env.sink.pause()
            try:
                f = self._keep("broker up", await self.paced_run(env, o.latency_rate, o.latency_duration,
                                                                o.warmup, consume=False))
            finally:
                await env.sink.resume()
            self.results.setdefault("forwarding", {})["broker_up"] = {
                "offered_events_per_s": o.latency_rate, "forward_us": f["forward_us"],
                "bridge_cpu_pct": f["bridge_cpu_pct"], "all_forwards_back": f["all_forwards_back"],
                "cpu_window": f["cpu_window"],
                "note": "consumer paused: events are confirmed by the broker, and stay unread"}
            self.checks["forwarding_broker_up_all_back"] = f["all_forwards_back"]

    async def _latency_runs(self, env: Env) -> None:
        o = self.o
        out: dict = {}
        r = self._keep(f"@{o.latency_rate:g}/s (consumer on)",
                       await self.paced_run(env, o.latency_rate, o.latency_duration, o.warmup))
        out["fixed"] = r
        self.checks["latency_fixed_all_received"] = bool(r.get("all_events_received")) and r["all_forwards_back"]
        if self.max_eps:
            eps = round(0.8 * self.max_eps)
            r80 = self._keep(f"@80% ({eps}/s, consumer on)",
                             await self.paced_run(env, eps, o.latency_duration, o.warmup))
            out["at_80pct_of_max"] = r80
            self.checks["latency_80pct_all_received"] = (bool(r80.get("all_events_received"))
                                                         and r80["all_forwards_back"])
        else:
            out["at_80pct_of_max"] = "n/a: no maximum (run throughput, or give --max-eps)"
        self.results["latency"] = out
        self.results["cpu"] = {
            "at_events_per_s": r["achieved_events_per_s"], "bridge_cpu_pct": r["bridge_cpu_pct"],
            "cpu_pct_of_one_core_per_1000_eps": r["cpu_pct_per_1000_eps"],
        }
        if isinstance(out.get("at_80pct_of_max"), dict):
            r80 = out["at_80pct_of_max"]
            self.results["cpu"]["at_80pct"] = {
                "at_events_per_s": r80["achieved_events_per_s"], "bridge_cpu_pct": r80["bridge_cpu_pct"],
                "cpu_pct_of_one_core_per_1000_eps": r80["cpu_pct_per_1000_eps"]}

    # ------------------------------------------------------------------ scenario 3, broker down
    async def broker_down(self) -> None:
        o = self.o
        env = Env(self, "broker-down", o.devices, broker=False, args=["--grace", "1"])
        try:
            await env.start()
            r = self._keep("broker down", await self.paced_run(env, o.latency_rate, o.latency_duration, o.warmup))
        finally:
            await env.stop()
        fw = self.results.setdefault("forwarding", {})
        fw["broker_down"] = {"offered_events_per_s": o.latency_rate, "forward_us": r["forward_us"],
                             "bridge_cpu_pct": r["bridge_cpu_pct"], "all_forwards_back": r["all_forwards_back"],
                             "cpu_window": r["cpu_window"]}
        # the floor: a process that only echoes the frames (no decode, no events, no broker)
        echo = Env(self, "echo-floor", o.devices, broker=False,
                   command=[sys.executable, "-m", "bridge.bench.echo"])
        try:
            await echo.start()
            f = self._keep("echo floor", await self.paced_run(echo, o.latency_rate, o.latency_duration, o.warmup))
            fw["floor_echo"] = {"offered_events_per_s": o.latency_rate, "forward_us": f["forward_us"],
                                "process_cpu_pct": f["bridge_cpu_pct"], "cpu_window": f["cpu_window"]}
        except Exception as e:
            fw["floor_echo"] = {"error": f"{type(e).__name__}: {e}"}
        finally:
            await echo.stop()
        up = fw.get("broker_up", {}).get("forward_us", {}).get("p99")
        down = r["forward_us"]["p99"]
        fw["p99_down_over_up"] = _r(down / up, 2) if up and down else None
        self.checks["forwarding_broker_down_all_back"] = r["all_forwards_back"]

    # ------------------------------------------------------------------ scenario 4: commands
    async def commands(self, env: Env) -> None:
        o, lg = self.o, env.lg
        hws = [s.hw for s in lg.order]
        conn = await aio_pika.connect(self.amqp)
        try:
            ch = await conn.channel()
            ex = await ch.get_exchange(env.names.commands, ensure=False)

            async def send(i: int) -> None:
                hw = hws[i % len(hws)]
                body = b'{"call":-1,"to":true,"sig":{"bench_c":%d,"type":"facility"}}' % now_ns()
                await ex.publish(aio_pika.Message(body, content_type="application/json"),
                                 f"device.{hw}.signaling")

            warm = min(50, max(1, o.commands // 10))  # first commands of each device: not counted
            base0 = lg.commands
            for i in range(warm):
                await send(i)
            if not await env.until(lg.wait_commands(base0 + warm, 30)):
                raise BenchError(f"warm-up commands: {lg.commands - base0}/{warm} reached the PBX")
            base = lg.commands
            lg.cmd_latency = []
            period = 1 / o.command_rate
            start = time.monotonic()
            for i in range(o.commands):
                await send(i)
                delay = start + (i + 1) * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            ok = await env.until(lg.wait_commands(base + o.commands, 30))
        finally:
            await conn.close()
        self.results["commands"] = {
            "commands": o.commands, "rate_per_s": o.command_rate, "received": lg.commands - base,
            "all_received": ok, "latency_ms": stats.summary(lg.cmd_latency, "ms"),
        }
        self.samples["command"] = list(lg.cmd_latency)
        self.checks["commands_all_received"] = ok

    # ------------------------------------------------------------------ scenario 5: scale
    async def scale(self) -> None:
        o = self.o
        runs = []
        soft = raise_nofile()[0]
        for n in sorted(o.scale_counts):
            if n + 256 > soft:
                runs.append({"devices": n, "skipped": f"RLIMIT_NOFILE {soft} too low for {n} sessions"})
                continue
            env = Env(self, f"scale{n}", n)
            timeout = max(60.0, n / 50)
            try:
                await env.start(attach_timeout=timeout)
                lg = env.lg
                attach_s = (env.t_attached - env.proc.t_spawn) / 1e9 if n else None
                first = ((env.t_attached - lg.t_first_connect) / 1e9) if lg.t_first_connect and n else None
                events_s = (env.t_attached_events - env.proc.t_spawn) / 1e9
                await asyncio.sleep(1.0)
                st = env.proc.status()
                c0 = env.proc.cpu_s()
                await asyncio.sleep(o.idle_window)
                idle = 100 * (env.proc.cpu_s() - c0) / o.idle_window
                st2 = env.proc.status()
                runs.append({
                    "devices": n, "attach_s": _r(attach_s, 2), "attach_from_first_connect_s": _r(first, 2),
                    "attached_events_confirmed_s": _r(events_s, 2),
                    "rss_mb": _r(st["VmRSS"] / 1024), "rss_mb_after_idle": _r(st2["VmRSS"] / 1024),
                    "hwm_mb": _r(st2["VmHWM"] / 1024), "idle_cpu_pct": _r(idle),
                    "login_failures": lg.login_failures,
                })
            except Exception as e:
                runs.append({"devices": n, "error": f"{type(e).__name__}: {e}"[:2000]})
            finally:
                await env.stop()
        ok = [r for r in runs if "rss_mb" in r]
        per_dev = None
        if len(ok) >= 2 and ok[-1]["devices"] > ok[0]["devices"]:
            per_dev = _r((ok[-1]["rss_mb"] - ok[0]["rss_mb"]) * 1024 / (ok[-1]["devices"] - ok[0]["devices"]), 2)
        self.results["scale"] = {"runs": runs, "rss_kb_per_device": per_dev}
        self.checks["scale_all_attached"] = all("rss_mb" in r or "skipped" in r for r in runs)

    # ------------------------------------------------------------------ scenario 8: the peer
    async def peer(self) -> None:
        """Issue 19: the bridge against a hand-written peer (:mod:`bridge.bench.peer`), per frame.

        Three processes side by side, each with its own load generator and consumer: the bridge
        with every event kind, the bridge with ``call.state`` only, and the peer (one
        ``call.signaling`` per frame). Every round: a closed-loop run of each (frames/s, CPU per
        10,000 frames), then an open-loop run of each at ``--peer-rate`` frames/s with the
        consumer on (forwarding and hop percentiles). Ratios bridge / peer per round; medians."""
        from bridge.events import KINDS

        o = self.o
        envs = {
            "bridge_all": Env(self, "peer-bridge-all", o.devices, extra_env={"EPSIGNAL_EVENT_KINDS": ",".join(KINDS)}),
            "bridge_state": Env(self, "peer-bridge-state", o.devices, extra_env={"EPSIGNAL_EVENT_KINDS": "call.state"}),
            "peer": Env(self, "peer", o.devices, peer=True, command=[sys.executable, "-m", "bridge.bench.peer"]),
        }
        frames = o.peer_frames
        warm = max(200, min(2000, frames // 5))
        rounds: list[dict] = []
        try:
            for env in envs.values():
                await env.start()
            for env in envs.values():
                await self.closed_run(env, warm)
            for _ in range(o.rounds):
                rnd: dict = {}
                for name, env in envs.items():
                    rnd[name] = {"closed": (await self.closed_run(env, frames))[0]}
                for name, env in envs.items():
                    p = await self.paced_run(env, o.peer_rate * env.epf, o.latency_duration, o.warmup)
                    p.pop("_hop", None)
                    p.pop("_fwd", None)
                    rnd[name]["paced"] = p
                rounds.append(rnd)
        finally:
            for env in envs.values():
                await env.stop()

        def med(name: str, get) -> float | None:
            xs = [get(r[name]) for r in rounds]
            xs = [x for x in xs if x is not None]
            return _r(stats.median(xs), 3) if xs else None

        def p99(r: dict, key: str):
            return (r["paced"].get(key) or {}).get("p99")

        res: dict = {"frames_per_round": frames, "rate_frames_per_s": o.peer_rate, "devices": o.devices,
                     "window_per_session": o.window, "rounds": rounds}
        for name, env in envs.items():
            res[name] = {
                "events_per_frame": env.epf,
                "frames_per_s": med(name, lambda r: r["closed"]["frames_per_s"]),
                "events_per_s": med(name, lambda r: r["closed"]["events_per_s"]),
                "cpu_s_per_10k_frames": med(name, lambda r: r["closed"]["cpu_s_per_10k_frames"]),
                "cpu_s_per_10k_frames_at_rate": med(name, lambda r: r["paced"]["cpu_s_per_10k_frames"]),
                "forward_p99_us": med(name, lambda r: p99(r, "forward_us")),
                "hop_p99_ms": med(name, lambda r: p99(r, "hop_ms")),
                "forward_p50_us": med(name, lambda r: (r["paced"].get("forward_us") or {}).get("p50")),
                "hop_p50_ms": med(name, lambda r: (r["paced"].get("hop_ms") or {}).get("p50")),
            }

        def ratio(a, b):
            return a / b if a is not None and b else None

        def mratio(name: str, get) -> float | None:
            """Median over the rounds of (bridge figure / peer figure in the same round)."""
            xs = [ratio(get(r[name]), get(r["peer"])) for r in rounds]
            xs = [x for x in xs if x is not None]
            return _r(stats.median(xs), 3) if xs else None

        res["ratios"] = {name: {
            "frames_per_s": mratio(name, lambda x: x["closed"]["frames_per_s"]),
            "forward_p99": mratio(name, lambda x: p99(x, "forward_us")),
            "hop_p99": mratio(name, lambda x: p99(x, "hop_ms")),
            "cpu_per_frame": mratio(name, lambda x: x["closed"]["cpu_s_per_10k_frames"]),
        } for name in ("bridge_all", "bridge_state")}
        self.results["peer"] = res
        self.checks["peer_all_events_received"] = all(
            x["closed"]["complete"] and x["paced"].get("all_events_received") and x["paced"]["all_forwards_back"]
            for r in rounds for x in r.values())

    # ------------------------------------------------------------------ scenario 7: tracing
    async def tracing(self) -> None:
        """Three bridges side by side, the throughput run alternating between them: tracing off,
        on with the Helm chart's sampler (:data:`DEPLOYED_SAMPLER`, the target's measure), and on
        with every span sampled."""
        o = self.o
        envs: dict[str, Env] = {}
        status_files: dict[str, Path] = {}
        for name, sampler in (("off", None), ("on", DEPLOYED_SAMPLER), ("every_span", ("parentbased_always_on", ""))):
            extra = {}
            if sampler is not None:
                status_files[name] = self.out / f"tracing-status-{name}.json"
                status_files[name].unlink(missing_ok=True)
                extra = {"EPSIGNAL_BENCH_TRACING": "sdk", "EPSIGNAL_BENCH_STATUS": str(status_files[name]),
                         "OTEL_SDK_DISABLED": "false", "OTEL_TRACES_SAMPLER": sampler[0],
                         "OTEL_TRACES_SAMPLER_ARG": sampler[1], "OTEL_SERVICE_NAME": "epsignal-bridge-bench",
                         **dict(o.tracing_env)}
            envs[name] = Env(self, f"tracing-{name}", o.devices, wrapper=True, extra_env=extra)
        rounds: list[dict] = []
        warm = max(200, min(2000, o.tracing_frames // 5))
        try:
            for env in envs.values():
                await env.start()
            for env in envs.values():
                await self.closed_run(env, warm)
            for _ in range(o.rounds):
                rounds.append({name: (await self.closed_run(env, o.tracing_frames))[0] for name, env in envs.items()})
        finally:
            for env in envs.values():
                await env.stop()
        eps = {name: stats.median([r[name]["events_per_s"] for r in rounds]) for name in envs}
        frames = sum(r["on"]["frames"] for r in rounds) + warm
        res: dict = {"frames_per_round": o.tracing_frames, "off_events_per_s": _r(eps["off"]),
                     "sampler": f"{DEPLOYED_SAMPLER[0]} {DEPLOYED_SAMPLER[1]}", "rounds": rounds}
        for name, path in status_files.items():
            try:
                status = json.loads(path.read_text())
            except (OSError, ValueError):
                status = {"tracing": "unknown: the traced bridge wrote no status", "spans": 0}
            part = {"events_per_s": _r(eps[name]), "spans_exported": status.get("spans", 0),
                    "tracing": status.get("tracing"), "spans_per_frame": _r(status.get("spans", 0) / frames, 2),
                    "cost_pct": _r(100 * (1 - eps[name] / eps["off"])) if eps["off"] else None}
            if status.get("tracing") != "on" or not status.get("spans"):
                part["cost_pct"] = None
                part["reason"] = (f"tracing in the bridge: {status.get('tracing')}; spans exported: "
                                  f"{status.get('spans', 0)} (not wired yet?)")
            res[name] = part
        on = res["on"]
        res.update(status="ok" if on["cost_pct"] is not None else "n/a", cost_pct=on["cost_pct"],
                   on_events_per_s=on["events_per_s"])
        if on["cost_pct"] is None:
            res["reason"] = on["reason"]
        self.results["tracing"] = res
        self.checks["tracing_all_events_received"] = all(x["complete"] for r in rounds for x in r.values())

    # ------------------------------------------------------------------ targets
    def targets(self) -> list[dict]:
        R = self.results
        out = []

        def add(name: str, target: str, value, met: bool | None) -> None:
            out.append({"name": name, "target": target, "value": value, "met": met})

        t = R.get("throughput", {})
        ratio = t.get("ratio")
        add("throughput vs raw aio-pika ceiling", ">= 0.9", ratio, None if ratio is None else ratio >= 0.9)
        fixed = R.get("latency", {}).get("fixed", {})
        hop99 = fixed.get("hop_ms", {}).get("p99") if isinstance(fixed, dict) else None
        add(f"hop p99 @ {self.o.latency_rate:g} ev/s (ms)", "< 5", hop99, None if hop99 is None else hop99 < 5)
        fw = R.get("forwarding", {})
        up99 = fw.get("broker_up", {}).get("forward_us", {}).get("p99")
        down99 = fw.get("broker_down", {}).get("forward_us", {}).get("p99")
        add("forwarding p99, broker up (us)", "< 1000", up99, None if up99 is None else up99 < 1000)
        add("forwarding p99, broker down (us)", "< 1000, within 25% (or 100 us) of broker up",
            down99, None if down99 is None or up99 is None else
            down99 < 1000 and down99 <= max(up99 * 1.25, up99 + 100))
        big = next((r for r in R.get("scale", {}).get("runs", []) if r.get("devices") == 10000 and "rss_mb" in r), None)
        add("10,000 devices: RSS (MB)", "< 250", big and big["hwm_mb"], None if big is None else big["hwm_mb"] < 250)
        add("10,000 devices: attached (s)", "< 30", big and big["attach_s"],
            None if big is None else big["attach_s"] < 30)
        pr = R.get("peer", {}).get("ratios", {})
        if pr:
            rate = self.o.peer_rate
            for name, label, need in (("bridge_state", "call.state only", 1.5), ("bridge_all", "every kind", 1.0)):
                v = pr.get(name, {}).get("frames_per_s")
                add(f"frames/s vs hand-written peer, {label}", f">= {need}", v, None if v is None else v >= need)
            for name, label in (("bridge_state", "call.state only"), ("bridge_all", "every kind")):
                for key, what in (("forward_p99", "forwarding p99"), ("hop_p99", "hop p99")):
                    v = pr.get(name, {}).get(key)
                    ok = None if v is None else v <= 1.0
                    add(f"{what} @ {rate:g} frames/s vs peer, {label} (ratio)", "<= 1.0", v, ok)
        tr = R.get("tracing", {})
        cost = tr.get("cost_pct")
        add(f"tracing cost (% throughput; {tr.get('sampler', 'the chart sampler')})", "< 15",
            cost if tr.get("status") == "ok" else "n/a", None if cost is None else cost < 15)
        return out

    # ------------------------------------------------------------------ plots
    def plots(self) -> dict:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            from matplotlib.ticker import FuncFormatter, NullFormatter
        except ImportError:
            return {"skipped": "matplotlib is not installed"}
        files = {}
        hop = {k: v for k, v in self.samples.items() if k.startswith("hop") and v}
        fwd = {k: v for k, v in self.samples.items() if k.startswith("forward") and v}
        if hop or fwd:
            fig, axes = plt.subplots(1, 2, figsize=(13, 5))
            for ax, series, div, unit, title in (
                (axes[0], hop, 1e6, "ms", "hop latency: frame from the PBX -> event at a consumer"),
                (axes[1], fwd, 1e3, "µs", "forwarding latency: frame out -> forwarded frame back"),
            ):
                for label, data in series.items():
                    xs, ys = stats.cdf_points(data, div)
                    ax.plot(xs, ys, label=f"{label.split(' ', 1)[1]} (n={len(data)})")
                ax.set_xscale("log")
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.set_xlabel(unit)
                ax.set_ylabel("fraction of messages")
                ax.set_title(title, fontsize=10)
                ax.grid(True, which="both", alpha=0.3)
                if series:
                    ax.legend(fontsize=8)
            fig.suptitle(f"epsignal-bridge latency CDF ({self.results['meta']['mode']} run, noisy machine)")
            fig.tight_layout()
            path = self.out / "latency-cdf.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files["latency_cdf"] = str(path)
        runs = [r for r in self.results.get("scale", {}).get("runs", []) if "rss_mb" in r]
        if runs:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            xs = [r["devices"] for r in runs]
            ax.plot(xs, [r["rss_mb"] for r in runs], "o-", label="VmRSS after attach")
            ax.plot(xs, [r["hwm_mb"] for r in runs], "s--", label="VmHWM (peak)")
            ax.axhline(250, color="red", lw=0.8, ls=":", label="target at 10,000: 250 MB")
            ax.set_xlabel("attached devices (one WebSocket session each)")
            ax.set_ylabel("MB")
            ax.set_title("bridge process memory vs devices")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = self.out / "rss-vs-devices.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            files["rss_vs_devices"] = str(path)
        return files


# ============================================================================ table
def table(R: dict) -> str:
    L: list[str] = []
    meta = R.get("meta", {})
    L.append(f"epsignal-bridge bench ({meta.get('mode')}; commit {meta.get('commit')}; {meta.get('cpus')} cpus; "
             f"RabbitMQ {meta.get('rabbitmq')}; load {meta.get('loadavg_before')} -> {meta.get('loadavg_after')})")
    L.append(f"note: {NOISE_NOTE}")

    def pct(s: dict | None, keys=("p50", "p99", "p99.9")) -> str:
        if not isinstance(s, dict) or s.get("count", 0) == 0:
            return "n/a"
        return " / ".join(f"{s[k]}" for k in keys) + f" {s['unit']} (n={s['count']})"

    t = R.get("throughput")
    if t:
        L.append("\n[1] throughput (closed loop, every event confirmed and consumed)")
        L.append(f"  bridge : {t['bridge_frames_per_s']} frames/s = {t['bridge_events_per_s']} events/s "
                 f"(median of {len(t['rounds'])}; {t['devices']} devices, window {t['window_per_session']}/session)")
        L.append(f"  ceiling: {t['ceiling_events_per_s']} events/s "
                 f"(plain aio-pika, confirms, window {t['publish_window']})")
        L.append(f"  ratio  : {t['ratio']}   all events received: {t['all_events_received']}")
        for i, r in enumerate(t["rounds"]):
            b, c = r["bridge"], r["ceiling"]
            L.append(f"    round {i + 1}: bridge {b['events_per_s']} ev/s (cpu: bridge {b['bridge_cpu_pct']}%, "
                     f"harness {b['harness_cpu_pct']}%, broker {b['broker_cpu_pct']}%, machine busy "
                     f"{b['machine_busy_pct']}%); ceiling {c['events_per_s']} ev/s (cpu: publisher "
                     f"{c['publisher_cpu_pct']}%, harness {c['harness_cpu_pct']}%, broker "
                     f"{c['broker_cpu_pct']}%, machine busy {c['machine_busy_pct']}%)")
        L.append(f"  hop latency while saturated p50/p99/p99.9: {pct(t['rounds'][0]['bridge']['hop_ms'])}")
    lat = R.get("latency")
    if lat:
        L.append("\n[2] hop latency, frame from the PBX -> event delivered (p50 / p99 / p99.9)")
        for key, r in lat.items():
            if isinstance(r, dict):
                L.append(f"  {key:16s} @ {r['achieved_events_per_s']} ev/s: {pct(r.get('hop_ms'))}"
                         f"  (all received: {r.get('all_events_received')}; machine busy "
                         f"{r['cpu_window'].get('machine_busy_pct')}%)")
            else:
                L.append(f"  {key:16s}: {r}")
    fw = R.get("forwarding")
    if fw:
        L.append("\n[3] forwarding latency, frame out -> forwarded frame back (p50 / p99 / p99.9)")
        for key in ("broker_up", "broker_down", "floor_echo"):
            if "forward_us" in fw.get(key, {}):
                busy = fw[key].get("cpu_window", {}).get("machine_busy_pct")
                L.append(f"  {key:12s}: {pct(fw[key]['forward_us'])}  (machine busy {busy}%)")
        if fw.get("p99_down_over_up") is not None:
            L.append(f"  p99 broker down / broker up: {fw['p99_down_over_up']}")
    c = R.get("commands")
    if c:
        L.append("\n[4] command latency, published -> Signaling at the PBX (p50 / p99 / p99.9)")
        L.append(f"  {pct(c['latency_ms'])}  ({c['received']}/{c['commands']} at {c['rate_per_s']:g}/s)")
    s = R.get("scale")
    if s:
        L.append("\n[5] scale (bridge process)")
        L.append("  devices  attach_s  rss_MB  hwm_MB  idle_cpu_%")
        for r in s["runs"]:
            if "rss_mb" in r:
                L.append(f"  {r['devices']:7d}  {r['attach_s']!s:>8}  {r['rss_mb']:6}  {r['hwm_mb']:6}  "
                         f"{r['idle_cpu_pct']:10}")
            else:
                L.append(f"  {r['devices']:7d}  {r.get('skipped') or r.get('error')}")
        if s.get("rss_kb_per_device") is not None:
            L.append(f"  ~{s['rss_kb_per_device']} kB per device")
    cpu = R.get("cpu")
    if cpu:
        L.append(f"  CPU: {cpu['cpu_pct_of_one_core_per_1000_eps']}% of a core per 1000 events/s "
                 f"(at {cpu['at_events_per_s']} ev/s: {cpu['bridge_cpu_pct']}%)"
                 + (f"; at 80%: {cpu['at_80pct']['cpu_pct_of_one_core_per_1000_eps']}% per 1000 ev/s"
                    if "at_80pct" in cpu else ""))
    k = R.get("codec")
    if k:
        L.append("\n[6] codec, per message (decode + call state + encode the events)")
        L.append(f"  msgspec {k['msgspec_full_us']} us, stdlib json {k['stdlib_full_us']} us: x{k['speedup_full']}"
                 f"  (decode only: {k['msgspec_decode_us']} vs {k['stdlib_decode_us']} us, x{k['speedup_decode']}; "
                 f"same events: {k['equivalent_events']})")
    pe = R.get("peer")
    if pe:
        L.append(f"\n[8] against the hand-written peer (issue 19): {pe['devices']} devices, window "
                 f"{pe['window_per_session']}/session, {pe['frames_per_round']} frames per round, "
                 f"{len(pe['rounds'])} round(s), open loop at {pe['rate_frames_per_s']:g} frames/s; medians")
        L.append("  process          ev/frame  frames/s  cpu_s/10k frames (closed / paced)  "
                 "fwd p50/p99 us  hop p50/p99 ms")
        for name in ("peer", "bridge_all", "bridge_state"):
            v = pe[name]
            L.append(f"  {name:16s} {v['events_per_frame']:8d}  {v['frames_per_s']!s:>8}  "
                     f"{v['cpu_s_per_10k_frames']!s:>8} / {v['cpu_s_per_10k_frames_at_rate']!s:<24}"
                     f"{v['forward_p50_us']} / {v['forward_p99_us']}   {v['hop_p50_ms']} / {v['hop_p99_ms']}")
        for name, r in pe["ratios"].items():
            L.append(f"  {name} / peer: frames/s x{r['frames_per_s']}, forwarding p99 x{r['forward_p99']}, "
                     f"hop p99 x{r['hop_p99']}, CPU per frame x{r['cpu_per_frame']}")
    tr = R.get("tracing")
    if tr:
        L.append(f"\n[7] tracing on vs off (throughput), off {tr['off_events_per_s']} ev/s")
        for name, label in (("on", f"on, {tr['sampler']}"), ("every_span", "on, every span sampled")):
            v = tr[name]
            if v["cost_pct"] is not None:
                L.append(f"  {label}: {v['events_per_s']} ev/s, cost {v['cost_pct']}% "
                         f"({v['spans_exported']} spans, {v['spans_per_frame']} per frame)")
            else:
                L.append(f"  {label}: n/a: {v.get('reason')} ({v['events_per_s']} ev/s)")
    L += intercept.table_lines(R)
    p = R.get("profile")
    if p:
        L.append(f"\nprofile ({p['tool']}): {p.get('file')}")
        a = p.get("analysis")
        if a:
            L.append("  self time by component: " + ", ".join(
                f"{x['component']} {x['pct']}%" for x in a["self_by_component"][:8]))
            L.append("  top self: " + "; ".join(f"{x['function']} {x['pct']}%" for x in a["top_self"][:8]))
    L.append("\ntargets")
    for tg in R.get("targets", []):
        mark = {True: "ok  ", False: "MISS", None: "n/a "}[tg["met"]]
        L.append(f"  [{mark}] {tg['name']}: {tg['value']} (target {tg['target']})")
    L.append("\nchecks: " + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in R.get("checks", {}).items()))
    for k, v in R.get("errors", {}).items():
        L.append(f"ERROR {k}: {v}")
    if R.get("plots"):
        L.append("plots: " + ", ".join(f"{v}" for v in R["plots"].values()))
    return "\n".join(L)


def main(args) -> int:
    from bridge.bench.options import resolve

    opts = resolve(args)
    bench = Bench(opts)
    try:
        results = asyncio.run(bench.run())
    except BenchError as e:
        print(f"epsignal-bridge bench: {e}", file=sys.stderr)
        return 2
    text = table(results)
    print(text)
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        with open(opts.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    ok = all(results["checks"].values()) and not results.get("errors")
    if opts.check_targets and any(t["met"] is False for t in results["targets"]):
        ok = False
    return 0 if ok else 1
