"""The event loop's pause for one full collection of CPython's cyclic GC with N events buffered
(a broker outage), in the bridge's process as ``epsignal-bridge run`` sets it up (its modules
loaded, :func:`bridge.main.tune_gc`): ``python -m bridge.bench.gcpause [N ...]``.
docs/PERFORMANCE.md ("GC pauses") has the before and after."""

from __future__ import annotations

import gc
import sys
import time

import bridge.cli  # noqa: F401  (the bridge's heap, as when it serves)
from bridge.buffer import EventBuffer
from bridge.events import EventFactory
from bridge.main import tune_gc


def pause_ms(n: int, buf: EventBuffer, factory: EventFactory) -> float:
    """Best of 5 full collections, in ms, once ``buf`` holds ``n`` events."""
    while len(buf) < n:
        event = factory.detached(f"hw{len(buf) % 100}", "command")
        assert event is not None  # (None only for a kind the deployment does not publish)
        buf.append(event)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        gc.collect()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv: list[str]) -> None:
    sizes = sorted(int(a) for a in argv) or [20_000, 50_000, 100_000]  # the buffer only grows
    tune_gc()
    buf, factory = EventBuffer(max(sizes), 300.0, clock=time.monotonic), EventFactory("gcpause")
    print(", ".join(f"{n:,} events: {pause_ms(n, buf, factory):.1f} ms" for n in sizes),
          f"| objects the collector tracks: {len(gc.get_objects()):,}")


if __name__ == "__main__":
    main(sys.argv[1:])
