"""``epsignal-bridge``: the command line.

    run        the bridge (configuration from EPSIGNAL_* variables)
    pbx-sim    the PBX simulator
    demo       simulator + bridge + a live view of the events, against the local RabbitMQ
    tail       print the events matching a binding pattern
    send       send a command (attach, detach, signaling) and print the reply
    config     list every EPSIGNAL_* setting with its default
    contracts  write (or --check) the JSON Schemas and the AsyncAPI document in contracts/
    bench      the benchmark (docs/PERFORMANCE.md)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from bridge.config import Settings, describe


def _setup_logging(level: str, secrets: list[str] | None = None) -> None:
    from bridge import logs

    logs.setup(level, secrets)


def _settings(args) -> Settings:
    try:
        return Settings.from_env()
    except ValueError as e:
        sys.exit(f"epsignal-bridge: {e}")


# --------------------------------------------------------------------------- run
def cmd_run(args) -> int:
    from bridge.service import run_until_signalled

    s = _settings(args)
    _setup_logging(s.log_level, s.secrets())
    try:
        return asyncio.run(run_until_signalled(s, grace_s=args.grace))
    except ValueError as e:  # a configuration the bridge cannot start with
        sys.exit(f"epsignal-bridge: {e}")


# --------------------------------------------------------------------------- config
def cmd_config(args) -> int:
    rows = describe()
    if args.markdown:
        print("| variable | default | meaning |\n|---|---|---|")
        for name, default, text in rows:
            print(f"| `{name}` | `{default}` | {text} |")
    else:
        for name, default, text in rows:
            print(f"{name}={default}\n    {text}")
    return 0


# --------------------------------------------------------------------------- tail / send / demo
def cmd_tail(args) -> int:
    from bridge.tools import tail

    s = _settings(args)
    try:
        asyncio.run(tail(s, args.patterns or ["#"], raw=args.json, limit=args.count))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_send(args) -> int:
    from bridge.tools import send

    s = _settings(args)
    body = args.body
    if args.verb == "signaling" and body is None:
        sys.exit("epsignal-bridge send signaling: a JSON body is required, e.g. "
                 "'{\"call\": -1, \"sig\": {\"type\": \"setup\", \"cd\": {\"num\": \"201\"}}}'")
    reply = asyncio.run(send(s, args.hw, args.verb, body or "", timeout=args.timeout))
    print(reply)
    return 0 if '"ok":true' in reply else 1


def cmd_demo(args) -> int:
    from bridge.tools import demo

    _setup_logging("WARNING")
    try:
        asyncio.run(demo(devices=args.devices, call_rate=args.call_rate, duration=args.duration,
                         amqp_url=args.amqp_url))
    except KeyboardInterrupt:
        pass
    return 0


def cmd_pbx_sim(args) -> int:
    from bridge.sim import cli as sim_cli

    _setup_logging("INFO")
    try:
        return asyncio.run(sim_cli.main(args))
    except KeyboardInterrupt:
        return 0


# --------------------------------------------------------------------------- bench
def cmd_bench(args) -> int:
    from bridge import bench

    try:
        return bench.main(args)
    except KeyboardInterrupt:
        return 130


# --------------------------------------------------------------------------- contracts
def cmd_contracts(args) -> int:
    from pathlib import Path

    from bridge import contracts

    root = Path(args.dir) if args.dir else contracts.default_dir()
    if args.check:
        diff = contracts.check(root)
        if diff:
            print(f"contracts in {root} differ from the Structs; run `epsignal-bridge contracts`:",
                  file=sys.stderr)
            print("\n".join(diff), file=sys.stderr)
            return 1
        print(f"contracts in {root} are up to date")
        return 0
    changed = contracts.write(root)
    print(f"{len(changed)} file(s) changed in {root}" + "".join(f"\n  {c}" for c in changed))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="epsignal-bridge",
        description="Bridge an innovaphone PBX's EpSignal call signaling to RabbitMQ.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configuration of `run` comes from EPSIGNAL_* variables: `epsignal-bridge config`.",
    )
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the bridge (configured by EPSIGNAL_* variables)")
    r.add_argument("--grace", type=float, default=10.0, help="seconds allowed for a graceful stop")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("config", help="list every EPSIGNAL_* setting with its default")
    c.add_argument("--markdown", action="store_true", help="as a Markdown table")
    c.set_defaults(func=cmd_config)

    t = sub.add_parser("tail", help="print events matching binding patterns, one line each",
                       description="Binds a temporary queue to the events exchange with each "
                       "PATTERN (AMQP topic syntax) and prints every event. Broker from EPSIGNAL_AMQP_URL.")
    t.add_argument("patterns", nargs="*", metavar="PATTERN", help="e.g. 'device.*.call.*.state' (default '#')")
    t.add_argument("--json", action="store_true", help="print the raw JSON bodies")
    t.add_argument("--count", type=int, default=None, help="stop after N events")
    t.set_defaults(func=cmd_tail)

    s = sub.add_parser("send", help="send a command and print the reply",
                       description="Publishes device.<HW>.<VERB> to the commands exchange with a "
                       "reply_to and prints the bridge's reply. Broker from EPSIGNAL_AMQP_URL.")
    s.add_argument("verb", choices=["attach", "detach", "signaling"])
    s.add_argument("hw", help="hardware id of the device")
    s.add_argument("body", nargs="?", default=None, help="JSON body (signaling: {\"call\":..,\"to\":..,\"sig\":{..}})")
    s.add_argument("--timeout", type=float, default=15.0)
    s.set_defaults(func=cmd_send)

    d = sub.add_parser("demo", help="simulator + bridge + live events, against the local RabbitMQ")
    d.add_argument("--devices", type=int, default=5)
    d.add_argument("--call-rate", type=float, default=0.5, help="calls per second across all devices")
    d.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    d.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1/")
    d.set_defaults(func=cmd_demo)

    k = sub.add_parser("contracts", help="generate the JSON Schemas and the AsyncAPI document",
                       description="Writes contracts/ (JSON Schemas 2020-12 of every body, "
                       "asyncapi.json) from the bridge's Structs; --check only compares.")
    k.add_argument("--dir", default=None, help="target directory (default: contracts/ of the checkout)")
    k.add_argument("--check", action="store_true", help="exit 1 with a diff summary when the files differ")
    k.set_defaults(func=cmd_contracts)

    from bridge.sim import cli as sim_cli

    ps = sub.add_parser("pbx-sim", help="run the PBX simulator",
                        description=sim_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sim_cli.add_arguments(ps)
    ps.set_defaults(func=cmd_pbx_sim)

    from bridge.bench import options as bench_options

    bn = sub.add_parser("bench", help="benchmark the bridge against the local RabbitMQ (issue 8)",
                        description="Runs the real bridge as a process, drives it with a load "
                        "generator playing the PBX, and measures throughput (vs a raw aio-pika "
                        "ceiling), hop/forwarding/command latency, memory and attach time at scale, "
                        "the codec and the cost of tracing. See docs/PERFORMANCE.md.")
    bench_options.add_arguments(bn)
    bn.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
