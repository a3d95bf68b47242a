"""The producer writes the trace headers itself: the same as the global propagator."""

from __future__ import annotations


def test_tracing_writes_the_same_headers_as_the_propagator():
    from opentelemetry import baggage, propagate, trace
    from opentelemetry import context as otel_context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import TraceState

    from bridge import tracing

    tracer = TracerProvider().get_tracer("t")
    parent = trace.set_span_in_context(trace.NonRecordingSpan(trace.SpanContext(
        0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True,
        trace_flags=trace.TraceFlags(1), trace_state=TraceState([("k", "v")]))))
    for ctx in (None, parent, baggage.set_baggage("user", "x", parent)):
        token = otel_context.attach(ctx) if ctx is not None else None
        try:
            span = tracer.start_span("s")
            mine: dict = {}
            tracing.inject(mine, span)
            ref: dict = {}
            propagate.inject(ref, context=trace.set_span_in_context(span))
            assert mine == ref and "traceparent" in mine
        finally:
            if token is not None:
                otel_context.detach(token)
