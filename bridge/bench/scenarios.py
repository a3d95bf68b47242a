"""The benchmark's scenarios (numbered as in :mod:`bridge.bench` and docs/PERFORMANCE.md): each
starts the bridge processes it needs (:class:`~bridge.bench.env.Env`), measures them with the runs
of :class:`~bridge.bench.measure.Bench`, and puts its results and checks into the bench. Scenario 9
(intercept) has a module of its own, :mod:`bridge.bench.intercept`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import aio_pika
import msgspec

from bridge.bench import profiling, stats
from bridge.bench.codec import run as run_codec
from bridge.bench.env import BenchError, Env, now_ns
from bridge.bench.measure import Bench
from bridge.bench.proc import raise_nofile
from bridge.bench.stats import rounded

#: the sampler the Helm chart sets (values.yaml otel.sampler / samplerArg; a deploy test checks)
DEPLOYED_SAMPLER = ("parentbased_traceidratio", "0.1")


def warm_up_frames(frames: int) -> int:
    """The frames of the (uncounted) closed-loop warm-up before runs of ``frames`` frames."""
    return max(200, min(2000, frames // 5))


async def _start_side_by_side(bench: Bench, envs: Iterable[Env], warm: int) -> None:
    """Start bridges that are measured in turns, then warm each up with ``warm`` frames."""
    envs = list(envs)
    for env in envs:
        await env.start()
    for env in envs:
        await bench.closed_run(env, warm)


# ------------------------------------------------------------------ scenario 6: codec
async def codec(bench: Bench) -> None:
    res = run_codec(bench.o.codec_messages, repeats=3 if bench.o.smoke else 7)
    bench.results["codec"] = res
    bench.checks["codec_equivalent"] = bool(res["equivalent_events"])


# ------------------------------------------------------------------ the main bridge
async def main_env(bench: Bench) -> None:
    o, S = bench.o, bench.o.scenario_set
    env = Env(bench, "main", o.devices)
    try:
        await env.start()
        if "throughput" in S:
            await bench.timed("throughput", throughput(bench, env))
        if "latency" in S:
            await bench.timed("latency", latency(bench, env))
        if "forwarding" in S:
            await bench.timed("forwarding", forwarding(bench, env))
        if "commands" in S:
            await bench.timed("commands", commands(bench, env))
    finally:
        await env.stop()
        await bench.close_ceiling()


# ------------------------------------------------------------------ scenario 1: throughput
async def throughput(bench: Bench, env: Env) -> None:
    o = bench.o
    warm = warm_up_frames(o.frames)
    await bench.closed_run(env, warm)  # warm-up, not counted
    rounds, messages = [], None
    input_file = bench.out / "ceiling-input.msgpack"
    try:
        for _ in range(o.rounds):
            b, msgs = await bench.closed_run(env, o.frames, store=messages is None)
            if messages is None:
                messages = msgs
                input_file.write_bytes(msgspec.msgpack.encode(messages))
            c = await bench.ceiling_run(messages, input_file)
            rounds.append({"bridge": b, "ceiling": c})
    finally:
        input_file.unlink(missing_ok=True)
    b_eps = stats.median([r["bridge"]["events_per_s"] for r in rounds])
    b_fps = stats.median([r["bridge"]["frames_per_s"] for r in rounds])
    c_eps = stats.median([r["ceiling"]["events_per_s"] for r in rounds])
    ratio = b_eps / c_eps if b_eps is not None and c_eps else None
    bench.max_eps = b_eps
    all_in = all(r["bridge"]["complete"] and r["ceiling"]["complete"] for r in rounds)
    bench.results["throughput"] = {
        "devices": o.devices, "frames_per_round": o.frames, "events_per_frame": env.epf,
        "window_per_session": o.window, "credit_frames": o.credit, "publish_window": o.publish_window,
        "bridge_frames_per_s": rounded(b_fps), "bridge_events_per_s": rounded(b_eps),
        "ceiling_events_per_s": rounded(c_eps), "ratio": rounded(ratio, 3),
        "all_events_received": all_in, "rounds": rounds,
    }
    bench.checks["throughput_all_events_received"] = all_in
    # a sanity range, not a target: it catches a broken measurement (a ceiling that fails, a
    # bridge that drops events), not a fast bridge. The bridge publishes in slices and the
    # ceiling awaits each publish, so on a quiet machine a smoke run saw 3.2
    bench.checks["throughput_ratio_sane"] = ratio is not None and 0.1 < ratio < 20
    if o.profile:
        await bench.timed("profile", profile(bench, env))


# ------------------------------------------------------------------ profile (scenario 1)
async def profile(bench: Bench, env: Env) -> None:
    o = bench.o
    tool = o.profiler
    if tool == "auto":
        tool = "py-spy" if profiling.py_spy() else "pyinstrument"
    res: dict = {"tool": tool}
    if tool == "py-spy":
        if not profiling.py_spy():
            raise BenchError("py-spy is not installed (pip install py-spy)")
        path = bench.out / "profile-throughput.collapsed.txt"
        spy = profiling.PySpy(env.proc.pid, path)
        try:
            await spy.start()
            r, _ = await bench.closed_run(env, o.frames)
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
        base = bench.out / "profile-throughput.pyinstrument"
        penv = Env(bench, "profile", o.devices, wrapper=True,
                   extra_env={"EPSIGNAL_BENCH_PYINSTRUMENT": str(base)})
        try:
            await penv.start()
            await bench.closed_run(penv, warm_up_frames(o.frames))
            r, _ = await bench.closed_run(penv, o.frames)
        finally:
            await penv.stop()
        res.update(tool="pyinstrument", file=f"{base}.html", text=f"{base}.txt", run=r)
    bench.results["profile"] = res


# ------------------------------------------------------------------ scenario 2 (+ CPU)
async def latency(bench: Bench, env: Env) -> None:
    o = bench.o
    out: dict = {}
    r = bench.keep(f"@{o.latency_rate:g}/s (consumer on)",
                   await bench.paced_run(env, o.latency_rate, o.latency_duration, o.warmup))
    out["fixed"] = r
    bench.checks["latency_fixed_all_received"] = bool(r.get("all_events_received")) and r["all_forwards_back"]
    if bench.max_eps:
        eps = round(0.8 * bench.max_eps)
        r80 = bench.keep(f"@80% ({eps}/s, consumer on)",
                         await bench.paced_run(env, eps, o.latency_duration, o.warmup))
        out["at_80pct_of_max"] = r80
        bench.checks["latency_80pct_all_received"] = (bool(r80.get("all_events_received"))
                                                     and r80["all_forwards_back"])
    else:
        out["at_80pct_of_max"] = "n/a: no maximum (run throughput, or give --max-eps)"
    bench.results["latency"] = out
    bench.results["cpu"] = {
        "at_events_per_s": r["achieved_events_per_s"], "bridge_cpu_pct": r["bridge_cpu_pct"],
        "cpu_pct_of_one_core_per_1000_eps": r["cpu_pct_per_1000_eps"],
    }
    if isinstance(out.get("at_80pct_of_max"), dict):
        r80 = out["at_80pct_of_max"]
        bench.results["cpu"]["at_80pct"] = {
            "at_events_per_s": r80["achieved_events_per_s"], "bridge_cpu_pct": r80["bridge_cpu_pct"],
            "cpu_pct_of_one_core_per_1000_eps": r80["cpu_pct_per_1000_eps"]}


def _median_of(values: Iterable[float | None]) -> float | None:
    xs = [x for x in values if x is not None]
    return rounded(stats.median(xs), 3) if xs else None


# ------------------------------------------------------------------ scenario 3: forwarding
#: the forwarding scenario's processes, in the order of its first round, with their labels
FORWARDING = {"broker_up": "broker up", "broker_down": "broker down", "floor_echo": "echo floor"}


async def forwarding(bench: Bench, main: Env) -> None:
    """Forwarding latency at ``--latency-rate`` events/s in three processes side by side: the
    main bridge with the broker up (its consumer paused: events are confirmed and stay unread,
    so the harness does the same work in every run), a bridge whose broker is down, and the bare
    echo floor (:mod:`bridge.bench.echo`: no decode, no events, no broker; the broker-down
    bridge is a new process every round, as it buffers what it cannot send). ``--rounds`` rounds,
    each a paced run of every process in turn (the order rotated from round to round); the
    ratios are taken per round and their medians reported, as the peer scenario's are: one
    run's p99 on a shared 2-core machine moves by 20% from one minute to the next."""
    o = bench.o
    down = Env(bench, "broker-down", o.devices, broker=False, args=["--grace", "1"])
    envs = {"broker_up": main, "broker_down": down,
            "floor_echo": Env(bench, "echo-floor", o.devices, broker=False,
                              command=[sys.executable, "-m", "bridge.bench.echo"])}
    names = list(FORWARDING)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    samples: dict[str, list[int]] = {name: [] for name in names}
    async with contextlib.AsyncExitStack() as stack:  # every stop runs, whatever fails
        await envs["floor_echo"].start()
        stack.push_async_callback(envs["floor_echo"].stop)
        await main.consumer().pause()
        stack.push_async_callback(main.consumer().resume)
        for i in range(o.rounds):
            for name in names[i % len(names):] + names[:i % len(names)]:
                env = envs[name]
                if env is down:  # a new process each round: its buffer of unsent events would
                    await env.start()  # grow from round to round (and overflow)
                try:
                    r = await bench.paced_run(env, o.latency_rate, o.latency_duration, o.warmup,
                                              consume=False)
                finally:
                    if env is down:
                        await env.stop()
                samples[name].extend(r.pop("_fwd"))
                runs[name].append(r)
    fw = bench.results.setdefault("forwarding", {})
    for name, label in FORWARDING.items():
        rs = runs[name]
        bench.samples[f"forward {label}"] = samples[name]
        fw[name] = {"offered_events_per_s": o.latency_rate, "rounds": len(rs),
                    "forward_us": stats.summary(samples[name], "us"),  # every round's samples
                    "p99_us_per_round": [r["forward_us"]["p99"] for r in rs],
                    "process_cpu_pct": _median_of(r["bridge_cpu_pct"] for r in rs),
                    "machine_busy_pct": _median_of(r["cpu_window"].get("machine_busy_pct") for r in rs),
                    "all_forwards_back": all(r["all_forwards_back"] for r in rs)}
    fw["broker_up"]["note"] = "consumer paused: events are confirmed by the broker, and stay unread"

    def median_ratio(a: str, b: str) -> float | None:
        """Median over the rounds of (p99 of ``a`` / p99 of ``b`` in the same round)."""
        pairs = zip(fw[a]["p99_us_per_round"], fw[b]["p99_us_per_round"], strict=True)
        xs = [x / y for x, y in pairs if x and y]
        return rounded(stats.median(xs), 2) if xs else None

    fw["p99_up_over_floor"] = median_ratio("broker_up", "floor_echo")
    fw["p99_down_over_up"] = median_ratio("broker_down", "broker_up")
    bench.checks["forwarding_broker_up_all_back"] = fw["broker_up"]["all_forwards_back"]
    bench.checks["forwarding_broker_down_all_back"] = fw["broker_down"]["all_forwards_back"]


# ------------------------------------------------------------------ scenario 4: commands
async def commands(bench: Bench, env: Env) -> None:
    o, lg = bench.o, env.lg
    hws = [s.hw for s in lg.order]
    conn = await aio_pika.connect(bench.amqp)
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
    bench.results["commands"] = {
        "commands": o.commands, "rate_per_s": o.command_rate, "received": lg.commands - base,
        "all_received": ok, "latency_ms": stats.summary(lg.cmd_latency, "ms"),
    }
    bench.samples["command"] = list(lg.cmd_latency)
    bench.checks["commands_all_received"] = ok


# ------------------------------------------------------------------ scenario 5: scale
async def scale(bench: Bench) -> None:
    o = bench.o
    runs = []
    soft = raise_nofile()[0]
    for n in sorted(o.scale_counts):
        if n + 256 > soft:
            runs.append({"devices": n, "skipped": f"RLIMIT_NOFILE {soft} too low for {n} sessions"})
            continue
        env = Env(bench, f"scale{n}", n)
        timeout = max(60.0, n / 50)
        try:
            await env.start(attach_timeout=timeout)
            lg = env.lg
            assert env.t_attached is not None and env.t_attached_events is not None  # started, with the broker
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
                "devices": n, "attach_s": rounded(attach_s, 2), "attach_from_first_connect_s": rounded(first, 2),
                "attached_events_confirmed_s": rounded(events_s, 2),
                "rss_mb": rounded(st["VmRSS"] / 1024), "rss_mb_after_idle": rounded(st2["VmRSS"] / 1024),
                "hwm_mb": rounded(st2["VmHWM"] / 1024), "idle_cpu_pct": rounded(idle),
                "login_failures": lg.login_failures,
            })
        except Exception as e:
            runs.append({"devices": n, "error": f"{type(e).__name__}: {e}"[:2000]})
        finally:
            await env.stop()
    ok = [r for r in runs if "rss_mb" in r]
    per_dev = None
    if len(ok) >= 2 and ok[-1]["devices"] > ok[0]["devices"]:
        per_dev = rounded((ok[-1]["rss_mb"] - ok[0]["rss_mb"]) * 1024 / (ok[-1]["devices"] - ok[0]["devices"]), 2)
    bench.results["scale"] = {"runs": runs, "rss_kb_per_device": per_dev}
    bench.checks["scale_all_attached"] = all("rss_mb" in r or "skipped" in r for r in runs)


# ------------------------------------------------------------------ scenario 8: the peer
async def peer(bench: Bench) -> None:
    """Issue 19: the bridge against a hand-written peer (:mod:`bridge.bench.peer`), per frame.

    Three processes side by side, each with its own load generator and consumer: the bridge
    with every event kind, the bridge with ``call.state`` only, and the peer (one
    ``call.signaling`` per frame). Every round: a closed-loop run of each (frames/s, CPU per
    10,000 frames), then an open-loop run of each at ``--peer-rate`` frames/s with the
    consumer on (forwarding and hop percentiles), the order rotated from round to round.
    Ratios bridge / peer per round; medians."""
    from bridge.events import KINDS

    o = bench.o
    envs = {
        "bridge_all": Env(bench, "peer-bridge-all", o.devices, extra_env={"EPSIGNAL_EVENT_KINDS": ",".join(KINDS)}),
        "bridge_state": Env(bench, "peer-bridge-state", o.devices, extra_env={"EPSIGNAL_EVENT_KINDS": "call.state"}),
        "peer": Env(bench, "peer", o.devices, peer=True, command=[sys.executable, "-m", "bridge.bench.peer"]),
    }
    frames = o.peer_frames
    warm = warm_up_frames(frames)
    rounds: list[dict] = []
    try:
        await _start_side_by_side(bench, envs.values(), warm)
        names = list(envs)
        for i in range(o.rounds):
            # the order rotated each round: no process always runs first after the saturated runs
            order = names[i % len(names):] + names[:i % len(names)]
            rnd: dict = {}
            for name in order:
                rnd[name] = {"closed": (await bench.closed_run(envs[name], frames))[0]}
            for name in order:
                env = envs[name]
                p = await bench.paced_run(env, o.peer_rate * env.epf, o.latency_duration, o.warmup)
                for key, kind in (("_hop", "peer-hop"), ("_fwd", "peer-forward")):  # every round's, for the plot
                    bench.samples.setdefault(f"{kind} {name}", []).extend(p.pop(key, None) or ())
                rnd[name]["paced"] = p
            rounds.append(rnd)
    finally:
        for env in envs.values():
            await env.stop()

    def med(name: str, get) -> float | None:
        xs = [get(r[name]) for r in rounds]
        xs = [x for x in xs if x is not None]
        return rounded(stats.median(xs), 3) if xs else None

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
        return rounded(stats.median(xs), 3) if xs else None

    res["ratios"] = {name: {
        "frames_per_s": mratio(name, lambda x: x["closed"]["frames_per_s"]),
        "forward_p99": mratio(name, lambda x: p99(x, "forward_us")),
        "hop_p99": mratio(name, lambda x: p99(x, "hop_ms")),
        "cpu_per_frame": mratio(name, lambda x: x["closed"]["cpu_s_per_10k_frames"]),
    } for name in ("bridge_all", "bridge_state")}
    bench.results["peer"] = res
    bench.checks["peer_all_events_received"] = all(
        x["closed"]["complete"] and x["paced"].get("all_events_received") and x["paced"]["all_forwards_back"]
        for r in rounds for x in r.values())


# ------------------------------------------------------------------ scenario 7: tracing
async def tracing(bench: Bench) -> None:
    """Three bridges side by side, the throughput run alternating between them: tracing off,
    on with the Helm chart's sampler (:data:`DEPLOYED_SAMPLER`, the target's measure), and on
    with every span sampled."""
    o = bench.o
    envs: dict[str, Env] = {}
    status_files: dict[str, Path] = {}
    for name, sampler in (("off", None), ("on", DEPLOYED_SAMPLER), ("every_span", ("parentbased_always_on", ""))):
        extra = {}
        if sampler is not None:
            status_files[name] = bench.out / f"tracing-status-{name}.json"
            status_files[name].unlink(missing_ok=True)
            extra = {"EPSIGNAL_BENCH_TRACING": "sdk", "EPSIGNAL_BENCH_STATUS": str(status_files[name]),
                     "OTEL_SDK_DISABLED": "false", "OTEL_TRACES_SAMPLER": sampler[0],
                     "OTEL_TRACES_SAMPLER_ARG": sampler[1], "OTEL_SERVICE_NAME": "epsignal-bridge-bench",
                     **dict(o.tracing_env)}
        envs[name] = Env(bench, f"tracing-{name}", o.devices, wrapper=True, extra_env=extra)
    rounds: list[dict] = []
    warm = warm_up_frames(o.tracing_frames)
    try:
        await _start_side_by_side(bench, envs.values(), warm)
        for _ in range(o.rounds):
            rounds.append({name: (await bench.closed_run(env, o.tracing_frames))[0] for name, env in envs.items()})
    finally:
        for env in envs.values():
            await env.stop()
    eps = {name: stats.median([r[name]["events_per_s"] for r in rounds]) for name in envs}
    frames = sum(r["on"]["frames"] for r in rounds) + warm
    res: dict = {"frames_per_round": o.tracing_frames, "off_events_per_s": rounded(eps["off"]),
                 "sampler": f"{DEPLOYED_SAMPLER[0]} {DEPLOYED_SAMPLER[1]}", "rounds": rounds}
    for name, path in status_files.items():
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):
            status = {"tracing": "unknown: the traced bridge wrote no status", "spans": 0}
        e, off = eps[name], eps["off"]
        part = {"events_per_s": rounded(e), "spans_exported": status.get("spans", 0),
                "tracing": status.get("tracing"), "spans_per_frame": rounded(status.get("spans", 0) / frames, 2),
                "cost_pct": rounded(100 * (1 - e / off)) if e is not None and off else None}
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
    bench.results["tracing"] = res
    bench.checks["tracing_all_events_received"] = all(x["complete"] for r in rounds for x in r.values())

