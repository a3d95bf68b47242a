"""``epsignal-bridge bench``: the performance harness (issue 8).

It drives the real bridge, run as its own process (``epsignal-bridge run`` configured by
``EPSIGNAL_*``), with a load generator that plays the PBX (:mod:`bridge.bench.loadgen`), and
the real RabbitMQ; a consumer bound with ``#`` to the run's own events exchange, in a process of
its own (:mod:`bridge.bench.consumer`), counts every event. Scenarios (``--scenarios``):

1. ``throughput``: Signaling frames per second sustained with every event confirmed and
   consumed, next to the raw aio-pika ceiling (the same bodies through a plain confirming
   publisher with the same window, :mod:`bridge.bench.ceiling`); the ratio is the headline.
2. ``latency``: hop latency (frame sent by the PBX -> event delivered to the consumer),
   p50/p99/p99.9, at a fixed offered load and at 80% of the maximum of (1); CPU per 1000 ev/s.
3. ``forwarding``: frame out -> forwarded frame back at the PBX, broker up, broker down and the
   bare echo floor, measured in turns for ``--rounds`` rounds (medians of the per-round ratios).
4. ``commands``: command published -> Signaling received by the PBX.
5. ``scale``: RSS and attach time of the bridge process for N devices (one session each).
6. ``codec``: msgspec decode + state + encode vs the same with the standard library's json.
7. ``tracing``: throughput with tracing off and with the OTel SDK on (no-op exporter).
8. ``peer``: the bridge (every event kind, and ``call.state`` only) against a hand-written
   peer of ~40 lines (:mod:`bridge.bench.peer`) under the same load generator and consumer,
   per frame: frames/s, forwarding and hop p99 at 500 frames/s, CPU per 10,000 frames (issue 19).
9. ``intercept``: setups held for a local decider (issue 18, :mod:`bridge.bench.intercept`):
   the verdict round trip, the extra forwarding latency of intercepted messages, and the
   devices without rules in the same run against a run without interception.

``--profile`` adds a throughput round under py-spy; plots go to ``--out``. Results: a table on
stdout and ``--json FILE``. docs/PERFORMANCE.md has the targets and a results table.
"""

from bridge.bench.options import add_arguments


def main(args) -> int:
    """Run the benchmark for parsed ``args`` (see :func:`add_arguments`); the exit code."""
    from bridge.bench.runner import main as run_main

    return run_main(args)


__all__ = ["add_arguments", "main"]
