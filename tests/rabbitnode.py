"""A RabbitMQ node of the test's own, beside the machine's broker (never reconfigured).

For what a TCP proxy cannot fake: a memory alarm (``connection.blocked``), a node that dies, a
cluster. The node gets its own name, AMQP and distribution ports, and a temp dir for its config,
data and logs, writable by the ``rabbitmq`` user the server script runs as. It starts in about
10 s; ``stop()`` stops it and removes the dir. :class:`RabbitCluster` joins several such nodes
(they share the Erlang cookie of the ``rabbitmq`` user, /var/lib/rabbitmq/.erlang.cookie).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tests.ports import free_port


def available() -> bool:
    """True when this machine can start a RabbitMQ node of its own (the server is installed)."""
    return shutil.which("rabbitmq-server") is not None and shutil.which("rabbitmqctl") is not None


def _start_time(pid: str) -> str:
    """The start time of process ``pid`` (field 22 of /proc/<pid>/stat), "" when there is none
    or it is a zombie (a killed node not reaped yet counts as gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if fields[0] == "Z" else fields[19]


class RabbitNode:
    def __init__(self, name: str | None = None, config: str = "", advanced: str = "") -> None:
        """``config``: more rabbitmq.conf lines (e.g. ``consumer_timeout = 5000``); ``advanced``:
        the rabbit application's advanced.config terms (e.g. ``{channel_tick_interval, 1000}``)."""
        self.config = config
        self.advanced = advanced
        self.name = f"{name or 'epsig-' + uuid.uuid4().hex[:6]}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="rmqnode-"))
        os.chmod(self.dir, 0o777)
        #: the node's process as started: (pid, start time in /proc/<pid>/stat)
        self._process: tuple[str, str] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_CONFIG_FILE=str(self.dir / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.dir / "advanced.config"),
            RABBITMQ_MNESIA_BASE=str(self.dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.dir / "log"),
            RABBITMQ_PID_FILE=str(self.dir / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.dir / "enabled_plugins"),
            RABBITMQ_DIST_PORT=str(self.dist_port),
        )
        return env

    def start(self, timeout: float = 60) -> RabbitNode:
        conf = self.dir / "rabbitmq.conf"
        conf.write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users = none\n{self.config}\n")
        adv = self.dir / "advanced.config"
        adv.write_text(f"[{{rabbit, [{self.advanced}]}}].\n")
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "pid").unlink(missing_ok=True)  # a killed node's: ``wait`` must see the new one
        self._process = None
        for f in (conf, adv, self.dir / "enabled_plugins"):
            os.chmod(f, 0o644)
        subprocess.run(["rabbitmq-server", "-detached"], env=self._env(), check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
        # waits for the pid file, then for the rabbit app
        try:
            self.ctl("wait", str(self.dir / "pid"), "--timeout", str(int(timeout)), timeout=timeout + 5)
        except BaseException:
            # not up in time (a loaded machine): the detached node may still come up later, and
            # nobody would stop it (the caller got no node): it would run on past the test run
            self._pid()
            self.kill()
            self.wait_gone()
            raise
        finally:
            self._pid()  # the process as of now, for kill and stop
        return self

    def _pid(self) -> str | None:
        """The node's process id while that process lives: not a pid the kernel has since given
        to another process (the other pytest-xdist worker's, say), which a stale pid file would
        name. The process is the one the pid file named when it was first read since start()."""
        if self._process is None:
            pid_file = self.dir / "pid"
            pid = pid_file.read_text().strip() if pid_file.exists() else ""
            if not pid.isdigit():
                return None
            self._process = (pid, _start_time(pid))
        pid, started = self._process
        return pid if started and _start_time(pid) == started else None

    def ctl(self, *args: str, timeout: float = 30) -> str:
        r = subprocess.run(["rabbitmqctl", "-n", self.name, *args], env=self._env(), capture_output=True,
                           text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {r.stdout} {r.stderr}")
        return r.stdout

    def memory_alarm(self, on: bool) -> None:
        """Raise (or clear) the memory alarm: the node blocks publishing connections."""
        self.ctl("set_vm_memory_high_watermark", "0.000001" if on else "0.4")

    def kill(self) -> None:
        """SIGKILL the node (a node that dies); :meth:`stop` still cleans up."""
        pid = self._pid()
        if pid is not None:
            subprocess.run(["kill", "-9", pid], check=False)

    def wait_gone(self, timeout: float = 10) -> None:
        """Wait until the node's process has ended."""
        deadline = time.monotonic() + timeout
        while self._pid() is not None and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self) -> None:
        try:
            self.ctl("stop", str(self.dir / "pid"), timeout=60)
        except (RuntimeError, subprocess.TimeoutExpired):
            self.kill()
            self.wait_gone()
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitCluster:
    """``n`` nodes started in parallel, nodes 2.. joined to node 1; :meth:`stop` kills them all."""

    def __init__(self, n: int = 3) -> None:
        self.nodes = [RabbitNode() for _ in range(n)]

    def start(self) -> RabbitCluster:
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for f in [pool.submit(node.start) for node in self.nodes]:
                f.result()
        first, rest = self.nodes[0], self.nodes[1:]
        # stopping and starting the joining nodes' app at once; the joins one at a time (each
        # changes the cluster's membership on the first node)
        with ThreadPoolExecutor(len(rest) or 1) as pool:
            list(pool.map(lambda node: node.ctl("stop_app"), rest))
            for node in rest:
                node.ctl("join_cluster", first.name)
            list(pool.map(lambda node: node.ctl("start_app", timeout=60), rest))
        running = first.ctl("eval", "length(rabbit_nodes:all_running()).").strip()
        if running != str(len(self.nodes)):
            raise RuntimeError(f"{running} of {len(self.nodes)} nodes running in the cluster")
        return self

    def stop(self) -> None:
        """SIGKILL every node, then remove its dir: the cluster goes with the test, so a graceful
        stop (seconds per node, a quorum queue's members handing over) would be waited for in
        vain."""
        for node in self.nodes:
            node.kill()
        for node in self.nodes:
            node.wait_gone()
            shutil.rmtree(node.dir, ignore_errors=True)
