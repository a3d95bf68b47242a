"""Prometheus metrics (prometheus-client). Labels never carry hw or call ids.

Counters and gauges are read from the bridge's own plain counters at scrape time (a custom
collector), so the hot path pays nothing for them; only the two latency histograms are observed
as things happen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from bridge.brokers import endpoint

if TYPE_CHECKING:
    from bridge.service import Bridge

REGISTRY = CollectorRegistry(auto_describe=True)


class FrameCounters:
    """Process-wide counts of frames from the PBX (plain ints: the hot path only adds)."""

    __slots__ = ("frames_in", "forwarded", "bad_frames")

    def __init__(self) -> None:
        self.frames_in = self.forwarded = self.bad_frames = 0


FRAMES = FrameCounters()

FORWARD_SECONDS = Histogram(
    "epsignal_forward_latency_seconds",
    "Frame read from the PBX until it was forwarded back (decode + send)",
    buckets=(5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1),
    registry=REGISTRY,
)
PUBLISH_SECONDS = Histogram(
    "epsignal_publish_latency_seconds",
    "Event made until the broker confirmed it (includes time buffered during outages)",
    buckets=(1e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 1, 10, 60, 300),
    registry=REGISTRY,
)


class BridgeCollector:
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def collect(self):
        b = self.bridge
        states = b.session_states()
        g = GaugeMetricFamily("epsignal_pbx_sessions", "PBX sessions by state", labels=["state"])
        for state in ("connecting", "waiting-registration", "attached"):
            g.add_metric([state], states.get(state, 0))
        yield g
        yield GaugeMetricFamily("epsignal_devices_attached", "Devices whose signaling path the bridge is in",
                                value=states.get("attached", 0))
        yield GaugeMetricFamily("epsignal_broker_connected", "1 when the broker link is up",
                                value=1 if b.link.ready else 0)
        info = GaugeMetricFamily("epsignal_broker_info", "1 for the broker address the link is connected "
                                 "to, with the cluster name and version the broker reports",
                                 labels=["address", "cluster", "version"])
        if b.link.ready and b.link.address:
            info.add_metric([endpoint(b.link.address), str(b.link.server.get("cluster_name", "")),
                             str(b.link.server.get("version", ""))], 1)
        yield info
        yield CounterMetricFamily("epsignal_broker_failovers", "Connections made to another broker "
                                  "address than the previous connection's", value=b.link.failovers)

        yield GaugeMetricFamily("epsignal_broker_blocked",
                                "1 while the broker blocks publishing (connection.blocked: memory or disk alarm)",
                                value=1 if b.link.blocked is not None else 0)
        yield CounterMetricFamily("epsignal_broker_blocks", "connection.blocked received from the broker",
                                  value=b.link.blocks)

        pub = b.publisher
        ps, bs = pub.stats, pub.buffer.stats
        c = CounterMetricFamily("epsignal_events", "Events by outcome", labels=["outcome"])
        for outcome, v in (("published", ps.published), ("confirmed", ps.confirmed),
                           ("returned", ps.returned), ("failed", ps.failed), ("nacked", ps.nacked),
                           ("made", bs.appended)):
            c.add_metric([outcome], v)
        yield c
        d = CounterMetricFamily("epsignal_events_dropped", "Events dropped unsent", labels=["reason"])
        d.add_metric(["buffer-full"], bs.dropped_full)
        d.add_metric(["too-old"], bs.dropped_age)
        d.add_metric(["nacked"], bs.dropped_nacked)
        d.add_metric(["unpublishable"], bs.dropped_invalid)
        yield d
        yield GaugeMetricFamily("epsignal_buffer_events", "Events buffered (waiting or in flight)",
                                value=len(pub.buffer))
        yield GaugeMetricFamily("epsignal_publish_stalled_seconds",
                                "Seconds events have waited without any publisher confirm (0: none waiting)",
                                value=pub.stalled_s())
        yield CounterMetricFamily("epsignal_publish_timeouts",
                                  "Confirms that did not come in time (each replaced the connection)",
                                  value=ps.timeouts)
        yield GaugeMetricFamily("epsignal_devices_held_by_nacks",
                                "Devices whose events wait behind an event the broker nacked",
                                value=pub.buffer.held_devices)
        yield GaugeMetricFamily("epsignal_events_unflushed",
                                "Events the last stop could not get confirmed within its grace (lost)",
                                value=pub.unflushed)

        cm = CounterMetricFamily("epsignal_commands", "Commands by kind and outcome", labels=["command", "outcome"])
        for (verb, outcome), v in sorted(b.consumer.stats.by_outcome.items()):
            cm.add_metric([verb, outcome], v)
        yield cm

        r = CounterMetricFamily("epsignal_reconnects", "Reconnects by side", labels=["side"])
        r.add_metric(["pbx"], b.pbx_reconnects())
        r.add_metric(["broker"], b.link.reconnects)
        yield r

        st = FRAMES
        f = CounterMetricFamily("epsignal_frames", "Frames from the PBX", labels=["kind"])
        f.add_metric(["received"], st.frames_in)
        f.add_metric(["forwarded"], st.forwarded)
        f.add_metric(["bad"], st.bad_frames)
        yield f
        yield CounterMetricFamily("epsignal_pbx_login_failures", "Refused AppWebsocket logins",
                                  value=b.login_failures())
        if b.leases is not None:
            lm = b.leases
            yield GaugeMetricFamily("epsignal_leases_held", "Device leases this replica holds",
                                    value=len(lm.tokens))
            yield GaugeMetricFamily("epsignal_replicas", "Live replicas, as heard on the presence exchange",
                                    value=len(lm.members.live))
            yield CounterMetricFamily("epsignal_leases_handed_on", "Idle devices handed on to another replica",
                                      value=lm.handed_on)


def registry_for(bridge: Bridge) -> CollectorRegistry:
    """A registry with the bridge's own collector (one per Bridge, so tests may run several)."""
    reg = CollectorRegistry(auto_describe=True)
    reg.register(BridgeCollector(bridge))
    return reg


def render(bridge_registry: CollectorRegistry) -> bytes:
    return generate_latest(REGISTRY) + generate_latest(bridge_registry)
