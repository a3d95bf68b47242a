"""Scenario 9, ``intercept`` (issue 18, docs/INTERCEPT.md): what holding messages for a verdict
costs.

Two bridges side by side, the same open-loop load (``--latency-rate`` events/s for
``--latency-duration`` s, the first ``--warmup`` s left out) on each in turn, ``--rounds``
times (samples pooled; alternating, so that the machine's drift hits both alike): ``off``
without intercept rules, ``on`` with ``EPSIGNAL_INTERCEPT`` holding the ``setup`` toward the
device of the first half of the devices, and a local decider in a process of its own (:class:`Decider`: an exclusive
auto-delete queue bound to ``device.*.call.*.intercept``, answering ``forward`` at once). The
load generator sorts every forwarded frame by device half and kind (setup or other), so that:

- ``verdict_round_trip_ms``: the bridge's own round trip (hold -> verdict in), the
  ``waited_ms`` of its ``call.intercepted`` events (the bridge's loop clock: 1 ms steps under
  uvloop);
- ``intercepted_setup_legs_ms``: the way of an intercepted setup decided by its verdict, in
  three legs on the machine's monotonic clock: frame sent -> request at the decider, at the
  decider, verdict -> frame back;
- ``broker_floor_ms``: the harness's own request -> decider -> reply round trips through the
  broker (FLOOR_PINGS after each round, one at a time): the part of the round trip that is the
  broker's and the decider's, on this machine at that time;
- ``extra_forward_us``: what intercepted setups take more than the same devices' setups on
  the ``off`` bridge (p50, p99), and the same for the other messages of those devices (a message
  that comes while its call's setup is held waits behind it);
- ``other_devices``: the devices without rules on the ``on`` bridge against the same devices
  on the ``off`` one (p50, p99 ratios): the traffic that is not intercepted is not slowed down.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import Counter, defaultdict

import aio_pika
import aiormq
import msgspec
from pamqp.commands import Basic

from bridge import routing
from bridge.bench import stats
from bridge.bench.env import Env
from bridge.bench.frames import hw_id
from bridge.bench.measure import Bench
from bridge.bench.proc import pipes
from bridge.bench.stats import rounded


SETUP = b'"type":"setup"'
CALL = re.compile(rb'"call":(\d+)')
now_ns = time.monotonic_ns
#: generous: a verdict of the local decider never misses it, a miss would show as a timeout
DEADLINE_MS = 1000
GROUPS = ("ruled", "other")  # the devices with rules in the `on` run, the others
KINDS = ("setup", "other")
#: request/verdict round trips of the harness itself through broker and decider, per round
FLOOR_PINGS = 100


class _Request(msgspec.Struct):
    hw: str
    call: int


_request = msgspec.json.Decoder(_Request)


class Decider:
    """The local decider, its own process (``python -m bridge.bench.intercept URL EXCHANGE``, as
    a consumer of the bus would run): answers every intercept request ``forward`` at once (to
    its reply_to, with its correlation_id). Lean, so that the harness's decider is not what is
    measured: uvloop, consuming and publishing on aio-pika's underlying aiormq channel (as the
    bench's consumer does). Prints ``ready`` once bound; on ``report`` from stdin prints what it
    saw as JSON and ends."""

    def __init__(self, url: str, exchange: str) -> None:
        self.url = url
        self.exchange = exchange
        self.answered = 0
        self._raw: aiormq.abc.AbstractChannel | None = None
        #: [hw, call, request in, verdict out] (monotonic ns: the load generator's clock)
        self.seen: list[tuple[str, int, int, int]] = []

    async def run(self) -> None:
        async with await aio_pika.connect(self.url) as conn:
            ch = await conn.channel(publisher_confirms=False)
            ex = await ch.get_exchange(self.exchange, ensure=False)
            requests = await ch.declare_queue(exclusive=True, auto_delete=True)
            await requests.bind(ex, routing.binding("call.intercept"))
            raw = self._raw = await ch.get_underlay_channel()
            await raw.basic_consume(requests.name, self._on_request, no_ack=True)
            print("ready", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            print(json.dumps({"answered": self.answered, "seen": self.seen}), flush=True)

    async def _on_request(self, msg: aiormq.abc.DeliveredMessage) -> None:
        t_in = now_ns()
        raw = self._raw
        assert raw is not None  # consuming on it
        props = msg.header.properties
        req = _request.decode(msg.body)
        body = b'{"v":1,"id":%s,"verdict":"forward"}' % msgspec.json.encode(props.correlation_id)
        # not mandatory: RabbitMQ 3.10 returns a mandatory message to a direct reply-to
        # pseudo-queue (NO_ROUTE) even when it delivered it
        assert props.reply_to is not None  # the bridge's requests name their direct reply-to
        await raw.basic_publish(body, routing_key=props.reply_to, properties=Basic.Properties(
            correlation_id=props.correlation_id))
        self.seen.append((req.hw, req.call, t_in, now_ns()))
        self.answered += 1


class Outcomes:
    """The bridge's ``call.intercepted`` events: outcomes and round trips (``waited_ms``)."""

    def __init__(self) -> None:
        self.conn: aio_pika.abc.AbstractConnection | None = None
        self.counts: Counter = Counter()
        self.waited_ns: list[int] = []

    async def open(self, url: str, exchange: str) -> None:
        self.conn = await aio_pika.connect(url)
        ch = await self.conn.channel()
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        await q.bind(await ch.get_exchange(exchange, ensure=False), routing.binding("call.intercepted"))
        await q.consume(self._on_event, no_ack=True)

    async def _on_event(self, msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        ev = msgspec.json.decode(msg.body)
        self.counts[ev["outcome"]] += 1
        self.waited_ns.append(int(ev["waited_ms"] * 1e6))

    async def wait(self, n: int, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while sum(self.counts.values()) < n:
                    await asyncio.sleep(0.05)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        if self.conn is not None:
            await self.conn.close()


async def broker_floor(url: str, exchange: str, n: int) -> list[int]:
    """``n`` request/verdict round trips through the broker and the decider, one at a time, from
    the harness: what the bridge's round trip cannot go below on this machine now (ns)."""
    out: list[int] = []
    async with await aio_pika.connect(url) as conn:
        ch = await conn.channel(publisher_confirms=False)
        got: asyncio.Queue = asyncio.Queue()
        reply_q = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)

        async def on_reply(_m: aio_pika.abc.AbstractIncomingMessage) -> None:
            got.put_nowait(now_ns())

        await reply_q.consume(on_reply, no_ack=True)
        ex = await ch.get_exchange(exchange, ensure=False)
        for i in range(n):
            t0 = now_ns()
            await ex.publish(aio_pika.Message(b'{"hw":"floor","call":%d}' % i, correlation_id=str(i),
                                              reply_to="amq.rabbitmq.reply-to"),
                             "device.floor.call.0.intercept", mandatory=False)
            out.append(await asyncio.wait_for(got.get(), 10) - t0)
            await asyncio.sleep(0.01)
    return out


async def start_decider(bench: Bench, exchange: str) -> asyncio.subprocess.Process:
    with open(bench.out / "intercept-decider.log", "ab") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge.bench.intercept", bench.amqp, exchange,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            limit=1 << 26)  # its report is one line of every request seen
    line = await asyncio.wait_for(pipes(proc)[1].readline(), 30)
    if line.strip() != b"ready":
        raise RuntimeError(f"the decider did not start: {line!r} (see "
                           f"{bench.out / 'intercept-decider.log'})")
    return proc


async def decider_report(proc: asyncio.subprocess.Process) -> dict:
    stdin, stdout = pipes(proc)
    stdin.write(b"report\n")
    await stdin.drain()
    line = await asyncio.wait_for(stdout.readline(), 30)
    await asyncio.wait_for(proc.wait(), 10)
    return json.loads(line)


async def run(bench: Bench) -> None:
    """The scenario; results in ``bench.results["intercept"]``, checks in ``bench.checks``."""
    o = bench.o
    n = o.devices
    ruled = {hw_id(i) for i in range(n // 2)}
    rules = ";".join(f"{hw}=setup:device" for hw in sorted(ruled))
    out: dict = {"devices": n, "intercepted_devices": len(ruled), "rule": "setup:device",
                 "deadline_ms": DEADLINE_MS, "offered_events_per_s": o.latency_rate,
                 "duration_s": o.latency_duration, "warmup_s": o.warmup, "rounds": o.rounds}
    names = ("off", "on")
    envs = {name: Env(bench, f"intercept-{name}", n, extra_env=extra) for name, extra in (
        ("off", {}), ("on", {"EPSIGNAL_INTERCEPT": rules,
                             "EPSIGNAL_INTERCEPT_DEADLINE_MS": str(DEADLINE_MS)}))}
    samples: dict[str, dict[tuple[str, str], list[int]]] = {k: defaultdict(list) for k in names}
    #: (hw, call) of an intercepted setup -> its send stamp and the time it came back
    back: dict[tuple[str, int], tuple[int, int]] = {}
    decider = outcomes = None
    try:
        for name, env in envs.items():
            await env.start()

            def tap(s, data: bytes, stamp: int, t: int, mine=samples[name], on=name == "on") -> None:
                setup = SETUP in data
                mine[("ruled" if s.hw in ruled else "other",
                      "setup" if setup else "other")].append(t - stamp)
                if on and setup and s.hw in ruled:
                    call = CALL.search(data)
                    assert call is not None  # every frame the load generator makes names its call
                    back[(s.hw, int(call[1]))] = (stamp, t)

            env.lg.tap = tap
        outcomes = Outcomes()
        await outcomes.open(bench.amqp, envs["on"].names.events)
        decider = await start_decider(bench, envs["on"].names.events)
        runs: dict[str, list[dict]] = {k: [] for k in names}
        floor: list[int] = []
        for _ in range(o.rounds):  # alternating, so that the machine's drift hits both alike
            for name in names:
                r = await bench.paced_run(envs[name], o.latency_rate, o.latency_duration, o.warmup)
                runs[name].append(r)
            floor += await broker_floor(bench.amqp, envs["on"].names.events, FLOOR_PINGS)
        out["broker_floor_ms"] = stats.summary(floor, "ms")
        for name in names:
            out[name] = {
                "achieved_events_per_s": [r["achieved_events_per_s"] for r in runs[name]],
                "all_forwards_back": all(r["all_forwards_back"] for r in runs[name]),
                "all_events_received": all(r.get("all_events_received") for r in runs[name]),
                "bridge_cpu_pct": [r["bridge_cpu_pct"] for r in runs[name]],
                "machine_busy_pct": [r["cpu_window"].get("machine_busy_pct") for r in runs[name]],
                "forward_us": {f"{g}.{k}": stats.summary(samples[name][(g, k)], "us")
                               for g in GROUPS for k in KINDS}}
        # every setup sent to a ruled device was held: one outcome each (a device's frame maker
        # is at call `call`, step `step` of the cycle; step 0 is the setup)
        held = sum(s.maker.call - 1 + (s.maker.step > 0) for s in envs["on"].lg.order
                   if s.hw in ruled)
        out["on"]["held"] = held
        out["on"]["outcomes_complete"] = await outcomes.wait(held, 30)
        report = await decider_report(decider)
        out["on"]["requests_answered"] = report["answered"]
        # the legs of an intercepted setup decided by its verdict: frame sent -> request at the
        # decider, at the decider, verdict -> frame back (a verdict after the frame came back
        # was late: the hold had timed out, fail-open; counted); the floor's pings are not setups
        legs: dict[str, list[int]] = defaultdict(list)
        late = 0
        for hw, call, t_in, t_out in report["seen"]:
            if (hw, call) in back:
                stamp, t = back[(hw, call)]
                if t_out > t:
                    late += 1
                    continue
                legs["to_decider"].append(t_in - stamp)
                legs["at_decider"].append(t_out - t_in)
                legs["from_decider"].append(t - t_out)
        out["on"]["verdicts_after_the_frame"] = late
        out["outcomes"] = dict(outcomes.counts)
        out["verdict_round_trip_ms"] = stats.summary(outcomes.waited_ns, "ms")
        out["intercepted_setup_legs_ms"] = {k: stats.summary(v, "ms") for k, v in legs.items()}
    finally:
        if decider is not None and decider.returncode is None:
            decider.kill()
            await decider.wait()
        if outcomes is not None:
            await outcomes.close()
        for env in envs.values():
            await env.stop()

    def delta(group: str, kind: str) -> dict:
        a = out["on"]["forward_us"][f"{group}.{kind}"]
        b = out["off"]["forward_us"][f"{group}.{kind}"]
        return {q: rounded(a[q] - b[q], 1) if a[q] is not None and b[q] is not None else None
                for q in ("p50", "p99")}

    out["extra_forward_us"] = {"intercepted_setup": delta("ruled", "setup"),
                               "same_devices_other_messages": delta("ruled", "other")}
    on_other = stats.summary(samples["on"][("other", "setup")] + samples["on"][("other", "other")], "us")
    off_other = stats.summary(samples["off"][("other", "setup")] + samples["off"][("other", "other")], "us")
    out["other_devices"] = {
        "forward_us_on": on_other, "forward_us_off": off_other,
        **{f"{q}_on_over_off": rounded(on_other[q] / off_other[q], 2) if on_other[q] and off_other[q] else None
           for q in ("p50", "p99")}}
    bench.results["intercept"] = out
    # every hold ended, forwarded: on the verdict or, past the deadline (a busy machine), by
    # fail-open; how many timed out is a number of the run, not a check
    outcomes = out.get("outcomes", {})
    bench.checks["intercept_all_forwarded"] = (
        all(out[k]["all_forwards_back"] and out[k]["all_events_received"] for k in ("off", "on"))
        and out["on"].get("outcomes_complete", False)
        and set(outcomes) <= {"forward", "timeout"} and outcomes.get("forward", 0) > 0)


if __name__ == "__main__":
    from bridge.main import loop_factory

    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        runner.run(Decider(sys.argv[1], sys.argv[2]).run())
