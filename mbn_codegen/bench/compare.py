"""Compare two bench reports (A = before, B = after), end to end and per layer, for every
(variant, threads) both measured; writes compare.md. Speedup = time A / time B."""
from __future__ import annotations

from pathlib import Path

from .report import fmt_ms, fmt_x
from .results import load


def compare(a: str | Path, b: str | Path, out: str | Path | None = None, variants: list[str] | None = None) -> dict:
    A, B = load(a), load(b)
    keep = lambda v: not variants or v in variants  # noqa: E731
    ea = {(e["variant"], e["threads"]): e["stats"]["median"] for e in A["e2e"] if e["stats"]["n"]}
    e2e = [{"variant": e["variant"], "threads": e["threads"], "a_ms": ea[k], "b_ms": e["stats"]["median"],
            "speedup": ea[k] / e["stats"]["median"]}
           for e in B["e2e"] if e["stats"]["n"] and (k := (e["variant"], e["threads"])) in ea and keep(e["variant"])]
    la = {(e["variant"], e["threads"], c["layer"]): c["median_ms"]
          for e in A["layers"] for c in e["calls"] if c["layer"]}
    layers = [{"variant": e["variant"], "threads": e["threads"], "name": c["layer"], "a_ms": la[k],
               "b_ms": c["median_ms"], "speedup": la[k] / c["median_ms"]} for e in B["layers"] for c in e["calls"]
              if (k := (e["variant"], e["threads"], c["layer"])) in la and keep(e["variant"])]
    cpu = A["provenance"]["machine"]["cpu_model"], B["provenance"]["machine"]["cpu_model"]
    lines = [f"# Compare: A = {Path(a).resolve().name}, B = {Path(b).resolve().name}", "",
             f"A on {cpu[0]}, B on {cpu[1]}" + (" (different CPUs!)" if cpu[0] != cpu[1] else "")
             + ". Speedup = time A / time B (> 1: B is faster).", "", "## End to end", "",
             "| variant | threads | A ms | B ms | speedup |", "|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['threads']} | {fmt_ms(r['a_ms'])} | {fmt_ms(r['b_ms'])} | {fmt_x(r['speedup'])} |"
              for r in e2e]
    if layers:
        lines += ["", "## Per layer", "", "| variant | threads | layer | A ms | B ms | speedup |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['threads']} | {r['name']} | {fmt_ms(r['a_ms'])} | {fmt_ms(r['b_ms'])} | "
                  f"{fmt_x(r['speedup'])} |" for r in layers]
    out = Path(out) if out else Path(b) / f"compare-vs-{Path(a).resolve().name}"
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    (out / "compare.md").write_text(text)
    return {"e2e": e2e, "layers": layers, "md": out / "compare.md", "text": text}
