"""The intercept deciders of examples/ (examples/python/intercept.py, examples/node/intercept.mjs)
as processes on the real broker: first against requests this test publishes (the verdict's exact
body, correlation and trace context), then against the real bridge and simulator (what the
simulated phone and the far end received)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import pytest
from msgspec import Raw

from bridge import intercept
from bridge.sim import sigs
from tests.conftest import AMQP_URL
from tests.contracts.helpers import NODE_DIR, node_ready

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
CRM = ROOT / "examples" / "crm.csv"
BLOCKED = ROOT / "examples" / "blocked.txt"
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture(params=["python", "node"])
def example(request) -> list[str]:
    """The command line of the decider in one language (the same options and output)."""
    if request.param == "node":
        return [node_ready(), str(NODE_DIR / "intercept.mjs")]
    return [sys.executable, str(ROOT / "examples" / "python" / "intercept.py")]


class Decider:
    """The example running as a process; ``lines`` its stdout."""

    def __init__(self, p: asyncio.subprocess.Process) -> None:
        self.p = p
        self.lines: list[str] = []

    @classmethod
    async def start(cls, example: list[str], names: dict, *args: str) -> Decider:
        p = await asyncio.create_subprocess_exec(
            *example, "--amqp-url", AMQP_URL, "--exchange", names["events_exchange"],
            "--commands-exchange", names["commands_exchange"], "--crm", str(CRM),
            "--block", str(BLOCKED), *args, cwd=ROOT, env=dict(os.environ),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        self = cls(p)
        async with asyncio.timeout(20):  # bound and, with --enable, the commands answered
            while not (line := await self.line()).startswith("deciding on "):
                pass
        assert line.endswith(": 3 CRM names, 2 blocked"), self.lines
        return self

    async def line(self) -> str:
        raw = await self.p.stdout.readline()
        if not raw:
            await self.p.wait()
            err = (await self.p.stderr.read()).decode()
            raise AssertionError(f"the decider ended ({self.p.returncode}): {self.lines} {err}")
        self.lines.append(raw.decode().rstrip("\n"))
        return self.lines[-1]

    async def stop(self) -> None:
        if self.p.returncode is None:
            self.p.terminate()
        out, err = await asyncio.wait_for(self.p.communicate(), 10)
        self.lines += out.decode().splitlines()
        assert "Traceback" not in err.decode() and "Error" not in err.decode(), err.decode()


@pytest.fixture
async def decider(example, names):
    started: list[Decider] = []

    async def start(*args: str) -> Decider:
        started.append(d := await Decider.start(example, names, *args))
        return d

    yield start
    for d in started:
        await d.stop()


# ------------------------------------------------------------------ against requests of the test's own
SETUP_IN = {
    "type": "setup", "bc": "8090a2", "cg": {"num": "201", "sip": "r201"},
    "cd": {"num": "1001", "sip": "user0001"}, "complete": True, "channel": -1,
    "fty": [{"type": "ct_complete", "x": 1}, {"type": "name_identification", "name": "Remote 201",
                                               "x-kept": [1.5, None]}],
    "channels": {"source": "local", "ch": [{"coder": "G711A", "addr": "127.0.0.1", "port": 5006}]},
    "x-vendor": {"deep": [True, "é"]},
}


async def ask(amqp, names: dict, sig: dict, *, to: bool = True, hw: str = "009033400001",
              headers: dict | None = None) -> tuple[dict, aio_pika.abc.AbstractIncomingMessage]:
    """Publish one request as the bridge would; the verdict's body and message."""
    ch = await amqp.channel(on_return_raises=True)
    try:
        now = datetime.now(UTC)
        rid = f"test/{hw}/i{uuid.uuid4().hex[:6]}"
        req = intercept.InterceptRequest(
            id=rid, hw=hw, instance="test", time=now, call=7, to=to,
            sig=Raw(json.dumps(sig).encode()), deadline=now + timedelta(seconds=5),
            deadline_ms=5000, fail="open")
        got = asyncio.get_running_loop().create_future()

        async def on(msg):
            if not got.done():
                got.set_result(msg)

        reply_q = await ch.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await reply_q.consume(on, no_ack=True)
        events = await ch.get_exchange(names["events_exchange"], ensure=False)
        await events.publish(aio_pika.Message(
            intercept.encode_request(req), reply_to="amq.rabbitmq.reply-to", correlation_id=rid,
            message_id=rid, type="call.intercept", expiration=5, headers=headers or {}),
            f"device.{hw}.call.7.intercept", mandatory=True)
        msg = await asyncio.wait_for(got, 10)
        assert msg.correlation_id == rid
        body = json.loads(msg.body)
        assert body["id"] == rid and body["v"] == 1
        return body, msg
    finally:
        await ch.close()


async def test_verdicts(decider, amqp, names):
    d = await decider()
    # a CRM number: renamed, every other field (unknown ones, their order, other facilities)
    # as it came
    v, msg = await ask(amqp, names, SETUP_IN, headers={"traceparent": TRACEPARENT})
    expected = json.loads(json.dumps(SETUP_IN))
    expected["fty"][1]["name"] = "ACME Corp - Jane Doe"
    assert v == {"v": 1, "id": v["id"], "verdict": "forward", "sig": expected}
    assert list(v["sig"]) == list(SETUP_IN)
    tp = msg.headers["traceparent"]
    tp = tp.decode() if isinstance(tp, bytes) else tp
    assert tp.split("-")[1] == TRACEPARENT.split("-")[1]  # the same trace, continued
    assert await d.line() == "009033400001 call 7 setup: rename 201 ACME Corp - Jane Doe"
    # a CRM name with a comma, UTF-8; a setup without fty gets one
    no_fty = {k: v for k, v in SETUP_IN.items() if k != "fty"} | {"cg": {"num": "202"}}
    v, _ = await ask(amqp, names, no_fty)
    assert v["sig"] == {**no_fty, "fty": [{"type": "name_identification", "name": "Müller, Hans"}]}
    assert await d.line() == "009033400001 call 7 setup: rename 202 Müller, Hans"
    # blocked: rejected, cause 21 (both entries of the file, one with a comment)
    for num in ("666", "0900123456"):
        v, _ = await ask(amqp, names, {**SETUP_IN, "cg": {"num": num}})
        assert v == {"v": 1, "id": v["id"], "verdict": "reject", "cause": 21}
        assert await d.line() == f"009033400001 call 7 setup: reject {num} cause 21"
    # dialling a blocked number from the device (toward the PBX): rejected too
    v, _ = await ask(amqp, names, {**SETUP_IN, "cd": {"num": "666"}, "cg": {"num": "1001"}},
                     to=False)
    assert v["verdict"] == "reject" and v["cause"] == 21
    await d.line()
    # a CRM number calling out is not renamed; unknown numbers and other messages: forward
    v, _ = await ask(amqp, names, {**SETUP_IN, "cd": {"num": "201"}}, to=False)
    assert v == {"v": 1, "id": v["id"], "verdict": "forward"}
    assert await d.line() == "009033400001 call 7 setup: forward 201"
    v, _ = await ask(amqp, names, {**SETUP_IN, "cg": {"num": "299"}})
    assert v == {"v": 1, "id": v["id"], "verdict": "forward"}
    assert await d.line() == "009033400001 call 7 setup: forward 299"
    v, _ = await ask(amqp, names, sigs.alert("x", 1), to=False)
    assert v == {"v": 1, "id": v["id"], "verdict": "forward"}
    assert await d.line() == "009033400001 call 7 alert: forward"


async def test_only_its_devices(decider, amqp, names):
    """--hw: bound to that device's requests only (the others are unroutable: fail-open)."""
    await decider("--hw", "009033400002")
    ch = await amqp.channel(on_return_raises=True)
    events = await ch.get_exchange(names["events_exchange"], ensure=False)
    with pytest.raises(aio_pika.exceptions.DeliveryError):  # returned: nobody bound
        await events.publish(aio_pika.Message(b"{}"), "device.009033400001.call.1.intercept",
                             mandatory=True)
    await ch.close()
    v, _ = await ask(amqp, names, SETUP_IN, hw="009033400002")
    assert v["verdict"] == "forward" and "sig" in v


# ------------------------------------------------------------------ against the real bridge and simulator
async def call_ended(sim, hw: str, call: int) -> dict:
    """The simulator's record of the call once it has ended: what each end received."""
    async with asyncio.timeout(15):
        while (rec := sim.call_record(hw, call))["active"]:
            await asyncio.sleep(0.02)
    return rec


@pytest.mark.parametrize("how", ["config", "command"])
async def test_renames_and_screens_calls(how, decider, sim, bus, settings_for, start_bridge):
    """The phone shows the CRM name; a blocked caller never rings the phone and gets cause 21;
    an unknown caller's setup reaches the phone as it came. Rules from the configuration, or
    from the decider's own intercept command (--enable)."""
    hw = sim.hw(3)
    seen = await bus.bind(f"device.{hw}.attached", f"device.{hw}.call.*.intercepted")
    rules = {"intercept": "*=setup:device"} if how == "config" else {}
    await start_bridge(settings_for(sim, devices=hw, intercept_deadline_ms=2000, **rules))
    await seen.until(lambda e: e.key.endswith(".attached"))
    d = await decider(*(("--enable", hw) if how == "command" else ()))
    if how == "command":
        assert d.lines[0] == f"intercept {hw}: ok", d.lines

    renamed = await sim.place_call(hw, direction="in", remote="202", hold_s=0.05)
    rec = await call_ended(sim, hw, renamed)
    assert rec["device"][0]["fty"] == [{"type": "name_identification", "name": "Müller, Hans"}]
    assert {k: v for k, v in rec["device"][0].items() if k != "fty"} == {
        k: v for k, v in sigs.setup(sigs.party("202", "r202"), sigs.party("1003", "user0003"),
                                    "x", 5006).items() if k != "fty"}
    assert rec["order"] == [">setup", "<alert", "<conn", ">disc", "<rel"]
    assert await d.line() == f"{hw} call {renamed} setup: rename 202 Müller, Hans"

    blocked = await sim.place_call(hw, direction="in", remote="666", hold_s=0.05)
    rec = await call_ended(sim, hw, blocked)
    assert rec["device"] == []  # the phone never rang
    assert rec["pbx"] == [{"type": "rel", "cau": {"num": 21}}]  # the caller got cause 21
    assert await d.line() == f"{hw} call {blocked} setup: reject 666 cause 21"

    unknown = await sim.place_call(hw, direction="in", remote="299", hold_s=0.05)
    rec = await call_ended(sim, hw, unknown)
    assert rec["device"][0] == sigs.setup(sigs.party("299", "r299"), sigs.party("1003", "user0003"),
                                          "Remote 299", 5006)
    assert await d.line() == f"{hw} call {unknown} setup: forward 299"

    outcomes = [e.body for e in await seen.until(lambda e: e.body.get("call") == unknown)
                if e.body["type"] == "call.intercepted"]
    assert [(o["call"], o["outcome"], o["action"]) for o in outcomes] == [
        (renamed, "replace", "replaced"), (blocked, "reject", "rejected"),
        (unknown, "forward", "forwarded")]
    assert outcomes[1]["cause"] == 21
    assert sim.stats()["calls_stalled"] == 0
