"""The report's plots (matplotlib figures without pyplot: no backend, no global state). Each writes
one PNG and returns its path, or None when the results hold nothing to plot."""
from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from .results import gflops, peak

KIND_COLORS = {"depthwise": "#d62728", "pointwise": "#1f77b4", "conv": "#2ca02c", "dense": "#7f7f7f"}
MARKERS = "osD^vPX"


def _save(ax, path: Path, title: str, log: str = "") -> Path:
    ax.set_title(title, fontsize=10)
    for axis in log:
        getattr(ax, f"set_{axis}scale")("log")
    ax.grid(which="both", alpha=0.3)
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    return path


def e2e_plot(doc: dict, path: Path) -> Path | None:
    entries = [e for e in doc["e2e"] if e["stats"]["n"]]
    if not entries:
        return None
    names, threads = list(dict.fromkeys(e["variant"] for e in entries)), sorted({e["threads"] for e in entries})
    ax = Figure(figsize=(9, 0.5 * len(names) * len(threads) + 1.5)).subplots()
    h = 0.8 / len(threads)
    for e in entries:
        s, j = e["stats"], threads.index(e["threads"])
        y = names.index(e["variant"]) + (j - (len(threads) - 1) / 2) * h
        ax.barh(y, s["median"], height=h * 0.9, color=f"C{j}", capsize=3,
                xerr=[[s["median"] - s["p10"]], [s["p90"] - s["median"]]], label=f"{e['threads']} thread(s)")
        ax.text(s["p90"] * 1.05, y, f"{s['median']:.3g} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("latency per image, ms (median, bars p10-p90)")
    handles = {l: h_ for h_, l in zip(*ax.get_legend_handles_labels())}     # one entry per thread count
    ax.legend(handles.values(), handles.keys(), fontsize=8)
    return _save(ax, path, "End to end, batch 1 fp32", "x")


def layers_plot(doc: dict, t: int, path: Path) -> Path | None:
    series = [(e["variant"], {c["layer"]: c["median_ms"] for c in e["calls"] if c["layer"]})
              for e in doc["layers"] if e["threads"] == t and not e["mapping_problem"]]
    if not series:
        return None
    order = [L["name"] for L in doc["model"]["layers"]]
    ax = Figure(figsize=(max(9, 0.4 * len(order) + 2), 4.8)).subplots()
    w = 0.8 / len(series)
    for j, (name, by) in enumerate(series):
        ax.bar([i + (j - (len(series) - 1) / 2) * w for i in range(len(order))], [by[k] for k in order],
               width=w * 0.95, color=f"C{j}", label=name)
    ax.set_xticks(range(len(order)), order, rotation=70, fontsize=8)
    ax.set_ylabel("kernel time, ms (median)")
    ax.legend(fontsize=8)
    return _save(ax, path, f"Per layer, {t} thread(s)", "y")


def roofline_plot(doc: dict, t: int, path: Path) -> Path | None:
    p = peak(doc, t)
    pts = [(e["variant"], c) for e in doc["layers"] if e["threads"] == t for c in e["calls"]
           if c["mult_adds"] and c["kind"] in KIND_COLORS and c["median_ms"] > 0]
    if not pts or not p:
        return None
    ai = [2 * c["mult_adds"] / c["bytes"] for _, c in pts]
    P, B, ridge = p["fma_gflops"], p["triad_gbs"], p["ridge_flop_per_byte"]
    lo, hi = min(ai + [ridge]) / 2, max(ai + [ridge]) * 2
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax = Figure(figsize=(11, 5.5)).subplots()
    ax.plot(xs, [min(P, x * B) for x in xs], "k-", lw=1.5, label=f"roof: FMA loop {P:.0f} GFLOP/s, triad {B:.1f} GB/s")
    ax.axvline(ridge, color="0.5", ls=":", lw=1, label=f"ridge point {ridge:.1f} FLOP/byte")
    names = list(dict.fromkeys(n for n, _ in pts))
    for (name, c), x in zip(pts, ai):
        ax.scatter(x, gflops(c), marker=MARKERS[names.index(name) % 7], s=36,
                   color=KIND_COLORS[c["kind"]], edgecolors="black", linewidths=0.4)
    for k in sorted({c["kind"] for _, c in pts}):
        ax.scatter([], [], color=KIND_COLORS[k], label=k)
    for i, n in enumerate(names):
        ax.scatter([], [], color="white", edgecolors="black", marker=MARKERS[i % 7], label=f"variant {n}")
    ax.set_xlabel("arithmetic intensity, FLOP per byte (2 x mult-adds / bytes of all kernel arguments)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(ax, path, f"Roofline, {t} thread(s)", "xy")


def grid_plot(doc: dict, path: Path) -> Path | None:
    pts = [g for g in doc["grid"] if g["stats"]["n"]]
    if not pts:
        return None
    ax = Figure(figsize=(9, 6)).subplots()
    names = list(dict.fromkeys(g["variant"] for g in pts))
    for i, n in enumerate(names):
        ps = [g for g in pts if g["variant"] == n]
        ax.scatter([g["mult_adds"] / 1e6 for g in ps], [g["stats"]["median"] for g in ps], color=f"C{i}",
                   marker=MARKERS[i % 7], label=n)
    for g in (g for g in pts if g["variant"] == names[0]):
        ax.annotate(f"{g['alpha']:g}-{g['resolution']}" + (f" {g['accuracy']}%" if g["accuracy"] else ""),
                    (g["mult_adds"] / 1e6, g["stats"]["median"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("mult-adds, millions")
    ax.set_ylabel("latency, ms (median)")
    ax.legend(fontsize=8)
    return _save(ax, path, "alpha x rho grid (labels: alpha-resolution, paper's top-1 where printed)", "xy")
