"""The bridge under test as a separate process, and what /proc says about it.

Normally the real ``epsignal-bridge run`` (configured only by ``EPSIGNAL_*`` variables, as in
production). The tracing-on variant and the pyinstrument profile run the same ``run`` command
through :mod:`bridge.bench.bridge_proc`, which sets up the SDK or the profiler first.
"""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aio_pika

from bridge.amqp import topology

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Names:
    """Per-run unique exchange and queue names (nothing shared with other runs or tests)."""

    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    @property
    def events(self) -> str:
        return f"bench{self.tag}.events"

    def env(self) -> dict[str, str]:
        t = self.tag
        return {
            "EPSIGNAL_EVENTS_EXCHANGE": f"bench{t}.events",
            "EPSIGNAL_COMMANDS_EXCHANGE": f"bench{t}.commands",
            "EPSIGNAL_COMMANDS_QUEUE": f"bench{t}.commands.bridge",
            "EPSIGNAL_DEAD_EXCHANGE": f"bench{t}.dead",
            "EPSIGNAL_DEAD_QUEUE": f"bench{t}.commands.dead",
            "EPSIGNAL_INSTANCE_ID": f"bench-{t}",
        }

    @property
    def commands(self) -> str:
        return f"bench{self.tag}.commands"

    @property
    def commands_queue(self) -> str:
        return f"bench{self.tag}.commands.bridge"

    async def wait_declared(self, url: str, timeout: float) -> bool:
        """Until the bridge has declared its commands queue: its broker link is up and its
        command consumer started (passive declares, nothing is created)."""
        conn = await aio_pika.connect(url)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    ch = await conn.channel()
                    try:
                        await ch.declare_queue(self.commands_queue, passive=True)
                        return True
                    except aio_pika.exceptions.ChannelNotFoundEntity:
                        await asyncio.sleep(0.05)
                    finally:
                        if not ch.is_closed:
                            await ch.close()
        except TimeoutError:
            return False
        finally:
            await conn.close()

    async def cleanup(self, url: str) -> None:
        """Delete what the bridge and the benchmark declared for this run."""
        try:
            conn = await aio_pika.connect(url)
        except Exception:
            return
        try:
            t = self.tag
            await topology.delete(
                conn, (f"bench{t}.events", f"bench{t}.commands", f"bench{t}.dead", f"bench{t}.ceiling"),
                (f"bench{t}.commands.bridge", f"bench{t}.commands.dead"))
        finally:
            await conn.close()


def closed_port() -> int:
    """A local TCP port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_of(pid: int) -> float | None:
    """utime + stime of any process, seconds; None if it is gone or unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all cores together, from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    v = [int(x) for x in parts[:8]]
    idle = v[3] + v[4]  # idle + iowait
    total = sum(v)
    return total - idle, total


def timer_overshoot_us(n: int = 2000, sleep_s: float = 0.0005) -> dict:
    """How late this machine wakes a sleeping process: ``n`` sleeps of ``sleep_s``, the overshoot
    of each (us), p50 / p99 / max. An indicator, taken before the scenarios with the machine
    idle: a VM whose vCPUs wake late (the hypervisor) shows a p99 near a millisecond, and the
    latency tails measured on it carry some of that (docs/PERFORMANCE.md, "A fifth VM")."""
    late: list[float] = []
    for _ in range(n):
        t = time.perf_counter_ns()
        time.sleep(sleep_s)
        late.append((time.perf_counter_ns() - t) / 1e3 - sleep_s * 1e6)
    late.sort()
    return {"sleeps": n, "sleep_us": sleep_s * 1e6, "p50": round(late[n // 2], 1),
            "p99": round(late[int(n * 0.99)], 1), "max": round(late[-1], 1)}


def find_broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM (``beam.smp``), to report its CPU next to the bridge's;
    None when the broker is not a local process (only reads /proc)."""
    best, best_cpu = None, -1.0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                if not f.read().startswith("beam"):
                    continue
        except OSError:
            continue
        c = cpu_of(int(d)) or 0.0
        if c > best_cpu:
            best, best_cpu = int(d), c
    return best


def raise_nofile() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (children inherit it); the new (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def bridge_command(wrapper: bool) -> list[str]:
    if wrapper:
        return [sys.executable, "-m", "bridge.bench.bridge_proc"]
    script = Path(sys.executable).with_name("epsignal-bridge")
    if script.exists():
        return [str(script), "run"]
    return [sys.executable, "-m", "bridge.cli", "run"]


def base_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment without any inherited EPSIGNAL_* or OTEL_* setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPSIGNAL_", "OTEL_"))}
    env.update(extra)
    return env


@dataclass
class BridgeProc:
    proc: asyncio.subprocess.Process
    log_path: Path
    t_spawn: int

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.returncode is None

    def status(self) -> dict[str, int]:
        """VmRSS / VmHWM in kB from /proc/<pid>/status."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
        return out

    def cpu_s(self) -> float:
        """utime + stime of the process, seconds (from /proc/<pid>/stat)."""
        c = cpu_of(self.pid)
        if c is None:
            raise OSError(f"process {self.pid} is gone")
        return c

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    async def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.proc.returncode


async def spawn_bridge(env: dict[str, str], log_path: Path, *, wrapper: bool = False,
                       args: list[str] | None = None, command: list[str] | None = None) -> BridgeProc:
    import time

    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")  # noqa: SIM115 (the child writes to it; closed below or on stop)
    try:
        t = time.monotonic_ns()
        proc = await asyncio.create_subprocess_exec(
            *(command or bridge_command(wrapper)), *(args or []), env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=log, stderr=log,
        )
    finally:
        log.close()
    return BridgeProc(proc, log_path, t)


def pipes(proc: asyncio.subprocess.Process) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
    """The stdin and stdout of a helper process started with both piped."""
    assert proc.stdin is not None and proc.stdout is not None, "started without stdin/stdout pipes"
    return proc.stdin, proc.stdout
