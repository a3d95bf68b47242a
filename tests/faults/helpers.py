"""Tools of the fault tests: the bridge as a real process, queue counts, replies, TLS material."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aio_pika
import aiohttp

from bridge.amqp import topology
from bridge.config import Settings

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
ROOT = Path(__file__).resolve().parents[2]


def bridge_env(names: dict, **settings) -> dict[str, str]:
    """The environment of ``epsignal-bridge run``: the test's names plus EPSIGNAL_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPSIGNAL_", "OTEL_"))}
    merged = dict(names, amqp_url=AMQP_URL, http_host="127.0.0.1", http_port=0,
                  reconnect_min_s=0.1, reconnect_max_s=1.0)
    merged.update(settings)
    env.update({f"EPSIGNAL_{k.upper()}": str(v) for k, v in merged.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _bridge_command() -> list[str]:
    exe = Path(sys.executable).parent / "epsignal-bridge"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("epsignal-bridge")
    return [found] if found else [sys.executable, "-m", "bridge.cli"]


class BridgeProcess:
    """``epsignal-bridge run`` in a process of its own; stderr (the JSON log) goes to a file."""

    def __init__(self, env: dict[str, str], log_dir: Path, grace_s: float = 10.0, name: str = "bridge") -> None:
        self.env = env
        self.grace_s = grace_s
        self.stderr_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.stderr"
        self.stdout_path = self.stderr_path.with_suffix(".stdout")
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self) -> BridgeProcess:
        # open for the process's lifetime (close_files closes them): no with block can hold them
        self._err = open(self.stderr_path, "wb")  # noqa: SIM115
        self._out = open(self.stdout_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*_bridge_command(), "run", "--grace", str(self.grace_s)], env=self.env, cwd=ROOT,
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        async with asyncio.timeout(timeout):
            while self.proc.poll() is None:
                await asyncio.sleep(0.02)
        self.returncode = self.proc.returncode
        return self.returncode

    def kill(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)
        self.returncode = self.proc.returncode

    async def stop(self, timeout: float = 15.0) -> int:
        if self.running():
            self.signal(signal.SIGTERM)
            try:
                return await self.wait(timeout)
            except TimeoutError:
                self.kill()
        self.returncode = self.proc.returncode
        return self.returncode

    def close_files(self) -> None:
        for f in (getattr(self, "_err", None), getattr(self, "_out", None)):
            if f is not None and not f.closed:
                f.close()

    def stderr(self) -> str:
        return self.stderr_path.read_bytes().decode(errors="replace")

    def output(self) -> bytes:
        """Everything the process wrote (stdout and stderr), as bytes."""
        return self.stdout_path.read_bytes() + self.stderr_path.read_bytes()

    def logs(self) -> list[dict]:
        """The JSON log lines (other lines, e.g. a traceback, as {"raw": line})."""
        out = []
        for line in self.stderr().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    async def wait_log(self, pred, timeout: float) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                for rec in self.logs():
                    if pred(rec):
                        return rec
                if not self.running():
                    raise AssertionError(f"bridge exited with {self.proc.returncode}:\n{self.stderr()[-3000:]}")
                await asyncio.sleep(0.05)


async def eventually(pred, timeout: float, what: str = "condition", interval: float = 0.05):
    """Poll ``pred`` (sync or async) until it returns a true value; that value."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:  # an exception (a queue not declared yet, say) counts as "not yet"
            v = pred()
            if asyncio.iscoroutine(v):
                v = await v
        except Exception as e:
            v, last = None, e
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last error: {last!r})")
        await asyncio.sleep(interval)


async def queue_counts(conn: aio_pika.abc.AbstractConnection, name: str) -> tuple[int, int]:
    """(messages ready, consumers) of a queue, by a passive declare on a channel of its own."""
    ch = await conn.channel()
    try:
        q = await ch.declare_queue(name, passive=True)
        return q.declaration_result.message_count, q.declaration_result.consumer_count
    finally:
        await ch.close()


def need_rabbitmqctl() -> None:
    import pytest

    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on PATH (needed to count unacked messages / make an AMQP user)")


def rabbitmq_queue(name: str) -> dict[str, int]:
    """messages_ready, messages_unacknowledged and consumers of a queue, from rabbitmqctl."""
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers", "name", "messages_ready",
         "messages_unacknowledged", "consumers"], capture_output=True, text=True, timeout=60, check=True)
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] == name:
            return {"ready": int(parts[1]), "unacked": int(parts[2]), "consumers": int(parts[3])}
    raise LookupError(f"no queue {name!r} in rabbitmqctl list_queues")


class Replies:
    """An exclusive reply queue; replies kept by correlation_id (every one, duplicates too)."""

    def __init__(self, conn: aio_pika.abc.AbstractConnection) -> None:
        self.conn = conn
        self.by_id: dict[str, list[dict]] = {}
        self.count = 0
        #: every reply as received: (body bytes, headers, properties as text)
        self.raw: list[tuple[bytes, dict, str]] = []
        self._new = asyncio.Event()

    async def open(self) -> Replies:
        self.channel = await self.conn.channel()
        await self.channel.set_qos(prefetch_count=1000)
        self.queue = await self.channel.declare_queue(exclusive=True, auto_delete=True)
        self.name = self.queue.name
        await self.queue.consume(self._on, no_ack=True)
        return self

    async def _on(self, msg) -> None:
        self.raw.append((msg.body, dict(msg.headers or {}), repr(msg.properties)))
        self.by_id.setdefault(msg.correlation_id, []).append(json.loads(msg.body))
        self.count += 1
        self._new.set()

    async def get(self, correlation_id: str, timeout: float = 15.0) -> dict:
        async with asyncio.timeout(timeout):
            while correlation_id not in self.by_id:
                self._new.clear()
                await self._new.wait()
        return self.by_id[correlation_id][0]

    async def wait_count(self, n: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.count < n:
                self._new.clear()
                await self._new.wait()


async def publish_command(exchange: aio_pika.abc.AbstractExchange, key: str, body: bytes | dict = b"",
                          reply_to: str | None = None, correlation_id: str | None = None) -> str:
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    cid = correlation_id or uuid.uuid4().hex
    await exchange.publish(aio_pika.Message(body, reply_to=reply_to, correlation_id=cid,
                                            delivery_mode=aio_pika.DeliveryMode.PERSISTENT), key)
    return cid


async def delete_topology(names: dict, extra_queues: tuple[str, ...] = ()) -> None:
    conn = await aio_pika.connect(AMQP_URL)
    try:
        await topology.delete_for(conn, Settings.from_env({}, **names), extra_queues)
    finally:
        await conn.close()


#: the HTTP server of each bridge a test started in-process (bridge.main builds it in a process)
SERVED: dict = {}


async def serve_http(bridge) -> int:
    """Start ``bridge``'s HTTP server (as ``epsignal-bridge run`` does); its port. Stopped by
    :func:`stop_http`."""
    from bridge.main import http_for
    http = SERVED[bridge] = http_for(bridge)
    await http.start()
    return http.port


async def stop_http(bridge) -> None:
    http = SERVED.pop(bridge, None)
    if http is not None:
        await http.stop()


def http_port(bridge) -> int:
    """The port of ``bridge``'s HTTP server (started by the ``start_bridge`` fixture)."""
    return SERVED[bridge].port


async def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, text) of a GET on the bridge's HTTP server."""
    async with (aiohttp.ClientSession() as http,
                http.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r):
        return r.status, await r.text()


def metric(text: str, name: str, **labels) -> float:
    """The sum of the samples of ``name`` with ``labels`` in a Prometheus text page."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total
