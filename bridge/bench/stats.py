"""Percentiles and small helpers for the benchmark's numbers."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p99.9", 0.999))


def rank(sorted_data: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted data (q in 0..1)."""
    n = len(sorted_data)
    k = max(1, math.ceil(round(q * n, 9)))
    return sorted_data[min(k, n) - 1]


def summary(samples_ns: Sequence[int], unit: str = "ms") -> dict:
    """count, p50/p90/p99/p99.9, max and mean of nanosecond samples, in ``unit`` (ms or us)."""
    div = {"ms": 1e6, "us": 1e3}[unit]
    data = sorted(samples_ns)
    out: dict = {"unit": unit, "count": len(data)}
    if not data:
        for name, _ in QUANTILES:
            out[name] = None
        out["max"] = out["mean"] = None
        return out
    for name, q in QUANTILES:
        out[name] = round(rank(data, q) / div, 3)
    out["max"] = round(data[-1] / div, 3)
    out["mean"] = round(statistics.fmean(data) / div, 3)
    return out


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def cdf_points(samples_ns: Sequence[int], div: float, points: int = 400) -> tuple[list[float], list[float]]:
    """(x, y) of the empirical CDF, thinned to about ``points`` points (the tail kept dense)."""
    data = sorted(samples_ns)
    n = len(data)
    if not n:
        return [], []
    idx: set[int] = set()
    for i in range(points):
        # denser towards the tail: 1 - 10**(-k) spacing
        q = 1 - 10 ** (-4 * i / points)
        idx.add(min(n - 1, int(q * n)))
    idx.update(range(max(0, n - 20), n))
    xs, ys = [], []
    for i in sorted(idx):
        xs.append(data[i] / div)
        ys.append((i + 1) / n)
    return xs, ys


def rounded(x: float | None, nd: int = 1) -> float | None:
    """``x`` rounded to ``nd`` digits; None stays None (a figure that was not measured)."""
    return None if x is None else round(x, nd)
