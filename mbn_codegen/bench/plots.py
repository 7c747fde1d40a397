"""The report's plots (matplotlib, Agg backend: no display needed). Each function writes one PNG and
returns its path, or None when the results hold nothing to plot."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"stock": "#8c8c8c", "metaschedule": "#9467bd", "ours": "#1f77b4", "ours-tuned": "#2ca02c",
          "pytorch": "#ee4c2c", "onnxruntime": "#ff7f0e", "openvino": "#17becf", "openvino-bf16": "#bcbd22"}
KIND_COLORS = {"depthwise": "#d62728", "pointwise": "#1f77b4", "conv": "#2ca02c", "dense": "#7f7f7f"}
KIND_LABELS = {"depthwise": "depthwise 3x3", "pointwise": "pointwise 1x1", "conv": "full 3x3 conv",
               "dense": "fully connected"}
MARKERS = ["o", "s", "^", "D", "v", "P", "X"]
DPI = 110


def color(name: str, i: int = 0) -> str:
    return COLORS.get(name, f"C{i % 10}")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _plain_log_ticks(ax, which: str = "xy") -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator
    f = FuncFormatter(lambda v, _: f"{v:g}")
    for axis in [a for n, a in (("x", ax.xaxis), ("y", ax.yaxis)) if n in which]:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(f)
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def e2e_plot(doc: dict, path: Path) -> Path | None:
    entries = [e for e in doc["e2e"] if e["stats"].get("n")]
    if not entries:
        return None
    threads = sorted({e["threads"] for e in entries})
    names = [v["name"] for v in doc["variants"] if any(e["variant"] == v["name"] for e in entries)]
    labels = {v["name"]: v["label"] for v in doc["variants"]}
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) * len(threads) + 1.6))
    h = 0.8 / len(threads)
    for j, t in enumerate(threads):
        for i, n in enumerate(names):
            e = next((e for e in entries if e["variant"] == n and e["threads"] == t), None)
            if not e:
                continue
            s = e["stats"]
            y = i + (j - (len(threads) - 1) / 2) * h
            ax.barh(y, s["median"], height=h * 0.9, color=color(n, i), alpha=1.0 if j else 0.55,
                    xerr=[[s["median"] - s["p10"]], [s["p90"] - s["median"]]], capsize=3,
                    label=f"{t} thread{'s' if t > 1 else ''}" if i == 0 else None)
            ax.text(s["p90"] * 1.08, y, f"{s['median']:.3g} ms ({t}t)", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [labels[n] for n in names])
    ax.invert_yaxis()
    ax.set_xscale("log")
    _plain_log_ticks(ax, "x")
    ax.set_xlabel("latency per image, ms (median, bars p10-p90; log scale)")
    ax.set_title("End to end, batch 1 fp32 (lighter bars: fewer threads)")
    lo = min(e["stats"]["p10"] for e in entries)
    hi = max(e["stats"]["p90"] for e in entries)
    ax.set_xlim(lo / 1.5, hi * 4)
    ax.grid(axis="x", which="both", alpha=0.3)
    return _save(fig, path)


def _layer_series(doc: dict, t: int) -> list[tuple[str, list[dict]]]:
    return [(e["variant"], e["calls"]) for e in doc["layers"] if e["threads"] == t]


def _x_labels(calls: list[dict]) -> list[str]:
    return [c.get("layer") or f"#{c['index']} {c['symbol'][:14]}" for c in calls]


def layers_plot(doc: dict, t: int, path: Path) -> Path | None:
    series = _layer_series(doc, t)
    if not series:
        return None
    # rows: cost-model layers where every variant maps; else the first variant's calls
    mapped = all(any(c.get("layer") for c in calls) for _, calls in series)
    if mapped:
        order = [l["name"] for l in doc["model"]["cost_layers"]]
    else:
        series = series[:1]
        order = _x_labels(series[0][1])
    fig, ax = plt.subplots(figsize=(max(9, 0.42 * len(order) + 2), 4.8))
    w = 0.8 / len(series)
    for j, (name, calls) in enumerate(series):
        by = {(c.get("layer") if mapped else lab): c["median_ms"] for c, lab in zip(calls, _x_labels(calls))}
        xs = [i + (j - (len(series) - 1) / 2) * w for i in range(len(order))]
        ys = [by.get(k, 0) for k in order]
        ax.bar(xs, ys, width=w * 0.95, color=color(name, j), label=name)
    ax.set_xticks(range(len(order)), order, rotation=70, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("kernel time, ms (median; log scale)")
    ax.set_title(f"Per layer, {t} thread{'s' if t > 1 else ''}: TVM schedule sources side by side")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    return _save(fig, path)


def roofline_plot(doc: dict, t: int, path: Path) -> Path | None:
    series = _layer_series(doc, t)
    peak = next((p for p in doc["peak"] if p.get("threads") == t), None)
    pts = [(name, c) for name, calls in series for c in calls
           if c.get("mult_adds") and c["kind"] in KIND_COLORS and c["median_ms"] > 0 and c["bytes"] > 0]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(11, 5.5))
    ai = [2 * c["mult_adds"] / c["bytes"] for _, c in pts]
    lo, hi = min(ai) / 2, max(ai) * 2
    if peak and peak.get("peak_gflops"):
        P, B = peak["peak_gflops"], peak.get("copy_bandwidth_gbs")
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        if B:
            ax.plot(xs, [min(P, x * B) for x in xs], "k-", lw=1.5,
                    label=f"roof: SGEMM {P:.0f} GFLOP/s, DRAM copy {B:.0f} GB/s")
        else:
            ax.axhline(P, color="k", lw=1.5, label=f"SGEMM peak {P:.0f} GFLOP/s")
        C = peak.get("cache_bandwidth_gbs")
        if C:
            ax.plot(xs, [min(P, x * C) for x in xs], color="0.45", ls="--", lw=1,
                    label=f"cache-resident copy {C:.0f} GB/s (512 KB)")
        nom = (peak.get("nominal") or {}).get("gflops")
        if nom:
            ax.axhline(nom, color="k", ls=":", lw=1, label=f"nominal {nom:.0f} GFLOP/s (assumed FMA units)")
    names = list(dict.fromkeys(n for n, _ in pts))
    for (name, c), x in zip(pts, ai):
        m = MARKERS[names.index(name) % len(MARKERS)]
        y = 2 * c["mult_adds"] / (c["median_ms"] * 1e-3) / 1e9
        ax.scatter(x, y, marker=m, s=36, color=KIND_COLORS[c["kind"]], edgecolors="black", linewidths=0.4)
    for k in ("depthwise", "pointwise", "conv", "dense"):
        if any(c["kind"] == k for _, c in pts):
            ax.scatter([], [], color=KIND_COLORS[k], marker="o", label=KIND_LABELS[k])
    for i, n in enumerate(names):
        ax.scatter([], [], color="white", edgecolors="black", marker=MARKERS[i % len(MARKERS)], label=f"variant {n}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity, FLOP per byte (2 x mult-adds / bytes of all kernel arguments)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"Roofline, {t} thread{'s' if t > 1 else ''}: depthwise (red) vs pointwise (blue) kernels, per layer")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(which="both", alpha=0.25)
    return _save(fig, path)


def grid_plot(doc: dict, path: Path) -> Path | None:
    pts = [g for g in doc["grid"] if g["stats"].get("n")]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(9, 6))
    names = list(dict.fromkeys(g["variant"] for g in pts))
    for i, n in enumerate(names):
        ps = sorted((g for g in pts if g["variant"] == n), key=lambda g: g["mult_adds"])
        ax.scatter([g["mult_adds"] / 1e6 for g in ps], [g["stats"]["median"] for g in ps],
                   color=color(n, i), marker=MARKERS[i % len(MARKERS)], s=40, label=n, zorder=3)
        for g in ps:
            if n != names[0]:                 # one label per grid point, on the first series
                continue
            a = f"{g['alpha']:g}" + (".0" if float(g["alpha"]).is_integer() else "")
            lab = f"{a}-{g['resolution']}"
            if g.get("accuracy") is not None:
                lab += f"  {g['accuracy']:.1f}%"
            ax.annotate(lab, (g["mult_adds"] / 1e6, g["stats"]["median"]), fontsize=6.5,
                        xytext=(4, 3), textcoords="offset points",
                        fontweight="bold" if g.get("accuracy") is not None else "normal")
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_ticks(ax)
    ax.set_xlabel("mult-adds, millions (cost model; log)")
    ax.set_ylabel("measured latency, ms (median; log)")
    t = pts[0]["threads"]
    ax.set_title(f"MobileNet v1 alpha x rho grid at {t} thread{'s' if t > 1 else ''} "
                 "(labels: alpha-resolution, paper's ImageNet top-1 where printed)")
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    ax.grid(which="both", alpha=0.25)
    return _save(fig, path)


def compare_plot(rows: list[dict], path: Path, title: str) -> Path | None:
    """rows: {"name", "a_ms", "b_ms"} per layer (and series key "series")."""
    rows = [r for r in rows if r.get("a_ms") and r.get("b_ms")]
    if not rows:
        return None
    series = list(dict.fromkeys(r["series"] for r in rows))
    order = list(dict.fromkeys(r["name"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(9, 0.42 * len(order) + 2), 4.8))
    w = 0.8 / len(series)
    for j, s in enumerate(series):
        by = {r["name"]: r["b_ms"] / r["a_ms"] for r in rows if r["series"] == s}
        xs = [i + (j - (len(series) - 1) / 2) * w for i in range(len(order))]
        ys = [by.get(k, float("nan")) for k in order]
        cols = ["#2ca02c" if y < 1 else "#d62728" for y in ys]
        ax.bar(xs, [y - 1 if y == y else 0 for y in ys], bottom=1, width=w * 0.95, color=cols,
               edgecolor=color(s.split("@")[0], j), linewidth=1.2, label=s)
    ax.axhline(1, color="k", lw=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(order)), order, rotation=70, fontsize=8)
    ax.set_ylabel("time B / time A (log; < 1 = B faster)")
    ax.set_title(title)
    ax.title.set_fontsize(10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    return _save(fig, path)
