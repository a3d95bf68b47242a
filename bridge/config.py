"""Settings: every knob is an ``EPSIGNAL_*`` environment variable. One Struct, validated once.

The README's configuration table is generated from :data:`Settings` field docs by
``epsignal-bridge config --markdown`` so the two cannot drift.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec
from msgspec import Meta, Struct

from bridge import brokers, ids, intercept
from bridge.events import KINDS
from bridge.intercept import Rules as InterceptRules
from bridge.protocol.callstate import CallLimits

PREFIX = "EPSIGNAL_"


class Secret(str):
    """A string that never shows itself in a repr, a log line or an exception message."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


def _doc(text: str, **kw) -> Meta:
    return Meta(description=text, **kw)


def _default_instance() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


class Settings(Struct, kw_only=True):
    # ------------------------------------------------------------------ PBX side
    pbx_url: Annotated[str, _doc("PBX AppWebsocket URL (client mode), ws:// or wss://")] = (
        "ws://127.0.0.1:8765/PBX0/APPS/websocket"
    )
    pbx_app: Annotated[str, _doc("Name of the PBX App object the bridge logs in as")] = "epsignal"
    pbx_password: Annotated[str, _doc("Password of the PBX App object (secret)")] = ""
    pbx_mode: Annotated[
        Literal["client", "server"],
        _doc("client: the bridge connects to the PBX; server: the PBX's App object connects in"),
    ] = "client"
    pbx_listen: Annotated[str, _doc("Listen address for server mode, host:port")] = "0.0.0.0:8090"
    devices: Annotated[str, _doc(
        "Comma-separated hw ids to attach at start (each 1 to 64 of `A-Z a-z 0-9 - _ . : @`)")] = ""
    attach_concurrency: Annotated[
        int, _doc("Sessions opened at once while attaching many devices", ge=1)
    ] = 50
    attach_timeout_s: Annotated[float, _doc("Time allowed for login + AttachResult", gt=0)] = 10.0
    max_frame_bytes: Annotated[int, _doc("Largest WebSocket frame accepted", ge=1024)] = 256 * 1024
    pbx_ca_file: Annotated[str, _doc("CA bundle to trust for wss:// (default: the system's)")] = ""
    pbx_tls_verify: Annotated[bool, _doc("Verify the PBX's TLS certificate and host name")] = True
    reconnect_min_s: Annotated[float, _doc("First reconnect delay (doubles, with jitter)", gt=0)] = 1.0
    reconnect_max_s: Annotated[float, _doc("Longest reconnect delay", gt=0)] = 32.0
    login_retry_s: Annotated[
        float, _doc("Delay before retrying a refused login (wrong password)", gt=0)
    ] = 60.0
    max_calls_per_device: Annotated[int, _doc(
        "Calls tracked per device at most (a phone has a handful); beyond, the least recently "
        "signaled is dropped: `released` with `evicted` too-many-calls", ge=1)] = 256
    call_idle_s: Annotated[float, _doc(
        "A call setting up, ringing or disconnecting with no signaling for this long is dropped: "
        "`released` with `evicted` idle (0: never)", ge=0)] = 3600.0
    connected_call_idle_s: Annotated[float, _doc(
        "The same for a connected, held or parked call, or one first seen mid-call (such calls "
        "may be silent for hours; 0: never)", ge=0)] = 86400.0
    # ------------------------------------------------------------------ broker side
    amqp_url: Annotated[str, _doc(
        "RabbitMQ URL, amqp:// or amqps://, or a comma-separated list of them, one per node of a "
        "cluster (tried in turn; credentials are secret)")] = "amqp://guest:guest@localhost/"
    amqp_hosts: Annotated[str, _doc(
        "Comma-separated host[:port] of the broker's nodes: when set, the bridge connects to each "
        "with the scheme, credentials, vhost and options of EPSIGNAL_AMQP_URL (then one URL), so "
        "the hosts need not be in the secret")] = ""
    queue_type: Annotated[Literal["quorum", "classic"], _doc(
        "Type of the durable queues the bridge declares (commands, dead letters, device leases): "
        "quorum (replicated; for a cluster) or classic. An existing queue keeps its type: see "
        "docs/SCALING.md to change it")] = "quorum"
    events_exchange: Annotated[str, _doc("Topic exchange for events")] = "epsignal.events"
    commands_exchange: Annotated[str, _doc("Topic exchange for commands")] = "epsignal.commands"
    commands_queue: Annotated[str, _doc("Durable queue the bridge consumes commands from")] = (
        "epsignal.commands.bridge"
    )
    amqp_ca_file: Annotated[str, _doc("CA bundle to trust for amqps:// (default: the system's)")] = ""
    dead_exchange: Annotated[str, _doc("Exchange for dead-lettered commands")] = "epsignal.dead"
    dead_queue: Annotated[str, _doc("Queue holding dead-lettered commands")] = "epsignal.commands.dead"
    prefetch: Annotated[int, _doc("Commands processed at once", ge=1)] = 64
    command_rate: Annotated[float, _doc("Commands per second accepted for one device (sustained)", gt=0)] = 20.0
    command_burst: Annotated[int, _doc("Commands accepted for one device in a burst", ge=1)] = 50
    heartbeat_s: Annotated[int, _doc("AMQP heartbeat interval", ge=1)] = 10
    publish_window: Annotated[int, _doc("Events published and not yet confirmed, at most", ge=1)] = 1024
    publish_timeout_s: Annotated[float, _doc("Time allowed for one publisher confirm", gt=0)] = 10.0
    publish_max_attempts: Annotated[int, _doc(
        "Publishes of one event the broker nacks (a queue refused it) before it is dropped and "
        "announced in a gap event; pauses between them double from 0.5 s to 8 s", ge=1)] = 6
    event_kinds: Annotated[str, _doc(
        "Comma-separated kinds of device event to publish: attached, detached, attach.failed, "
        "call.state, call.signaling, call.intercepted (default: all; gap events always). "
        "`call.state` alone halves the events of a call")] = (
        "attached,detached,attach.failed,call.state,call.signaling,call.intercepted")
    buffer_max_events: Annotated[int, _doc("Events kept while the broker is away", ge=1)] = 100_000
    buffer_max_mb: Annotated[int, _doc(
        "Megabytes of event bodies kept while the broker is away (the oldest are dropped beyond, "
        "as beyond the event count)", ge=1)] = 256
    buffer_max_age_s: Annotated[float, _doc("Events older than this are dropped unsent", gt=0)] = 300.0
    # ------------------------------------------------------------------ intercept mode
    intercept: Annotated[str, _doc(
        "Messages held for a verdict from the bus (docs/INTERCEPT.md): `;`-separated "
        "`<hw or *>=<type>:<device|pbx>[,...]`, e.g. `*=setup:device` (a setup toward any device); "
        "a device's own entry replaces `*`. Empty: only what intercept commands set")] = ""
    intercept_deadline_ms: Annotated[int, _doc(
        "How long an intercepted message waits for its verdict at most, in milliseconds",
        ge=intercept.DEADLINE_MIN_MS, le=intercept.DEADLINE_MAX_MS)] = 250
    intercept_fail: Annotated[Literal["open", "closed"], _doc(
        "Without a verdict (deadline, broker away, nobody bound, stop): open = forward the message "
        "unchanged; closed = reject it (a release with EPSIGNAL_INTERCEPT_CAUSE)")] = "open"
    intercept_cause: Annotated[int, _doc(
        "Q.931 cause of the release a fail-closed rejection sends (21: call rejected)", ge=1, le=127)] = 21
    # ------------------------------------------------------------------ many replicas
    leases: Annotated[bool, _doc(
        "Share the devices with other replicas: a device is attached by the replica holding its "
        "lease queue (needed with more than one replica; client mode only; see docs/SCALING.md)"
    )] = False
    lease_heartbeat_s: Annotated[float, _doc(
        "Presence heartbeat between replicas (a replica unheard for 5 is gone)", gt=0
    )] = 1.0
    # ------------------------------------------------------------------ the process
    http_host: Annotated[str, _doc("Address of the HTTP server (health, readiness, metrics)")] = "0.0.0.0"
    http_port: Annotated[int, _doc("Port of /healthz, /readyz and /metrics (0: any free port)", ge=0)] = 8080
    instance_id: Annotated[str, _doc("Bridge instance id (default: hostname + random)")] = ""
    log_level: Annotated[str, _doc("Log level: DEBUG, INFO, WARNING, ERROR")] = "INFO"

    def __post_init__(self) -> None:
        if not self.instance_id:
            self.instance_id = _default_instance()
        self.pbx_password = Secret(self.pbx_password)
        self.amqp_url = Secret(self.amqp_url)
        ids.check_devices(self.device_list)
        self.log_level = self.log_level.upper()
        problems = _problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    def secrets(self) -> list[str]:
        """Every secret value, for the log filter: the PBX password, the AMQP password and URL."""
        from yarl import URL

        out = [str(self.pbx_password), str(self.amqp_url)]
        pbx = URL(self.pbx_url)
        if pbx.password or pbx.query_string:  # credentials or a token in the PBX URL
            out.append(self.pbx_url)
        for text in brokers.split(self.amqp_url):
            try:
                u = URL(text)
            except ValueError:
                continue
            out += [text, u.password or "", u.raw_password or ""]
        return list(dict.fromkeys(s for s in out if s))

    def broker_addresses(self) -> list[str]:
        """The broker's addresses, tried in turn (EPSIGNAL_AMQP_URL, EPSIGNAL_AMQP_HOSTS)."""
        return brokers.addresses(str(self.amqp_url), self.amqp_hosts)

    def call_limits(self) -> CallLimits:
        """The bounds on the calls of each device (for :class:`~bridge.device.Device`)."""
        return CallLimits(self.max_calls_per_device, self.call_idle_s, self.connected_call_idle_s)

    def intercept_rules(self) -> InterceptRules:
        """The configuration's intercept rules (EPSIGNAL_INTERCEPT and its defaults)."""
        return intercept.Rules(intercept.parse_config(self.intercept), intercept.Defaults(
            self.intercept_deadline_ms, self.intercept_fail, self.intercept_cause))

    @property
    def event_kind_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.event_kinds.split(",") if k.strip())

    @property
    def device_list(self) -> list[str]:
        return [d.strip() for d in self.devices.split(",") if d.strip()]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        """Settings from ``EPSIGNAL_*`` variables (other ``EPSIGNAL_*`` names are ignored)."""
        env = os.environ if environ is None else environ
        known = set(cls.__struct_fields__)
        raw = {k[len(PREFIX):].lower(): v for k, v in env.items() if k.startswith(PREFIX)}
        raw = {k: v for k, v in raw.items() if k in known}  # others: k8s service links, the sim
        raw.update(overrides)
        try:
            return msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ValueError(f"configuration: {_env_name(str(e))}") from None


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _problems(s: Settings) -> list[str]:
    """What makes these settings unable to work, each a sentence naming the variable (a bad
    setting refuses the start instead of retrying for ever or running silently otherwise)."""
    from yarl import URL

    out = []
    if s.pbx_mode == "client":
        pbx = URL(s.pbx_url)
        if pbx.scheme not in ("ws", "wss") or not pbx.host:
            out.append(f"EPSIGNAL_PBX_URL {brokers.shown(s.pbx_url)!r} is not a ws:// or wss:// URL with a host "
                       "(the PBX's AppWebsocket, e.g. wss://pbx.example.com/PBX0/APPS/websocket)")
    out += brokers.problems(str(s.amqp_url), s.amqp_hosts)
    kinds = s.event_kind_list
    if not kinds or set(kinds) - set(KINDS):
        out.append(f"EPSIGNAL_EVENT_KINDS {s.event_kinds!r}: each kind must be one of {', '.join(KINDS)}")
    try:
        intercept.parse_config(s.intercept)
    except ValueError as e:
        out.append(str(e))
    if s.log_level not in LOG_LEVELS:
        out.append(f"EPSIGNAL_LOG_LEVEL {s.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    if s.http_port > 65535:
        out.append(f"EPSIGNAL_HTTP_PORT {s.http_port} is not a TCP port (0 to 65535)")
    if s.pbx_mode == "server":
        host, _, port = s.pbx_listen.rpartition(":")
        if not host or not port.isdigit() or int(port) > 65535:
            out.append(f"EPSIGNAL_PBX_LISTEN {s.pbx_listen!r} is not host:port (e.g. 0.0.0.0:8090)")
    return out


def _env_name(text: str) -> str:
    """Point a validation message at the environment variable, not the Struct field."""
    m = re.search(r"`\$\.(\w+)`", text)
    return text.replace(m.group(0), f"{PREFIX}{m.group(1).upper()}") if m else text


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, description) for every setting, for docs and ``--help``."""
    out = []
    for f in msgspec.structs.fields(Settings):
        meta = next((m for m in getattr(f.type, "__metadata__", ()) if isinstance(m, Meta)), None)
        default = "" if f.default is msgspec.NODEFAULT else str(f.default)
        out.append((PREFIX + f.name.upper(), default, (meta.description or "") if meta else ""))
    return out
