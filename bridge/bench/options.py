"""The options of ``epsignal-bridge bench`` (argparse only: cheap to import from the CLI)."""

from __future__ import annotations

import argparse

SCENARIOS = ("throughput", "latency", "forwarding", "commands", "scale", "codec", "tracing", "peer",
             "intercept")

#: defaults of the full run and of --smoke; an option given on the command line wins
FULL = dict(
    frames=30_000, rounds=3, devices=100, window=8, latency_duration=20.0, warmup=2.0,
    commands=1000, command_rate=200.0, scale_devices="0,1000,5000,10000", codec_messages=50_000,
    tracing_frames=None, idle_window=20.0, peer_frames=None,
)
SMOKE = dict(
    frames=2000, rounds=1, devices=100, window=8, latency_duration=2.0, warmup=0.5,
    commands=100, command_rate=200.0, scale_devices="100", codec_messages=5000,
    tracing_frames=1500, idle_window=1.0, peer_frames=1000,
)


def _kv(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    return k, v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--smoke", action="store_true",
                   help="a small, quick run (CI): checks that every scenario works and the numbers "
                   "are sane, not that targets are met")
    p.add_argument("--json", metavar="FILE", default=None, help="write the results as JSON to FILE")
    p.add_argument("--out", metavar="DIR", default="bench-out",
                   help="directory for plots, the profile and the bridge logs (default: bench-out)")
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/",
                   help="the broker (default: the local RabbitMQ)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated subset of: {', '.join(SCENARIOS)} (default: all)")
    g = p.add_argument_group("load")
    g.add_argument("--frames", type=int, default=None,
                   help="Signaling frames per throughput round (full 30000, smoke 2000)")
    g.add_argument("--rounds", type=int, default=None,
                   help="rounds of the scenarios that compare processes (throughput: bridge then ceiling; "
                   "forwarding, peer, tracing, intercept: each process in turn); medians reported (full 3, smoke 1)")
    g.add_argument("--devices", type=int, default=None,
                   help="devices (WebSocket sessions) for throughput and latency (default 100)")
    g.add_argument("--window", type=int, default=None,
                   help="frames in flight per session in the throughput pump (default 8)")
    g.add_argument("--credit", type=int, default=None,
                   help="frames sent ahead of the consumer at most (default 2 x publish window)")
    g.add_argument("--publish-window", type=int, default=1024,
                   help="EPSIGNAL_PUBLISH_WINDOW of the bridge; the ceiling uses the same (default 1024)")
    g.add_argument("--latency-rate", type=float, default=1000.0,
                   help="fixed offered load for the latency runs, events/s (default 1000)")
    g.add_argument("--latency-duration", type=float, default=None,
                   help="seconds per latency run (full 20, smoke 2)")
    g.add_argument("--warmup", type=float, default=None,
                   help="seconds at the start of a latency run left out of the numbers (full 2, smoke 0.5)")
    g.add_argument("--max-eps", type=float, default=None,
                   help="maximum events/s for the 80%% latency run when throughput is not run")
    g.add_argument("--commands", type=int, default=None, help="commands sent (full 1000, smoke 100)")
    g.add_argument("--command-rate", type=float, default=None, help="commands per second (default 200)")
    g.add_argument("--scale-devices", default=None,
                   help="device counts of the scale runs (full 0,1000,5000,10000; smoke 100)")
    g.add_argument("--codec-messages", type=int, default=None, help="messages per codec timing")
    g.add_argument("--idle-window", type=float, default=None,
                   help="seconds of idle CPU measured after attach in the scale runs (full 20: one "
                   "keepalive ping of every session; smoke 1)")
    g.add_argument("--tracing-frames", type=int, default=None,
                   help="frames per tracing round (default: --frames)")
    g.add_argument("--peer-frames", type=int, default=None,
                   help="frames per closed-loop round of the peer scenario (default: --frames; smoke 1000)")
    g.add_argument("--peer-rate", type=float, default=500.0,
                   help="open-loop rate of the peer scenario, frames/s (default 500)")
    p.add_argument("--profile", action="store_true",
                   help="one more throughput round with the bridge under py-spy (or pyinstrument); "
                   "the profile is written to DIR")
    p.add_argument("--profiler", choices=("auto", "py-spy", "pyinstrument"), default="auto")
    p.add_argument("--bridge-env", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of every bridge process (e.g. EPSIGNAL_LOG_LEVEL=WARNING)")
    p.add_argument("--tracing-env", type=_kv, action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment of the tracing-on bridge (e.g. OTEL_TRACES_SAMPLER=...)")
    p.add_argument("--no-plots", action="store_true", help="no PNG plots")
    p.add_argument("--check-targets", action="store_true",
                   help="exit 1 when a performance target is missed (default: only sanity checks)")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left unset from the full or smoke defaults."""
    defaults = SMOKE if args.smoke else FULL
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.tracing_frames is None:
        args.tracing_frames = args.frames
    if args.peer_frames is None:
        args.peer_frames = args.frames
    if args.credit is None:
        args.credit = 2 * args.publish_window
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SCENARIOS]
    if unknown:
        raise SystemExit(f"epsignal-bridge bench: unknown scenario(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SCENARIOS)}")
    args.scenario_set = set(wanted)
    args.scale_counts = [int(x) for x in str(args.scale_devices).split(",") if x.strip()]
    return args
