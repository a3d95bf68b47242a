"""The simulator's counters and the forwarding round-trip window."""

from __future__ import annotations

from collections import deque

RTT_WINDOW = 100_000


class RttWindow:
    """The last :data:`RTT_WINDOW` forwarding round trips, in microseconds.

    Adding is O(1); the percentiles are computed when asked (a sort of the window).
    """

    __slots__ = ("_samples",)

    def __init__(self, size: int = RTT_WINDOW) -> None:
        self._samples: deque[int] = deque(maxlen=size)

    def add(self, us: int) -> None:
        self._samples.append(us)

    def summary(self) -> dict[str, int | None]:
        """``p50``/``p99`` (nearest rank, None without samples) and ``count`` (samples held)."""
        data = sorted(self._samples)
        n = len(data)
        if not n:
            return {"p50": None, "p99": None, "count": 0}
        return {"p50": _rank(data, 0.50), "p99": _rank(data, 0.99), "count": n}


def _rank(data: list[int], q: float) -> int:
    k = max(1, -(-int(q * len(data) * 1000) // 1000))  # ceil(q * n), at least 1
    return data[min(k, len(data)) - 1]


class Counters:
    """Monotonic counters; the gauges (sessions, devices, active calls) live in the simulator."""

    __slots__ = (
        "app_calls",
        "attach_conflicts",
        "bad_frames",
        "bad_signaling",
        "binary_frames",
        "calls_aborted",
        "calls_completed",
        "calls_stalled",
        "calls_started",
        "invalid_utf8",
        "late_signaling",
        "logins_failed",
        "logins_ok",
        "messages_forwarded",
        "messages_injected",
    )
    app_calls: int
    attach_conflicts: int
    bad_frames: int
    bad_signaling: int
    binary_frames: int
    calls_aborted: int
    calls_completed: int
    calls_stalled: int
    calls_started: int
    invalid_utf8: int
    late_signaling: int
    logins_failed: int
    logins_ok: int
    messages_forwarded: int
    messages_injected: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}
