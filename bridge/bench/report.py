"""The results table ``epsignal-bridge bench`` prints: one section per scenario that ran (in the
order below), then the targets, the checks and the errors. Text only: no I/O."""

from __future__ import annotations

from collections.abc import Callable

NOISE_NOTE = ("numbers depend on the machine and on what else runs on it (the bridge, the load "
              "generator, the consumer and RabbitMQ share its cores); compare runs on the same quiet machine")


def table(R: dict) -> str:
    """The results ``R`` (what the run returns, and writes as JSON) as text."""
    L: list[str] = []
    meta = R.get("meta", {})
    L.append(f"epsignal-bridge bench ({meta.get('mode')}; commit {meta.get('commit')}; {meta.get('cpus')} cpus; "
             f"RabbitMQ {meta.get('rabbitmq')}; harness loop {meta.get('harness_loop')}; "
             f"load {meta.get('loadavg_before')} -> {meta.get('loadavg_after')})")
    L.append(f"note: {NOISE_NOTE}")
    late = meta.get("timer_overshoot_us")
    if late:
        L.append(f"machine: a {late['sleep_us']:g} us sleep wakes late by p50 {late['p50']} / p99 {late['p99']} / "
                 f"max {late['max']} us ({late['sleeps']} sleeps before the scenarios, the machine idle: how "
                 "much of the latency tails below may be the machine's)")
    for key, section in SECTIONS:
        if R.get(key):
            L += section(R[key])
    L.append("\ntargets")
    for tg in R.get("targets", []):
        mark = {True: "ok  ", False: "MISS", None: "n/a "}[tg["met"]]
        L.append(f"  [{mark}] {tg['name']}: {tg['value']} (target {tg['target']})")
    L.append("\nchecks: " + ", ".join(f"{k}={'ok' if v else 'FAIL'}" for k, v in R.get("checks", {}).items()))
    for k, v in R.get("errors", {}).items():
        L.append(f"ERROR {k}: {v}")
    if R.get("plots"):
        L.append("plots: " + ", ".join(f"{v}" for v in R["plots"].values()))
    return "\n".join(L)


P50_P99 = ("p50", "p99")


def pct(s: dict | None, keys: tuple[str, ...] = ("p50", "p99", "p99.9")) -> str:
    """A latency summary (bridge.bench.stats.summary) as ``p50 / p99 / p99.9 unit (n=count)``."""
    if not isinstance(s, dict) or s.get("count", 0) == 0:
        return "n/a"
    return " / ".join(f"{s[k]}" for k in keys) + f" {s['unit']} (n={s['count']})"


def _throughput(t: dict) -> list[str]:
    L: list[str] = []
    L.append("\n[1] throughput (closed loop, every event confirmed and consumed)")
    L.append(f"  bridge : {t['bridge_frames_per_s']} frames/s = {t['bridge_events_per_s']} events/s "
             f"(median of {len(t['rounds'])}; {t['devices']} devices, window {t['window_per_session']}/session)")
    L.append(f"  ceiling: {t['ceiling_events_per_s']} events/s "
             f"(plain aio-pika, confirms, window {t['publish_window']})")
    L.append(f"  ratio  : {t['ratio']}   all events received: {t['all_events_received']}")
    for i, r in enumerate(t["rounds"]):
        b, c = r["bridge"], r["ceiling"]
        L.append(f"    round {i + 1}: bridge {b['events_per_s']} ev/s (cpu: bridge {b['bridge_cpu_pct']}%, "
                 f"harness {b['harness_cpu_pct']}%, consumer {b['consumer_cpu_pct']}%, broker "
                 f"{b['broker_cpu_pct']}%, machine busy {b['machine_busy_pct']}%); ceiling "
                 f"{c['events_per_s']} ev/s (cpu: publisher {c['publisher_cpu_pct']}%, harness "
                 f"{c['harness_cpu_pct']}%, consumer {c['consumer_cpu_pct']}%, broker "
                 f"{c['broker_cpu_pct']}%, machine busy {c['machine_busy_pct']}%)")
    L.append(f"  hop latency while saturated p50/p99/p99.9: {pct(t['rounds'][0]['bridge']['hop_ms'])}")
    return L


def _latency(lat: dict) -> list[str]:
    L: list[str] = []
    L.append("\n[2] hop latency, frame from the PBX -> event delivered (p50 / p99 / p99.9)")
    for key, r in lat.items():
        if isinstance(r, dict):
            L.append(f"  {key:16s} @ {r['achieved_events_per_s']} ev/s: {pct(r.get('hop_ms'))}"
                     f"  (all received: {r.get('all_events_received')}; machine busy "
                     f"{r['cpu_window'].get('machine_busy_pct')}%)")
        else:
            L.append(f"  {key:16s}: {r}")
    return L


def _forwarding(fw: dict) -> list[str]:
    L: list[str] = []
    rounds = fw.get("broker_up", {}).get("rounds")
    L.append("\n[3] forwarding latency, frame out -> forwarded frame back (p50 / p99 / p99.9 of "
             f"{rounds} round(s); then each round's p99)")
    for key in ("broker_up", "broker_down", "floor_echo"):
        if "forward_us" in fw.get(key, {}):
            r = fw[key]
            per = " / ".join(f"{x:g}" for x in r.get("p99_us_per_round", ()))
            L.append(f"  {key:12s}: {pct(r['forward_us'])}  (p99 per round {per} us; machine busy "
                     f"{r.get('machine_busy_pct')}%)")
    if fw.get("p99_up_over_floor") is not None:
        L.append(f"  p99 broker up / echo floor, median of the rounds: {fw['p99_up_over_floor']}")
    if fw.get("p99_down_over_up") is not None:
        L.append(f"  p99 broker down / broker up, median of the rounds: {fw['p99_down_over_up']}")
    return L


def _commands(c: dict) -> list[str]:
    L: list[str] = []
    L.append("\n[4] command latency, published -> Signaling at the PBX (p50 / p99 / p99.9)")
    L.append(f"  {pct(c['latency_ms'])}  ({c['received']}/{c['commands']} at {c['rate_per_s']:g}/s)")
    return L


def _scale(s: dict) -> list[str]:
    L: list[str] = []
    L.append("\n[5] scale (bridge process)")
    L.append("  devices  attach_s  rss_MB  hwm_MB  idle_cpu_%")
    for r in s["runs"]:
        if "rss_mb" in r:
            L.append(f"  {r['devices']:7d}  {r['attach_s']!s:>8}  {r['rss_mb']:6}  {r['hwm_mb']:6}  "
                     f"{r['idle_cpu_pct']:10}")
        else:
            L.append(f"  {r['devices']:7d}  {r.get('skipped') or r.get('error')}")
    if s.get("rss_kb_per_device") is not None:
        L.append(f"  ~{s['rss_kb_per_device']} kB per device")
    return L


def _cpu(cpu: dict) -> list[str]:
    L: list[str] = []
    L.append(f"  CPU: {cpu['cpu_pct_of_one_core_per_1000_eps']}% of a core per 1000 events/s "
             f"(at {cpu['at_events_per_s']} ev/s: {cpu['bridge_cpu_pct']}%)"
             + (f"; at 80%: {cpu['at_80pct']['cpu_pct_of_one_core_per_1000_eps']}% per 1000 ev/s"
                if "at_80pct" in cpu else ""))
    return L


def _codec(k: dict) -> list[str]:
    L: list[str] = []
    L.append("\n[6] codec, per message (decode + call state + encode the events)")
    L.append(f"  msgspec {k['msgspec_full_us']} us, stdlib json {k['stdlib_full_us']} us: x{k['speedup_full']}"
             f"  (decode only: {k['msgspec_decode_us']} vs {k['stdlib_decode_us']} us, x{k['speedup_decode']}; "
             f"same events: {k['equivalent_events']})")
    return L


def _peer(pe: dict) -> list[str]:
    L: list[str] = []
    L.append(f"\n[8] against the hand-written peer (issue 19): {pe['devices']} devices, window "
             f"{pe['window_per_session']}/session, {pe['frames_per_round']} frames per round, "
             f"{len(pe['rounds'])} round(s), open loop at {pe['rate_frames_per_s']:g} frames/s; medians")
    L.append("  process          ev/frame  frames/s  cpu_s/10k frames (closed / paced)  "
             "fwd p50/p99 us  hop p50/p99 ms")
    for name in ("peer", "bridge_all", "bridge_state"):
        v = pe[name]
        L.append(f"  {name:16s} {v['events_per_frame']:8d}  {v['frames_per_s']!s:>8}  "
                 f"{v['cpu_s_per_10k_frames']!s:>8} / {v['cpu_s_per_10k_frames_at_rate']!s:<24}"
                 f"{v['forward_p50_us']} / {v['forward_p99_us']}   {v['hop_p50_ms']} / {v['hop_p99_ms']}")
    for name, r in pe["ratios"].items():
        L.append(f"  {name} / peer: frames/s x{r['frames_per_s']}, forwarding p99 x{r['forward_p99']}, "
                 f"hop p99 x{r['hop_p99']}, CPU per frame x{r['cpu_per_frame']}")
    return L


def _tracing(tr: dict) -> list[str]:
    L: list[str] = []
    L.append(f"\n[7] tracing on vs off (throughput), off {tr['off_events_per_s']} ev/s")
    for name, label in (("on", f"on, {tr['sampler']}"), ("every_span", "on, every span sampled")):
        v = tr[name]
        if v["cost_pct"] is not None:
            L.append(f"  {label}: {v['events_per_s']} ev/s, cost {v['cost_pct']}% "
                     f"({v['spans_exported']} spans, {v['spans_per_frame']} per frame)")
        else:
            L.append(f"  {label}: n/a: {v.get('reason')} ({v['events_per_s']} ev/s)")
    return L


def _intercept(x: dict) -> list[str]:
    """Scenario 9 (bridge.bench.intercept)."""

    rt = x.get("verdict_round_trip_ms", {})
    ex, od = x["extra_forward_us"], x["other_devices"]
    return [
        f"\n[9] intercept: {x['intercepted_devices']} of {x['devices']} devices hold their setup "
        f"for a local decider, @ {x['offered_events_per_s']:g} ev/s, {x['rounds']} round(s) "
        f"off/on (p50 / p99)",
        f"  verdict round trip (the bridge's waited_ms): {pct(rt, P50_P99)}; outcomes {x.get('outcomes')}",
        *(f"  intercepted setup, {k.replace('_', ' ')}: {pct(v, P50_P99)}"
          for k, v in x.get("intercepted_setup_legs_ms", {}).items()),
        f"  verdicts that came after their setup was forwarded (timed out, fail-open): "
        f"{x['on'].get('verdicts_after_the_frame')}",
        f"  floor: the harness's own request -> decider -> reply through the broker: "
        f"{pct(x.get('broker_floor_ms', {}), P50_P99)}",
        f"  forwarding, intercepted setups: {pct(x['on']['forward_us']['ruled.setup'], P50_P99)} "
        f"(off: {pct(x['off']['forward_us']['ruled.setup'], P50_P99)}); extra {ex['intercepted_setup']['p50']} / "
        f"{ex['intercepted_setup']['p99']} us",
        f"  forwarding, later messages of those devices: extra {ex['same_devices_other_messages']['p50']}"
        f" / {ex['same_devices_other_messages']['p99']} us",
        f"  forwarding, devices without rules: {pct(od['forward_us_on'], P50_P99)} (off: "
        f"{pct(od['forward_us_off'], P50_P99)}); on/off x{od['p50_on_over_off']} / x{od['p99_on_over_off']}",
    ]


def _profile(p: dict) -> list[str]:
    L: list[str] = []
    L.append(f"\nprofile ({p['tool']}): {p.get('file')}")
    a = p.get("analysis")
    if a:
        L.append("  self time by component: " + ", ".join(
            f"{x['component']} {x['pct']}%" for x in a["self_by_component"][:8]))
        L.append("  top self: " + "; ".join(f"{x['function']} {x['pct']}%" for x in a["top_self"][:8]))
    return L


#: the sections of the table, in order: the results' key, and its lines (when the scenario ran)
SECTIONS: tuple[tuple[str, Callable[[dict], list[str]]], ...] = (
    ("throughput", _throughput),
    ("latency", _latency),
    ("forwarding", _forwarding),
    ("commands", _commands),
    ("scale", _scale),
    ("cpu", _cpu),
    ("codec", _codec),
    ("peer", _peer),
    ("tracing", _tracing),
    ("intercept", _intercept),
    ("profile", _profile),
)
