"""``epsignal-bridge``: the command line.

    run        the bridge (configuration from EPSIGNAL_* variables)
    pbx-sim    the PBX simulator
    demo       simulator + bridge + a live view of the events, isolated (its own names, ports)
    tail       print the events matching a binding pattern
    send       send a command (attach, detach, signaling, intercept) and print the reply
    leases     list the device leases (holder, wanted state, waiting commands); reset one
    config     list every EPSIGNAL_* setting with its default; --check, --effective
    contracts  write (or --check) the JSON Schemas and the AsyncAPI document in contracts/
    bench      the benchmark (docs/PERFORMANCE.md)
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import sys
import traceback
from collections.abc import Coroutine
from typing import Any, TypeVar

from bridge.config import Settings, describe


#: the --amqp-url help of every command that talks to the broker
AMQP_URL_HELP = "broker URL (default: EPSIGNAL_AMQP_URL, else amqp://guest:guest@localhost/)"

T = TypeVar("T")

def _setup_logging(level: str, secrets: list[str] | None = None) -> None:
    from bridge import logs

    logs.setup(level, secrets)


#: exit status of a configuration the program cannot use (as argparse's usage errors)
EXIT_CONFIG = 2


class Fail(Exception):
    """Ends the command with one sentence on stderr and ``status``, no traceback."""

    def __init__(self, sentence: str, status: int = 1) -> None:
        super().__init__(sentence)
        self.status = status


def _settings(args: argparse.Namespace | None = None, **overrides: Any) -> Settings:
    try:
        return Settings.from_env(None, **overrides)
    except ValueError as e:
        raise Fail(str(e), EXIT_CONFIG) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("epsignal-bridge")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _note(text: str) -> None:
    """What a tool tells its user beside its output (stderr: stdout stays the data)."""
    print(f"epsignal-bridge: {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    from bridge.main import loop_factory, run_until_signalled

    s = _settings(args)
    _setup_logging(s.log_level, s.secrets())
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(run_until_signalled(s, grace_s=args.grace))
    except ValueError as e:  # a configuration the bridge cannot start with
        raise Fail(str(e), EXIT_CONFIG) from None
    except OSError as e:  # a listening socket at start: the HTTP server, the PBX listener
        raise Fail(_listen_error(e, s)) from None


def _listen_error(e: OSError, s: Settings) -> str:
    """One sentence for a socket the bridge could not listen on, naming the setting."""
    files = [f.f_code.co_filename.replace(os.sep, "/") for f, _ in traceback.walk_tb(e.__traceback__)]
    if any(f.endswith("bridge/http.py") for f in files):
        var, host, port = "EPSIGNAL_HTTP_PORT", s.http_host, str(s.http_port)
        value = port
    elif any("bridge/pbx/" in f for f in files):
        host, _, port = s.pbx_listen.rpartition(":")
        var, value = "EPSIGNAL_PBX_LISTEN", s.pbx_listen
    else:
        return f"cannot start: {e}"
    if e.errno == errno.EADDRINUSE:
        return (f"{var} {value} is in use: another process listens on port {port} of {host or '*'} "
                f"(stop it, or set {var} to a free port)")
    if e.errno == errno.EACCES:
        return f"{var} {value} may not be used: permission denied (ports below 1024 need privileges)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"{var} {value} cannot be used: {host} is not an address of this machine"
    return f"{var} {value} cannot be used: {e.strerror or e}"


# --------------------------------------------------------------------------- config
def cmd_config(args: argparse.Namespace) -> int:
    if args.check:
        s = _settings(args)
        print(f"configuration OK: {_summary(s)}")
        return 0
    if args.effective:
        return _print_effective()
    rows = describe()
    if args.markdown:
        print("| variable | default | meaning |\n|---|---|---|")
        for name, default, text in rows:
            print(f"| `{name}` | `{default}` | {text} |")
    else:
        for name, default, text in rows:
            print(f"{name}={default}\n    {text}")
    return 0


def _summary(s: Settings) -> str:
    from bridge.tools import describe_broker, masked_url

    pbx = (f"PBX {masked_url(s.pbx_url)} (client mode)" if s.pbx_mode == "client"
           else f"PBX connects in on {s.pbx_listen} (server mode)")
    n = len(s.device_list)
    first, *more = s.broker_addresses()
    broker = describe_broker(first) + (f" (+{len(more)} more addresses)" if more else "")
    return (f"{broker}, {pbx}, {n} device{'s' if n != 1 else ''}, "
            f"HTTP {s.http_host}:{s.http_port}")


def _print_effective() -> int:
    """Every setting as the bridge would use it (environment over defaults), secrets masked."""
    from bridge.brokers import split
    from bridge.config import PREFIX
    from bridge.tools import masked_url

    s = _settings()
    for name, _default, _ in describe():
        field = name[len(PREFIX):].lower()
        value = str(getattr(s, field))
        if field == "pbx_password":
            value = "***" if value else ""
        elif field == "amqp_url":
            value = ",".join(masked_url(u) for u in split(value))
        elif field == "pbx_url":
            value = masked_url(value)
        origin = "environment" if name in os.environ else "default"
        if field == "instance_id" and name not in os.environ:
            origin = "generated: hostname + random"
        print(f"{name}={value}    # {origin}")
    return 0


# --------------------------------------------------------------------------- tail / send / demo
def _tool_settings(args: argparse.Namespace) -> Settings:
    """Settings of tail and send: the environment's, with ``--amqp-url`` over EPSIGNAL_AMQP_URL."""
    from bridge.tools import amqp_url_from, describe_broker

    s = _settings(args, amqp_url=amqp_url_from(args.amqp_url))
    _note(f"{args.command}: {describe_broker(s.broker_addresses()[0])}")
    return s


def _run_tool(coro: Coroutine[Any, Any, T]) -> T:
    """Run a tool; its :class:`~bridge.tools.ToolError` becomes one sentence and exit 1."""
    from bridge.tools import ToolError

    try:
        return asyncio.run(coro)
    except ToolError as e:
        raise Fail(str(e)) from None


def cmd_tail(args: argparse.Namespace) -> int:
    from bridge.tools import tail

    s = _tool_settings(args)
    try:
        _run_tool(tail(s, args.patterns or ["#"], raw=args.json, limit=args.count))
    except KeyboardInterrupt:
        pass
    return 0


#: the verbs whose command needs a body, with an example of it
_BODY_EXAMPLES = {"signaling": '{"call": -1, "sig": {"type": "setup", "cd": {"num": "201"}}}',
                  "intercept": '{"rules": [{"type": "setup", "to": true}]}'}


def cmd_send(args: argparse.Namespace) -> int:
    from bridge.tools import send

    body = args.body
    if args.verb in _BODY_EXAMPLES and body is None:
        raise Fail(f"send {args.verb}: a JSON body is required, e.g. '{_BODY_EXAMPLES[args.verb]}'", EXIT_CONFIG)
    s = _tool_settings(args)
    reply = _run_tool(send(s, args.hw, args.verb, body or "", timeout=args.timeout))
    print(reply)
    return 0 if '"ok":true' in reply else 1


def cmd_leases(args: argparse.Namespace) -> int:
    from bridge import tools

    s = _tool_settings(args)
    if args.action == "list":
        rows = _run_tool(tools.leases_list(s, args.hw))
        if args.json:
            import msgspec

            print(msgspec.json.encode(rows).decode())
        else:
            for row in rows:
                print(tools.format_lease(row))
        return 0
    hws = list(args.hw) + (s.device_list if args.configured else [])
    if not hws:
        raise Fail("leases reset: name the devices (HW ...) or --configured (every EPSIGNAL_DEVICES one)",
                   EXIT_CONFIG)
    for line in _run_tool(tools.leases_reset(s, hws)):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from bridge.tools import amqp_url_from, demo

    _setup_logging("WARNING")
    url = amqp_url_from(args.amqp_url)
    url = _settings(args, amqp_url=url).broker_addresses()[0]  # as `run` would take it, or why not
    _run_tool(demo(devices=args.devices, call_rate=args.call_rate, duration=args.duration,
                   amqp_url=url, http_port=args.http_port, intercept=args.intercept))
    return 0


def cmd_pbx_sim(args: argparse.Namespace) -> int:
    from bridge.sim import cli as sim_cli

    _setup_logging("INFO")
    try:
        return asyncio.run(sim_cli.main(args))
    except KeyboardInterrupt:
        return 0


# --------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from bridge import bench

    try:
        return bench.main(args)
    except KeyboardInterrupt:
        return 130


# --------------------------------------------------------------------------- contracts
def cmd_contracts(args: argparse.Namespace) -> int:
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
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the bridge (configured by EPSIGNAL_* variables)")
    r.add_argument("--grace", type=float, default=10.0, help="seconds allowed for a graceful stop")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("config", help="list every EPSIGNAL_* setting with its default; "
                       "--check validates the environment's, --effective shows it",
                       description="Without options: every EPSIGNAL_* setting, its default and "
                       "meaning. --check validates the configuration in the environment without "
                       "running anything (exit 0 and one line, or exit 2 and the reason); "
                       "--effective prints the values `run` would use, secrets masked.")
    mode = c.add_mutually_exclusive_group()
    mode.add_argument("--markdown", action="store_true", help="as a Markdown table")
    mode.add_argument("--check", action="store_true",
                      help="validate the EPSIGNAL_* variables of the environment (exit 2 if wrong)")
    mode.add_argument("--effective", action="store_true",
                      help="the values in effect (environment over defaults), secrets masked")
    c.set_defaults(func=cmd_config)

    t = sub.add_parser("tail", help="print events matching binding patterns, one line each",
                       description="Binds a temporary queue to the events exchange with each "
                       "PATTERN (AMQP topic syntax) and prints every event. Broker: --amqp-url, "
                       "else EPSIGNAL_AMQP_URL; exchange: EPSIGNAL_EVENTS_EXCHANGE.")
    t.add_argument("patterns", nargs="*", metavar="PATTERN", help="e.g. 'device.*.call.*.state' (default '#')")
    t.add_argument("--json", action="store_true", help="print the raw JSON bodies")
    t.add_argument("--count", type=int, default=None, help="stop after N events")
    t.add_argument("--amqp-url", default=None, help=AMQP_URL_HELP)
    t.set_defaults(func=cmd_tail)

    snd = sub.add_parser("send", help="send a command and print the reply",
                       description="Publishes device.<HW>.<VERB> to the commands exchange with a "
                       "reply_to and prints the bridge's reply. Broker: --amqp-url, else "
                       "EPSIGNAL_AMQP_URL; exchange: EPSIGNAL_COMMANDS_EXCHANGE (never declared: "
                       "the bridge does that).")
    snd.add_argument("verb", choices=["attach", "detach", "signaling", "intercept"])
    snd.add_argument("hw", help="hardware id of the device")
    snd.add_argument("body", nargs="?", default=None,
                   help="JSON body (signaling: {\"call\":..,\"to\":..,\"sig\":{..}}; intercept: {\"rules\":[..]})")
    snd.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for the reply")
    snd.add_argument("--amqp-url", default=None, help=AMQP_URL_HELP)
    snd.set_defaults(func=cmd_send)

    ls = sub.add_parser("leases", help="device leases (several replicas): list them, or reset a device's",
                        description="list: every device's holder replica, the replicas in line, the "
                        "wanted state (since when, by whom) and the commands waiting, asking every "
                        "replica running with leases; the devices are theirs, EPSIGNAL_DEVICES and "
                        "any HW named. reset: forget a device's lease state (wanted state, waiting "
                        "commands: dead-lettered) by deleting its lease queue; the replicas make it "
                        "anew from their configuration (calls on the device are cut). Broker: "
                        "--amqp-url, else EPSIGNAL_AMQP_URL; names: EPSIGNAL_COMMANDS_*. See "
                        "docs/SCALING.md.")
    ls.add_argument("action", choices=["list", "reset"])
    ls.add_argument("hw", nargs="*", help="hardware ids of devices")
    ls.add_argument("--configured", action="store_true", help="reset: every device of EPSIGNAL_DEVICES")
    ls.add_argument("--json", action="store_true", help="list: one JSON array")
    ls.add_argument("--amqp-url", default=None, help=AMQP_URL_HELP)
    ls.set_defaults(func=cmd_leases)

    d = sub.add_parser("demo", help="simulator + bridge + live events, isolated from other bridges",
                       description="A PBX simulator with call traffic, a bridge for its devices and "
                       "the events it publishes, live. The demo uses exchanges and queues of its "
                       "own (demo-<id>.*, deleted at exit) and a free HTTP port on 127.0.0.1, so it "
                       "never takes a real bridge's commands nor shows other bridges' events.")
    d.add_argument("--devices", type=int, default=5)
    d.add_argument("--call-rate", type=float, default=0.5, help="calls per second across all devices")
    d.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    d.add_argument("--amqp-url", default=None, help=AMQP_URL_HELP)
    d.add_argument("--http-port", type=int, default=0,
                   help="port of the bridge's /healthz, /readyz, /metrics (default: a free one)")
    d.add_argument("--intercept", action="append", choices=("crm", "screen"), default=None,
                   help="intercept mode live (docs/INTERCEPT.md): every setup toward a device "
                   "waits for the example decider (examples/python/intercept.py); crm: the "
                   "caller's name from examples/crm.csv on the phone; screen: the numbers of "
                   "examples/blocked.txt rejected (cause 21). Repeat for both; the demo calls "
                   "from those numbers every few seconds")
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
    try:
        status = args.func(args) or 0
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return status
    except Fail as e:
        print(f"epsignal-bridge: {e}", file=sys.stderr, flush=True)
        return e.status
    except BrokenPipeError:  # `epsignal-bridge config | head`: the reader is gone; end quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + 13  # as a Unix tool ended by SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
