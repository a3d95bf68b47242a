"""Faults on the PBX side, injected for real: refused logins, slow answers, malformed frames, a cut
TCP connection, one device's session dying. Each test asserts what the bridge does and what a
consumer of the bus sees.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import pytest

from bridge.metrics import FRAMES
from bridge.protocol.messages import CallState
from tests.conftest import attached
from tests.faults.helpers import eventually, http_port
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.broker


def figures(name: str, **kw) -> None:
    """The figures of a run, for docs/RELIABILITY.md (shown with pytest -s)."""
    print(f"\nFIGURES {name}: " + " ".join(f"{k}={v}" for k, v in kw.items()))


def state_of(call, state, hw=None):
    return lambda e: (e.body["type"] == "call.state" and e.body["call"] == call
                      and e.body["state"] == state and (hw is None or e.body["hw"] == hw))


async def released_all(q, calls: set[tuple[str, int]], timeout: float) -> list:
    """Every event until each (hw, call) in ``calls`` was seen released."""
    left, seen = set(calls), []
    async with asyncio.timeout(timeout):
        while left:
            e = await q.get(timeout)
            seen.append(e)
            if e.body["type"] == "call.state" and e.body["state"] == "released":
                left.discard((e.body["hw"], e.body["call"]))
    return seen


def assert_seq_contiguous(events, hw):
    seqs = [e.body["seq"] for e in events if e.body["hw"] == hw]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs


# ------------------------------------------------------------------------------- refused logins
async def test_refused_logins_back_off_and_attach_once_allowed(sim, bus, settings_for, start_bridge, caplog):
    """The PBX refuses every new login while it still serves the sessions it has: the device
    already attached keeps its calls; the new one is retried every login_retry_s (not in a
    tight loop), its attach command is answered with an error, and it attaches once logins are
    allowed again."""
    caplog.set_level(logging.WARNING, logger="bridge")
    hw_ok, hw_new = sim.hw(1), sim.hw(2)
    q = await bus.bind("device.#")
    retry_s = 1.0
    bridge = await start_bridge(settings_for(sim, devices=hw_ok, login_retry_s=retry_s, attach_timeout_s=2.5))
    await q.until(attached(hw_ok))

    sim.faults.refuse_logins = True
    failed0 = sim.stats()["logins_failed"]
    t0 = time.monotonic()
    reply = await bus.command(hw_new, "attach")  # waits attach_timeout_s for an AttachResult
    assert reply["ok"] is False and "no AttachResult" in reply["error"] and "keeps trying" in reply["error"]
    # the PBX still serves the session it had: a call of the attached device completes
    call = await sim.place_call(hw_ok, direction="in", hold_s=0.1)
    await q.until(state_of(call, "released"))
    await asyncio.sleep(max(0.0, 4.0 - (time.monotonic() - t0)))
    window = time.monotonic() - t0
    attempts = sim.stats()["logins_failed"] - failed0
    # one attempt at once, then one every retry_s: no tight loop (a tight loop makes hundreds)
    assert 2 <= attempts <= window / retry_s + 1, (attempts, window)
    assert bridge.pbx.runners[hw_new].login_failures >= attempts - 1
    assert bridge.pbx.login_failures >= attempts - 1
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "bridge.pbx"]
    assert errors and all(hw_new in r.getMessage() for r in errors)
    msg = errors[0].getMessage()
    assert "refused" in msg and "EPSIGNAL_PBX_PASSWORD" in msg and "retry in" in msg, msg
    assert sim.stats()["attached_devices"] == 1
    assert bridge.pbx.runners[hw_ok].reconnects == 0

    sim.faults.refuse_logins = False
    t1 = time.monotonic()
    await q.until(attached(hw_new), timeout=retry_s + 5)
    took = time.monotonic() - t1
    assert sim.stats()["attached_devices"] == 2 and sim.stats()["calls_stalled"] == 0
    call = await sim.place_call(hw_new, direction="in", hold_s=0.1)
    await q.until(state_of(call, "released"))
    figures("refused-logins", window_s=round(window, 1), login_attempts=attempts,
                                     attached_after_allow_s=round(took, 2))


# ------------------------------------------------------------------------------- slow PBX
async def test_slow_pbx_answers_attach_and_calls_still_complete(sim, bus, settings_for, start_bridge):
    """Every frame from the PBX 300 ms late: the login and attach take about a second, the
    attach command is answered ok, and calls complete without stalling."""
    sim.delay_ms = 300
    hws = [sim.hw(1), sim.hw(2)]
    q = await bus.bind("device.#")
    t0 = time.monotonic()
    await start_bridge(settings_for(sim, devices=",".join(hws), attach_timeout_s=5.0))
    # both devices attach at once, each on a session of its own: their events come in either order
    await q.until_all([attached(hw) for hw in hws], timeout=10)
    attach_s = time.monotonic() - t0
    assert attach_s >= 0.9  # challenge, login result, attach result: 3 x 300 ms at least
    hw3 = sim.hw(3)
    t1 = time.monotonic()
    reply = await bus.command(hw3, "attach")
    cmd_s = time.monotonic() - t1
    assert reply["ok"] is True and reply["attached"] is True and cmd_s >= 0.9
    calls = set()
    for i, hw in enumerate([*hws, hw3]):
        calls.add((hw, await sim.place_call(hw, direction="in" if i % 2 else "out", hold_s=0.2)))
    evs = await released_all(q, calls, timeout=20)
    st = sim.stats()
    assert st["calls_stalled"] == 0 and st["calls_completed"] >= 3
    for hw, call in calls:
        got = [e.body["state"] for e in evs
               if e.body["type"] == "call.state" and (e.body["hw"], e.body["call"]) == (hw, call)]
        assert "connected" in got and got[-1] == "released", got
    figures("slow-pbx", delay_ms=300, attach_s=round(attach_s, 2), attach_command_s=round(cmd_s, 2),
                               calls=len(calls), stalled=st["calls_stalled"])


# ------------------------------------------------------------------------------- garbage
async def test_malformed_frames_during_calls_are_counted_and_sessions_stay(sim, bus, settings_for, start_bridge):
    hws = [sim.hw(i) for i in range(1, 4)]
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(sim, devices=",".join(hws)))
    await q.until_all([attached(hw) for hw in hws])
    calls = {(hw, await sim.place_call(hw, direction="in", hold_s=1.0)) for hw in hws}
    for _hw, call in calls:
        await sim.wait_call_state(call, CallState.CONNECTED, 5)
    bad0, sim_bad0 = FRAMES.bad_frames, sim.stats()["bad_frames"]
    sent = await sim.send_garbage(300)
    assert sent == 300 * len(hws)
    await eventually(lambda: FRAMES.bad_frames - bad0 >= sent, 10, "the bad frames counted")
    evs = await released_all(q, calls, timeout=15)
    assert FRAMES.bad_frames - bad0 == sent
    st = sim.stats()
    assert st["calls_stalled"] == 0 and st["bad_frames"] == sim_bad0  # nothing bad was echoed
    assert all(r.reconnects == 0 for r in bridge.pbx.runners.values())
    assert not [e for e in evs if e.body["type"] in ("detached", "attached")]
    for hw in hws:
        assert_seq_contiguous(evs, hw)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{http_port(bridge)}/metrics") as r:
        text = await r.text()
    line = next(ln for ln in text.splitlines() if ln.startswith('epsignal_frames_total{kind="bad"}'))
    assert float(line.split()[-1]) >= sent
    figures("garbage", bad_frames_sent=sent, bad_frames_counted=FRAMES.bad_frames - bad0,
                              reconnects=0, calls=len(calls), stalled=st["calls_stalled"])


# ------------------------------------------------------------------------------- TCP cut
async def test_session_cut_by_proxy_mid_call_reattaches_and_syncs_true_state(sim, bus, settings_for, start_bridge):
    """The TCP connection between bridge and PBX is cut mid-call; while it is down a second call
    starts. After the reconnect the consumer gets Sync states for both calls (their true state),
    and both calls then end through the bridge."""
    host, port = sim.url.split("//")[1].split("/")[0].split(":")
    proxy = await TcpProxy(host, int(port)).start()
    try:
        hw = sim.hw(8)
        q = await bus.bind(f"device.{hw}.#")
        url = f"ws://127.0.0.1:{proxy.port}/PBX0/APPS/websocket"
        bridge = await start_bridge(settings_for(sim, pbx_url=url, devices=hw))
        await q.until(attached(hw))
        call1 = await sim.place_call(hw, direction="in", hold_s=4.0)
        await q.until(state_of(call1, "connected"))
        proxy.cut()
        evs = await q.until(lambda e: e.body["type"] == "detached")
        assert evs[-1].body["reason"] == "session-lost"
        call2 = await sim.place_call(hw, direction="out", hold_s=4.0, remote="202")
        await sim.wait_call_state(call2, CallState.CONNECTED, 5)  # nobody in the path: direct
        await asyncio.sleep(0.5)
        assert sim.stats()["attached_devices"] == 0
        proxy.restore()
        evs += await q.until(lambda e: e.body["type"] == "call.state" and e.body.get("sync")
                             and e.body["call"] == max(call1, call2), timeout=10)
        syncs = {e.body["call"]: e.body for e in evs if e.body["type"] == "call.state" and e.body.get("sync")}
        assert syncs[call1]["state"] == "connected" and syncs[call1]["in"] is True
        assert syncs[call2]["state"] == "connected" and syncs[call2]["in"] is False
        assert syncs[call2]["remote"]["num"] == "202"
        kinds = [e.body["type"] for e in evs]
        assert kinds.index("detached") < kinds.index("attached", kinds.index("detached"))
        assert bridge.pbx.runners[hw].reconnects >= 1 and proxy.connections_total >= 2
        evs += await released_all(q, {(hw, call1), (hw, call2)}, timeout=10)
        assert sim.stats()["calls_stalled"] == 0
        assert_seq_contiguous(evs, hw)
        figures("pbx-cut", reconnects=bridge.pbx.runners[hw].reconnects, syncs=len(syncs),
                                  stalled=sim.stats()["calls_stalled"])
    finally:
        await proxy.stop()


# ------------------------------------------------------------------------------- one session dies
async def test_one_device_session_dying_does_not_affect_the_others(sim, bus, settings_for, start_bridge):
    hws = [sim.hw(i) for i in range(11, 15)]
    victim, others = hws[0], hws[1:]
    q = await bus.bind("device.#")
    bridge = await start_bridge(settings_for(sim, devices=",".join(hws)))
    await q.until_all([attached(hw) for hw in hws])
    calls = {(hw, await sim.place_call(hw, direction="in", hold_s=1.0)) for hw in hws}
    for _, call in calls:
        await sim.wait_call_state(call, CallState.CONNECTED, 5)
    sim.device(victim).session.abort()  # this device's TCP connection only, no close frame
    evs = await released_all(q, {c for c in calls if c[0] in others}, timeout=10)
    back = lambda e: e.body["type"] == "attached" and e.body["hw"] == victim  # noqa: E731
    if not any(back(e) for e in evs):
        evs += await q.until(back, timeout=10)
    assert [e.body["reason"] for e in evs if e.body["type"] == "detached"] == ["session-lost"]
    assert all(e.body["hw"] == victim for e in evs if e.body["type"] in ("detached", "attached"))
    assert bridge.pbx.runners[victim].reconnects == 1
    assert all(bridge.pbx.runners[hw].reconnects == 0 for hw in others)
    await sim.wait_idle(10)
    assert sim.stats()["calls_stalled"] == 0
    for hw in others:
        got = [e.body["state"] for e in evs if e.body["hw"] == hw and e.body["type"] == "call.state"]
        assert got[-1] == "released" and "connected" in got
        assert_seq_contiguous(evs, hw)
    figures("one-session-dies", others=len(others), other_reconnects=0,
                                       victim_reconnects=bridge.pbx.runners[victim].reconnects)

