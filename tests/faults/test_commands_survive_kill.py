"""A bridge killed with SIGKILL in the middle of a command: the command is not lost (it was not
acked, so the broker delivers it again) and the next bridge answers it, to the same
correlation_id. Commands whose effect already happened are answered ok when redelivered.

The bridges are real processes (``epsignal-bridge run``), killed for real.
"""

from __future__ import annotations

import asyncio
import signal

import aio_pika
import pytest

from tests.conftest import PASSWORD
from tests.faults.helpers import (
    BridgeProcess, Replies, bridge_env, eventually, publish_command, queue_counts,
)
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.broker


async def counts(conn, name) -> tuple[int, int] | None:
    try:
        return await queue_counts(conn, name)
    except aio_pika.exceptions.ChannelClosed:
        return None  # not declared yet


@pytest.fixture
def procs(tmp_path):
    started: list[BridgeProcess] = []

    def start(env) -> BridgeProcess:
        p = BridgeProcess(env, tmp_path, name=f"bridge{len(started)}").start()
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()
        p.close_files()


async def consuming(conn, names, n: int = 1) -> None:
    async def ok():
        c = await counts(conn, names["commands_queue"])
        return c is not None and c[1] == n
    await eventually(ok, 15, f"{n} consumer(s) on the command queue")


async def test_attach_in_progress_survives_sigkill_and_the_next_bridge_answers_it(sim, bus, names, amqp, procs):
    hw = sim.hw(5)
    sim.delay_ms = 1500  # login and attach take 3 x 1.5 s: plenty of time to kill mid-command
    env = bridge_env(names, pbx_url=sim.url, pbx_password=PASSWORD, attach_timeout_s=20)
    a = procs(env)
    await consuming(amqp, names)
    replies = await Replies(amqp).open()
    ex = await (await amqp.channel()).get_exchange(names["commands_exchange"], ensure=False)
    c1 = await publish_command(ex, f"device.{hw}.attach", b"", reply_to=replies.name)
    c2 = await publish_command(ex, f"device.{hw}.attach", b"{}", reply_to=replies.name)  # behind c1 (same device)
    # the PBX has attached the device (the effect happened); its AttachResult is still on the way
    await eventually(lambda: sim.device(hw).session is not None, 15, "the PBX attached the device")
    assert (await counts(amqp, names["commands_queue"]))[0] == 0  # both delivered to bridge A
    a.kill()
    assert a.returncode == -signal.SIGKILL
    assert replies.count == 0  # bridge A answered nothing
    # both commands are back in the queue (they were never acked), nobody consumes
    await eventually(lambda: _is(counts(amqp, names["commands_queue"]), (2, 0)), 10, "2 commands back in the queue")
    await eventually(lambda: sim.stats()["attached_devices"] == 0, 5, "the PBX dropped A's session")

    sim.delay_ms = 0
    b = procs(env)
    r1 = await replies.get(c1, timeout=20)
    r2 = await replies.get(c2, timeout=10)
    # ("attached" in the reply is a snapshot taken at the AttachResult; the PBX's Attached may
    # come a moment later, so it is not asserted here)
    assert r1["ok"] is True and r1["command"] == "attach" and r1["hw"] == hw
    assert r2["ok"] is True and r2["hw"] == hw  # idempotent: attached already
    await eventually(lambda: _is(counts(amqp, names["commands_queue"]), (0, 1)), 10, "the queue empty")
    st = sim.stats()
    assert st["attached_devices"] == 1 and st["attach_conflicts"] == 0
    await asyncio.sleep(0.3)
    assert replies.count == 2 and all(len(v) == 1 for v in replies.by_id.values())  # one answer each
    assert b.running()
    print(f"\nFIGURES kill-mid-attach: commands=2 answered_by_A=0 redelivered=2 answered_by_B=2 "
          f"duplicates=0 lost=0 attach_conflicts={st['attach_conflicts']}")


async def test_redelivered_commands_whose_effect_already_happened_answer_ok(sim, bus, names, amqp, procs):
    """A is stopped (SIGSTOP) with three commands delivered but not acked, then killed:
    ``attach hwB`` (hwB was attached by A, and B attaches it at start too), ``detach hwD``
    (attached by A; the kill ended that session), ``detach hwC`` (never attached). B connects to
    the broker only after it has attached hwB, so the redelivered attach finds the effect done."""
    hw_b, hw_c, hw_d = sim.hw(6), sim.hw(7), sim.hw(8)
    a = procs(bridge_env(names, pbx_url=sim.url, pbx_password=PASSWORD, devices=f"{hw_b},{hw_d}"))
    await consuming(amqp, names)
    await eventually(lambda: sim.stats()["attached_devices"] == 2, 10, "A attached hwB and hwD")
    replies = await Replies(amqp).open()
    ex = await (await amqp.channel()).get_exchange(names["commands_exchange"], ensure=False)
    a.signal(signal.SIGSTOP)
    c1 = await publish_command(ex, f"device.{hw_b}.attach", b"", reply_to=replies.name)
    c2 = await publish_command(ex, f"device.{hw_d}.detach", b"", reply_to=replies.name)
    c3 = await publish_command(ex, f"device.{hw_c}.detach", b"", reply_to=replies.name)
    await eventually(lambda: _is(counts(amqp, names["commands_queue"]), (0, 1)), 10, "delivered to the stopped A")
    a.kill()
    await eventually(lambda: _is(counts(amqp, names["commands_queue"]), (3, 0)), 10, "3 commands back in the queue")
    await eventually(lambda: sim.stats()["attached_devices"] == 0, 5, "the PBX dropped A's sessions")
    assert replies.count == 0

    proxy = await TcpProxy("127.0.0.1", 5672).start()
    try:
        proxy.stall()  # B's broker connection hangs until B has attached hwB
        b = procs(bridge_env(names, pbx_url=sim.url, pbx_password=PASSWORD, devices=hw_b,
                             amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
        await eventually(lambda: sim.device(hw_b).session is not None, 10, "B attached hwB")
        await asyncio.sleep(0.3)  # the Attached is in
        assert (await counts(amqp, names["commands_queue"]))[0] == 3  # B has taken nothing yet
        proxy.unstall()
        r1 = await replies.get(c1, timeout=20)
        r2 = await replies.get(c2, timeout=10)
        r3 = await replies.get(c3, timeout=10)
        assert r1["ok"] is True and r1["command"] == "attach" and r1["hw"] == hw_b
        assert r2 == {"ok": True, "v": 1, "command": "detach", "hw": hw_d, "was_attached": False}
        assert r3 == {"ok": True, "v": 1, "command": "detach", "hw": hw_c, "was_attached": False}
        st = sim.stats()
        assert st["attached_devices"] == 1 and st["attach_conflicts"] == 0
        assert sim.device(hw_b).session is not None and sim.device(hw_d).session is None
        await eventually(lambda: _is(counts(amqp, names["commands_queue"]), (0, 1)), 10, "the queue empty")
        assert replies.count == 3
        assert b.running()
        print(f"\nFIGURES kill-redelivery-idempotent: commands=3 redelivered=3 answered_ok=3 duplicates=0 lost=0 "
              f"attach_conflicts={st['attach_conflicts']}")
    finally:
        await proxy.stop()


async def _is(coro, want) -> bool:
    return (await coro) == want
