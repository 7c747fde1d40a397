"""Compare two bench reports (A = before, B = after): end to end and per layer, for every
(variant, threads) pair both measured. `mbn-codegen bench --compare A B` prints it and writes
compare.md + compare.png."""
from __future__ import annotations

from pathlib import Path

from .report import fmt_ms, fmt_x, to_markdown
from .results import load


def _e2e(doc: dict) -> dict:
    return {(e["variant"], e["threads"]): e["stats"]["median"] for e in doc["e2e"] if e["stats"].get("n")}


def _layers(doc: dict) -> dict:
    out = {}
    for e in doc["layers"]:
        rows = {}
        for c in e["calls"]:
            key = c.get("layer") or f"#{c['index']} {c['symbol']}"
            rows[key] = rows.get(key, 0.0) + c["median_ms"]
        out[(e["variant"], e["threads"])] = rows
    return out


def compare(a: str | Path, b: str | Path, out: str | Path | None = None,
            variants: list[str] | None = None) -> dict:
    A, B = load(a), load(b)
    ea, eb = _e2e(A), _e2e(B)
    keys = [k for k in eb if k in ea and (not variants or k[0] in variants)]
    e2e = [{"variant": v, "threads": t, "a_ms": ea[(v, t)], "b_ms": eb[(v, t)],
            "speedup": ea[(v, t)] / eb[(v, t)]} for v, t in keys]
    la, lb = _layers(A), _layers(B)
    lkeys = [k for k in lb if k in la and (not variants or k[0] in variants)]
    layers = []
    for v, t in lkeys:
        for name, b_ms in lb[(v, t)].items():
            a_ms = la[(v, t)].get(name)
            layers.append({"series": f"{v}@{t}t", "variant": v, "threads": t, "name": name, "a_ms": a_ms,
                           "b_ms": b_ms, "speedup": a_ms / b_ms if a_ms and b_ms else None})
    name_a, name_b = Path(a).resolve().name, Path(b).resolve().name
    out = Path(out) if out else Path(b) / f"compare-vs-{name_a}"
    out.mkdir(parents=True, exist_ok=True)
    bl: list = [("h1", f"Compare: A = {name_a}, B = {name_b}"),
                ("p", f"A: {A['provenance']['date']} on {A['provenance']['machine']['cpu_model']}; "
                      f"B: {B['provenance']['date']} on {B['provenance']['machine']['cpu_model']}. "
                      "Speedup = time A / time B (> 1: B is faster).")]
    if A["provenance"]["machine"]["cpu_model"] != B["provenance"]["machine"]["cpu_model"]:
        bl.append(("p", "⚠ The two reports come from different CPUs."))
    bl += [("h2", "End to end"),
           ("table", ["variant", "threads", "A median ms", "B median ms", "speedup"],
            [[r["variant"], str(r["threads"]), fmt_ms(r["a_ms"]), fmt_ms(r["b_ms"]), fmt_x(r["speedup"])]
             for r in e2e] or [["(no variant measured in both)", "", "", "", ""]])]
    if layers:
        bl += [("h2", "Per layer"),
               ("table", ["variant@threads", "layer", "A ms", "B ms", "speedup"],
                [[r["series"], r["name"], fmt_ms(r["a_ms"]), fmt_ms(r["b_ms"]), fmt_x(r["speedup"])]
                 for r in layers])]
    files = {}
    from .plots import compare_plot
    if compare_plot(layers, out / "compare.png", f"Per-layer change, B ({name_b}) vs A ({name_a})"):
        files["png"] = out / "compare.png"
        bl.append(("img", "compare.png", "Per-layer time ratio B / A"))
    (out / "compare.md").write_text(to_markdown(bl))
    files["md"] = out / "compare.md"
    text = to_markdown([x for x in bl if x[0] != "img"])
    return {"e2e": e2e, "layers": layers, "files": files, "text": text}
