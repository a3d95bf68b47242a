"""``python -m bridge.bench.bridge_proc [run options]``: ``epsignal-bridge run``, instrumented.

Environment (all optional; the bridge ignores these names):

``EPSIGNAL_BENCH_TRACING=sdk``
    Tracing on with the OpenTelemetry SDK in process: a ``TracerProvider`` with a
    ``BatchSpanProcessor`` (the production setup) whose exporter counts the spans and drops
    them (no network, no serialisation: what is measured is the bridge's own cost of making
    spans). It is handed to ``bridge.tracing.configure(provider)``; the ``configure()`` that
    ``run`` calls afterwards (which reads ``OTEL_*``) is kept from turning it off again.
``EPSIGNAL_BENCH_PYINSTRUMENT=FILE``
    The whole run under pyinstrument; FILE.html and FILE.txt are written at exit.
``EPSIGNAL_BENCH_STATUS=FILE``
    JSON written at exit: ``{"tracing": "on" | "unavailable: why" | "off", "spans": n}``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter


class _SpanCount:
    """How many spans the bench's exporter was handed (it counts them and forgets them)."""

    def __init__(self) -> None:
        self.spans = 0


def _counting_exporter(count: _SpanCount) -> SpanExporter:
    """A SpanExporter that counts into ``count`` and drops the spans."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    class Counting(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            count.spans += len(spans)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return True

    return Counting()


def _setup_tracing(status: dict) -> tuple[TracerProvider, _SpanCount] | tuple[None, None]:
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from bridge import tracing
    except ImportError as e:
        status["tracing"] = f"unavailable: {e}"
        return None, None
    configure = getattr(tracing, "configure", None)
    if configure is None:
        status["tracing"] = "unavailable: bridge.tracing has no configure()"
        return None, None
    count = _SpanCount()
    provider = TracerProvider(resource=Resource.create({"service.name": "epsignal-bridge-bench"}))
    provider.add_span_processor(BatchSpanProcessor(_counting_exporter(count)))
    try:
        on = configure(provider)
    except Exception as e:  # an older or different tracing module: measure without
        status["tracing"] = f"unavailable: configure(provider) failed: {type(e).__name__}: {e}"
        return None, None
    if on is False:
        status["tracing"] = "unavailable: configure(provider) returned False"
        return None, None
    tracing.configure = lambda provider=None: True  # run() calls configure() again from OTEL_*
    status["tracing"] = "on"
    return provider, count


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    status: dict = {"tracing": "off", "spans": 0}
    provider, count = None, None
    if os.environ.get("EPSIGNAL_BENCH_TRACING") == "sdk":
        provider, count = _setup_tracing(status)
    profiler = None
    prof_file = os.environ.get("EPSIGNAL_BENCH_PYINSTRUMENT")
    if prof_file:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
    from bridge.cli import main as cli_main

    try:
        rc = cli_main(["run", *argv])
    finally:
        if profiler is not None and prof_file:
            profiler.stop()
            with open(prof_file + ".html", "w") as f:
                f.write(profiler.output_html())
            with open(prof_file + ".txt", "w") as f:
                f.write(profiler.output_text(unicode=False, color=False, show_all=False))
        if provider is not None and count is not None:
            provider.force_flush()
            status["spans"] = count.spans
            provider.shutdown()
        path = os.environ.get("EPSIGNAL_BENCH_STATUS")
        if path:
            with open(path, "w") as f:
                json.dump(status, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
