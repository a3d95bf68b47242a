"""The benchmark's plots (matplotlib, if installed): latency CDFs and memory vs devices."""

from __future__ import annotations

from pathlib import Path

from bridge.bench import stats


def plots(results: dict, samples: dict[str, list[int]], out: Path) -> dict:
    """Latency CDFs of ``samples`` and memory vs devices of the scale scenario as PNG files in
    ``out``; their paths by name (or why there are none)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        return {"skipped": "matplotlib is not installed"}
    files = {}
    for prefix, name, what in (("", "latency-cdf", "latency CDF"),
                               ("peer-", "peer-cdf", "against the hand-written peer, paced runs of every round")):
        hop = {k: v for k, v in samples.items() if k.startswith(f"{prefix}hop ") and v}
        fwd = {k: v for k, v in samples.items() if k.startswith(f"{prefix}forward ") and v}
        if not (hop or fwd):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for ax, series, div, unit, title in (
            (axes[0], hop, 1e6, "ms", "hop latency: frame from the PBX -> event at a consumer"),
            (axes[1], fwd, 1e3, "µs", "forwarding latency: frame out -> forwarded frame back"),
        ):
            for label, data in series.items():
                xs, ys = stats.cdf_points(data, div)
                ax.plot(xs, ys, label=f"{label.split(' ', 1)[1]} (n={len(data)})")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(unit)
            ax.set_ylabel("fraction of messages")
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if series:
                ax.legend(fontsize=8)
        fig.suptitle(f"epsignal-bridge {what} ({results['meta']['mode']} run)")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files[name.replace("-", "_")] = str(path)
    runs = [r for r in results.get("scale", {}).get("runs", []) if "rss_mb" in r]
    if runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        xs = [r["devices"] for r in runs]
        ax.plot(xs, [r["rss_mb"] for r in runs], "o-", label="VmRSS after attach")
        ax.plot(xs, [r["hwm_mb"] for r in runs], "s--", label="VmHWM (peak)")
        ax.axhline(250, color="red", lw=0.8, ls=":", label="target at 10,000: 250 MB")
        ax.set_xlabel("attached devices (one WebSocket session each)")
        ax.set_ylabel("MB")
        ax.set_title("bridge process memory vs devices")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "rss-vs-devices.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files["rss_vs_devices"] = str(path)
    return files
