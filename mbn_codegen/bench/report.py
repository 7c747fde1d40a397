"""results.json -> report.html, self-contained: tables and matplotlib plots (no pyplot: no backend, no
global state) embedded as base64 PNG."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from matplotlib.figure import Figure

from .board import BOARD_METHOD, EMULATED_NOTE

KIND_COLORS = {"depthwise": "#d62728", "pointwise": "#1f77b4", "conv": "#2ca02c", "dense": "#7f7f7f"}
MARKERS = "osD^vPX"
METHOD = ("<h2>Method</h2><p>End to end: each variant in its own worker process per thread count, same seeded "
          "input, output checked against ONNX Runtime; warm-up, then interleaved rounds of blocks in random order; "
          "median, p10/p90 and a bootstrap 95% interval over all samples. Per layer: the VM's instrument hook "
          "reads the clock before and after each kernel call inside whole runs; calls map in order to "
          "the ONNX graph's Conv/Gemm nodes, whose mult-adds come from their own shapes. ONNX Runtime's per-layer times "
          "are its own profiler's, inside whole runs (its NCHWc reorders are separate nodes). % of peak divides by the "
          "FMA loop; the roofline's memory roof is the triad (DRAM): kernels whose operands fit in the caches can sit "
          "above it.</p>")
CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:.5em 0;"
       "font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px}th{background:#eef}img{max-width:100%}")


def fmt_ms(x: float | None) -> str:
    return "–" if x is None else f"{x:.{0 if x >= 100 else 1 if x >= 10 else 2 if x >= 1 else 3}f}"


def fmt_x(r: float | None) -> str:
    return "–" if r is None else f"{r:.3g}×"


def pct_of_peak(gflops: float, p: dict | None) -> str:
    """Against the FMA loop, which no kernel can beat: a kernel above it means the peak is wrong."""
    frac = gflops / p["fma_gflops"] if p else None
    return "–" if frac is None else "above peak: peak wrong" if frac > 1 else f"{100 * frac:.1f}%"


def peak(doc: dict, t: int) -> dict | None:
    return next((p for p in doc["peak"] if p["threads"] == t), None)


def gflops(call: dict) -> float:
    return 2 * call["mult_adds"] / call["median_ms"] / 1e6


def emulated(doc: dict) -> bool:
    return bool((doc["provenance"].get("board") or {}).get("emulated"))


def summarize(doc: dict) -> dict:
    """The headline rows (also read by benchmarks/performance_targets.py); an emulator's timings
    support no comparison."""
    rows, compare = [], not emulated(doc)
    kind = {v["name"]: v["kind"] for v in doc["variants"]}
    for t in doc["config"]["threads"]:
        e2e = {e["variant"]: e for e in doc["e2e"] if e["threads"] == t and e["stats"]["n"]}
        med = {n: e["stats"]["median"] for n, e in e2e.items()}
        chk = {v["name"]: next((c for c in v["checks"] if c["threads"] == t), {}) for v in doc["variants"]}
        peers = {n: m for n, m in med.items() if kind[n] == "peer" and chk[n].get("ok")}
        fp = min(peers, key=peers.get) if peers else None
        for v in doc["variants"]:
            row = {"threads": t, "variant": v["name"], "label": v["label"], "kind": v["kind"], "note": v["note"],
                   "status": v["status"] if v["status"] != "ok" or v["name"] in e2e else "not measured"}
            if v["name"] in e2e:
                s, m = e2e[v["name"]]["stats"], med[v["name"]]
                row.update(median_ms=m, p10_ms=s["p10"], p90_ms=s["p90"], ci95_ms=s["ci95"], n=s["n"],
                           noise=e2e[v["name"]]["noise"], check_ok=chk[v["name"]].get("ok"),
                           vs_stock=med["stock"] / m if "stock" in med and compare else None, fastest_peer=fp,
                           vs_fastest_peer=peers[fp] / m if fp and compare else None)
            rows.append(row)
    return {"headline": rows}


def closing_line(doc: dict) -> str:
    ps = ", ".join(f"{p['fma_gflops']:.1f} GFLOP/s at {p['threads']} thread{'s' if p['threads'] > 1 else ''}"
                   for p in doc["peak"])
    return f"machine peak (FMA loop): {ps or 'not measured'}; CPU {doc['provenance']['machine']['cpu_model']}"


def _table(head: list[str], rows: list[list]) -> str:
    """Cells that start with '<' are HTML already."""
    def tr(tag, cells):
        return "<tr>" + "".join(f"<{tag}>{c if str(c).startswith('<') else html.escape(str(c))}</{tag}>"
                                for c in cells) + "</tr>"
    return "<table>" + tr("th", head) + "".join(tr("td", r) for r in rows) + "</table>"


def _headline(doc: dict, t: int) -> str:
    rows = [r for r in doc["summary"]["headline"] if r["threads"] == t]
    measured = sorted((r for r in rows if "median_ms" in r), key=lambda r: 0 if emulated(doc) else r["median_ms"])
    fp = next((r["fastest_peer"] for r in measured if r["fastest_peer"]), None)
    body = [[r["label"], fmt_ms(r["median_ms"]), f"{fmt_ms(r['p10_ms'])} – {fmt_ms(r['p90_ms'])}",
             f"{fmt_ms(r['ci95_ms'][0])} – {fmt_ms(r['ci95_ms'][1])}",
             "–" if r["noise"] is None else f"{100 * r['noise']:.1f}%", fmt_x(r["vs_stock"]),
             fmt_x(r["vs_fastest_peer"]), r["n"], {True: "✓", False: "✗ differs"}.get(r["check_ok"], "–")]
            for r in measured] + [[r["label"], "–", "", "", "", "", "", 0, f"{r['status']}: {r['note']}"]
                                  for r in rows if "median_ms" not in r]
    noise = [r["noise"] for r in measured if r["noise"] is not None]
    return (f"<h3>{t} thread(s)</h3>" + _table(["variant", "median ms", "p10 – p90", "95% CI of median", "noise",
                                                 "vs stock", f"vs fastest peer ({fp or '–'})", "samples",
                                                 "output check"], body)
            + (f"<p>Noise of this run at {t} thread(s): up to {100 * max(noise):.1f}%.</p>" if noise else ""))


def _layers(doc: dict, t: int) -> str:
    entries = [e for e in doc["layers"] if e["threads"] == t]
    mapped, out = [e for e in entries if not e["mapping_problem"]], ""
    if mapped:
        tvm = {v["name"] for v in doc["variants"] if v["kind"] == "tvm"}
        ref = min([e for e in mapped if e["variant"] in tvm] or mapped, key=lambda e: e["consistency"]["e2e_ms"])
        by = {e["variant"]: {c["layer"]: c for c in e["calls"] if c["layer"]} for e in mapped}
        out += _table(["layer", "type", "shape", "MMACs", *[f"{n} ms" for n in by], f"{ref['variant']} GFLOP/s",
                       "% of FMA peak", "schedule"],
                      [[L["name"], L["kind"], L["shape"], f"{L['mult_adds'] / 1e6:.3g}",
                        *[fmt_ms(by[n][L["name"]]["median_ms"]) for n in by], f"{gflops(rc):.1f}",
                        pct_of_peak(gflops(rc), peak(doc, t)), rc.get("source") or "–"]
                       for L in doc["model"]["layers"] for rc in [by[ref["variant"]][L["name"]]]])
    for e in (e for e in entries if e["mapping_problem"]):
        out += (f"<p>{e['variant']}: kernel calls not mapped to the ONNX layers ({html.escape(e['mapping_problem'])})"
                ".</p>" + _table(["#", "symbol", "kind", "ms"], [[c["index"], c["symbol"], c["kind"],
                                                                  fmt_ms(c["median_ms"])] for c in e["calls"]]))
    med = {r["variant"]: r.get("median_ms") for r in doc["summary"]["headline"] if r["threads"] == t}
    return out + _table(["variant", "other kernels (reshape, pool, layout) ms", "sum of kernels ms",
                         "end to end, same process ms", "overhead: end to end − sum of kernels ms",
                         "end to end, interleaved run ms"],
                        [[e["variant"], fmt_ms(sum(c["median_ms"] for c in e["calls"] if not c["layer"])),
                          *[fmt_ms(e["consistency"][k]) for k in ("kernel_sum_ms", "e2e_ms", "unattributed_ms")],
                          fmt_ms(med.get(e["variant"]))] for e in entries])


def _machine(doc: dict) -> list[str]:
    p, iso = doc["provenance"], doc["isolation"]
    m = p["machine"]
    peaks = [[q["threads"], f"{q['fma_gflops']:.1f}", f"{q['triad_gbs']:.1f}", f"{q['ridge_flop_per_byte']:.1f}",
              f"{q['asm_check']['fmas_in_loop']} FMAs on {', '.join(q['asm_check']['registers'][:3])}…, "
              + ("no memory operands" if q["asm_check"]["ok"] else "<b>NOT register-resident: peak too low</b>"),
              q["method"]] for q in doc["peak"]]
    fences = "; ".join(f"{t} thread(s): median {f['median_wait_ms']:.0f} ms, max {f['max_wait_ms']:.0f} ms, "
                       f"{f['timeouts']} timeouts of {f['blocks']} blocks" for t, f in iso.get("fence", {}).items())
    spin = ", ".join(f"{k}={v}" for k, v in iso.get("spin_settings", {}).items())
    prov = {"CPU": f"{m['cpu_model']} ({m['arch']}), {m['usable_cores']} usable cores, {m['mhz'] or '–'} MHz",
            "SIMD flags": " ".join(m["simd_flags"]), "memory": f"{(m['memory_bytes'] or 0) / 2**30:.1f} GiB",
            "load average": f"start {m['load_average_start']}, end {p['load_average_end']}",
            "versions": ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v),
            "target": f"{p['target']['name']}: {p['target'].get('tvm_target')}", "git": p["git"] or "–",
            "board": ", ".join(f"{k} {v}" for k, v in (p.get("board") or {}).items() if k != "features"),
            "command": p["command"], "duration": f"{p['seconds']} s"}
    return ["<h2>Machine peak and isolation</h2>",
            _table(["threads", "FMA loop GFLOP/s", "triad GB/s", "ridge FLOP/byte", "hot loop", "method"], peaks),
            f"<p>Spin settings of every worker: {html.escape(spin)}. Variant order: {iso.get('order', '–')}. Before "
            f"each block a fence waits until all workers' CPU time stops growing (idle pools blocked, not spinning): "
            f"{html.escape(fences)}.</p>", "<h2>Provenance</h2>",
            _table(["", ""], [[k, v] for k, v in prov.items() if v])]


def render(doc: dict, pngs: dict[str, bytes]) -> str:
    def img(key, caption):
        return key in pngs and (f"<figure><img src='data:image/png;base64,{base64.b64encode(pngs[key]).decode()}' "
                                f"alt='{caption}'><figcaption>{caption}</figcaption></figure>") or ""
    m, p = doc["model"], doc["provenance"]
    h = [f"<h1>Benchmark: {html.escape(m['name'])} on {html.escape(p['machine']['cpu_model'])}</h1>",
         f"<p>Target <code>{p['target']['name']}</code>, batch 1, fp32, weights: {html.escape(m['weights'])}"
         + (f", {m['mult_adds'] / 1e6:.1f}M mult-adds (counted from the ONNX graph)" if m.get("mult_adds") else "")
         + f". {p['date']}. Status: <b>{doc['status']}</b>.</p>",
         *([f"<p class='emulated'><b>⚠ {EMULATED_NOTE}</b></p>"] if emulated(doc) else []),
         "<h2>End to end</h2><p>Only ratios within one interleaved run count: absolute times on a shared machine "
         "drift by more than the differences between variants. Noise = (p90 − p10) / median of the variant's "
         "per-block medians.</p>", *[_headline(doc, t) for t in doc["config"]["threads"]],
         img("e2e", "End-to-end latency per variant")]
    for i, t in enumerate(sorted({e["threads"] for e in doc["layers"]})):
        h += ["<h2>Per layer</h2>"] * (i == 0) + [f"<h3>{t} thread(s)</h3>", _layers(doc, t),
                                                 img(f"layers-{t}", f"Per-layer time, {t} thread(s)"),
                                                 img(f"roofline-{t}", f"Roofline, {t} thread(s)")]
    h += [*_machine(doc), BOARD_METHOD if p.get("board") else METHOD, f"<p><b>{html.escape(closing_line(doc))}</b></p>"]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(m['name'])}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(h) + "\n</body></html>\n")


def write_report(out: str | Path, doc: dict) -> Path:
    out, pngs = Path(out), {}
    plots = {"e2e": (e2e_plot,)}
    for t in doc["config"]["threads"]:
        plots.update({f"layers-{t}": (layers_plot, t), f"roofline-{t}": (roofline_plot, t)})
    for key, (fn, *args) in plots.items():
        try:
            if fn(doc, *args, out / f"{key}.png"):
                pngs[key] = (out / f"{key}.png").read_bytes()
        except Exception as e:          # a broken plot must not lose the report
            doc.setdefault("plot_errors", []).append(f"{key}.png: {type(e).__name__}: {e}")
    (out / "report.html").write_text(render(doc, pngs))
    return out / "report.html"


# --- the plots: each writes one PNG and returns its path, or None when there is nothing to plot -------

def _save(ax, path: Path, title: str, xlabel: str, ylabel: str, log: str, **legend) -> Path:
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    for axis in log:
        getattr(ax, f"set_{axis}scale")("log")
    ax.grid(which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**{"fontsize": 8, **legend})
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=110)
    return path


def e2e_plot(doc: dict, path: Path) -> Path | None:
    entries = sorted((e for e in doc["e2e"] if e["stats"]["n"]), key=lambda e: e["threads"])
    if not entries:
        return None
    ax = Figure(figsize=(9, 0.4 * len(entries) + 1.5)).subplots()
    for y, e in enumerate(entries):
        s = e["stats"]
        ax.barh(y, s["median"], color=f"C{e['threads'] % 10}", capsize=3,
                xerr=[[s["median"] - s["p10"]], [s["p90"] - s["median"]]])
        ax.text(s["p90"] * 1.05, y, f"{s['median']:.3g} ms", va="center", fontsize=8)
    ax.set_yticks(range(len(entries)), [f"{e['variant']}, {e['threads']} thread(s)" for e in entries])
    ax.invert_yaxis()
    return _save(ax, path, "End to end, batch 1 fp32", "latency per image, ms (median, bars p10-p90)", "", "x")


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
    return _save(ax, path, f"Per layer, {t} thread(s)", "", "kernel time, ms (median)", "y")


def roofline_plot(doc: dict, t: int, path: Path) -> Path | None:
    p = peak(doc, t)
    pts = [(e["variant"], c) for e in doc["layers"] if e["threads"] == t for c in e["calls"]
           if c["mult_adds"] and c["bytes"] and c["kind"] in KIND_COLORS and c["median_ms"] > 0]
    if not pts or not p:
        return None
    ai = [2 * c["mult_adds"] / c["bytes"] for _, c in pts]
    P, B, ridge = p["fma_gflops"], p["triad_gbs"], p["ridge_flop_per_byte"]
    lo, hi = min(ai + [ridge]) / 2, max(ai + [ridge]) * 2
    ax = Figure(figsize=(11, 5.5)).subplots()
    ax.plot([lo, ridge, hi], [lo * B, P, P], "k-", lw=1.5, label=f"roof: FMA loop {P:.0f} GFLOP/s, triad {B:.1f} GB/s")
    ax.axvline(ridge, color="0.5", ls=":", lw=1, label=f"ridge point {ridge:.1f} FLOP/byte")
    names = list(dict.fromkeys(n for n, _ in pts))
    for n, k in dict.fromkeys((n, c["kind"]) for n, c in pts):       # marker: the variant, colour: the kind
        xy = [(x, gflops(c)) for (m, c), x in zip(pts, ai) if (m, c["kind"]) == (n, k)]
        ax.scatter(*zip(*xy), marker=MARKERS[names.index(n) % 7], s=36, color=KIND_COLORS[k], edgecolors="black",
                   linewidths=0.4, label=f"{n}: {k}")
    return _save(ax, path, f"Roofline, {t} thread(s)", "arithmetic intensity, FLOP per byte (2 x mult-adds / bytes "
                 "of all kernel arguments)", "achieved GFLOP/s", "xy", fontsize=7, loc="upper left",
                 bbox_to_anchor=(1.01, 1.0))
