"""A simulated innovaphone PBX: a WebSocket server at ws://HOST:PORT/PBX0/APPS/websocket that speaks
AppWebsocket (AppChallenge/AppLogin with SHA-256 digest) and EpSignal (Attach, AttachResult,
Attached, Detached, Sync, Signaling), so the bridge can be run and tested without a PBX.

Devices: device i (1-based) has the hw id "00903340" + 4 digits (009033400001,
009033400002, ...), extension 1000+i, SIP user user0001..., display name "User i". The first
--devices are registered; the next --unregistered are known but not registered (Attach answers
ok, Attached comes when they register). Any other hw gets AttachResult err "unknown device".

Calls: once the application has attached a device, every signaling message of its calls goes
to the application as Signaling and reaches the other end only when the application sends it
back (same call, same direction). A message not forwarded within --stall-timeout stalls the call:
the PBX releases it toward the device (rel, cause 102) and counts it. Calls the application
starts with negative call ids are answered by the simulated remote (setup toward the PBX) or
device (setup toward the device) up to conn. Random traffic (--call-rate) mixes incoming,
outgoing, busy, unanswered, hold and transfer calls.

Faults on demand (cut sessions, refuse logins, slow answers, malformed frames) and scripted
calls are driven through the HTTP control API (--control, see below). On start one line gives
the WebSocket and control URLs; then a stats line at most every 10 s; SIGINT/SIGTERM stop it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

from websockets.exceptions import InvalidURI

from bridge.sim.config import MAX_DEVICES, SimConfig
from bridge.sim.pbx import PbxSimulator

PASSWORD_ENV = "EPSIGNAL_SIM_PASSWORD"
STATS_EVERY_S = 10.0

DESCRIPTION = __doc__

EPILOG = """\
control API (with --control HOST:PORT; every answer is JSON, errors are {"error": "..."}):
  POST /devices/<hw>/calls       start a scripted call, answers {"call": <id>}; body (all optional):
                                 {"direction": "in"|"out", "remote": "201", "answer": true,
                                  "hold_s": 1.0, "busy": false, "hold": false,
                                  "transfer_to": null|"202", "hangup": "remote"|"device"}
  POST /devices/<hw>/register    register the device (late Attached for an attached device)
  POST /devices/<hw>/unregister  unregister it (Detached)
  GET  /devices/<hw>             {"registered", "attached", "calls": [...]}
  GET  /devices/<hw>/calls/<id>  what each end of the call received (running or recently
                                 ended): {"active", "outcome", "device": [sig...], "pbx":
                                 [sig...], "order": [">setup", "<alert", ...]}
  GET  /devices/<hw>/calls       {"calls": [record...]} the device's recent and running calls
  POST /sessions/drop            cut every application session (TCP abort), {"dropped": n}
  POST /sessions/garbage         send malformed frames to every session, body {"count": 5}
  POST /faults                   body {"refuse_logins": true, "delay_ms": 200} (each optional)
  GET  /stats                    sessions, logins, devices, calls, forwarding round trip p50/p99

example:
  epsignal-bridge pbx-sim --devices 1000 --call-rate 50 --control 127.0.0.1:8766
  curl -X POST -d '{"direction":"out","remote":"202","hold_s":5}' \\
       http://127.0.0.1:8766/devices/009033400001/calls
"""


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None
    if not 0 <= p <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host, p


def _nonneg(kind):
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if v < 0:
            raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
        return v
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the pbx-sim options (and its description) to ``parser``."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.add_argument("--listen", type=_hostport, default=("127.0.0.1", 8765),
                        metavar="HOST:PORT",
                        help="where the PBX's WebSocket listens (default 127.0.0.1:8765; "
                             "port 0: any free port)")
    parser.add_argument("--app", default="epsignal",
                        help="name of the PBX App object the application logs in as "
                             "(default epsignal)")
    parser.add_argument("--password", default=None,
                        help=f"the App object's password (default: ${PASSWORD_ENV}, "
                             "else 'secret'); "
                             "never printed")
    parser.add_argument("--devices", type=_nonneg(int), default=100,
                        help="registered devices 009033400001 ... "
                             f"(default 100, at most {MAX_DEVICES})")
    parser.add_argument("--unregistered", type=_nonneg(int), default=0,
                        help="extra known devices after those, not registered (default 0)")
    parser.add_argument("--call-rate", type=_nonneg(float), default=0.0, metavar="PER_S",
                        help="random calls per second over all registered devices "
                             "(default 0: none)")
    parser.add_argument("--call-duration", type=_nonneg(float), default=2.0, metavar="S",
                        help="mean connected time of random calls in seconds (default 2)")
    parser.add_argument("--ring", type=_nonneg(float), default=0.3, metavar="S",
                        help="seconds a called party rings before answering (default 0.3); "
                             "an unanswered call rings 5 times that")
    parser.add_argument("--stall-timeout", type=_nonneg(float), default=5.0, metavar="S",
                        help="seconds the application has to forward a message before the call "
                             "stalls and is released with cause 102 (default 5)")
    parser.add_argument("--control", type=_hostport, default=None, metavar="HOST:PORT",
                        help="serve the HTTP control API here (default: off); see below")
    parser.add_argument("--connect", default=None, metavar="URL",
                        help="also connect out to the application at URL as the PBX's App object "
                             "(the application's server mode), logging in with --app/--password; "
                             "reconnects with back-off 1 s doubling to 32 s")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the random traffic, for reproducible runs")


def _config(args: argparse.Namespace) -> SimConfig:
    password = args.password
    if password is None:
        password = os.environ.get(PASSWORD_ENV, "secret")
    return SimConfig(
        app=args.app, password=password, devices=args.devices, unregistered=args.unregistered,
        call_rate=args.call_rate, call_duration_s=args.call_duration, ring_s=args.ring,
        stall_timeout_s=args.stall_timeout, seed=args.seed,
    )


def stats_line(s: dict) -> str:
    rtt = s["forward_rtt_us"]
    return (
        f"pbx-sim: sessions={s['sessions']} attached={s['attached_devices']} "
        f"registered={s['registered_devices']} calls active={s['calls_active']} "
        f"started={s['calls_started']} completed={s['calls_completed']} "
        f"stalled={s['calls_stalled']} app={s['app_calls']} forwarded={s['messages_forwarded']} "
        f"rtt_us p50={rtt['p50']} p99={rtt['p99']} logins ok={s['logins_ok']} "
        f"failed={s['logins_failed']} bad_frames={s['bad_frames']} "
        f"bad_signaling={s['bad_signaling']} conflicts={s['attach_conflicts']}"
    )


async def main(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM; 0 on a clean stop, 1 if it cannot listen, 2 on bad options."""
    try:
        config = _config(args)
    except ValueError as e:
        print(f"pbx-sim: {e}", file=sys.stderr)
        return 2
    host, port = args.listen
    sim = PbxSimulator(config)
    try:
        if args.control is not None:
            await sim.start(host, port, control_port=args.control[1], control_host=args.control[0])
        else:
            await sim.start(host, port)
    except OSError as e:
        print(f"pbx-sim: cannot listen: {e}", file=sys.stderr)
        await sim.stop()
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread, or no signals here
            pass
    try:
        if args.connect:
            try:
                await sim.connect(args.connect, config.app, config.password)
            except InvalidURI as e:
                print(f"pbx-sim: --connect: {e}", file=sys.stderr)
                return 2
        print(f"pbx-sim: PBX at {sim.url} control at {sim.control_url or 'off'} "
              f"(app {config.app!r}, {config.devices} devices, {config.call_rate:g} calls/s"
              + (f", connecting out to {args.connect}" if args.connect else "") + ")", flush=True)
        last = None
        while not stop.is_set():
            try:
                async with asyncio.timeout(STATS_EVERY_S):
                    await stop.wait()
            except TimeoutError:
                s = sim.stats()
                line = stats_line(s)
                if line != last:  # a quiet simulator does not repeat itself
                    print(line, flush=True)
                    last = line
        return 0
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        await sim.stop()
