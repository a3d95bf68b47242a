"""Prometheus metrics (prometheus-client). Labels never carry hw or call ids.

This module holds the instruments only and imports nothing of the bridge. Counters and gauges
are read at scrape time from a :class:`Snapshot` the bridge makes of its plain counters (a
custom collector), so the hot path pays nothing for them. The two latency histograms are
observed as things happen (one per forwarded frame, one per confirmed event), into plain bucket
counts (:class:`LatencyHistogram`) that a collector turns into a Prometheus histogram at scrape
time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

import msgspec
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry(auto_describe=True)


class FrameCounters:
    """Process-wide counts of frames from the PBX (plain ints: the hot path only adds)."""

    __slots__ = ("bad_frames", "forwarded", "frames_in")

    def __init__(self) -> None:
        self.frames_in = self.forwarded = self.bad_frames = 0


FRAMES = FrameCounters()


class LatencyHistogram:
    """A Prometheus histogram without labels, observed on the hot path: ``observe`` is a
    bisect and two additions (0.1 us; prometheus-client's ``Histogram.observe``, with a lock
    per bucket and sum, 0.6 us, three times per frame). Single-threaded, like the bridge."""

    __slots__ = ("bounds", "counts", "doc", "name", "sum")

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...],
                 registry: CollectorRegistry) -> None:
        self.name, self.doc, self.bounds = name, doc, tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound (+Inf)
        self.sum = 0.0
        registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.sum += value

    def collect(self) -> Iterator[Metric]:
        total, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            buckets.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=self.sum)


FORWARD_SECONDS = LatencyHistogram(
    "epsignal_forward_latency_seconds",
    "Frame read from the PBX until it was forwarded back (decode + send)",
    (5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1),
    REGISTRY,
)
PUBLISH_SECONDS = LatencyHistogram(
    "epsignal_publish_latency_seconds",
    "Event made until the broker confirmed it (includes time buffered during outages)",
    (1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1, 10, 60, 300),
    REGISTRY,
)

INTERCEPT_WAIT_SECONDS = LatencyHistogram(
    "epsignal_intercept_wait_seconds",
    "Time an intercepted message was held (request, verdict or fail policy, docs/INTERCEPT.md)",
    (1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1, 2, 4),
    REGISTRY,
)


class InterceptSnapshot(msgspec.Struct, frozen=True):
    """Intercept mode's figures: holds ended by outcome, held now, verdicts ignored (late or
    unknown id)."""

    outcomes: dict[str, int]
    held: int
    ignored: dict[str, int]


class LeaseSnapshot(msgspec.Struct, frozen=True):
    """The lease manager's figures (with EPSIGNAL_LEASES)."""

    held: int
    replicas: int
    handed_on: int
    wanted_detached: int
    #: lease queues found without an active consumer and lined up for again (bridge.leases.Orphans)
    repaired: int = 0


class BrokerSnapshot(msgspec.Struct, frozen=True):
    """The broker the link is connected to: its address (``host:port``), and the cluster name
    and version it reports."""

    address: str
    cluster: str
    version: str


class Snapshot(msgspec.Struct, frozen=True):
    """What the bridge's metrics read at a scrape, made by ``Bridge.snapshot()``: the collector
    knows this Struct, not the bridge's parts."""

    sessions: dict[str, int]
    broker_connected: bool
    broker_blocked: bool
    broker_blocks: int
    broker_reconnects: int
    broker_failovers: int
    pbx_reconnects: int
    login_failures: int
    events: dict[str, int]
    dropped: dict[str, int]
    buffered: int
    stalled_s: float
    publish_timeouts: int
    held_by_nacks: int
    unflushed: int
    commands: dict[tuple[str, str], int]
    broker: BrokerSnapshot | None = None
    leases: LeaseSnapshot | None = None
    intercept: InterceptSnapshot | None = None


class BridgeCollector:
    """Turns a :class:`Snapshot` into metric families at each scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        b = self.snapshot()
        g = GaugeMetricFamily("epsignal_pbx_sessions", "PBX sessions by state", labels=["state"])
        for state in ("connecting", "waiting-registration", "attached"):
            g.add_metric([state], b.sessions.get(state, 0))
        yield g
        yield GaugeMetricFamily("epsignal_devices_attached", "Devices whose signaling path the bridge is in",
                                value=b.sessions.get("attached", 0))
        yield GaugeMetricFamily("epsignal_broker_connected", "1 when the broker link is up",
                                value=int(b.broker_connected))
        info = GaugeMetricFamily("epsignal_broker_info", "1 for the broker address the link is connected "
                                 "to, with the cluster name and version the broker reports",
                                 labels=["address", "cluster", "version"])
        if b.broker is not None:
            info.add_metric([b.broker.address, b.broker.cluster, b.broker.version], 1)
        yield info
        yield CounterMetricFamily("epsignal_broker_failovers", "Connections made to another broker "
                                  "address than the previous connection's", value=b.broker_failovers)

        yield GaugeMetricFamily("epsignal_broker_blocked",
                                "1 while the broker blocks publishing (connection.blocked: memory or disk alarm)",
                                value=int(b.broker_blocked))
        yield CounterMetricFamily("epsignal_broker_blocks", "connection.blocked received from the broker",
                                  value=b.broker_blocks)
        c = CounterMetricFamily("epsignal_events", "Events by outcome", labels=["outcome"])
        for outcome, v in b.events.items():
            c.add_metric([outcome], v)
        yield c
        d = CounterMetricFamily("epsignal_events_dropped", "Events dropped unsent", labels=["reason"])
        for reason, v in b.dropped.items():
            d.add_metric([reason], v)
        yield d
        yield GaugeMetricFamily("epsignal_buffer_events", "Events buffered (waiting or in flight)",
                                value=b.buffered)
        yield GaugeMetricFamily("epsignal_publish_stalled_seconds",
                                "Seconds events have waited without any publisher confirm (0: none waiting)",
                                value=b.stalled_s)
        yield CounterMetricFamily("epsignal_publish_timeouts",
                                  "Confirms that did not come in time (each replaced the connection)",
                                  value=b.publish_timeouts)
        yield GaugeMetricFamily("epsignal_devices_held_by_nacks",
                                "Devices whose events wait behind an event the broker nacked",
                                value=b.held_by_nacks)
        yield GaugeMetricFamily("epsignal_events_unflushed",
                                "Events the last stop could not get confirmed within its grace (lost)",
                                value=b.unflushed)
        cm = CounterMetricFamily("epsignal_commands", "Commands by kind and outcome", labels=["command", "outcome"])
        for (verb, outcome), v in sorted(b.commands.items()):
            cm.add_metric([verb, outcome], v)
        yield cm
        r = CounterMetricFamily("epsignal_reconnects", "Reconnects by side", labels=["side"])
        r.add_metric(["pbx"], b.pbx_reconnects)
        r.add_metric(["broker"], b.broker_reconnects)
        yield r
        st = FRAMES
        f = CounterMetricFamily("epsignal_frames", "Frames from the PBX", labels=["kind"])
        f.add_metric(["received"], st.frames_in)
        f.add_metric(["forwarded"], st.forwarded)
        f.add_metric(["bad"], st.bad_frames)
        yield f
        yield CounterMetricFamily("epsignal_pbx_login_failures", "Refused AppWebsocket logins",
                                  value=b.login_failures)
        if b.intercept is not None:
            ix = b.intercept
            io = CounterMetricFamily("epsignal_intercept_outcomes", "Intercepted messages by how their "
                                     "hold ended (docs/INTERCEPT.md)", labels=["outcome"])
            for outcome, v in ix.outcomes.items():
                io.add_metric([outcome], v)
            yield io
            yield GaugeMetricFamily("epsignal_intercept_held", "Messages held for a verdict now",
                                    value=ix.held)
            iv = CounterMetricFamily("epsignal_intercept_verdicts_ignored", "Verdicts for a hold that "
                                     "had ended (late) or that was never known (unknown)", labels=["reason"])
            for reason, v in ix.ignored.items():
                iv.add_metric([reason], v)
            yield iv
        if b.leases is not None:
            lm = b.leases
            yield GaugeMetricFamily("epsignal_leases_held", "Device leases this replica holds", value=lm.held)
            yield GaugeMetricFamily("epsignal_leases_wanted_detached",
                                    "Device leases held here that say detached (a detach command; docs/SCALING.md)",
                                    value=lm.wanted_detached)
            yield GaugeMetricFamily("epsignal_replicas", "Live replicas, as heard on the presence exchange",
                                    value=lm.replicas)
            yield CounterMetricFamily("epsignal_leases_handed_on", "Idle devices handed on to another replica",
                                      value=lm.handed_on)
            yield CounterMetricFamily("epsignal_lease_repairs",
                                      "Lease queues this replica was not in line on and lined up for again: "
                                      "nobody held the device and the queue had no active consumer, or a "
                                      "holder's hand-on to it came straight back (docs/SCALING.md)",
                                      value=lm.repaired)


def registry_for(snapshot: Callable[[], Snapshot]) -> CollectorRegistry:
    """A registry with a bridge's own collector (one per bridge, so tests may run several)."""
    reg = CollectorRegistry(auto_describe=True)
    reg.register(BridgeCollector(snapshot))
    return reg


def render(bridge_registry: CollectorRegistry) -> bytes:
    return generate_latest(REGISTRY) + generate_latest(bridge_registry)
