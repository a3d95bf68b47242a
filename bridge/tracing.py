"""Tracing across hops with OpenTelemetry, instrumented by hand (propagate.inject/extract).

Span model (OpenTelemetry messaging conventions for RabbitMQ), one span per frame:

- ``receive EpSignal {mt}`` (CONSUMER): one per frame from the PBX, with ``epsignal.hw``,
  ``epsignal.call``, ``epsignal.sig.type``, ``epsignal.to_device``; it starts at the moment the
  frame was read, so it covers decoding and forwarding; a forwarded frame has
  ``epsignal.forward_us``, the microseconds from reading it to having sent it back.
- The events a frame makes carry that span's context in their AMQP headers
  (``traceparent``/``tracestate``): it is their *creation context*, so consumers continue the
  call's trace. An event made outside any span (a session lost, a gap) gets a short
  ``create {exchange} {key template}`` span of its own, so every event carries a context.
- ``publish {exchange}`` (PRODUCER, ERROR): only for a slice of events the broker did not
  confirm in full (nack, timeout, connection lost), from its write to the failure, linked to the
  creation contexts of the events that failed (they stay buffered and are sent again). Confirmed
  publishes make no span: ``epsignal_publish_latency_seconds`` measures them.
- ``process {exchange} device.{hw}.{verb}`` (CONSUMER): one per command, a child of the
  producer's context extracted from the headers, with a link to it as the conventions say;
  ``send EpSignal Signaling`` (PRODUCER toward the PBX) under it for a signaling command.

Why not a PRODUCER span per event (the conventions' default): with every span sampled that was
4 spans per frame and cost 40-46% of the throughput; one span per frame is the floor
(docs/PERFORMANCE.md has the measurements).

**Across the PBX hop** every call has a trace: the first frame of a call starts it, later frames
of the call are children of it; a command that starts or acts on a call makes its own context
the call's, so click-to-dial (command -> call-proc, alert, connected, released) is one trace.

Configuration is the standard ``OTEL_*`` variables (``OTEL_TRACES_SAMPLER`` included). Tracing is
on when ``OTEL_TRACES_EXPORTER`` is ``otlp`` or ``console`` (or unset with
``OTEL_EXPORTER_OTLP_ENDPOINT`` set), and not ``OTEL_SDK_DISABLED=true``. Off, the hot path checks
one module flag and does nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from opentelemetry import baggage as _baggage
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

from bridge import routing
from bridge.device import Device
from bridge.events import Outgoing
from bridge.protocol.callstate import CallTracker

_tracer = trace.get_tracer("epsignal-bridge")
#: False: no span is made anywhere (checked on the hot path)
ENABLED = False

SYSTEM = "rabbitmq"


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
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        exp: SpanExporter
        if exporter == "console":
            exp = ConsoleSpanExporter()
        elif exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exp = OTLPSpanExporter()
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported (otlp, console, none)")
        service = env.get("OTEL_SERVICE_NAME", "epsignal-bridge")
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        provider.add_span_processor(BatchSpanProcessor(exp))
    _tracer = provider.get_tracer("epsignal-bridge")
    global _FAST_INJECT
    _FAST_INJECT = None  # decided on first use (the propagator may be set after this)
    ENABLED = True
    return True


def disable() -> None:
    global ENABLED
    ENABLED = False


# ------------------------------------------------------------------------------ events
def emitter(publish: Callable[[Outgoing], None], exchange: str) -> Callable[[Outgoing], None]:
    """What the PBX sessions hand their events to: ``publish`` (the publisher's, never blocks),
    with tracing on after putting the event's creation context in its headers (:func:`creation`)."""
    def emit(event: Outgoing) -> None:
        if ENABLED:
            creation(event, exchange)
        publish(event)
    return emit


# ------------------------------------------------------------------------------ PBX side
#: the parent of a call's first frame: no span (a new trace); contexts are immutable, so one will do
_ROOT = otel_context.Context()


class CallContexts:
    """One device's calls -> the context of each call's trace (:func:`_call_context`).

    Bounded like the device's calls: a call's context goes when the call ends (the device tells,
    as its :class:`~bridge.device.CallWatcher`), and the contexts of calls the device does not
    track (a sig never understood) go once there are twice as many contexts as calls may be
    tracked (so pruning is amortised O(1))."""

    __slots__ = ("_ctx", "_max", "_tracked")

    def __init__(self, tracker: CallTracker) -> None:
        self._ctx: dict[int, otel_context.Context] = {}
        self._tracked = tracker.get
        self._max = 2 * tracker.limits.max_calls

    def get(self, call: int, default: otel_context.Context) -> otel_context.Context:
        return self._ctx.get(call, default)

    def set(self, call: int, ctx: otel_context.Context) -> None:
        if len(self._ctx) >= self._max:
            tracked = self._tracked
            self._ctx = {c: v for c, v in self._ctx.items() if tracked(c) is not None}
        self._ctx[call] = ctx

    def ended(self, call: int) -> None:
        self._ctx.pop(call, None)

    def cleared(self) -> None:
        self._ctx.clear()

    def __len__(self) -> int:
        return len(self._ctx)

    def __iter__(self) -> Iterator[int]:
        return iter(self._ctx)


#: the call contexts of each device (they go with the device)
def contexts(device: Device) -> CallContexts:
    """The call contexts of ``device`` (made on first use and kept as the device's watcher: the
    device tells them when calls end, and they go with the device)."""
    c = device.watcher
    if not isinstance(c, CallContexts):
        c = device.watcher = CallContexts(device.tracker)
    return c


def _call_context(span) -> otel_context.Context:
    """What :class:`CallContexts` keeps per call: a context whose span is the call's root (as a
    NonRecordingSpan: the ended span itself is not kept alive), built once per call."""
    return trace.set_span_in_context(NonRecordingSpan(span.get_span_context()))


def frame_span(device: Device, msg, start_ns: int, forwarded_ns: int | None = None):
    """The span of one frame from the PBX (already forwarded if ``forwarded_ns``), in its call's trace."""
    call = getattr(msg, "call", None)
    calls = contexts(device)
    parent = calls.get(call, _ROOT) if call is not None else _ROOT
    name = type(msg).__name__
    attrs: dict[str, str | bool | int] = {"epsignal.hw": device.hw}
    if call is not None:
        attrs["epsignal.call"] = call
    sig = getattr(msg, "sig", None)
    if sig is not None:
        try:
            attrs["epsignal.sig.type"] = msg.signal.type
        except ValueError:
            pass
        attrs["epsignal.to_device"] = msg.to is True
    if forwarded_ns is not None:
        attrs["epsignal.forward_us"] = (forwarded_ns - start_ns) // 1000
    span = _tracer.start_span(_RECEIVE_NAMES.get(name) or f"receive EpSignal {name}", context=parent,
                              kind=SpanKind.CONSUMER, start_time=start_ns, attributes=attrs)
    if call is not None and parent is _ROOT:
        calls.set(call, _call_context(span))
    return span


_RECEIVE_NAMES = {n: f"receive EpSignal {n}" for n in ("Signaling", "Sync", "AttachResult", "Attached", "Detached")}


def enter_frame(device: Device, msg, start_ns: int, forwarded_ns: int | None):
    """The frame's span, made current: ``(span, token)`` for :func:`exit_frame`. The events
    made meanwhile carry its context."""
    span = frame_span(device, msg, start_ns, forwarded_ns)
    return span, otel_context.attach(trace.set_span_in_context(span))


def exit_frame(span, token, error: BaseException | None = None) -> None:
    otel_context.detach(token)
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


# ------------------------------------------------------------------------------ broker side
def _traceparent_only() -> bool:
    """True when the global propagator is the default W3C one (tracecontext, baggage): then the
    producer writes ``traceparent``/``tracestate`` itself (the same text, without the composite
    propagator's machinery on every event)."""
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    p = propagate.get_global_textmap()
    parts = (getattr(p, "_propagators", None) or []) if isinstance(p, CompositePropagator) else [p]
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


def _template(event) -> str:
    return routing.EVENT_KEYS.get(event.type) or routing.template_of(event.key)


def creation(event, exchange: str) -> None:
    """Put the event's creation context in its headers: the current span (the frame's or the
    command's), or a ``create`` span of its own when there is none. The events made in one
    context share one headers dict (the publisher encodes it once)."""
    global _made
    ctx: otel_context.Context | None = otel_context.get_current()
    if ctx is _made[0]:
        event.headers = _made[1]
        return
    span = trace.get_current_span(ctx)
    sc = span.get_span_context()
    if not sc.is_valid:
        span = _tracer.start_span(f"create {exchange} {_template(event)}", kind=SpanKind.PRODUCER, attributes={
            "messaging.system": SYSTEM, "messaging.operation.name": "create",
            "messaging.operation.type": "create", "messaging.destination.name": exchange,
            "messaging.rabbitmq.destination.routing_key": event.key,
            "messaging.message.id": event.message_id,
        })
        span.end()
        sc = span.get_span_context()
        ctx = None  # nothing to share with the next event
    headers: dict[str, str] = {}
    inject(headers, span)
    event.headers = headers
    _made = (ctx, headers)


#: (context, headers) of the last :func:`creation` (contexts are immutable)
_made: tuple[otel_context.Context | None, dict[str, str] | None] = (None, None)


def _origins(events: list[Outgoing]) -> list[SpanContext]:
    """The sampled creation contexts of ``events`` (from their headers), one per span."""
    out: dict[int, SpanContext] = {}
    seen: set[int] = set()
    for ev in events:
        h = ev.headers
        if not h or id(h) in seen:  # the events of one context share one headers dict
            continue
        seen.add(id(h))
        sc = trace.get_current_span(propagate.extract(h)).get_span_context()
        if sc.is_valid and sc.trace_flags.sampled:  # a local context, as it was made
            out[sc.span_id] = SpanContext(sc.trace_id, sc.span_id, False, sc.trace_flags, sc.trace_state)
    return list(out.values())


def publish_failed(exchange: str, start_ns: int, failed: list[Outgoing], total: int,
                   error: BaseException) -> None:
    """A slice the broker did not confirm in full: a ``publish {exchange}`` span (ERROR) from its
    write to now, linked to the creation contexts of the events that failed (sent again later).
    Confirmed slices make no span: the publish latency histogram covers them."""
    links = [Link(sc) for sc in _origins(failed)]
    span = _tracer.start_span(
        f"publish {exchange}", context=_ROOT, kind=SpanKind.PRODUCER, links=links, start_time=start_ns,
        attributes={"messaging.system": SYSTEM, "messaging.operation.name": "publish",
                    "messaging.operation.type": "send", "messaging.destination.name": exchange,
                    "messaging.batch.message_count": total})
    span.set_status(Status(StatusCode.ERROR, f"{len(failed)} of {total} not confirmed "
                                             f"({type(error).__name__}); sent again"))
    span.end()


def command_span(headers: dict | None, exchange: str, hw: str, verb: str, routing_key: str,
                 message_id: str | None, correlation_id: str | None):
    """The CONSUMER span of a command: child of the producer's context, linked to it."""
    carrier = {k: v for k, v in (headers or {}).items() if isinstance(v, str)}
    parent = propagate.extract(carrier)
    pctx = trace.get_current_span(parent).get_span_context()
    links = [Link(pctx)] if pctx.is_valid else []
    template = routing.COMMAND_KEYS.get(verb, "{other}")
    attrs = {
        "messaging.system": SYSTEM, "messaging.operation.name": "process",
        "messaging.operation.type": "process", "messaging.destination.name": exchange,
        "messaging.destination.template": template,
        "messaging.rabbitmq.destination.routing_key": routing_key, "epsignal.hw": hw,
    }
    if message_id:
        attrs["messaging.message.id"] = message_id
    if correlation_id:
        attrs["messaging.message.conversation_id"] = correlation_id
    return _tracer.start_as_current_span(
        f"process {exchange} {template}", context=parent, kind=SpanKind.CONSUMER,
        links=links, attributes=attrs,
    )


# ------------------------------------------------------------------------------ intercept mode
def intercept_span(device: Device, hold):
    """The span of an intercept round trip (PRODUCER), in the call's trace: from the request to
    the outcome. The request carries its context; a verdict's becomes a link."""
    calls = contexts(device)
    parent = calls.get(hold.call, _ROOT)
    span = _tracer.start_span(
        f"intercept {routing.EVENT_KEYS['call.intercept']}", context=parent, kind=SpanKind.PRODUCER,
        attributes={"messaging.system": SYSTEM, "messaging.operation.name": "publish",
                    "messaging.operation.type": "send", "messaging.message.id": hold.id,
                    "epsignal.hw": device.hw, "epsignal.call": hold.call,
                    "epsignal.sig.type": hold.sig_type, "epsignal.to_device": hold.to,
                    "epsignal.intercept.deadline_ms": hold.rule.deadline_ms})
    if parent is _ROOT:
        calls.set(hold.call, _call_context(span))
    return span


def intercept_verdict(span, headers: dict | None) -> None:
    """A verdict arrived: its producer's context (``traceparent``) becomes a link of the span."""
    carrier = {k: v for k, v in (headers or {}).items() if isinstance(v, str)}
    if carrier:
        sc = trace.get_current_span(propagate.extract(carrier)).get_span_context()
        if sc.is_valid:
            span.add_link(sc)


def intercept_end(span, outcome: str, action: str) -> None:
    span.set_attribute("epsignal.intercept.outcome", outcome)
    span.set_attribute("epsignal.intercept.action", action)
    if outcome == "bad-verdict":
        span.set_status(Status(StatusCode.ERROR, "bad verdict"))
    span.end()


def current(span):
    """Make ``span`` current (events made meanwhile carry it): a token for :func:`detach`."""
    return otel_context.attach(trace.set_span_in_context(span))


def detach(token) -> None:
    otel_context.detach(token)


@contextmanager
def send_span(device: Device, call: int, sig_type: str):
    """The span of a Signaling the bridge sends for a command; the call joins this trace."""
    with _tracer.start_as_current_span(
        "send EpSignal Signaling", kind=SpanKind.PRODUCER,
        attributes={"epsignal.hw": device.hw, "epsignal.call": call, "epsignal.sig.type": sig_type},
    ) as span:
        contexts(device).set(call, _call_context(span))
        yield span
