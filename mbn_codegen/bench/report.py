"""results.json -> report.md and report.html (self-contained: plots embedded as base64 PNG).

Both are rendered from one list of blocks, so they say the same thing. Regenerate a report from
its results with `mbn-codegen bench --report-only DIR`.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from .layers import CONSISTENCY_TOLERANCE, VM_CALL_ALLOWANCE_US
from .measure import SETTLE_S


def fmt_ms(x: float | None) -> str:
    if x is None or x != x:
        return "–"
    for lim, f in ((100, "{:.0f}"), (10, "{:.1f}"), (1, "{:.2f}"), (0.1, "{:.3f}")):
        if x >= lim:
            return f.format(x)
    return f"{x:.4f}"


def fmt_x(r: float | None) -> str:
    if r is None or r != r:
        return "–"
    return f"{r:.3g}×"


def _threads(doc: dict) -> list[int]:
    return list(doc["config"]["threads"])


def _variant(doc: dict, name: str) -> dict:
    return next((v for v in doc["variants"] if v["name"] == name), {"name": name, "label": name, "kind": "tvm"})


def _check(doc: dict, name: str, t: int) -> dict | None:
    return next((c for c in _variant(doc, name).get("checks", []) if c["threads"] == t), None)


def summarize(doc: dict) -> dict:
    """Headline rows per thread count: median, p10/p90, 95% CI, speedup vs stock and vs the fastest
    peer (peers whose output matched ONNX Runtime)."""
    rows = []
    for t in _threads(doc):
        e2e = {e["variant"]: e["stats"] for e in doc["e2e"] if e["threads"] == t and e["stats"].get("n")}
        stock = e2e.get("stock", {}).get("median")
        peers = {n: s["median"] for n, s in e2e.items() if _variant(doc, n)["kind"] == "peer"
                 and (_check(doc, n, t) or {}).get("ok", True)}
        fastest_peer = min(peers, key=peers.get) if peers else None
        for v in doc["variants"]:
            s = e2e.get(v["name"])
            row = {"threads": t, "variant": v["name"], "label": v["label"], "kind": v["kind"],
                   "status": v["status"] if v["status"] != "ok" or s else "not measured", "note": v["note"]}
            if s:
                chk = _check(doc, v["name"], t) or {}
                row.update(median_ms=s["median"], p10_ms=s["p10"], p90_ms=s["p90"], ci95_ms=s["ci95"], n=s["n"],
                           vs_stock=(stock / s["median"]) if stock else None,
                           vs_fastest_peer=(peers[fastest_peer] / s["median"]) if fastest_peer else None,
                           fastest_peer=fastest_peer, check_ok=chk.get("ok"), max_abs_err=chk.get("max_abs_err"))
            rows.append(row)
    return {"headline": rows}


def _peak(doc: dict, t: int) -> float | None:
    p = next((p for p in doc["peak"] if p.get("threads") == t), None)
    return p.get("peak_gflops") if p else None


def headline_blocks(doc: dict) -> list:
    out = []
    summary = doc.get("summary") or summarize(doc)
    for t in _threads(doc):
        rows = [r for r in summary["headline"] if r["threads"] == t]
        measured = [r for r in rows if "median_ms" in r]
        if not measured:
            continue
        fp = measured[0].get("fastest_peer")
        body = []
        for r in sorted(measured, key=lambda r: r["median_ms"]):
            ok = r.get("check_ok")
            chk = "✓" if ok else ("✗ differs (max err %.2g)" % r["max_abs_err"] if ok is False else "–")
            body.append([r["label"], fmt_ms(r["median_ms"]), f"{fmt_ms(r['p10_ms'])} – {fmt_ms(r['p90_ms'])}",
                         f"{fmt_ms(r['ci95_ms'][0])} – {fmt_ms(r['ci95_ms'][1])}", fmt_x(r.get("vs_stock")),
                         fmt_x(r.get("vs_fastest_peer")), str(r["n"]), chk])
        for r in rows:
            if "median_ms" not in r:
                body.append([r["label"], "–", "", "", "", "", "0", f"{r['status']}: {r['note']}"])
        out.append(("h3", f"{t} thread{'s' if t > 1 else ''}"))
        out.append(("table", ["variant", "median ms", "p10 – p90", "95% CI of median", "vs stock",
                              f"vs fastest peer ({fp or '–'})", "samples", "output check"], body))
        best = min(measured, key=lambda r: r["median_ms"])
        tvm = [r for r in measured if r["kind"] == "tvm"]
        txt = f"Fastest at {t} thread{'s' if t > 1 else ''}: **{best['label']}**, {fmt_ms(best['median_ms'])} ms."
        if tvm:
            bt = min(tvm, key=lambda r: r["median_ms"])
            txt += f" Best TVM build: {bt['label']}, {fmt_ms(bt['median_ms'])} ms"
            if bt.get("vs_fastest_peer"):
                txt += f" ({fmt_x(bt['vs_fastest_peer'])} the speed of the fastest peer)"
            txt += "."
        out.append(("p", txt))
    return out


def layer_blocks(doc: dict, t: int) -> list:
    entries = [e for e in doc["layers"] if e["threads"] == t]
    if not entries:
        return []
    peak = _peak(doc, t)
    out = [("h3", f"{t} thread{'s' if t > 1 else ''}")]
    mapped = [e for e in entries if not e["mapping_problem"]]
    e2e_med = {e["variant"]: next((x["stats"]["median"] for x in doc["e2e"]
                                   if x["variant"] == e["variant"] and x["threads"] == t and x["stats"].get("n")), None)
               for e in entries}
    if mapped:
        ref = min(mapped, key=lambda e: e["consistency"]["e2e_ms"])
        stock = next((e for e in mapped if e["variant"] == "stock"), None)
        names = [e["variant"] for e in mapped]
        head = ["layer", "type", "shape", "MMACs"] + [f"{n} ms" for n in names] + \
               [f"{ref['variant']} GFLOP/s", "% of peak", "schedule"] + \
               ([f"{ref['variant']} vs stock"] if stock and ref is not stock else [])
        by = {e["variant"]: {c["layer"]: c for c in e["calls"] if c.get("layer")} for e in mapped}
        body = []
        for L in doc["model"]["cost_layers"]:
            rc = by[ref["variant"]].get(L["name"])
            row = [L["name"], L["kind"], (rc or {}).get("shape", ""), f"{L['mult_adds'] / 1e6:.3g}"]
            row += [fmt_ms(by[n].get(L["name"], {}).get("median_ms")) for n in names]
            if rc and L["mult_adds"]:
                g = 2 * L["mult_adds"] / (rc["median_ms"] * 1e-3) / 1e9
                row += [f"{g:.1f}", f"{100 * g / peak:.1f}%" if peak else "–", rc.get("source") or "–"]
            else:
                row += ["–", "–", (rc or {}).get("source") or "–"]
            if stock and ref is not stock:
                a, b = by["stock"].get(L["name"]), rc
                row.append(fmt_x(a["median_ms"] / b["median_ms"]) if a and b else "–")
            body.append(row)
        extra = [("other kernels (reshape, layout)",
                  {e["variant"]: sum(c["median_ms"] for c in e["calls"] if not c.get("layer")) for e in mapped}),
                 ("sum of kernels", {e["variant"]: e["consistency"]["kernel_sum_ms"] for e in mapped}),
                 ("end to end, same process", {e["variant"]: e["consistency"]["e2e_ms"] for e in mapped}),
                 ("end to end, interleaved run", e2e_med)]
        pad = len(head) - 4 - len(names)
        for label, vals in extra:
            body.append([f"**{label}**", "", "", ""] + [fmt_ms(vals.get(n)) for n in names] + [""] * pad)
        out.append(("table", head, body))
        out.append(("p", f"% of peak: achieved GFLOP/s (2 × mult-adds / time) over the measured SGEMM peak "
                         f"at {t} thread(s), {peak:.0f} GFLOP/s." if peak else "No peak measured."))
        out += kernel_blocks(ref)
    for e in entries:
        if e["mapping_problem"]:
            out.append(("p", f"{e['variant']}: per-call table (not mapped to the cost model's layers: "
                             f"{e['mapping_problem']})."))
            out.append(("table", ["#", "symbol", "kind", "MMACs (from shapes)", "ms", "GFLOP/s"],
                        [[str(c["index"]), c["symbol"], c["kind"],
                          f"{c['mult_adds'] / 1e6:.2f}" if c.get("mult_adds") else "–", fmt_ms(c["median_ms"]),
                          f"{2 * c['mult_adds'] / c['median_ms'] / 1e6:.1f}" if c.get("mult_adds") else "–"]
                         for c in e["calls"]]))
    cons = []
    for e in entries:
        c = e["consistency"]
        cons.append([e["variant"], fmt_ms(c["kernel_sum_ms"]), fmt_ms(c.get("cold_kernel_sum_ms")),
                     fmt_ms(c["e2e_ms"]), str(c.get("vm_calls", "–")),
                     f"{fmt_ms(c.get('lower_ms'))} – {fmt_ms(c.get('upper_ms'))}",
                     "ok" if c["ok"] else "**outside**"])
    tol = entries[0]["consistency"]
    out.append(("p", f"Consistency: each kernel call is timed warm (back to back, caches hot) and cold (its "
                     f"weights and output flushed from the caches first); inside the graph it takes between "
                     f"the two, and the VM adds its own instructions (allocations, shape checks, dispatch). "
                     f"The check: warm sum × (1 − {tol['tolerance']:.2f}) ≤ end to end ≤ (cold sum + "
                     f"{tol.get('per_call_allowance_us', 0):g} µs × VM instructions) × (1 + {tol['tolerance']:.2f}). "
                     f"The per-layer table shows warm times."))
    out.append(("table", ["variant", "warm sum ms", "cold sum ms", "end to end ms", "VM instructions",
                          "allowed range ms", "check"], cons))
    return out


def kernel_blocks(entry: dict) -> list:
    agg: dict[str, dict] = {}
    for c in entry["calls"]:
        a = agg.setdefault(c["symbol"], {"kind": c["kind"], "calls": 0, "ms": 0.0, "layers": [], "source": c.get("source")})
        a["calls"] += 1
        a["ms"] += c["median_ms"]
        if c.get("layer"):
            a["layers"].append(c["layer"])
    body = [[s, a["kind"], str(a["calls"]), ", ".join(a["layers"]) or "–", fmt_ms(a["ms"]), a["source"] or "–"]
            for s, a in sorted(agg.items(), key=lambda kv: -kv[1]["ms"])]
    return [("p", f"Kernels of {entry['variant']} (identical layers share one compiled kernel; each call "
                  "is timed on its own):"),
            ("table", ["kernel symbol", "kind", "calls", "layers", "total ms", "schedule"], body)]


def provenance_blocks(doc: dict) -> list:
    p = doc["provenance"]
    m = p["machine"]
    rows = [["CPU", f"{m['cpu_model']} ({m['arch']}), {m['usable_cores']} usable cores"
                    + (" (virtual machine)" if m.get("hypervisor") else "")],
            ["clock", f"{m['mhz']:.0f} MHz (as reported by the OS)" if m.get("mhz") else "not readable"],
            ["SIMD flags", " ".join(m["simd_flags"]) or "–"],
            ["memory", f"{m['memory_bytes'] / 2**30:.1f} GiB" if m.get("memory_bytes") else "–"],
            ["GPU", m["gpu"]],
            ["load average (1/5/15 min)", f"start {m.get('load_average_start')}, end {m.get('load_average_end')}"],
            ["board", p["board"]], ["OS", m["os"]],
            ["versions", ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v)],
            ["target", f"{(p.get('target') or {}).get('name')}: {(p.get('target') or {}).get('tvm_target')} "
                       f"({p.get('target_file')})"],
            ["git", f"{p['git']['commit'][:12]}{' (uncommitted changes)' if p['git']['dirty'] else ''}"
             if p.get("git") else "–"],
            ["date (UTC)", p["date"]], ["host", p["host"]], ["command", p["command"]],
            ["duration", f"{p.get('seconds', '–')} s"]]
    for name, db in (p.get("databases") or {}).items():
        if db:
            desc = f"{db['path']}: " + (f"{db.get('tuning_records', 0)} tuning records (trials), "
                                        f"{db.get('workloads', 0)} workloads" if db.get("exists") else "absent")
            if db.get("provenance"):
                desc += f"; provenance {db['provenance']}"
            rows.append([f"database ({name})", desc])
    for pk in doc["peak"]:
        rows.append([f"peak, {pk['threads']} thread(s)",
                     f"{pk.get('peak_gflops', 0):.1f} GFLOP/s ({pk.get('method', '')}); numpy "
                     f"{pk.get('numpy_sgemm_gflops', 0):.1f}, torch {pk.get('torch_sgemm_gflops', 0):.1f}; "
                     f"copy bandwidth {pk.get('copy_bandwidth_gbs', 0):.1f} GB/s; nominal "
                     f"{(pk.get('nominal') or {}).get('gflops') or 0:.0f} GFLOP/s "
                     f"({(pk.get('nominal') or {}).get('note', '')})"])
    return [("table", ["", ""], rows)]


def method_blocks(doc: dict) -> list:
    c = doc["config"]
    return [("p", f"End to end: every variant runs in its own process at each thread count (TVM_NUM_THREADS, "
                  f"OMP/OpenBLAS/MKL variables, torch.set_num_threads, ONNX Runtime intra_op_num_threads, "
                  f"OpenVINO INFERENCE_NUM_THREADS), on the same seeded input, called the way a user calls it "
                  f"(numpy in, numpy out). {c['warmup']} warm-up calls, then {c['rounds']} interleaved rounds: "
                  f"each round visits every variant once (order rotated every round) and times {c['reps']} "
                  f"calls after one untimed call and a {SETTLE_S * 1e3:.0f} ms pause (thread pools spin-wait for "
                  f"tens of ms after their last job; the pause keeps one variant's spinning threads off the "
                  f"next one's cores), so drift hits all variants alike. Statistics over all "
                  f"samples: median, p10/p90, and a bootstrap 95% interval of the median. Every variant's "
                  f"output is checked against ONNX Runtime's (rtol 1e-3) before timing."),
            ("p", f"Per layer: the VM's instrument hook records each kernel call with its real arguments; "
                  f"each call is then timed alone with TVM's time_evaluator (warm: back to back), in "
                  f"{c['layer_rounds']} rounds interleaved with the whole model; median per call. Kernel calls map to the cost model's "
                  f"layers in program order by kind (a renamed kernel, e.g. `_prepacked`, takes its manifest "
                  f"entry's kind). Each call is also timed cold (arguments but the first flushed from the "
                  f"caches, as MetaSchedule's runner does) for the consistency bracket."),
            ("p", "Roofline: arithmetic intensity = 2 × mult-adds / bytes of all the kernel's arguments "
                  "(input, weights, bias, output: the compulsory traffic); the roof is the measured SGEMM "
                  "peak and the measured copy bandwidth.")]


def blocks(doc: dict, plots: dict[str, str]) -> list:
    m = doc["model"]
    p = doc["provenance"]
    alpha = f"{m['alpha']:g}" + (".0" if float(m["alpha"]).is_integer() else "")
    title = (f"{m['name']} {alpha}-{m['resolution']} on {p['machine']['cpu_model']}"
             if not m.get("onnx") else f"{m['onnx']} on {p['machine']['cpu_model']}")
    b: list = [("h1", f"Benchmark: {title}")]
    status = doc["status"]
    b.append(("p", f"Target `{(p.get('target') or {}).get('name')}`, batch 1, fp32, weights: {m['weights']}"
                   + (f", {m['mult_adds'] / 1e6:.1f}M mult-adds" if m.get("mult_adds") else "")
                   + f". {p['date']}. Status: **{status}**"
                   + (" (the run was stopped: what it measured is below)" if status != "complete" else "") + "."))
    la = p["machine"].get("load_average_start")
    if la and la[0] > 0.5 * p["machine"]["usable_cores"]:
        b.append(("p", f"⚠ The machine was busy when the bench started (load average {la}); interleaving "
                       "spreads the disturbance over all variants, but absolute times are pessimistic."))
    one = next((x.get("peak_gflops") for x in doc["peak"] if x.get("threads") == 1), None)
    for x in doc["peak"]:
        if one and x.get("threads", 1) > 1 and x.get("peak_gflops", 0) < 0.6 * x["threads"] * one:
            b.append(("p", f"⚠ SGEMM at {x['threads']} threads reached only {x['peak_gflops'] / one:.2f}× its "
                           f"1-thread rate: other processes were probably using cores during the run, so "
                           f"multi-thread numbers are pessimistic (load average at the end: "
                           f"{p['machine'].get('load_average_end')})."))
    b.append(("h2", "End to end"))
    b += headline_blocks(doc)
    if "e2e" in plots:
        b.append(("img", plots["e2e"], "End-to-end latency per variant"))
    unavailable = [v for v in doc["variants"] if v["status"] != "ok"]
    if unavailable:
        b.append(("p", "Not measured: " + "; ".join(f"{v['label']} ({v['note']})" for v in unavailable) + "."))
    if doc["layers"]:
        b.append(("h2", "Per layer"))
        for t in _threads(doc):
            b += layer_blocks(doc, t)
            if f"layers-{t}" in plots:
                b.append(("img", plots[f"layers-{t}"], f"Per-layer kernel time, {t} thread(s)"))
            if f"roofline-{t}" in plots:
                b.append(("img", plots[f"roofline-{t}"], f"Roofline, {t} thread(s)"))
    if doc["grid"]:
        b.append(("h2", "Width x resolution grid"))
        rows = [[g["variant"], f"{g['alpha']:g}", str(g["resolution"]), f"{g['mult_adds'] / 1e6:.0f}",
                 f"{g['accuracy']:.1f}" if g.get("accuracy") is not None else "–",
                 fmt_ms(g["stats"].get("median")) if g["stats"].get("n") else f"{g['status']}: {g['note']}"]
                for g in doc["grid"]]
        b.append(("table", ["variant", "alpha", "resolution", "MMACs", "paper top-1 %", "median ms"], rows))
        if "grid" in plots:
            b.append(("img", plots["grid"], "Latency against mult-adds, alpha x rho grid"))
    b.append(("h2", "Provenance"))
    b += provenance_blocks(doc)
    b.append(("h2", "Method"))
    b += method_blocks(doc)
    return b


# --- rendering -----------------------------------------------------------------------------------

def to_markdown(bl: list) -> str:
    out = []
    for blk in bl:
        k = blk[0]
        if k in ("h1", "h2", "h3"):
            out.append("#" * int(k[1]) + " " + blk[1])
        elif k == "p":
            out.append(blk[1])
        elif k == "table":
            head, rows = blk[1], blk[2]
            cell = lambda s: str(s).replace("|", "\\|")  # noqa: E731
            out.append("| " + " | ".join(map(cell, head)) + " |")
            out.append("|" + "|".join("---" for _ in head) + "|")
            out += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
        elif k == "img":
            out.append(f"![{blk[2]}]({blk[1]})")
        out.append("")
    return "\n".join(out)


def _inline(s: str) -> str:
    s = html.escape(s)
    parts = s.split("**")
    s = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = s.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em}h2{border-bottom:2px solid #ddd;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.86em}th,td{border:1px solid #ccc;padding:3px 7px;
vertical-align:top}th{background:#f0f3f7;text-align:left}tr:nth-child(even) td{background:#fafafa}
td.n{text-align:right;font-variant-numeric:tabular-nums}td.nw{white-space:nowrap}img{max-width:100%;border:1px solid #eee;margin:.5em 0}
figure{margin:0}figcaption{font-size:.85em;color:#666}code{background:#f4f4f4;padding:0 3px}"""


def _is_num(s: str) -> bool:
    s = str(s).replace("×", "").replace("%", "").replace("–", "").replace(" ", "").replace("±", "")
    try:
        float(s)
        return True
    except ValueError:
        return False


def _cls(c) -> str:
    c = str(c)
    return ("n " if _is_num(c) else "") + ("nw" if len(c) <= 40 else "")


def to_html(bl: list, folder: Path) -> str:
    out = ["<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
           f"<title>{html.escape(bl[0][1])}</title><style>{CSS}</style></head><body>"]
    for blk in bl:
        k = blk[0]
        if k in ("h1", "h2", "h3"):
            out.append(f"<{k}>{_inline(blk[1])}</{k}>")
        elif k == "p":
            out.append(f"<p>{_inline(blk[1])}</p>")
        elif k == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in blk[1]) + "</tr></thead><tbody>")
            for r in blk[2]:
                out.append("<tr>" + "".join(f"<td class='{_cls(c)}'>{_inline(c)}</td>" for c in r) + "</tr>")
            out.append("</tbody></table>")
        elif k == "img":
            data = base64.b64encode((folder / blk[1]).read_bytes()).decode()
            out.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(blk[2])}'>"
                       f"<figcaption>{html.escape(blk[2])} ({html.escape(blk[1])})</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_plots(out: Path, doc: dict) -> dict[str, str]:
    from . import plots as P

    made: dict[str, str] = {}

    def add(key, fn, *args):
        name = f"{key}.png"
        try:
            if fn(*args, out / name):
                made[key] = name
        except Exception as e:          # a broken plot must not lose the report
            doc.setdefault("plot_errors", []).append(f"{name}: {type(e).__name__}: {e}")

    add("e2e", P.e2e_plot, doc)
    for t in _threads(doc):
        add(f"layers-{t}", P.layers_plot, doc, t)
        add(f"roofline-{t}", P.roofline_plot, doc, t)
    add("grid", P.grid_plot, doc)
    return made


def write_report(out: str | Path, doc: dict) -> dict[str, Path]:
    out = Path(out)
    plots = write_plots(out, doc)
    bl = blocks(doc, plots)
    (out / "report.md").write_text(to_markdown(bl))
    (out / "report.html").write_text(to_html(bl, out))
    return {"md": out / "report.md", "html": out / "report.html", **{k: out / v for k, v in plots.items()}}
