"""Tracing across hops with OpenTelemetry, instrumented by hand (propagate.inject/extract).

Span model (OpenTelemetry messaging conventions for RabbitMQ):

- ``receive EpSignal {mt}`` (CONSUMER): one per frame from the PBX, with ``epsignal.hw``,
  ``epsignal.call``, ``epsignal.sig.type``; it starts at the moment the frame was read, so it
  covers decoding and forwarding; a child ``forward`` span covers exactly the forward.
- ``publish {exchange} {key template}`` (PRODUCER): one per event, started when the event is
  made, ended when the broker confirmed it; its context goes into the AMQP headers
  (``traceparent``/``tracestate``) so consumers continue the trace.
- ``process {exchange} device.{hw}.{verb}`` (CONSUMER): one per command, a child of the
  producer's context extracted from the headers, with a link to it as the conventions say;
  ``send EpSignal Signaling`` (PRODUCER toward the PBX) under it for a signaling command.

**Across the PBX hop** every call has a trace: the first frame of a call starts it, later frames
of the call are children of it; a command that starts or acts on a call makes its own context
the call's, so click-to-dial (command -> call-proc, alert, connected, released) is one trace.

Configuration is the standard ``OTEL_*`` variables. Tracing is on when ``OTEL_TRACES_EXPORTER``
is ``otlp`` or ``console`` (or unset with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set), and not
``OTEL_SDK_DISABLED=true``. Off, the hot path checks one module flag and does nothing else.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from opentelemetry import baggage as _baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanKind, Status, StatusCode

_tracer = trace.get_tracer("epsignal-bridge")
#: False: no span is made anywhere (checked on the hot path)
ENABLED = False

SYSTEM = "rabbitmq"
_KEY_TEMPLATES = [
    (re.compile(r"^device\.[^.]+\.call\.[^.]+\.(state|signaling)$"), r"device.{hw}.call.{call}.\1"),
    (re.compile(r"^device\.[^.]+\.(attached|detached|attach\.failed)$"), r"device.{hw}.\1"),
    (re.compile(r"^bridge\.[^.]+\.gap$"), "bridge.{instance}.gap"),
]


def key_template(key: str) -> str:
    """The low-cardinality template of a routing key (span names never carry ids)."""
    for rx, tpl in _KEY_TEMPLATES:
        if rx.match(key):
            return rx.sub(tpl, key)
    return "{other}"


def configure(provider=None) -> bool:
    """Turn tracing on with ``provider`` (tests), or from the ``OTEL_*`` environment."""
    global ENABLED, _tracer
    if provider is None:
        env = os.environ
        if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return False
        exporter = env.get("OTEL_TRACES_EXPORTER", "otlp" if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") else "none")
        if exporter in ("", "none"):
            return False
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        if exporter == "console":
            exp = ConsoleSpanExporter()
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exp = OTLPSpanExporter()
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported (otlp, console, none)")
        provider = TracerProvider(resource=Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "epsignal-bridge")}))
        provider.add_span_processor(BatchSpanProcessor(exp))
    _tracer = provider.get_tracer("epsignal-bridge")
    global _FAST_INJECT
    _FAST_INJECT = None  # decided on first use (the propagator may be set after this)
    ENABLED = True
    return True


def disable() -> None:
    global ENABLED
    ENABLED = False


# ------------------------------------------------------------------------------ PBX side
#: the parent of a call's first frame: no span (a new trace); contexts are immutable, so one will do
_ROOT = otel_context.Context()


def _call_context(span) -> otel_context.Context:
    """What ``device.trace_ctx`` keeps per call: a context whose span is the call's root (as a
    NonRecordingSpan: the ended span itself is not kept alive), built once per call."""
    return trace.set_span_in_context(NonRecordingSpan(span.get_span_context()))


def frame_span(device, msg, start_ns: int):
    """The span of one frame from the PBX (already forwarded), in its call's trace."""
    call = getattr(msg, "call", None)
    parent = device.trace_ctx.get(call, _ROOT) if call is not None else _ROOT
    name = type(msg).__name__
    attrs = {"epsignal.hw": device.hw, "epsignal.mt": name}
    if call is not None:
        attrs["epsignal.call"] = call
    sig = getattr(msg, "sig", None)
    if sig is not None:
        try:
            attrs["epsignal.sig.type"] = msg.signal.type
        except ValueError:
            pass
        attrs["epsignal.to_device"] = msg.to is True
    span = _tracer.start_span(_RECEIVE_NAMES.get(name) or f"receive EpSignal {name}", context=parent,
                              kind=SpanKind.CONSUMER, start_time=start_ns, attributes=attrs)
    if call is not None and parent is _ROOT:
        device.trace_ctx[call] = _call_context(span)
    return span


_RECEIVE_NAMES = {n: f"receive EpSignal {n}" for n in ("Signaling", "Sync", "AttachResult", "Attached", "Detached")}


def forward_span(parent, start_ns: int, end_ns: int) -> None:
    """``parent``: the frame's span, or a context holding it."""
    if not isinstance(parent, otel_context.Context):
        parent = trace.set_span_in_context(parent)
    s = _tracer.start_span("forward", context=parent, kind=SpanKind.PRODUCER, start_time=start_ns)
    s.end(end_time=end_ns)


def enter_frame(device, msg, start_ns: int, forwarded_ns: int | None):
    """The frame's span (with its ``forward`` child when it was forwarded), made current:
    ``(span, token)`` for :func:`exit_frame`. The events made meanwhile are its children."""
    span = frame_span(device, msg, start_ns)
    ctx = trace.set_span_in_context(span)
    if forwarded_ns is not None:
        forward_span(ctx, start_ns, forwarded_ns)
    return span, otel_context.attach(ctx)


def exit_frame(span, token, error: BaseException | None = None) -> None:
    otel_context.detach(token)
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


# ------------------------------------------------------------------------------ broker side
#: event type -> routing key template (what key_template gives for the keys of that type)
_TYPE_TEMPLATES = {
    "call.state": "device.{hw}.call.{call}.state",
    "call.signaling": "device.{hw}.call.{call}.signaling",
    "attached": "device.{hw}.attached",
    "detached": "device.{hw}.detached",
    "attach.failed": "device.{hw}.attach.failed",
    "gap": "bridge.{instance}.gap",
}
_names: dict[tuple[str, str], str] = {}


def _traceparent_only() -> bool:
    """True when the global propagator is the default W3C one (tracecontext, baggage): then the
    producer writes ``traceparent``/``tracestate`` itself (the same text, without the composite
    propagator's machinery on every event)."""
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    p = propagate.get_global_textmap()
    parts = getattr(p, "_propagators", None) if isinstance(p, CompositePropagator) else [p]
    return bool(parts) and all(type(x) in (TraceContextTextMapPropagator, W3CBaggagePropagator) for x in parts) \
        and any(type(x) is TraceContextTextMapPropagator for x in parts)


_FAST_INJECT: bool | None = None


def inject(headers: dict, span) -> None:
    """The trace context of ``span`` (a child of the current context) into AMQP headers."""
    global _FAST_INJECT
    if _FAST_INJECT is None:
        _FAST_INJECT = _traceparent_only()
    if not _FAST_INJECT or _baggage.get_all():
        propagate.inject(headers, context=trace.set_span_in_context(span))
        return
    sc = span.get_span_context()
    if sc.is_valid:
        headers["traceparent"] = f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}"
        if sc.trace_state:
            headers["tracestate"] = sc.trace_state.to_header()


def producer(event, exchange: str) -> None:
    """Start the PRODUCER span of an event in the current context and put it in its headers."""
    typ = event.type
    tpl = _TYPE_TEMPLATES.get(typ) or key_template(event.key)
    name = _names.get((exchange, tpl))
    if name is None:
        name = _names[(exchange, tpl)] = f"publish {exchange} {tpl}"
    span = _tracer.start_span(
        name, kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": SYSTEM, "messaging.operation.name": "publish",
            "messaging.operation.type": "send", "messaging.destination.name": exchange,
            "messaging.destination.template": tpl,
            "messaging.rabbitmq.destination.routing_key": event.key,
            "messaging.message.id": event.message_id,
            "messaging.message.body.size": len(event.body),
        },
    )
    headers = event.headers if event.headers is not None else {}
    inject(headers, span)
    event.headers = headers
    event.span = span


def published(event, error: BaseException | None = None) -> None:
    span = getattr(event, "span", None)
    if span is not None:
        if error is not None:
            span.record_exception(error)
        span.end()
        event.span = None


def command_span(headers: dict | None, exchange: str, hw: str, verb: str, routing_key: str,
                 message_id: str | None, correlation_id: str | None):
    """The CONSUMER span of a command: child of the producer's context, linked to it."""
    carrier = {k: v for k, v in (headers or {}).items() if isinstance(v, str)}
    parent = propagate.extract(carrier)
    pctx = trace.get_current_span(parent).get_span_context()
    links = [Link(pctx)] if pctx.is_valid else []
    attrs = {
        "messaging.system": SYSTEM, "messaging.operation.name": "process",
        "messaging.operation.type": "process", "messaging.destination.name": exchange,
        "messaging.destination.template": f"device.{{hw}}.{verb}",
        "messaging.rabbitmq.destination.routing_key": routing_key, "epsignal.hw": hw,
    }
    if message_id:
        attrs["messaging.message.id"] = message_id
    if correlation_id:
        attrs["messaging.message.conversation_id"] = correlation_id
    return _tracer.start_as_current_span(
        f"process {exchange} device.{{hw}}.{verb}", context=parent, kind=SpanKind.CONSUMER,
        links=links, attributes=attrs,
    )


@contextmanager
def send_span(device, call: int, sig_type: str):
    """The span of a Signaling the bridge sends for a command; the call joins this trace."""
    with _tracer.start_as_current_span(
        "send EpSignal Signaling", kind=SpanKind.PRODUCER,
        attributes={"epsignal.hw": device.hw, "epsignal.call": call, "epsignal.sig.type": sig_type},
    ) as span:
        device.trace_ctx[call] = _call_context(span)
        yield span
