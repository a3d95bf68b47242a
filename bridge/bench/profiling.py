"""Profiling the bridge process during a throughput round, and reading the profile.

py-spy (preferred: a sampling profiler outside the process, ~no overhead, sees C frames'
Python callers) attaches to the bridge's pid and writes collapsed stacks ("raw" format: one
``frame;frame;...;leaf count`` line per stack; open it in https://www.speedscope.app or
flamegraph.pl). :func:`analyse` turns it into the top functions by self and total time and a
breakdown by component. pyinstrument is the fallback when py-spy cannot be used.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

#: component of a frame, by path fragment (first match wins)
COMPONENTS = (
    ("bridge/pbx/", "bridge: PBX session (forward path)"),
    ("bridge/amqp/publisher", "bridge: publisher"),
    ("bridge/amqp/", "bridge: amqp other"),
    ("bridge/buffer", "bridge: buffer"),
    ("bridge/events", "bridge: events (encode)"),
    ("bridge/protocol/callstate", "bridge: call-state tracker"),
    ("bridge/protocol/", "bridge: protocol (decode)"),
    ("bridge/device", "bridge: device"),
    ("bridge/routing", "bridge: routing keys"),
    ("bridge/tracing", "bridge: tracing"),
    ("bridge/", "bridge: other"),
    ("aio_pika/", "aio-pika"),
    ("aiormq/", "aiormq"),
    ("pamqp/", "pamqp (AMQP frames)"),
    ("websockets/", "websockets"),
    ("prometheus_client/", "prometheus-client"),
    ("opentelemetry/", "opentelemetry"),
    ("asyncio/", "asyncio (event loop)"),
    ("logging/", "logging"),
    ("tenacity/", "tenacity"),
    ("yarl/", "yarl"),
    ("multidict/", "multidict"),
)


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    if exe.exists():
        return str(exe)
    return shutil.which("py-spy")


def pyinstrument_available() -> bool:
    try:
        import pyinstrument  # noqa: F401
    except ImportError:
        return False
    return True


class PySpy:
    """``py-spy record --pid`` around a block of work."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        self.pid, self.out, self.rate = pid, out, rate
        self.proc: asyncio.subprocess.Process | None = None
        self.log = out.with_suffix(".log")

    async def start(self) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed")
        log = open(self.log, "wb")  # noqa: SIM115 (py-spy writes to it; closed below)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                exe, "record", "--pid", str(self.pid), "--rate", str(self.rate),
                "--format", "raw", "--nonblocking", "--full-filenames", "-o", str(self.out),
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )
        finally:
            log.close()
        await asyncio.sleep(1.0)  # attach
        if self.proc.returncode is not None:
            raise RuntimeError(f"py-spy exited at once: {self.log.read_text(errors='replace')[-500:]}")

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes the file on SIGINT
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def _parse_frame(text: str) -> tuple[str, str]:
    """(function label without line, file) of one py-spy frame ``func (file:line)``."""
    mt = _FRAME.match(text)
    if mt is None:
        return text, ""
    f = mt.group("file")
    return f"{mt.group('func')} ({_short(f)})", f


def _short(path: str) -> str:
    """A path as a module-ish name: after site-packages/, lib/python3.x/ or the project root."""
    p = path.replace("\\", "/")
    i = p.find("site-packages/")
    if i >= 0:
        return p[i + len("site-packages/"):]
    i = p.find("/lib/python3")
    if i >= 0:
        return p[i + 1:].split("/", 2)[-1]
    i = p.rfind("/bridge/")
    if i >= 0:
        return p[i + 1:]
    return p


def component(path: str) -> str:
    p = path.replace("\\", "/")
    for frag, name in COMPONENTS:
        if frag in p:
            return name
    if "/lib/python3" in p and "site-packages" not in p:
        return "stdlib other"
    return "other"


def analyse(collapsed: str, top: int = 15) -> dict:
    """Top functions by self and total samples, and self samples by component."""
    self_c: Counter = Counter()
    total_c: Counter = Counter()
    comp_c: Counter = Counter()
    n = 0
    for line in collapsed.splitlines():
        line = line.rstrip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            c = int(count)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames:
            continue
        n += c
        parsed = [_parse_frame(f) for f in frames]
        leaf, leaf_file = parsed[-1]
        self_c[leaf] += c
        comp_c[component(leaf_file)] += c
        for label in {p[0] for p in parsed}:
            total_c[label] += c

    def pct(v: int) -> float:
        return round(100.0 * v / n, 1) if n else 0.0
    return {
        "samples": n,
        "top_self": [{"function": k, "pct": pct(v)} for k, v in self_c.most_common(top)],
        "top_total": [{"function": k, "pct": pct(v)} for k, v in total_c.most_common(top)],
        "self_by_component": [{"component": k, "pct": pct(v)} for k, v in comp_c.most_common()],
    }
