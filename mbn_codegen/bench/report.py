"""results.json -> report.html, self-contained (plots embedded as base64 PNG); `mbn-codegen bench
--report-only DIR` regenerates it. Also `--compare`: two reports side by side, as compare.md."""
from __future__ import annotations

import base64
import html
from pathlib import Path

from .board import BOARD_METHOD, EMULATED_NOTE
from .results import gflops, peak


def fmt_ms(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.{0 if x >= 100 else 1 if x >= 10 else 2 if x >= 1 else 3}f}"


def fmt_x(r: float | None) -> str:
    return "–" if r is None else f"{r:.3g}×"


def pct_of_peak(gflops: float, p: dict | None) -> str:
    """Against the FMA loop, which no kernel can beat: a kernel above it means the peak is wrong."""
    frac = gflops / p["fma_gflops"] if p else None
    return "–" if frac is None else "above peak: peak wrong" if frac > 1 else f"{100 * frac:.1f}%"


def emulated(doc: dict) -> bool:
    return bool((doc["provenance"].get("board") or {}).get("emulated"))


def e2e_medians(doc: dict, t: int) -> dict[str, float]:
    return {e["variant"]: e["stats"]["median"] for e in doc["e2e"] if e["threads"] == t and e["stats"]["n"]}


def summarize(doc: dict) -> dict:
    """The headline rows (also read by benchmarks/performance_targets.py); an emulator's timings
    support no comparison."""
    rows, compare = [], not emulated(doc)
    kind = {v["name"]: v["kind"] for v in doc["variants"]}
    for t in doc["config"]["threads"]:
        e2e, med = {e["variant"]: e for e in doc["e2e"] if e["threads"] == t and e["stats"]["n"]}, e2e_medians(doc, t)
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
    def cell(tag, c):
        return f"<{tag}>{c if str(c).startswith('<') else html.escape(str(c))}</{tag}>"
    return ("<table><tr>" + "".join(cell("th", h) for h in head) + "</tr>"
            + "".join("<tr>" + "".join(cell("td", c) for c in r) + "</tr>" for r in rows) + "</table>")


def _img(out: Path, name: str | None, caption: str) -> str:
    if not name:
        return ""
    data = base64.b64encode((out / name).read_bytes()).decode()
    return (f"<figure><img src='data:image/png;base64,{data}' alt='{caption}'>"
            f"<figcaption>{caption}</figcaption></figure>")


def _headline(doc: dict, t: int) -> str:
    rows = [r for r in doc["summary"]["headline"] if r["threads"] == t]
    measured = sorted((r for r in rows if "median_ms" in r), key=lambda r: 0 if emulated(doc) else r["median_ms"])
    fp = next((r["fastest_peer"] for r in rows if r.get("fastest_peer")), None)
    body = [[r["label"], fmt_ms(r["median_ms"]), f"{fmt_ms(r['p10_ms'])} – {fmt_ms(r['p90_ms'])}",
             f"{fmt_ms(r['ci95_ms'][0])} – {fmt_ms(r['ci95_ms'][1])}",
             "–" if r["noise"] is None else f"{100 * r['noise']:.1f}%", fmt_x(r["vs_stock"]),
             fmt_x(r["vs_fastest_peer"]), r["n"], {True: "✓", False: "✗ differs"}.get(r["check_ok"], "–")]
            for r in measured]
    body += [[r["label"], "–", "", "", "", "", "", 0, f"{r['status']}: {r['note']}"]
             for r in rows if "median_ms" not in r]
    noise = [r["noise"] for r in rows if r.get("noise") is not None]
    return (f"<h3>{t} thread(s)</h3>" + _table(["variant", "median ms", "p10 – p90", "95% CI of median", "noise",
                                                 "vs stock", f"vs fastest peer ({fp or '–'})", "samples",
                                                 "output check"], body)
            + (f"<p>Noise of this run at {t} thread(s): up to {100 * max(noise):.1f}%.</p>" if noise else ""))


def _layers(doc: dict, t: int) -> str:
    entries = [e for e in doc["layers"] if e["threads"] == t]
    mapped, out = [e for e in entries if not e["mapping_problem"]], ""
    if mapped:
        ref = min(mapped, key=lambda e: e["consistency"]["e2e_ms"])
        by = {e["variant"]: {c["layer"]: c for c in e["calls"] if c["layer"]} for e in mapped}
        body = []
        for L in doc["model"]["layers"]:
            rc = by[ref["variant"]][L["name"]]
            body.append([L["name"], L["kind"], L["shape"], f"{L['mult_adds'] / 1e6:.3g}",
                         *[fmt_ms(by[n][L["name"]]["median_ms"]) for n in by],
                         f"{gflops(rc):.1f}", pct_of_peak(gflops(rc), peak(doc, t)), rc.get("source") or "–"])
        med = e2e_medians(doc, t)
        for label, f in (("other kernels (reshape, pool, layout)",
                          lambda e: sum(c["median_ms"] for c in e["calls"] if not c["layer"])),
                         ("sum of kernels", lambda e: e["consistency"]["kernel_sum_ms"]),
                         ("end to end, same process", lambda e: e["consistency"]["e2e_ms"]),
                         ("overhead: end to end − sum of kernels", lambda e: e["consistency"]["unattributed_ms"]),
                         ("end to end, interleaved run", lambda e: med.get(e["variant"]))):
            body.append([f"<b>{label}</b>", "", "", "", *[fmt_ms(f(e)) for e in mapped], "", "", ""])
        out += _table(["layer", "type", "shape", "MMACs", *[f"{n} ms" for n in by],
                       f"{ref['variant']} GFLOP/s", "% of FMA peak", "schedule"], body)
    for e in (e for e in entries if e["mapping_problem"]):
        out += (f"<p>{e['variant']}: kernel calls not mapped to the ONNX layers "
                f"({html.escape(e['mapping_problem'])}).</p>"
                + _table(["#", "symbol", "kind", "ms"],
                         [[c["index"], c["symbol"], c["kind"], fmt_ms(c["median_ms"])] for c in e["calls"]]))
    c0 = entries[0]["consistency"]
    out += (f"<p>Consistency: warm sum × (1 − {c0['tolerance']:.2f}) ≤ end to end ≤ (cold sum + "
            f"{c0['per_call_allowance_us']:g} µs × VM instructions) × (1 + {c0['tolerance']:.2f}).</p>")
    keys = ("kernel_sum_ms", "cold_kernel_sum_ms", "e2e_ms", "unattributed_ms")
    rows = [[e["variant"], *[fmt_ms(c[k]) for k in keys],
             f"{fmt_ms(c['lower_ms'])} – {fmt_ms(c['upper_ms'])}", "ok" if c["ok"] else "<b>outside</b>"]
            for e in entries for c in [e["consistency"]]]
    return out + _table(["variant", "warm sum ms", "cold sum ms", "end to end ms", "overhead ms", "allowed range ms",
                         "check"], rows)


def _warnings(doc: dict) -> list[str]:
    out = [f"<p>⚠ {x['variant']} {c['layer']} at {x['threads']} thread(s) runs above the measured FMA peak: the "
           "peak measurement is wrong, no % of peak is printed for it.</p>"
           for x in doc["layers"] for c in x["calls"]
           if c["mult_adds"] and pct_of_peak(gflops(c), peak(doc, x["threads"])).startswith("above")]
    return out + [f"<p>⚠ The FMA loop at {q['threads']} thread(s) is not register-resident "
                  f"({html.escape(str(q['asm_check']))}): its peak is too low.</p>"
                  for q in doc["peak"] if not q["asm_check"]["ok"]]


def _machine(doc: dict) -> list[str]:
    p, iso = doc["provenance"], doc["isolation"]
    m = p["machine"]
    peaks = [[q["threads"], f"{q['fma_gflops']:.1f}", f"{q['triad_gbs']:.1f}", f"{q['ridge_flop_per_byte']:.1f}",
              f"{q['asm_check']['fmas_in_loop']} FMAs on {', '.join(q['asm_check']['registers'][:3])}…, "
              + ("no memory operands" if q["asm_check"]["ok"] else "NOT register-resident"), q["method"]]
             for q in doc["peak"]]
    fences = "; ".join(f"{t} thread(s): median {f['median_wait_ms']:.0f} ms, max {f['max_wait_ms']:.0f} ms, "
                       f"{f['timeouts']} timeouts of {f['blocks']} blocks" for t, f in iso.get("fence", {}).items())
    spin = ", ".join(f"{k}={v}" for k, v in iso.get("spin_settings", {}).items())
    return ["<h2>Machine peak and isolation</h2>",
            _table(["threads", "FMA loop GFLOP/s", "triad GB/s", "ridge FLOP/byte", "hot loop", "method"], peaks),
            f"<p>Spin settings of every worker: {html.escape(spin)}. Variant order: {iso.get('order', '–')}. Before "
            f"each block a fence waits until all workers' CPU time stops growing (idle pools blocked, not spinning): "
            f"{html.escape(fences)}.</p>", "<h2>Provenance</h2>", _table(["", ""], [
                ["CPU", f"{m['cpu_model']} ({m['arch']}), {m['usable_cores']} usable cores, {m['mhz'] or '–'} MHz"],
                ["SIMD flags", " ".join(m["simd_flags"])], ["memory", f"{m['memory_bytes'] / 2**30:.1f} GiB"],
                ["load average", f"start {m['load_average_start']}, end {p.get('load_average_end')}"],
                ["versions", ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v)],
                ["target", f"{p['target']['name']}: {p['target'].get('tvm_target')}"], ["git", p["git"] or "–"],
                *([["board", ", ".join(f"{k} {v}" for k, v in p["board"].items() if k != "features")]]
                  if p.get("board") else []),
                ["command", p["command"]], ["duration", f"{p.get('seconds', '–')} s"]])]


METHOD = ("<h2>Method</h2><p>End to end: each variant in its own worker process per thread count, same seeded "
          "input, output checked against ONNX Runtime; warm-up, then interleaved rounds of blocks in random order; "
          "median, p10/p90 and a bootstrap 95% interval over all samples. Per layer: the VM's instrument hook "
          "records each kernel call; each is timed alone (warm and cold) with time_evaluator; calls map in order to "
          "the ONNX graph's Conv/Gemm nodes, whose mult-adds come from their own shapes. % of peak divides by the "
          "FMA loop; the roofline's memory roof is the triad (DRAM): kernels whose operands fit in the caches can sit "
          "above it.</p>")
CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto}table{border-collapse:collapse;margin:.5em 0;"
       "font-size:.85em}td,th{border:1px solid #ccc;padding:2px 6px}th{background:#eef}img{max-width:100%}")


def render(doc: dict, out: Path, plots: dict[str, str]) -> str:
    m, p = doc["model"], doc["provenance"]
    h = [f"<h1>Benchmark: {html.escape(m['name'])} on {html.escape(p['machine']['cpu_model'])}</h1>",
         f"<p>Target <code>{p['target']['name']}</code>, batch 1, fp32, weights: {html.escape(m['weights'])}"
         + (f", {m['mult_adds'] / 1e6:.1f}M mult-adds (counted from the ONNX graph)" if m.get("mult_adds") else "")
         + f". {p['date']}. Status: <b>{doc['status']}</b>.</p>", *_warnings(doc),
         *([f"<p class='emulated'><b>⚠ {EMULATED_NOTE}</b></p>"] if emulated(doc) else []),
         "<h2>End to end</h2><p>Only ratios within one interleaved run count: absolute times on a shared machine "
         "drift by more than the differences between variants. Noise = (p90 − p10) / median of the variant's "
         "per-block medians.</p>", *[_headline(doc, t) for t in doc["config"]["threads"]],
         _img(out, plots.get("e2e"), "End-to-end latency per variant")]
    for i, t in enumerate(sorted({e["threads"] for e in doc["layers"]})):
        h += ["<h2>Per layer</h2>"] * (i == 0) + [f"<h3>{t} thread(s)</h3>", _layers(doc, t),
                                                 _img(out, plots.get(f"layers-{t}"), f"Per-layer time, {t} thread(s)"),
                                                 _img(out, plots.get(f"roofline-{t}"), f"Roofline, {t} thread(s)")]
    if doc["grid"]:
        h += ["<h2>Width x resolution grid</h2>", _table(
            ["variant", "alpha", "resolution", "MMACs", "paper top-1 %", "median ms"],
            [[g["variant"], f"{g['alpha']:g}", g["resolution"], f"{g['mult_adds'] / 1e6:.0f}",
              g["accuracy"] or "–", fmt_ms(g["stats"].get("median"))] for g in doc["grid"]]),
              _img(out, plots.get("grid"), "Latency against mult-adds")]
    h += [*_machine(doc), BOARD_METHOD if p.get("board") else METHOD, f"<p><b>{html.escape(closing_line(doc))}</b></p>"]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(m['name'])}</title>"
            f"<style>{CSS}</style></head><body>\n" + "\n".join(h) + "\n</body></html>\n")


def write_report(out: str | Path, doc: dict) -> Path:
    from . import plots as P

    out, made = Path(out), {}
    jobs = [("e2e", P.e2e_plot, ()), ("grid", P.grid_plot, ())]
    jobs += [(f"{k}-{t}", f, (t,)) for t in doc["config"]["threads"]
             for k, f in (("layers", P.layers_plot), ("roofline", P.roofline_plot))]
    for key, fn, args in jobs:
        try:
            if fn(doc, *args, out / f"{key}.png"):
                made[key] = f"{key}.png"
        except Exception as e:          # a broken plot must not lose the report
            doc.setdefault("plot_errors", []).append(f"{key}.png: {type(e).__name__}: {e}")
    (out / "report.html").write_text(render(doc, out, made))
    return out / "report.html"


def compare(a: str | Path, b: str | Path, out: str | Path | None = None, variants: list[str] | None = None) -> dict:
    """End to end and per layer, for every (variant, threads) both measured; speedup = time A / time B."""
    from .results import load

    A, B = load(a), load(b)

    def medians(doc):                     # (variant, threads, layer or None: end to end) -> median ms
        out = {(e["variant"], e["threads"], None): e["stats"]["median"] for e in doc["e2e"] if e["stats"]["n"]}
        return out | {(e["variant"], e["threads"], c["layer"]): c["median_ms"] for e in doc["layers"]
                      for c in e["calls"] if c["layer"]}
    ma, mb = medians(A), medians(B)
    rows = [{"variant": k[0], "threads": k[1], "name": k[2], "a_ms": ma[k], "b_ms": ms, "speedup": ma[k] / ms}
            for k, ms in mb.items() if k in ma and (not variants or k[0] in variants)]
    cpu = A["provenance"]["machine"]["cpu_model"], B["provenance"]["machine"]["cpu_model"]
    lines = [f"# Compare: A = {Path(a).resolve().name}, B = {Path(b).resolve().name}", "",
             f"A on {cpu[0]}, B on {cpu[1]}" + (" (different CPUs!)" if cpu[0] != cpu[1] else "")
             + ". Speedup = time A / time B (> 1: B is faster)."]
    parts = {"e2e": [r for r in rows if not r["name"]], "layers": [r for r in rows if r["name"]]}
    for title, part in zip(("End to end", "Per layer"), parts.values()):
        lines += ["", f"## {title}", "", "| variant | threads | layer | A ms | B ms | speedup |", "|" + "---|" * 6]
        lines += [f"| {r['variant']} | {r['threads']} | {r['name'] or '–'} | {fmt_ms(r['a_ms'])} | "
                  f"{fmt_ms(r['b_ms'])} | {fmt_x(r['speedup'])} |" for r in part]
    out = Path(out) if out else Path(b) / f"compare-vs-{Path(a).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    return {**parts, "md": out / "compare.md", "text": "\n".join(lines) + "\n"}
