"""Per-device command rate limit: a token bucket per hw id. Pure (the clock is passed in).

One device's flood of commands (a runaway consumer, a hostile one) is refused with a clear
reason instead of taking the bridge's time and memory from every other device.
"""

from __future__ import annotations


class RateLimiter:
    """A token bucket per key: ``burst`` tokens at most, ``rate`` new ones a second; at most
    ``max_keys`` buckets (beyond, the full ones are forgotten)."""

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last time)

    def allow(self, key: str, now: float) -> bool:
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        ok = tokens >= 1.0
        if ok:
            tokens -= 1.0
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._prune(now)
        self._buckets[key] = (tokens, now)
        return ok

    def _prune(self, now: float) -> None:
        """Forget buckets that are full again (they behave exactly like new ones)."""
        full = [k for k, (t, last) in self._buckets.items() if t + (now - last) * self.rate >= self.burst]
        for k in full:
            del self._buckets[k]
