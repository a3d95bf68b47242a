"""`send`, `tail` and `demo` as processes against the real RabbitMQ (issue 16, items 1 and 3):
which broker they use, a send that finds no bridge, the demo's isolation and clean-up."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import uuid

import aio_pika
import aiohttp
import pytest

from bridge.amqp import topology
from bridge.config import Settings
from tests.conftest import AMQP_URL
from tests.sim.test_cli_errors import ROOT, _env

pytestmark = pytest.mark.broker


async def start(*args: str, **env: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.cli", *args, env=_env(**env), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def cli(*args: str, timeout: float = 20, **env: str) -> tuple[int, str, str]:
    p = await start(*args, **env)
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    assert "Traceback" not in err.decode(), err.decode()
    return p.returncode, out.decode(), err.decode()


async def exists(conn, kind: str, name: str) -> bool:
    ch = await conn.channel()
    try:
        if kind == "exchange":
            await ch.declare_exchange(name, passive=True)
        else:
            await ch.declare_queue(name, passive=True)
        return True
    except aio_pika.exceptions.ChannelClosed:
        return False
    finally:
        if not ch.is_closed:
            await ch.close()


async def test_send_never_creates_the_commands_exchange(amqp):
    name = f"test-{uuid.uuid4().hex[:8]}.commands"
    code, out, err = await cli("send", "attach", "009033400001", "--amqp-url", AMQP_URL,
                               EPSIGNAL_COMMANDS_EXCHANGE=name)
    assert code == 1 and out == ""
    assert "send: broker amqp://guest:***@127.0.0.1:5672/ (vhost /)" in err
    last = err.strip().splitlines()[-1]
    assert f"the commands exchange '{name}' does not exist" in last
    assert "is a bridge running against this broker and vhost" in last
    assert not await exists(amqp, "exchange", name)


async def test_send_says_at_once_when_no_queue_takes_the_command(amqp):
    s = Settings.from_env({}, commands_exchange=f"test-{uuid.uuid4().hex[:8]}.commands")
    ch = await amqp.channel()
    await topology.declare_commands_exchange(ch, s)  # as a bridge does, but no queue is bound
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        code, out, err = await cli("send", "detach", "009033400001", "--timeout", "15",
                                   EPSIGNAL_AMQP_URL=AMQP_URL, EPSIGNAL_COMMANDS_EXCHANGE=s.commands_exchange)
        assert loop.time() - t0 < 8  # not the reply timeout
        assert code == 1 and out == ""
        last = err.strip().splitlines()[-1]
        assert last.startswith("epsignal-bridge: no queue is bound for key 'device.009033400001.detach'")
        assert "is a bridge running and attached" in last
    finally:
        await topology.delete(amqp, [s.commands_exchange, topology.unrouted_exchange(s)], [])


async def test_tail_prints_its_broker_and_stops_after_count(amqp):
    ex_name = f"test-{uuid.uuid4().hex[:8]}.events"
    p = await start("tail", "--count", "1", "--json", "device.#", EPSIGNAL_AMQP_URL=AMQP_URL,
                    EPSIGNAL_EVENTS_EXCHANGE=ex_name)
    try:
        line = await asyncio.wait_for(p.stderr.readline(), 10)
        assert line.decode().strip() == "epsignal-bridge: tail: broker amqp://guest:***@127.0.0.1:5672/ (vhost /)"
        ch = await amqp.channel()
        ex = await ch.declare_exchange(ex_name, "topic", durable=True)
        reader = asyncio.create_task(p.communicate())
        async with asyncio.timeout(10):  # the queue is bound shortly after the line: until it reads one
            while not reader.done():
                await ex.publish(aio_pika.Message(b'{"type":"x"}'), "device.h1.attached")
                await asyncio.wait([reader], timeout=0.2)
        out, _err = await reader
        assert p.returncode == 0 and out.decode().splitlines()[0] == '{"type":"x"}'
    finally:
        if p.returncode is None:
            p.kill()
            await p.wait()
        await topology.delete(amqp, [ex_name], [])


async def _demo_started(p) -> tuple[str, int, list[str]]:
    lines = []
    async with asyncio.timeout(15):
        while len(lines) < 2:  # its two lines (events may come between them)
            line = (await p.stdout.readline()).decode()
            assert line, "the demo ended"
            if line.startswith("demo "):
                lines.append(line)
    m = re.match(r"demo (demo-[0-9a-f]+): .*bridge HTTP http://127\.0\.0\.1:(\d+) ", lines[0])
    assert m, lines
    return m.group(1), int(m.group(2)), lines


async def test_two_demos_side_by_side_isolated_and_cleaned_up(amqp):
    a = await start("demo", "--devices", "2", "--duration", "6", EPSIGNAL_AMQP_URL=AMQP_URL)
    b = await start("demo", "--devices", "1", "--duration", "6", "--amqp-url", AMQP_URL)
    try:
        (na, pa, la), (nb, pb, lb) = await asyncio.gather(_demo_started(a), _demo_started(b))
        assert na != nb and pa != pb
        assert f"broker amqp://guest:***@127.0.0.1:5672/ (vhost /), exchanges {na}.events and {na}.commands" in la[1]
        async with aiohttp.ClientSession() as http:
            for port in (pa, pb):
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    assert r.status == 200
        for name in (na, nb):
            for kind, suffix in (("exchange", "events"), ("exchange", "commands"), ("exchange", "dead"),
                                 ("queue", "commands.bridge"), ("queue", "commands.dead")):
                assert await exists(amqp, kind, f"{name}.{suffix}"), (kind, name, suffix)
        # a command for the demo reaches the demo's bridge, on the demo's own names
        code, out, err = await cli("send", "detach", "009033400001", "--timeout", "5",
                                   EPSIGNAL_AMQP_URL=AMQP_URL, EPSIGNAL_COMMANDS_EXCHANGE=f"{na}.commands")
        assert code == 0 and json.loads(out)["ok"] is True, (out, err)
        results = await asyncio.gather(*(asyncio.wait_for(p.communicate(), 20) for p in (a, b)))
        assert a.returncode == 0 and b.returncode == 0, results
        out_a = la[0] + la[1] + results[0][0].decode()
        assert "009033400001 detached command" in out_a  # the demo shows its own bridge's events
        assert "009033400002" not in "".join(lb) + results[1][0].decode()  # not the other demo's
        for _, err in results:
            assert "Traceback" not in err.decode()
        for name in (na, nb):  # everything it declared is gone
            for kind, suffix in (("exchange", "events"), ("exchange", "commands"), ("exchange", "dead"),
                                 ("exchange", "commands.unrouted"), ("queue", "commands.bridge"),
                                 ("queue", "commands.dead")):
                assert not await exists(amqp, kind, f"{name}.{suffix}"), (kind, name, suffix)
    finally:
        for p in (a, b):
            if p.returncode is None:
                p.kill()
                await p.wait()


async def test_demo_intercept_shows_renamed_and_screened_calls(amqp):
    """--intercept: the example decider renames the CRM caller, rejects the blocked one; the
    demo's own calls (every 3 s: 201, then 0900123456) show it live, and it all goes at exit."""
    p = await start("demo", "--devices", "1", "--call-rate", "0", "--intercept", "crm",
                    "--intercept", "screen", EPSIGNAL_AMQP_URL=AMQP_URL)
    hw = "009033400001"
    try:
        name, _, lines = await _demo_started(p)
        async with asyncio.timeout(30):  # until the second call (screened) was released
            while not re.search(rf"{hw} call +2 released", lines[-1]):
                lines.append((await p.stdout.readline()).decode())
                assert lines[-1], "the demo ended"
        p.send_signal(2)
        out, err = await asyncio.wait_for(p.communicate(), 15)
        assert p.returncode == 0 and "Traceback" not in err.decode(), err.decode()
        text = "".join(lines) + out.decode()
        assert "an incoming call every 3 s from 201, 0900123456, 202, 666, 203, 299" in text
        assert f"decider: {hw} call 1 setup: rename 201 ACME Corp - Jane Doe" in text
        assert re.search(rf"{hw} call +1 intercepted setup: replace -> replaced after", text), text
        assert re.search(rf'{hw} call +1 alert +in  201 "ACME Corp - Jane Doe"', text), text
        assert f"decider: {hw} call 2 setup: reject 0900123456 cause 21" in text
        assert re.search(rf"{hw} call +2 intercepted setup: reject -> rejected after [\d.]+ ms cause 21",
                         text), text
        assert re.search(rf"{hw} call +2 released +in  0900123456 .* cause 21", text), text
        assert not await exists(amqp, "exchange", f"{name}.events")
    finally:
        if p.returncode is None:
            p.kill()
            await p.wait()


async def test_demo_on_sigint_stops_and_cleans_up(amqp):
    p = await start("demo", "--devices", "1", EPSIGNAL_AMQP_URL=AMQP_URL)
    try:
        name, _, _ = await _demo_started(p)
        p.send_signal(2)
        out, err = await asyncio.wait_for(p.communicate(), 15)
        assert p.returncode == 0 and "Traceback" not in err.decode(), err.decode()
        assert "calls started" in out.decode()
        assert not await exists(amqp, "exchange", f"{name}.events")
        assert not await exists(amqp, "queue", f"{name}.commands.bridge")
    finally:
        if p.returncode is None:
            p.kill()
            await p.wait()


async def test_demo_honours_epsignal_amqp_url():
    code, out, err = await cli("demo", "--duration", "5",
                               EPSIGNAL_AMQP_URL="amqp://guest:not-the-pw@127.0.0.1:5672/")
    assert code == 1 and out == ""
    assert err.strip().splitlines()[-1] == ("epsignal-bridge: the broker amqp://guest:***@127.0.0.1:5672/ "
                                            "refused the login of user 'guest' (wrong user name or password?)")
