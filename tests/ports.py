"""Local TCP ports for a listener a test starts later (a RabbitMQ node, a bridge's HTTP port).

A port from ``bind(("127.0.0.1", 0))`` lies in the kernel's ephemeral range
(``net.ipv4.ip_local_port_range``, 32768-60999 here), where any outgoing connection, of this
process or of the other pytest-xdist worker, may take it between the test's release and the
listener's bind. These come from below that range, from a block of their own per xdist worker
(``PYTEST_XDIST_WORKER`` gw0, gw1, ...), handed out in turn and each checked free by binding it.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
from pathlib import Path

FIRST, BLOCK = 20000, 2000  # blocks 20000-21999 (gw0), 22000-23999 (gw1), ... (six below 32768)


@functools.cache
def _block_start() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    n = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    start = FIRST + n * BLOCK
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if start + BLOCK > low:  # a block of its own for each worker, or none
        raise RuntimeError(f"xdist worker {worker}: no port block of its own below the ephemeral range ({low})")
    return start


_turn = itertools.count()


def free_port() -> int:
    """A port of this worker's block that nobody listens on or is connected from right now (the
    next one each call, so a port just released is not handed out again at once)."""
    start = _block_start()
    for _ in range(BLOCK):
        port = start + next(_turn) % BLOCK
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{start + BLOCK - 1}")
