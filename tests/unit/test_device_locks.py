"""Issue 17: the command consumer's per-device locks (bridge.amqp.consumer.DeviceLocks), and the
consumer's use of them with a broker stand-in: one device's commands are carried out one at a
time in the order they came, other devices' meanwhile; a device's entry goes with its last
command; a refusal waiting for its dead-letter confirm does not hold up the device's next
command, and it is acked only once that confirm came."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from bridge import commands as cmds
from bridge.amqp.consumer import ERROR_HEADER, ORIGINAL_ID_HEADER, CommandConsumer, DeviceLocks, dead_letter
from bridge.config import Settings


# ------------------------------------------------------------------------------- DeviceLocks
async def test_one_devices_commands_run_one_at_a_time_in_arrival_order():
    locks = DeviceLocks()
    log: list[tuple[str, int]] = []

    async def command(i: int) -> None:
        with locks.use("a") as lock:
            async with lock:
                log.append(("start", i))
                for _ in range(3):  # let the others run, if the lock let them
                    await asyncio.sleep(0)
                log.append(("end", i))

    await asyncio.gather(*(command(i) for i in range(10)))
    assert log == [(what, i) for i in range(10) for what in ("start", "end")]
    assert len(locks) == 0 and not locks.busy("a")


async def test_other_devices_go_ahead_while_one_device_waits():
    locks = DeviceLocks()
    release = asyncio.Event()
    done: list[str] = []

    async def slow() -> None:
        with locks.use("a") as lock:
            async with lock:
                await release.wait()
        done.append("a")

    async def quick(hw: str) -> None:
        with locks.use(hw) as lock:
            async with lock:
                done.append(hw)

    a = asyncio.create_task(slow())
    await asyncio.sleep(0)
    await asyncio.gather(quick("b"), quick("c"))
    assert done == ["b", "c"] and locks.busy("a") and not locks.busy("b") and len(locks) == 1
    release.set()
    await a
    assert done == ["b", "c", "a"] and len(locks) == 0


async def test_a_device_is_busy_while_a_command_waits_holds_or_finishes_and_then_dropped():
    locks = DeviceLocks()
    first_in, finish = asyncio.Event(), asyncio.Event()
    states: list[str] = []

    async def first() -> None:
        with locks.use("a") as lock:
            async with lock:
                first_in.set()
                await asyncio.sleep(0.01)
            states.append("first let go")
            await finish.wait()  # answering, dead-lettering, acking: no lock, still in use

    async def second() -> None:
        await first_in.wait()
        with locks.use("a") as lock:
            assert locks.busy("a")
            async with lock:
                states.append("second holds")

    t1, t2 = asyncio.create_task(first()), asyncio.create_task(second())
    await t2
    assert states == ["first let go", "second holds"]
    assert locks.busy("a") and len(locks) == 1  # the first still finishing
    finish.set()
    await t1
    assert not locks.busy("a") and len(locks) == 0


async def test_the_same_lock_for_a_device_while_in_use_a_new_one_after():
    locks = DeviceLocks()
    with locks.use("a") as one, locks.use("a") as two, locks.use("b") as other:
        assert one is two and other is not one and len(locks) == 2
    with locks.use("a") as again:
        assert again is not one  # the old entry was dropped with its last user


async def test_an_error_inside_drops_the_entry_too():
    locks = DeviceLocks()
    with pytest.raises(RuntimeError), locks.use("a") as lock:
        async with lock:
            raise RuntimeError("the handler failed")
    assert len(locks) == 0 and not locks.busy("a")


async def test_many_device_ids_leave_nothing_behind():
    locks = DeviceLocks()

    async def command(hw: str) -> None:
        with locks.use(hw) as lock:
            async with lock:
                await asyncio.sleep(0)

    await asyncio.gather(*(command(f"dev{i % 500}") for i in range(2000)))
    assert len(locks) == 0


# ------------------------------------------------------------------------------- the consumer
HW = "009033400001"


class FakeMessage:
    """What the consumer reads of an incoming command, and its settlement."""

    def __init__(self, key: str, body: bytes, events: list, name: str) -> None:
        self.routing_key, self.body, self.headers = key, body, {}
        self.reply_to = self.correlation_id = self.content_type = self.timestamp = self.type = None
        self.message_id = name
        self._events = events

    async def ack(self) -> None:
        self._events.append(("ack", self.message_id))

    async def reject(self, requeue: bool = False) -> None:
        self._events.append(("reject", self.message_id))

    async def nack(self, requeue: bool = True) -> None:
        self._events.append(("nack", self.message_id))


class FakeDead:
    """The dead-letter exchange: a publish returns when the test confirms it."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.confirms: dict[str, asyncio.Future] = {}

    async def publish(self, message, routing_key: str, timeout: float | None = None) -> None:
        name = message.headers[ORIGINAL_ID_HEADER]  # the command's (the copy has an id of its own)
        assert message.message_id != name
        self.events.append(("dead-letter", name, message.headers[ERROR_HEADER]))
        fut = self.confirms[name] = asyncio.get_running_loop().create_future()
        await fut
        self.events.append(("confirmed", name))


class FakeLink:
    def __init__(self, events: list) -> None:
        self.s = Settings.from_env({}, command_rate=1000, command_burst=1000)
        self.dead = FakeDead(events)
        self.topology = SimpleNamespace(dead=self.dead)
        self.channel = object()

    def on_ready(self, _cb) -> None:  # the consumer registers its recovery with the link
        pass

    attach = on_ready


def signaling(call: int) -> bytes:
    return json.dumps({"call": call, "sig": {"type": "setup", "cd": {"num": "201"}}}).encode()


async def test_a_refusal_awaiting_its_confirm_does_not_hold_up_the_devices_next_command():
    events: list = []
    link = FakeLink(events)

    async def handler(hw: str, verb: str, cmd) -> cmds.Reply:
        events.append(("carry out", cmd.call))
        if cmd.call == -1:
            raise cmds.CommandError(f"device {hw} is not attached")
        return cmds.Reply(ok=True, command=verb, hw=hw)

    consumer = CommandConsumer(link, handler)
    first = FakeMessage(f"device.{HW}.signaling", signaling(-1), events, "m1")
    second = FakeMessage(f"device.{HW}.signaling", signaling(-2), events, "m2")
    t1 = asyncio.create_task(consumer.on_message(first))
    t2 = asyncio.create_task(consumer.on_message(second))
    async with asyncio.timeout(5):
        while ("ack", "m2") not in events:  # the second is carried out and acked meanwhile
            await asyncio.sleep(0)
    assert events[:3] == [("carry out", -1), ("dead-letter", "m1", f"device {HW} is not attached"),
                          ("carry out", -2)]
    assert ("ack", "m1") not in events, "acked before its dead-letter copy was confirmed"
    assert consumer.busy(HW)  # the refusal still in progress
    link.dead.confirms["m1"].set_result(None)
    await asyncio.gather(t1, t2)
    assert events.index(("confirmed", "m1")) < events.index(("ack", "m1"))
    assert not consumer.busy(HW) and not consumer._inflight
    assert consumer.stats.by_outcome == {("signaling", "refused"): 1, ("signaling", "ok"): 1}


async def test_an_unconfirmed_dead_letter_copy_rejects_the_command_to_the_queues_own_dead_lettering():
    events: list = []
    link = FakeLink(events)

    async def handler(hw: str, verb: str, cmd) -> cmds.Reply:
        raise cmds.CommandError("no")

    consumer = CommandConsumer(link, handler)
    msg = FakeMessage(f"device.{HW}.signaling", signaling(-1), events, "m1")
    task = asyncio.create_task(consumer.on_message(msg))
    async with asyncio.timeout(5):
        while "m1" not in link.dead.confirms:
            await asyncio.sleep(0)
    link.dead.confirms["m1"].set_exception(ConnectionError("channel closed"))
    await task
    assert events[-1] == ("reject", "m1") and ("ack", "m1") not in events
    assert not consumer.busy(HW)


def test_a_dead_letter_has_an_id_of_its_own_and_the_command_s_in_a_header():
    message = FakeMessage("device.x.explode", b"{}", [], "retry-1")
    message.headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    message.correlation_id, message.reply_to = "c1", "replies"
    a, b = dead_letter(message, "unknown command", "inst"), dead_letter(message, "unknown command", "inst")
    assert a.message_id != b.message_id and a.message_id.startswith("inst/.dead/")
    assert a.headers == {"traceparent": message.headers["traceparent"], ERROR_HEADER: "unknown command",
                         ORIGINAL_ID_HEADER: "retry-1"}
    assert (a.body, a.correlation_id, a.reply_to, a.delivery_mode) == (b"{}", "c1", "replies", 2)
    assert message.headers == {"traceparent": message.headers["traceparent"]}  # the command's untouched
    message.message_id = None  # a command without one: no header
    assert ORIGINAL_ID_HEADER not in dead_letter(message, "unknown command", "inst").headers
