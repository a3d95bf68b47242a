"""The README's examples, run exactly as written (issue 16: "the README's examples are run by a
test exactly as written").

The fenced code blocks are taken from README.md by the heading above them (and their language);
nothing in them is substituted. What a user sets up around them is what the test sets up: a
bridge with the DEFAULT names (`epsignal.events`, `epsignal.commands`, ...) on the local
RabbitMQ, attached to the PBX simulator, and an environment whose PATH has the virtual
environment's bin first. Default names are shared by everything on this broker: the test refuses
to run while another bridge consumes them, and deletes them (and the consumer's `my-call-states`)
at the end, pass or fail.

Not run here: "Two commands" (`scripts/demo` bootstraps a virtual environment with pip when its
stamp is missing and runs until stopped; `epsignal-bridge demo` itself is tested in
test_cli_bus.py), "Running the bridge" (a real PBX), the Jaeger block (docker) and the pbx-sim
session (its `...` are elisions, not output).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aio_pika
import pytest

from bridge.amqp import topology
from bridge.config import Settings
from bridge.service import Bridge
from tests.conftest import PASSWORD
from tests.faults.helpers import eventually, queue_counts

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
VENV_BIN = ROOT / ".venv" / "bin"
#: the broker of the README's examples (their default); the same RabbitMQ as the tests'
AMQP_URL = "amqp://guest:guest@localhost/"
HW = "009033400001"  # the device of the README's examples (device 1 of the simulator)
DEFAULTS = Settings.from_env({})


# --------------------------------------------------------------------------- the README's blocks
def readme_blocks() -> list[tuple[str, str, str]]:
    """Every fenced block of README.md as (the heading above it, its language, its text)."""
    out, heading, lang, body = [], "", None, []
    for line in README.read_text(encoding="utf-8").splitlines():
        if lang is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            elif line.startswith("```"):
                lang, body = line[3:].strip(), []
        elif line.startswith("```"):
            out.append((heading, lang, "\n".join(body) + "\n"))
            lang = None
        else:
            body.append(line)
    assert lang is None, "README.md has an unclosed code block"
    return out


def readme_block(heading: str, lang: str) -> str:
    found = [text for h, lg, text in readme_blocks() if h == heading and lg == lang]
    assert len(found) == 1, f"README.md: {len(found)} {lang} blocks under the heading {heading!r}"
    return found[0]


def user_env() -> dict[str, str]:
    """A user's shell: no EPSIGNAL_*/OTEL_* settings, the virtual environment's bin first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPSIGNAL_", "OTEL_"))}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # a pipe, not a terminal: lines as they are printed
    env["NO_COLOR"] = "1"
    return env


def python() -> str:
    exe = VENV_BIN / "python"
    return str(exe) if exe.exists() else sys.executable


# --------------------------------------------------------------------------- processes
class Lines:
    """The stdout of a process, read line by line as it comes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self.proc.stdout.readline():
            self.lines.append(line.decode().rstrip("\n"))
            self._new.set()
        self._new.set()

    async def until(self, pred, timeout: float, what: str) -> str:
        async with asyncio.timeout(timeout):
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines)
                if self._task.done():
                    raise AssertionError(f"the process ended before {what}: {self.lines}")
                self._new.clear()
                await self._new.wait()

    async def stop(self) -> str:
        """Kill the process (its whole session); what it wrote on stderr."""
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        _, err = await asyncio.wait_for(asyncio.gather(self._task, self.proc.stderr.read()), 10)
        await self.proc.wait()
        return err.decode(errors="replace")


async def spawn(*argv: str, cwd: Path = ROOT) -> Lines:
    p = await asyncio.create_subprocess_exec(
        *argv, env=user_env(), cwd=cwd, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
    return Lines(p)


async def bash_line(line: str, timeout: float = 20) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        "bash", "-c", line, env=user_env(), cwd=ROOT, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    return p.returncode, out.decode(), err.decode()


# --------------------------------------------------------------------------- the bridge
async def counts_or_none(conn, name: str) -> tuple[int, int] | None:
    """(messages, consumers) of a queue, None when there is none."""
    try:
        return await queue_counts(conn, name)
    except aio_pika.exceptions.ChannelClosed:
        return None


@pytest.fixture
async def default_bridge(sim, amqp):
    """A bridge with the default exchange and queue names, attached to the simulator's device
    ``HW``; its topology (and `my-call-states`) deleted afterwards, whatever happened."""
    counts = await counts_or_none(amqp, DEFAULTS.commands_queue)
    # the README's examples use the default names: a bridge of the developer's own on them would
    # take the commands; stop it (the test must not run beside one, nor silently skip)
    assert counts is None or counts[1] == 0, (
        f"another bridge consumes {DEFAULTS.commands_queue!r} on this broker: stop it to run this test")
    s = Settings.from_env({}, pbx_url=sim.url, pbx_password=PASSWORD, devices=HW, http_host="127.0.0.1",
                          http_port=0, reconnect_min_s=0.1, reconnect_max_s=1.0, attach_timeout_s=5.0)
    assert (s.events_exchange, s.commands_exchange, s.commands_queue) == (
        "epsignal.events", "epsignal.commands", "epsignal.commands.bridge")
    await topology.delete_for(amqp, s, ["my-call-states"])  # leftovers of an earlier run: stale commands
    bridge = Bridge(s)
    try:
        ch = await amqp.channel()
        events = await ch.declare_exchange(s.events_exchange, "topic", durable=True)
        q = await ch.declare_queue(exclusive=True, auto_delete=True)
        await q.bind(events, f"device.{HW}.attached")
        await bridge.start()
        assert await bridge.link.wait_ready(10), "the bridge did not connect to the broker"
        async with asyncio.timeout(10):  # the device is attached: commands for it are carried out
            while await q.get(no_ack=True, fail=False) is None:
                await asyncio.sleep(0.05)
        await ch.close()
        yield bridge
    finally:
        await bridge.stop(2)
        await topology.delete_for(amqp, s, ["my-call-states"])
        for kind, name in (("exchange", s.events_exchange), ("exchange", s.commands_exchange),
                           ("queue", s.commands_queue), ("queue", "my-call-states")):
            ch = await amqp.channel()
            try:
                if kind == "exchange":
                    await ch.declare_exchange(name, passive=True)
                else:
                    await ch.declare_queue(name, passive=True)
                left = True
            except aio_pika.exceptions.ChannelClosed:
                left = False
            finally:
                if not ch.is_closed:
                    await ch.close()
            assert not left, f"{kind} {name!r} is still on the broker"


# --------------------------------------------------------------------------- the tests
def test_the_blocks_are_found():
    assert "aio_pika.connect(\"amqp://guest:guest@localhost/\")" in readme_block("A consumer in Python", "python")
    lines = [ln for ln in readme_block("Placing a call on behalf of a device", "sh").splitlines() if ln.strip()]
    assert [ln.split()[1] for ln in lines] == ["tail", "send", "send"]


async def test_python_consumer_prints_the_states_of_a_call(default_bridge, sim, amqp, tmp_path):
    code = readme_block("A consumer in Python", "python")
    (tmp_path / "consumer.py").write_text(code, encoding="utf-8")
    consumer = await spawn(python(), "consumer.py", cwd=tmp_path)
    try:
        # it consumes (so its queue is declared and bound): a call now is seen from its setup
        await eventually(lambda: _has_consumer(amqp, "my-call-states"), 15, "the consumer's queue")
        cid = await sim.place_call(HW, direction="in", hold_s=0.05)
        await consumer.until(lambda ln: ln.split()[2:3] == ["released"], 15, "released")
        assert consumer.lines == [f"{HW} {cid} {state} 201" for state in
                                  ("setup", "alert", "connected", "disconnected", "released")]
    finally:
        err = await consumer.stop()
        assert "Traceback" not in err, err


async def _has_consumer(conn, name: str) -> bool:
    counts = await counts_or_none(conn, name)
    return counts is not None and counts[1] >= 1


async def test_placing_a_call_with_send_and_tail(default_bridge, sim, amqp):
    lines = [ln for ln in readme_block("Placing a call on behalf of a device", "sh").splitlines() if ln.strip()]
    tail_line, setup_line, rel_line = lines
    # the tail, run first (in a second terminal): bound once it prints an event sent to its pattern
    tail = await spawn("bash", "-c", tail_line)
    try:
        ch = await amqp.channel()
        events = await ch.get_exchange(DEFAULTS.events_exchange, ensure=False)
        probe = json.dumps({"type": "readme-probe"}).encode()
        reader = asyncio.create_task(tail.until(lambda ln: "readme-probe" in ln, 15, "the probe"))
        async with asyncio.timeout(15):
            while not reader.done():
                await events.publish(aio_pika.Message(probe), f"device.{HW}.call.0.state")
                await asyncio.wait([reader], timeout=0.2)
        await reader
        await ch.close()
        start = len(tail.lines)

        code, out, err = await bash_line(setup_line)
        assert code == 0 and json.loads(out)["ok"] is True, (out, err)
        assert err.splitlines()[0] == "epsignal-bridge: send: broker amqp://guest:***@localhost/ (vhost /)"
        await tail.until(lambda ln: _state(ln, -1) == "connected", 10, "call -1 connected")

        code, out, err = await bash_line(rel_line)
        assert code == 0 and json.loads(out)["ok"] is True, (out, err)
        await tail.until(lambda ln: _state(ln, -1) == "released", 10, "call -1 released")
        await sim.wait_idle(5)  # the simulator ended the call too

        states = [_state(ln, -1) for ln in tail.lines[start:] if "readme-probe" not in ln]
        # the README: the PBX's answers come back as call-proc, alert, connected
        assert states == ["setup", "call-proc", "alert", "connected", "released"], tail.lines
        assert all(f" {HW} call    -1 " in ln for ln in tail.lines[start:] if "readme-probe" not in ln)
    finally:
        err = await tail.stop()
        assert err.splitlines()[:1] == ["epsignal-bridge: tail: broker amqp://guest:***@localhost/ (vhost /)"], err
        assert "Traceback" not in err, err


_STATE = re.compile(r" call +(-?\d+) (\S+)")


def _state(line: str, call: int) -> str | None:
    m = _STATE.search(line)
    return m.group(2) if m and int(m.group(1)) == call else None
