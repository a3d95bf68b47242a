"""The process: builds the bridge and its HTTP server, runs until SIGTERM or SIGINT.

``epsignal-bridge run`` (bridge.cli) comes here. The bridge (bridge.service) knows nothing of
HTTP; the HTTP server (bridge.http) knows callables of the bridge, not the bridge.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable

from bridge import tracing
from bridge.config import Settings
from bridge.http import HttpServer
from bridge.service import Bridge

log = logging.getLogger("bridge")


def http_for(bridge: Bridge) -> HttpServer:
    """The bridge's /healthz, /readyz, /metrics and /leases on EPSIGNAL_HTTP_HOST:EPSIGNAL_HTTP_PORT."""
    return HttpServer(bridge.s.http_host, bridge.s.http_port, bridge.not_ready_reasons, bridge.snapshot,
                      lambda: bridge.leases.view() if bridge.leases is not None else None)


#: the cyclic GC's first threshold while serving (CPython's default is 700). Every frame makes
#: and drops small containers (and with tracing the SDK keeps spans queued until exported), so
#: with 700 the collector ran ~100 times a second and its older generations kept re-walking the
#: survivors: in the tracing benchmark GC took 2.7 s of 28.6 s CPU (tracing on) and 1.1 s of 20 s
#: (off); with 10,000, 0.26 s and 0.21 s. Garbage in cycles waits a little longer, that is all.
GC_THRESHOLD0 = 10_000


def tune_gc() -> None:
    """Before serving: the threshold above, and what exists by now (modules, classes, the
    settings: some 50,000 objects that live as long as the process) moved out of the collector's
    sight (``gc.freeze``), so a full collection walks only what serving made: 20 ms of stalled
    event loop per full collection less (docs/PERFORMANCE.md)."""
    gc.set_threshold(GC_THRESHOLD0, *gc.get_threshold()[1:])
    gc.collect()
    gc.freeze()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The service's event loop: uvloop's (a dependency; asyncio's loop and its socket writes
    were half of the bridge's CPU, docs/PERFORMANCE.md), asyncio's where uvloop is not installed
    (a platform without its wheels). None: asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def run_until_signalled(settings: Settings, grace_s: float = 10.0) -> int:
    """``epsignal-bridge run``: start, serve until SIGTERM/SIGINT, stop gracefully."""
    import signal

    tracing.configure()
    tune_gc()
    bridge = Bridge(settings)
    http = http_for(bridge)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await http.start()
    await bridge.start()
    await stop.wait()
    log.info("stopping (grace %.0fs)", grace_s)
    flushed = await bridge.stop(grace_s)
    await http.stop()
    return 0 if flushed else 1

