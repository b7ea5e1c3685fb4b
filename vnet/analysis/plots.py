"""`--plot DIR`: PNGs of the latencies in trace files (matplotlib, Agg: no display).

    segment_cdf.png    per-segment latency CDF (log x), the end-to-end one dashed
    latency_heatmap.png  end-to-end latency of the most common path over time
                       (time x log latency bins, colour = packets per bin)
    waterfall.png      the slowest packets of that path, hop by hop (one bar per
                       segment, from the packet's first hop)

Everything comes from the streaming join (vnet.analysis.stream), as `vnet analyze`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .stream import PacketTable, PathRows, path_hash

MAX_SEGMENTS = 10   # CDF lines: the most frequent segments
US = 1e3


def _mpl():
    from .export import require

    mpl = require("matplotlib", "--plot")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _short(tl: PacketTable, hop: int) -> str:
    return tl.hop_names[hop]


def plot_all(tl: PacketTable, out_dir: str | os.PathLike, slowest: int = 20,
             paths: list[PathRows] | None = None) -> list[Path]:
    """Write the PNGs of a joined trace (stream.read_table) into out_dir (created); returns
    their paths. Plots with no data (no packet seen at two hops) are not written; paths:
    only these rows of it (e.g. a time window)."""
    plt = _mpl()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = sorted((p for p in (tl.paths if paths is None else paths) if p.count),
                   key=lambda p: (-p.count, path_hash(p.hops)))
    written: list[Path] = []
    if not any(len(p.hops) >= 2 for p in paths):
        return written
    main = next(p for p in paths if len(p.hops) >= 2)
    written.append(_cdf(plt, tl, paths, main, out / "segment_cdf.png"))
    written.append(_heatmap(plt, tl, main, out / "latency_heatmap.png"))
    written.append(_waterfall(plt, tl, main, slowest, out / "waterfall.png"))
    return written


def _plain_log(axis) -> None:
    """Log-scale ticks as plain numbers (5, 10, 20, 50, ...), not 10^x."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    fmt = FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(fmt)
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _path_label(tl: PacketTable, hops) -> str:
    names = [_short(tl, h) for h in hops]
    return " → ".join(names) if len(names) <= 3 else f"{names[0]} → … → {names[-1]} ({len(names)} hops)"


def _cdf(plt, tl: PacketTable, paths: list[PathRows], main: PathRows, path: Path) -> Path:
    cols: dict[tuple[int, int], list[np.ndarray]] = {}
    for p in paths:
        for i in range(len(p.hops) - 1):
            cols.setdefault((p.hops[i], p.hops[i + 1]), []).append(p.column(i))
    n = {k: sum(c.size for c in v) for k, v in cols.items()}
    top = sorted(cols, key=lambda k: (-n[k], k))[:MAX_SEGMENTS]
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    for fa, fb in top:
        d = np.sort(np.concatenate(cols[(fa, fb)])) / US
        y = np.arange(1, d.size + 1) / d.size
        ax.step(np.maximum(d, 1e-3), y, where="post",
                label=f"{_short(tl, fa)} → {_short(tl, fb)}  (n={d.size:,}, p99 {_q(d, .99):.1f} µs)")
    e2e = np.sort(main.e2e()) / US
    ax.step(np.maximum(e2e, 1e-3), np.arange(1, e2e.size + 1) / e2e.size, where="post", color="black",
            linestyle="--", linewidth=2,
            label=f"end to end: {_path_label(tl, main.hops)}  (n={e2e.size:,}, p99 {_q(e2e, .99):.1f} µs)")
    ax.set_xscale("log")
    _plain_log(ax.xaxis)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("latency (µs, log scale)")
    ax.set_ylabel("fraction of packets with latency ≤ x")
    ax.set_title("Per-segment latency CDF (time from one hop to the next)")
    ax.axhline(0.99, color="grey", linewidth=0.8, linestyle=":")
    ax.text(ax.get_xlim()[0], 0.99, " p99", va="bottom", ha="left", color="grey", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, title="segment (from → to)", title_fontsize=8)
    return _save(fig, plt, path)


def _q(sorted_values: np.ndarray, q: float) -> float:
    return float(sorted_values[max(0, int(np.ceil(q * sorted_values.size)) - 1)])


def _heatmap(plt, tl: PacketTable, main: PathRows, path: Path) -> Path:
    from matplotlib.colors import LogNorm

    t = (main.first_ts - tl.t0) / 1e9
    lat = np.maximum(main.e2e(), 1) / US
    tbins = max(10, min(200, int(np.sqrt(t.size))))
    lo, hi = np.log10(lat.min()), np.log10(lat.max())
    pad = max(0.1 * (hi - lo), 0.05)  # the extremes are not squeezed against the frame
    lbins = np.logspace(lo - pad, hi + pad, 60)
    tedges = np.linspace(t.min(), max(t.max(), t.min() + 1e-6), tbins + 1)
    h, xe, ye = np.histogram2d(t, lat, bins=(tedges, lbins))
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    mesh = ax.pcolormesh(xe, ye, h.T, norm=LogNorm(vmin=1, vmax=max(h.max(), 1)), cmap="viridis")
    cb = fig.colorbar(mesh, ax=ax)
    cb.set_label("packets per bin (log scale)")
    ax.set_yscale("log")
    _plain_log(ax.yaxis)
    ax.set_xlabel("time since the first packet (s)")
    ax.set_ylabel("end-to-end latency (µs, log scale)")
    ax.set_title(f"End-to-end latency over time\n{_path_label(tl, main.hops)}, {main.count:,} packets",
                 fontsize=11)
    p50, p99 = np.percentile(lat, 50), np.percentile(lat, 99)
    ax.axhline(p50, color="white", linestyle="--", linewidth=1, label=f"p50 {p50:.1f} µs")
    ax.axhline(p99, color="red", linestyle="--", linewidth=1, label=f"p99 {p99:.1f} µs")
    ax.legend(loc="center right", fontsize=8, facecolor="lightgrey", title="end-to-end", title_fontsize=8)
    return _save(fig, plt, path)


def _waterfall(plt, tl: PacketTable, main: PathRows, slowest: int, path: Path) -> Path:
    pick = np.argsort(-main.e2e(), kind="stable")[:max(1, slowest)]  # slowest first
    hops = main.hops
    cmap = plt.get_cmap("tab10" if len(hops) <= 11 else "tab20")
    fig, ax = plt.subplots(figsize=(11, 2.2 + 0.35 * pick.size), dpi=110, layout="constrained")
    labels = []
    rows = main.rows(np.sort(pick))
    by_row = {int(r): rows[k] for k, r in enumerate(np.sort(pick).tolist())}
    pkt = main.pkt_id
    for row, i in enumerate(pick.tolist()):
        rel = np.r_[0, np.cumsum(by_row[i])] / US
        for s in range(len(hops) - 1):
            ax.barh(row, rel[s + 1] - rel[s], left=rel[s], color=cmap(s % cmap.N), edgecolor="white", height=0.7,
                    label=f"{_short(tl, hops[s])} → {_short(tl, hops[s + 1])}" if row == 0 else None)
        labels.append(f"{int(pkt[i]):016x}  {rel[-1]:.1f} µs")
    ax.set_yticks(range(pick.size), labels, fontsize=8, family="monospace")
    ax.invert_yaxis()
    ax.set_xlabel("time since the packet's first hop (µs)")
    ax.set_ylabel("packet (pkt_id, end-to-end latency)")
    ax.set_title(f"The {pick.size} slowest packets, hop by hop\n{_path_label(tl, hops)}", fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(loc="outside lower center", ncol=2, fontsize=8, title="segment (from → to)", title_fontsize=8)
    return _save(fig, plt, path)


def _save(fig, plt, path: Path) -> Path:
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
