"""The tools for people: ``tail``, ``send`` and ``demo``. Thin clients of the bus.

A problem a user can fix (the broker is down, refuses the login, has no such vhost, no bridge
declared the commands exchange, no queue takes a command) raises :class:`ToolError` with one
sentence naming the broker (credentials masked, host shown); the CLI prints it, no traceback."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import logging
import os
import signal
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

import aio_pika
import aiormq.exceptions
import msgspec
from yarl import URL

from bridge import routing
from bridge.amqp import link, topology
from bridge.amqp.consumer import dead_letter
from bridge.config import Settings

if TYPE_CHECKING:
    from bridge.sim import PbxSimulator

_COLOURS = {
    "setup": "36", "setup-ack": "36", "call-proc": "36", "alert": "33", "connected": "32",
    "disconnected": "35", "disconnecting": "35", "parked": "34", "released": "90", "null": "90",
}


def _paint(text: str, code: str | None, on: bool) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if on and code else text


def format_event(key: str, body: bytes, colour: bool = False) -> str:
    """One readable line for an event."""
    try:
        ev = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return f"{key} <not JSON: {body[:80]!r}>"
    t = ev.get("type", "?")
    clock = str(ev.get("time", ""))[11:23]
    hw = ev.get("hw", "")
    if t == "call.state":
        r = ev.get("remote") or {}
        who = " ".join(x for x in (r.get("num"), f'"{r["dn"]}"' if r.get("dn") else None) if x)
        state = ev.get("state", "?")
        flags = [f for f, on in (("held", ev.get("held")), ("sync", ev.get("sync")), ("app", ev.get("app"))) if on]
        cause = ev.get("cause")
        extra = (f" cause {cause.get('num')}" if cause else "") + (f" [{','.join(flags)}]" if flags else "")
        direction = {True: "in ", False: "out", None: "?  "}[ev.get("in")]
        return (f"{clock} {hw} call {ev.get('call'):>5} {_paint(f'{state:<13}', _COLOURS.get(state), colour)}"
                f" {direction} {who}{extra}")
    if t == "call.signaling":
        sig = ev.get("sig") or {}
        arrow = "->dev" if ev.get("to") else "->pbx"
        return f"{clock} {hw} call {ev.get('call'):>5} {arrow} {sig.get('type', '?'):<10} ({ev.get('origin')})"
    if t == "call.intercepted":
        extra = (f" cause {ev['cause']}" if "cause" in ev else "") + (f" ({ev['error']})" if "error" in ev else "")
        return (f"{clock} {hw} call {ev.get('call'):>5} intercepted {ev.get('sig_type')}: {ev.get('outcome')}"
                f" -> {ev.get('action')} after {ev.get('waited_ms')} ms{extra}")
    if t in ("attached", "detached", "attach.failed"):
        detail = ev.get("reason") or ev.get("error") or ""
        code = {"attached": "32", "detached": "35", "attach.failed": "31"}[t]
        return f"{clock} {hw} {_paint(t, code, colour)} {detail}".rstrip()
    if t == "gap":
        return f"{clock} {_paint('gap', '31', colour)} {ev.get('reason')}: {ev.get('dropped')}"
    return f"{clock} {key} {body.decode(errors='replace')}"


# --------------------------------------------------------------------------- the broker, for people
#: the broker of the tools when neither --amqp-url nor EPSIGNAL_AMQP_URL says otherwise
DEFAULT_AMQP_URL = "amqp://guest:guest@localhost/"
#: time allowed to reach the broker and open the connection
CONNECT_TIMEOUT_S = 5.0
#: time the demo waits for its bridge to be ready before it prints where it is
READY_WAIT_S = 10.0


class ToolError(Exception):
    """A problem the user can fix; ``str(e)`` is one sentence that says it."""


def amqp_url_from(arg: str | None, environ: Mapping[str, str] | None = None) -> str:
    """The broker URL: ``--amqp-url``, else EPSIGNAL_AMQP_URL, else :data:`DEFAULT_AMQP_URL`."""
    env = os.environ if environ is None else environ
    return arg or env.get("EPSIGNAL_AMQP_URL") or DEFAULT_AMQP_URL


def masked_url(url: str) -> str:
    """``url`` with its password and query values as ``***``; scheme, user, host, port and path
    shown (what a user needs to see which broker or PBX is meant)."""
    try:
        u = URL(str(url))
        if u.password is not None:
            u = u.with_password("***")
        if u.query_string:
            u = u.with_query({k: "***" for k in u.query})
        return str(u)
    except (ValueError, TypeError):
        return "<not a URL>"


def vhost_of(url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when its path is empty)."""
    try:
        return URL(str(url)).path[1:] or "/"
    except (ValueError, TypeError):
        return "/"


def describe_broker(url: str) -> str:
    return f"broker {masked_url(url)} (vhost {vhost_of(url)})"


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """aiormq logs a failed connect before raising it: the caller says it better, once."""
    loggers = [logging.getLogger(n) for n in names]
    saved = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        yield
    finally:
        for lg, was in zip(loggers, saved, strict=True):
            lg.disabled = was


async def connect(url: str, *, timeout: float = CONNECT_TIMEOUT_S) -> aio_pika.abc.AbstractConnection:
    """A connection to the broker, or :class:`ToolError` within ``timeout`` seconds."""
    url = str(url)
    where = masked_url(url)
    try:
        u = URL(url)
    except (ValueError, TypeError):
        u = None
    if u is None or u.scheme not in ("amqp", "amqps") or not u.host:
        raise ToolError(f"the broker URL {where!s} is not an amqp:// or amqps:// URL with a host "
                        "(e.g. amqp://guest:guest@localhost/)")
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            await loop.getaddrinfo(u.host, u.port)
    except TimeoutError:
        raise ToolError(f"cannot resolve the host {u.host} of the broker {where} "
                        f"within {timeout:g}s") from None
    except OSError as e:
        raise ToolError(f"cannot resolve the host {u.host} of the broker {where}: "
                        f"{e.strerror or e}") from None
    try:
        with _quiet("aiormq", "aiormq.connection", "aio_pika", "aio_pika.connection"):
            return await link.connect(url, timeout)  # a Ctrl-C while connecting leaves no task behind
    except aiormq.exceptions.ProbableAuthenticationError:
        raise ToolError(f"the broker {where} refused the login of user {u.user!r} "
                        "(wrong user name or password?)") from None
    except TimeoutError:
        raise ToolError(f"the broker {where} did not answer within {timeout:g}s "
                        "(is it running, and is this its AMQP port?)") from None
    except OSError as e:  # AMQPConnectionError is one: refused, reset, TLS
        raise ToolError(f"cannot reach the broker {where}: {_reason(e)}") from None
    except aiormq.exceptions.AMQPError:  # Connection.Close at Connection.Open
        raise ToolError(f"the broker {where} closed the connection at the opening of vhost "
                        f"{vhost_of(url)!r}: does the vhost exist, and may user {u.user!r} use it?"
                        ) from None


def _reason(e: OSError) -> str:
    code = e.errno if isinstance(e.errno, int) else (e.args[0] if e.args and isinstance(e.args[0], int) else None)
    if code is not None:
        return os.strerror(code).lower()
    text = str(e.args[0]) if len(e.args) == 1 else str(e)
    return text or type(e).__name__


async def tail(settings: Settings, patterns: list[str], *, raw: bool = False, limit: int | None = None,
               out: TextIO | None = None, ready: asyncio.Event | None = None,
               conn: aio_pika.abc.AbstractConnection | None = None) -> None:
    """Print the events matching ``patterns`` (on ``conn``, or a connection of its own)."""
    out = out or sys.stdout
    colour = hasattr(out, "isatty") and out.isatty() and not os.environ.get("NO_COLOR")
    own = conn is None
    if conn is None:
        conn = await connect(settings.broker_addresses()[0])
    try:
        ch = await conn.channel()
        ex = await ch.declare_exchange(settings.events_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        for p in patterns:
            await q.bind(ex, p)
        if ready is not None:
            ready.set()
        n = 0
        async with q.iterator(no_ack=True) as it:
            async for msg in it:
                line = msg.body.decode() if raw else format_event(msg.routing_key or "", msg.body, colour)
                print(line, file=out, flush=True)
                n += 1
                if limit is not None and n >= limit:
                    return
        if conn.is_closed:
            raise ToolError(f"lost the {describe_broker(settings.broker_addresses()[0])}")
    except (aiormq.exceptions.AMQPError, ConnectionError) as e:
        raise ToolError(f"lost the {describe_broker(settings.broker_addresses()[0])}: "
                        f"{type(e).__name__}") from None
    finally:
        if own:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)


async def send(settings: Settings, hw: str, verb: str, body: str | bytes, *, timeout: float = 15.0) -> str:
    """Publish one command with a reply_to (direct reply-to) and return the reply body.

    Never declares anything: a missing commands exchange (no bridge ever ran against this
    broker and vhost) and a command no queue takes are :class:`ToolError` at once."""
    url = settings.broker_addresses()[0]
    conn = await connect(url)
    async with conn:
        ch = await conn.channel(on_return_raises=True)
        name = settings.commands_exchange
        try:
            ex = await ch.get_exchange(name, ensure=True)  # passive: never creates it
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise ToolError(
                f"the commands exchange {name!r} does not exist on the {describe_broker(url)}; "
                "a bridge declares it when it starts: is a bridge running against this broker "
                "and vhost (with the same EPSIGNAL_COMMANDS_EXCHANGE)?") from None
        reply_q = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
        got: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        cid = uuid.uuid4().hex

        async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
            if msg.correlation_id == cid and not got.done():
                got.set_result(msg.body.decode())

        await reply_q.consume(on_reply, no_ack=True)
        data = body.encode() if isinstance(body, str) else body
        key = routing.device_key(hw, verb)
        try:
            await ex.publish(
                aio_pika.Message(data, content_type="application/json", reply_to="amq.rabbitmq.reply-to",
                                 correlation_id=cid, message_id=cid),
                key, mandatory=True,
            )
        except aio_pika.exceptions.PublishError:  # returned: no binding, not even the alternate's
            raise ToolError(
                f"no queue is bound for key {key!r} on exchange {name!r} ({describe_broker(url)}): "
                "is a bridge running and attached to this exchange?") from None
        try:
            return await asyncio.wait_for(got, timeout)
        except TimeoutError:
            return '{"ok":false,"error":"no reply within ' + f"{timeout:g}" + 's (is the bridge running?)"}'


# --------------------------------------------------------------------------- demo
def demo_settings(name: str, *, amqp_url: str, pbx_url: str, pbx_app: str, password: str,
                  devices: list[str], http_port: int = 0, intercept: str = "") -> Settings:
    """The demo bridge's settings: every exchange and queue named after the demo (``name``), so
    it never takes a real bridge's commands nor shows another bridge's events; HTTP on the
    loopback only."""
    return Settings.from_env(
        {}, pbx_url=pbx_url, pbx_app=pbx_app, pbx_password=password, amqp_url=amqp_url,
        amqp_ca_file=os.environ.get("EPSIGNAL_AMQP_CA_FILE", ""), devices=",".join(devices),
        instance_id=name, events_exchange=f"{name}.events", commands_exchange=f"{name}.commands",
        commands_queue=f"{name}.commands.bridge", dead_exchange=f"{name}.dead",
        dead_queue=f"{name}.commands.dead", http_host="127.0.0.1", http_port=http_port,
        intercept=intercept,
    )


#: the demo's intercept modes (``--intercept``): the example decider's option and sample file
INTERCEPT_MODES = {"crm": ("--crm", "crm.csv"), "screen": ("--block", "blocked.txt")}
#: the decider the demo runs for --intercept, and its sample files (a checkout's examples/)
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
#: seconds between the demo's own calls from the sample numbers (with --intercept)
INTERCEPT_CALL_EVERY_S = 3.0


def _load_decider() -> ModuleType:
    """examples/python/intercept.py as a module (its loaders of the sample files)."""
    path = EXAMPLES / "python" / "intercept.py"
    if not path.is_file():
        raise ToolError(f"--intercept runs the example decider {path}, which is not there "
                        "(it comes with a checkout of the repository, not with the image)")
    spec = importlib.util.spec_from_file_location("epsignal_intercept_example", path)
    if spec is None or spec.loader is None:
        raise ToolError(f"--intercept runs the example decider {path}, which cannot be loaded as a module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class DemoDecider:
    """The example decider (examples/python/intercept.py) as a process of the demo, its output
    relayed as ``decider: ...`` lines; and the numbers the demo calls from to show it: the CRM
    file's (renamed on the phone), the block list's (rejected), and one that is in neither."""

    UNKNOWN = "299"

    def __init__(self, modes: list[str], amqp_url: str, settings: Settings, out: TextIO) -> None:
        example = _load_decider()
        self.args = [str(EXAMPLES / "python" / "intercept.py"), "--amqp-url", amqp_url,
                     "--exchange", settings.events_exchange]
        per_mode: list[list[str]] = []
        for mode in dict.fromkeys(modes):  # each once, in order
            option, sample = INTERCEPT_MODES[mode]
            self.args += [option, str(EXAMPLES / sample)]
            load = example.load_crm if mode == "crm" else example.load_blocked
            per_mode.append(sorted(load(str(EXAMPLES / sample))))
        # the modes' numbers taken in turn (a renamed caller, a blocked one, ...)
        turns = itertools.zip_longest(*per_mode)
        self.numbers = [n for turn in turns for n in turn if n is not None] + [self.UNKNOWN]
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None
        self._relay: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Until it is bound (its first line); ToolError if it ends before."""
        self.proc = proc = await asyncio.create_subprocess_exec(
            sys.executable, *self.args, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None  # both are PIPE
        first = await proc.stdout.readline()
        if not first:
            err = (await proc.stderr.read()).decode(errors="replace").strip()
            raise ToolError(f"the example decider ended at its start: {err.splitlines()[-1:]}")
        self._line(first)
        self._relay = asyncio.create_task(self.relay(proc.stdout))

    def _line(self, raw: bytes) -> None:
        print(f"decider: {raw.decode(errors='replace').rstrip()}", file=self.out, flush=True)

    async def relay(self, stdout: asyncio.StreamReader) -> None:
        while line := await stdout.readline():
            self._line(line)

    async def calls(self, sim: PbxSimulator, hws: list[str]) -> None:
        """An incoming call from the next sample number every INTERCEPT_CALL_EVERY_S."""
        for i in itertools.count():
            await asyncio.sleep(INTERCEPT_CALL_EVERY_S)
            with contextlib.suppress(ValueError):  # the device is not registered (any more)
                await sim.place_call(hws[i % len(hws)], direction="in", hold_s=2.0,
                                     remote=self.numbers[i % len(self.numbers)])

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it ended (Ctrl-C reaches it too)
                self.proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 5)
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        if self._relay is not None:
            await asyncio.gather(self._relay, return_exceptions=True)


async def demo(*, devices: int, call_rate: float, duration: float | None, amqp_url: str,
               http_port: int = 0, intercept: list[str] | None = None, out: TextIO | None = None) -> None:
    """Simulator with traffic + a bridge for its devices + live events, in one process.

    Isolated: its own exchange and queue names (``demo-<id>.*``, deleted at exit), its own
    ports. Reaches the broker first, so an unreachable one is a :class:`ToolError` within
    :data:`CONNECT_TIMEOUT_S`; ``duration`` ends it, so do SIGINT and SIGTERM.

    ``intercept`` (modes of :data:`INTERCEPT_MODES`): the bridge holds every setup toward a
    device for a verdict, the example decider answers (``crm``: the CRM name on the phone;
    ``screen``: blocked numbers rejected), and the demo calls from the sample numbers."""
    from bridge.main import http_for
    from bridge.service import Bridge
    from bridge.sim import PbxSimulator, SimConfig

    out = out or sys.stdout
    loop = asyncio.get_running_loop()
    deadline = None if duration is None else loop.time() + duration
    conn = await connect(amqp_url)  # before anything starts: fail fast

    def left(most: float | None = None) -> float | None:
        rest = None if deadline is None else max(0.0, deadline - loop.time())
        return most if rest is None else rest if most is None else min(most, rest)
    name = f"demo-{uuid.uuid4().hex[:6]}"
    password = "demo-secret"
    sim = PbxSimulator(SimConfig(devices=devices, call_rate=call_rate, password=password))
    bridge: Bridge | None = None
    settings: Settings | None = None
    viewer: asyncio.Task[None] | None = None
    decider: DemoDecider | None = None
    caller: asyncio.Task[None] | None = None
    started = False
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sim.start(control_port=0)
        hws = [sim.hw(i) for i in range(1, devices + 1)]
        assert sim.url is not None  # set by start()
        settings = demo_settings(name, amqp_url=amqp_url, pbx_url=sim.url, pbx_app=sim.config.app,
                                 password=password, devices=hws, http_port=http_port,
                                 intercept="*=setup:device" if intercept else "")
        bridge = Bridge(settings)
        http = http_for(bridge)
        ready = asyncio.Event()
        keys = [routing.binding(k) for k in ("call.state", "attached", "detached", "attach.failed", "gap")]
        if intercept:
            keys.append(routing.binding("call.intercepted"))
        viewer = asyncio.create_task(tail(settings, keys, ready=ready, conn=conn, out=out))
        bound = asyncio.ensure_future(ready.wait())
        try:
            await asyncio.wait([viewer, bound], return_when=asyncio.FIRST_COMPLETED)
        finally:
            bound.cancel()
        if viewer.done():
            viewer.result()  # its ToolError
        if intercept:  # bound before the first setup: none goes by unintercepted
            decider = DemoDecider(intercept, amqp_url, settings, out)
            await decider.start()
        try:
            await http.start()
        except OSError as e:
            await http.stop()
            what = f"--http-port {http_port}" if http_port else "a free port"
            raise ToolError(f"the demo's HTTP server cannot listen on 127.0.0.1 ({what}): "
                            f"{_reason(e)}") from None
        await bridge.start()
        started = True
        print(f"demo {name}: PBX simulator {sim.url} (control {sim.control_url}), {devices} devices, "
              f"{call_rate:g} calls/s; bridge HTTP http://127.0.0.1:{http.port} "
              "(/healthz /readyz /metrics)", file=out, flush=True)
        # ready (its exchanges and queues declared, the devices' sessions up) before it says
        # how to send it a command; bounded, and a stop or the duration ends the wait too
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left(READY_WAIT_S)):
                while bridge.not_ready_reasons() and not stop.is_set() and not viewer.done():
                    await asyncio.sleep(0.05)
        print(f"demo {name}: {describe_broker(amqp_url)}, exchanges {settings.events_exchange} and "
              f"{settings.commands_exchange} (deleted at exit); try "
              f"`EPSIGNAL_COMMANDS_EXCHANGE={settings.commands_exchange} epsignal-bridge send "
              f"detach {hws[0] if hws else '<hw>'}`; Ctrl-C to stop", file=out, flush=True)
        if decider is not None and hws:
            print(f"demo {name}: setups toward the devices wait for the example decider; an "
                  f"incoming call every {INTERCEPT_CALL_EVERY_S:g} s from "
                  f"{', '.join(decider.numbers)}", file=out, flush=True)
            caller = asyncio.create_task(decider.calls(sim, hws))
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([viewer, waiter], timeout=left(), return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if viewer.done():
            viewer.result()  # the broker went away: its ToolError
            raise ToolError(f"the event view ended: lost the {describe_broker(amqp_url)}?")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if caller is not None:
            caller.cancel()
            await asyncio.gather(caller, return_exceptions=True)
        if started and bridge is not None:
            await bridge.stop(5)
            await http.stop()
        if decider is not None:
            await decider.stop()
        if viewer is not None:
            viewer.cancel()
            await asyncio.gather(viewer, return_exceptions=True)
        if settings is not None:  # what the demo (its bridge) declared
            with contextlib.suppress(Exception):
                await asyncio.wait_for(topology.delete_for(conn, settings), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2)
        if started:
            st = sim.stats()
            print(f"calls started {st['calls_started']}, completed {st['calls_completed']}, "
                  f"stalled {st['calls_stalled']}; forwarded {st['messages_forwarded']}", file=out, flush=True)
        await sim.stop()


# --------------------------------------------------------------------------- leases (issue 20)
#: how long `leases list` waits for the replicas' answers (they answer at once)
LEASES_WAIT_S = 1.5


class _LeaseQueue(NamedTuple):
    """A device's lease queue as a passive declare saw it, and the channel that saw it."""

    channel: aio_pika.abc.AbstractChannel
    ready: int
    consumers: int


async def _lease_queue_state(conn: aio_pika.abc.AbstractConnection, ch: aio_pika.abc.AbstractChannel | None,
                             s: Settings, hw: str) -> _LeaseQueue | None:
    """What ``hw``'s lease queue holds (on ``ch``, or a new channel when it is None or closed);
    None when ``hw`` has no lease queue (the channel closed with the 404: the caller opens
    another)."""
    if ch is None or ch.is_closed:
        ch = await conn.channel()
    try:
        q = await ch.declare_queue(topology.lease_queue(s, hw), passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    result = q.declaration_result  # a declare-ok always carries both counts (pamqp types them Optional)
    return _LeaseQueue(ch, result.message_count or 0, result.consumer_count or 0)


async def leases_list(settings: Settings, hws: list[str], *, wait: float = LEASES_WAIT_S) -> list[dict[str, Any]]:
    """Per device: its holder, the replicas in line, the wanted state (since when, by whom,
    under which configuration) as the holder reads it, and what its lease queue holds. Every
    replica with leases on is asked (on the presence exchange; each answers with its view); the
    devices are the ones they know, the configured ones (EPSIGNAL_DEVICES) and ``hws``."""
    from bridge.amqp.leases import LEASE_QUERY

    url = str(settings.amqp_url)
    conn = await connect(url)
    async with conn:
        ch = await conn.channel()
        name = topology.presence_exchange(settings)
        views: list[dict[str, Any]] = []
        try:
            ex = await ch.get_exchange(name, ensure=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            pass  # no replica with leases ever ran here (the 404 closed the channel): only the queues can tell
        else:
            reply_q = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
            cid = uuid.uuid4().hex

            async def on_reply(msg: aio_pika.abc.AbstractIncomingMessage) -> None:
                if msg.correlation_id == cid:
                    views.append(msgspec.json.decode(msg.body))
            await reply_q.consume(on_reply, no_ack=True)
            await ex.publish(aio_pika.Message(b"{}", type=LEASE_QUERY, reply_to="amq.rabbitmq.reply-to",
                                              correlation_id=cid, expiration=wait), "")
            await asyncio.sleep(wait)
        rows: dict[str, dict[str, Any]] = {hw: {"hw": hw, "holder": None, "in_line": []}
                                 for hw in (*settings.device_list, *hws)}
        for view in sorted(views, key=lambda v: v["instance"]):
            for d in view["devices"]:
                row = rows.setdefault(d["hw"], {"hw": d["hw"], "holder": None, "in_line": []})
                if d["state"] == "holding":
                    row["holder"] = view["instance"]
                    row.update({k: d[k] for k in ("wanted", "since", "by", "gen") if k in d})
                    row["configuration"] = "current" if d.get("cfg") == view["cfg"] else "other"
                elif d["state"] != "out":
                    row["in_line"].append(view["instance"])
        qch = None
        for hw, row in sorted(rows.items()):
            state = await _lease_queue_state(conn, qch, settings, hw)
            qch = None if state is None else state.channel
            row["queue"] = None if state is None else {"ready": state.ready, "consumers": state.consumers}
        return [rows[hw] for hw in sorted(rows)]


def format_lease(row: dict[str, Any]) -> str:
    q = row["queue"]
    if q is None:
        where = "no lease queue"
    elif row["holder"]:
        where = f"{q['ready']} command(s) waiting"
    else:
        where = f"no holder: {q['ready']} message(s) in the queue (the token among them), {q['consumers']} consumer(s)"
    if row["holder"]:
        wanted = f"wanted {row.get('wanted', '?')} since {row.get('since') or '?'} by {row.get('by') or '?'}"
        if row.get("configuration") == "other":
            wanted += " (under another configuration)"
        who = f"held by {row['holder']}" + (f", in line {','.join(row['in_line'])}" if row["in_line"] else "")
    else:
        wanted = "wanted ?"
        who = f"in line {','.join(row['in_line'])}" if row["in_line"] else "not held"
    return f"{row['hw']}  {who}; {wanted}; {where}"


async def leases_reset(settings: Settings, hws: list[str]) -> list[str]:
    """Forget each device's lease state: its wanted state and what waits in its lease queue
    (commands are refused to the dead-letter exchange with the reason, when nobody consumes the
    queue). The queue is deleted; the replicas with leases on make it anew, with a token from
    their configuration, within a lease round (the holder's PBX session ends meanwhile: calls
    on the device are cut). One line per device."""
    url = str(settings.amqp_url)
    conn = await connect(url)
    out = []
    async with conn:
        ch = None
        for hw in hws:
            state = await _lease_queue_state(conn, ch, settings, hw)
            if state is None:
                ch = None
                out.append(f"{hw}: no lease queue (nothing to reset)")
                continue
            ch = state.channel
            name = topology.lease_queue(settings, hw)
            q = await ch.get_queue(name, ensure=False)
            await q.unbind(settings.commands_exchange, topology.lease_key(hw))
            refused = 0
            if state.consumers == 0:  # nobody consumes it: what waits can be taken and refused
                dead = await ch.get_exchange(settings.dead_exchange, ensure=False)
                async for msg in topology.take_waiting(q, state.ready):
                    if msg.type != topology.LEASE_TOKEN:
                        error = f"lease of {hw} reset by an operator; not carried out"
                        await dead.publish(dead_letter(msg, error, settings.instance_id), msg.routing_key or "")
                        refused += 1
                    await msg.ack()
            ok = await (await ch.get_underlay_channel()).queue_delete(name)
            out.append(f"{hw}: lease queue deleted ({state.consumers} consumer(s); {refused} waiting command(s) "
                       f"dead-lettered, {ok.message_count} message(s) dropped with it); the replicas "
                       "make it anew from their configuration")
    return out
