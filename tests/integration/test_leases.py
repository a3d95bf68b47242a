"""Several bridges share the devices through lease queues (EPSIGNAL_LEASES; docs/SCALING.md).

In-process bridges, the real broker and the real simulator. The simulator refuses a second
Attach of a device from another session and counts it (``attach_conflicts``), so a duplicate
attachment cannot go unseen. The multi-process SIGKILL test is in tests/faults/test_replicas.py.
"""

from __future__ import annotations

import asyncio

import pytest

from bridge.sim import hw_id
from tests.integration.conftest import N

pytestmark = [pytest.mark.asyncio, pytest.mark.broker]



def held(bridges) -> list[int]:
    return [len(b.leases.tokens) for b in bridges]


def attached_by(bridges) -> dict[str, int]:
    """hw -> number of bridges with that device attached."""
    out: dict[str, int] = {}
    for b in bridges:
        for hw, r in b.pbx.runners.items():
            if r.device.attached:
                out[hw] = out.get(hw, 0) + 1
    return out


async def until(pred, timeout: float = 15.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_two_replicas_attach_every_device_once_and_commands_reach_the_holder(
        sim, bus, start_bridge, lease_settings):
    a = await start_bridge(lease_settings(1))
    b = await start_bridge(lease_settings(2))
    await until(lambda: sim.stats()["attached_devices"] == N, what="every device attached")
    await until(lambda: sum(held([a, b])) == N and min(held([a, b])) > 0, what="both hold devices")
    assert sim.stats()["attach_conflicts"] == 0
    assert set(attached_by([a, b]).values()) == {1}
    # every device's command goes to its holder: attach is idempotent and says attached
    replies = await asyncio.gather(*(bus.command(hw_id(i), "attach") for i in range(1, N + 1)))
    assert [r["ok"] for r in replies] == [True] * N
    assert all(r["attached"] for r in replies)
    assert sum(b.consumer.stats.by_outcome.get(("attach", "ok"), 0) for b in (a, b)) == N
    # no command went to the shared queue's replica by mistake: each was carried out where held
    for br in (a, b):
        assert br.consumer.stats.by_outcome.get(("attach", "refused"), 0) == 0


async def test_graceful_stop_hands_every_device_to_the_survivor(sim, bus, start_bridge, lease_settings):
    a = await start_bridge(lease_settings(1))
    b = await start_bridge(lease_settings(2))
    await until(lambda: sum(held([a, b])) == N and min(held([a, b])) > 0, what="both hold devices")
    await a.stop(2)
    await until(lambda: held([b]) == [N], 10, "the survivor holds every device")
    await until(lambda: len(attached_by([b])) == N, 10, "the survivor attached every device")
    assert sim.stats()["attach_conflicts"] == 0


async def test_a_new_replica_takes_idle_devices_but_no_call_in_progress(sim, bus, start_bridge, lease_settings):
    a = await start_bridge(lease_settings(1))
    await until(lambda: len(attached_by([a])) == N, what="one replica attached every device")
    # a long call on every device: none may move while it lasts
    calls = [await sim.place_call(hw_id(i), hold_s=3.0) for i in range(1, N + 1)]
    await asyncio.sleep(0.5)
    b = await start_bridge(lease_settings(2))
    await asyncio.sleep(1.5)
    assert held([a, b]) == [N, 0], "a device with a call in progress moved"
    await sim.wait_idle(15)
    await until(lambda: held([b])[0] > 0 and sum(held([a, b])) == N, 10, "devices moved once idle")
    await until(lambda: len(attached_by([a, b])) == N, 10, "every device attached again")
    assert set(attached_by([a, b]).values()) == {1}
    st = sim.stats()
    assert st["calls_stalled"] == 0 and st["calls_completed"] == len(calls)
    assert st["attach_conflicts"] == 0
    assert a.leases.handed_on == held([b])[0]


async def test_detach_is_kept_by_the_next_holder_and_attach_by_command_moves_too(
        sim, bus, start_bridge, lease_settings):
    configured = ",".join(hw_id(i) for i in range(1, N))
    extra = hw_id(N)  # registered in the simulator, not configured
    a = await start_bridge(lease_settings(1, devices=configured))
    await until(lambda: len(attached_by([a])) == N - 1, what="every configured device attached")
    r = await bus.command(hw_id(1), "detach")
    assert r["ok"] and r["was_attached"]
    r = await bus.command(extra, "attach")
    assert r["ok"] and r["attached"], r
    await until(lambda: extra in a.leases.tokens, what="the attached device's lease")
    b = await start_bridge(lease_settings(2, devices=configured))
    await until(lambda: extra in b.leases.devices(), 5, "the other replica learns the extra device")
    await a.stop(2)
    await until(lambda: held([b]) == [N], 10, "the survivor holds every lease")
    await until(lambda: len(attached_by([b])) == N - 1, 10, "the survivor attached what is wanted")
    assert extra in attached_by([b]) and hw_id(1) not in attached_by([b])
    assert sim.stats()["attach_conflicts"] == 0


async def test_a_broker_outage_moves_the_cut_replicas_devices_and_they_come_back(
        sim, bus, start_bridge, lease_settings):
    """The invariant (issue 14): a replica runs a device only while it holds its token on its
    open lease channel. Cut from the broker, a replica stops its runners (the broker gave its
    tokens to the stand-in, which attaches them); back on the broker, it lines up again and the
    idle devices it is preferred for are handed back to it. Never two replicas on one device."""
    from tests.tcpproxy import TcpProxy

    proxy = await TcpProxy("127.0.0.1", 5672).start()
    try:
        a = await start_bridge(lease_settings(1, amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
                                              heartbeat_s=2))
        b = await start_bridge(lease_settings(2))
        await until(lambda: sum(held([a, b])) == N and min(held([a, b])) > 0, what="both hold devices")
        await until(lambda: len(attached_by([a, b])) == N, what="every device attached")
        mine = set(a.leases.tokens)
        t0 = asyncio.get_running_loop().time()
        proxy.cut()
        await until(lambda: not a.link.ready, 15, "the broker link down")
        await until(lambda: held([b]) == [N] and not a.leases.tokens, 10, "the other replica given the leases")
        await until(lambda: not a.pbx.runners, 10, "the cut replica stopped its runners")
        await until(lambda: len(attached_by([b])) == N, 15, "the other replica attached every device")
        print(f"\ncut from the broker (AMQP heartbeat 2 s): {len(mine)} devices on the other replica in "
              f"{asyncio.get_running_loop().time() - t0:.2f}s")
        assert set(attached_by([a, b]).values()) == {1}
        proxy.restore()
        await until(lambda: a.link.ready, 20, "the broker link back")
        await until(lambda: held([a])[0] > 0 and sum(held([a, b])) == N, 15, "devices handed back")
        await until(lambda: len(attached_by([a, b])) == N, 15, "every device attached again")
        assert set(attached_by([a, b]).values()) == {1}
        assert set(sim.conflict_hw) <= mine, "a second Attach for a device the cut replica did not hold"
    finally:
        await proxy.stop()


async def test_lease_metrics(sim, bus, start_bridge, lease_settings):
    from bridge.metrics import registry_for, render

    a = await start_bridge(lease_settings(1))
    await until(lambda: held([a]) == [N], what="every lease held")
    text = render(registry_for(a.snapshot)).decode()
    assert f"epsignal_leases_held {N}.0" in text
    assert "epsignal_replicas 1.0" in text and "epsignal_leases_handed_on_total 0.0" in text
    assert "epsignal_leases_wanted_detached 0.0" in text
    assert (await bus.command(hw_id(1), "detach"))["ok"]
    await until(lambda: a.leases.leases[hw_id(1)].pending is None, 5, "the detach's token")
    assert "epsignal_leases_wanted_detached 1.0" in render(registry_for(a.snapshot)).decode()
