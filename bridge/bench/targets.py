"""The benchmark's targets (docs/PERFORMANCE.md), judged from a run's results. No I/O."""

from __future__ import annotations

import argparse


def targets(R: dict, o: argparse.Namespace) -> list[dict]:
    """The performance targets (docs/PERFORMANCE.md) against the results ``R``: met, missed, or
    None (not measured in this run)."""
    out = []

    def add(name: str, target: str, value, met: bool | None) -> None:
        out.append({"name": name, "target": target, "value": value, "met": met})

    t = R.get("throughput", {})
    ratio = t.get("ratio")
    add("throughput vs raw aio-pika ceiling", ">= 0.9", ratio, None if ratio is None else ratio >= 0.9)
    fixed = R.get("latency", {}).get("fixed", {})
    hop99 = fixed.get("hop_ms", {}).get("p99") if isinstance(fixed, dict) else None
    add(f"hop p99 @ {o.latency_rate:g} ev/s (ms)", "< 5", hop99, None if hop99 is None else hop99 < 5)
    fw = R.get("forwarding", {})
    up99 = fw.get("broker_up", {}).get("forward_us", {}).get("p99")
    down99 = fw.get("broker_down", {}).get("forward_us", {}).get("p99")
    add("forwarding p99, broker up (us)", "< 1000", up99, None if up99 is None else up99 < 1000)
    down_up = fw.get("p99_down_over_up")  # the median of the rounds' ratios
    add("forwarding p99, broker down (us)", "< 1000, within 25% (median of the rounds) or 100 us of broker up",
        down99, None if down99 is None or up99 is None or down_up is None else
        down99 < 1000 and (down_up <= 1.25 or down99 <= up99 + 100))
    floor = fw.get("p99_up_over_floor")
    add("forwarding p99, broker up / bare echo floor (median of the rounds)", "<= 1.1", floor,
        None if floor is None else floor <= 1.1)
    big = next((r for r in R.get("scale", {}).get("runs", []) if r.get("devices") == 10000 and "rss_mb" in r), None)
    add("10,000 devices: RSS (MB)", "< 250", big and big["hwm_mb"], None if big is None else big["hwm_mb"] < 250)
    add("10,000 devices: attached (s)", "< 30", big and big["attach_s"],
        None if big is None else big["attach_s"] < 30)
    pr = R.get("peer", {}).get("ratios", {})
    if pr:
        rate = o.peer_rate
        for name, label, need in (("bridge_state", "call.state only", 1.5), ("bridge_all", "every kind", 1.0)):
            v = pr.get(name, {}).get("frames_per_s")
            add(f"frames/s vs hand-written peer, {label}", f">= {need}", v, None if v is None else v >= need)
        for name, label in (("bridge_state", "call.state only"), ("bridge_all", "every kind")):
            for key, what in (("forward_p99", "forwarding p99"), ("hop_p99", "hop p99")):
                v = pr.get(name, {}).get(key)
                ok = None if v is None else v <= 1.0
                add(f"{what} @ {rate:g} frames/s vs peer, {label} (ratio)", "<= 1.0", v, ok)
    tr = R.get("tracing", {})
    cost = tr.get("cost_pct")
    add(f"tracing cost (% throughput; {tr.get('sampler', 'the chart sampler')})", "< 15",
        cost if tr.get("status") == "ok" else "n/a", None if cost is None else cost < 15)
    return out
