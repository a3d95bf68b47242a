"""The benchmark run: every scenario against the real bridge process and the real broker.

See :mod:`bridge.bench` for what each scenario does; docs/PERFORMANCE.md for targets and results.
The parts: :mod:`~bridge.bench.env` (a bridge process under test), :mod:`~bridge.bench.measure`
(the run's state and its measured runs), :mod:`~bridge.bench.scenarios` and
:mod:`~bridge.bench.intercept` (what is measured), :mod:`~bridge.bench.targets`,
:mod:`~bridge.bench.plots` and :mod:`~bridge.bench.report` (what is made of the results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import aio_pika

from bridge.bench import intercept, scenarios
from bridge.bench.env import BenchError
from bridge.bench.measure import Bench
from bridge.bench.plots import plots
from bridge.bench.proc import raise_nofile, timer_overshoot_us
from bridge.bench.report import NOISE_NOTE, table
from bridge.bench.targets import targets
from bridge.main import loop_factory


async def run(bench: Bench) -> dict:
    """Every scenario the options ask for, in order; the results (also ``bench.results``)."""
    o, S = bench.o, bench.o.scenario_set
    bench.out.mkdir(parents=True, exist_ok=True)
    nofile = raise_nofile()
    bench.results["meta"] = await meta(bench, nofile)
    if "codec" in S:
        await bench.timed("codec", scenarios.codec(bench))
    if S & {"throughput", "latency", "forwarding", "commands"}:
        await bench.timed("main", scenarios.main_env(bench))
    if "peer" in S:
        await bench.timed("peer", scenarios.peer(bench))
    if "tracing" in S:
        await bench.timed("tracing", scenarios.tracing(bench))
    if "scale" in S:
        await bench.timed("scale", scenarios.scale(bench))
    if "intercept" in S:
        await bench.timed("intercept", intercept.run(bench))
    bench.results["meta"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    bench.results["targets"] = targets(bench.results, o)
    bench.results["checks"] = bench.checks
    if bench.errors:
        bench.results["errors"] = bench.errors
    if not o.no_plots:
        bench.results["plots"] = plots(bench.results, bench.samples, bench.out)
    return bench.results


async def meta(bench: Bench, nofile: tuple[int, int]) -> dict:
    """What the run ran on and with (the results' ``meta``)."""
    import aio_pika as ap
    import msgspec as ms
    import websockets as ws

    rabbit = None
    try:
        conn = await aio_pika.connect(bench.amqp)
        assert conn.transport is not None  # connected
        props = conn.transport.connection.server_properties
        rabbit = props.get("version")
        rabbit = rabbit.decode() if isinstance(rabbit, bytes) else rabbit
        await conn.close()
    except Exception as e:
        raise BenchError(f"broker at {bench.amqp} not reachable: {e}") from None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    except Exception:
        commit = None
    return {
        "mode": "smoke" if bench.o.smoke else "full",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "platform": platform.platform(), "commit": commit, "rabbitmq": rabbit,
        "aio_pika": ap.__version__, "websockets": ws.__version__, "msgspec": ms.__version__,
        "rlimit_nofile": list(nofile), "loadavg_before": [round(x, 2) for x in os.getloadavg()],
        "harness_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
        # how late the machine wakes a sleeper, before the scenarios (an indicator of its noise)
        "timer_overshoot_us": timer_overshoot_us(200 if bench.o.smoke else 2000),
        "note": NOISE_NOTE,
        "options": {k: v for k, v in vars(bench.o).items()
                    if k not in ("func", "scenario_set") and not callable(v)},
    }


def main(args: argparse.Namespace) -> int:
    from bridge.bench.options import resolve

    opts = resolve(args)
    bench = Bench(opts)
    try:
        # the harness (load generator and consumers) on the bridge's own loop, uvloop: it reads a
        # forwarded frame ~60 us sooner at the median than on asyncio's (docs/PERFORMANCE.md)
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            results = runner.run(run(bench))
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
