"""The schedules' performance targets, judged from a bench report (or a fresh bench run).

    .venv/bin/python benchmarks/performance_targets.py reports/<dir>          # judge an existing report
    .venv/bin/python benchmarks/performance_targets.py --run [--target x86_64]   # measure, then judge

Targets (MobileNet v1 1.0-224, fp32, batch 1, on 1 thread and on all cores):
  ours-tuned at least as fast as the fastest peer (PyTorch / ONNX Runtime / OpenVINO);
  ours-tuned faster than TVM's generic MetaSchedule space (compare the budgets in the labels);
  ours (default knobs) at least 10x faster than stock TVM.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def judge(doc: dict) -> list[tuple[str, int, str, bool | None]]:
    rows = []
    for t in doc["config"]["threads"]:
        h = {r["variant"]: r for r in doc["summary"]["headline"] if r["threads"] == t and "median_ms" in r}

        def ratio(a, b):                      # how many times faster a is than b
            return h[b]["median_ms"] / h[a]["median_ms"] if a in h and b in h else None

        peer = next((r["fastest_peer"] for r in h.values() if r.get("fastest_peer")), None)
        for what, r, need in (("ours-tuned vs fastest peer" + (f" ({peer})" if peer else ""),
                               ratio("ours-tuned", peer) if peer else None, 1.0),
                              ("ours-tuned vs generic MetaSchedule", ratio("ours-tuned", "metaschedule"), 1.0),
                              ("ours (default) vs stock", ratio("ours", "stock"), 10.0)):
            rows.append((what, t, "not measured" if r is None else f"{r:.2f}x (target >= {need:g}x)",
                         None if r is None else r >= need))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("report", nargs="?", help="a bench report folder")
    p.add_argument("--run", action="store_true", help="run the bench first (v1 1.0-224, all variants)")
    p.add_argument("--target", default="x86_64")
    a = p.parse_args()
    from mbn_codegen.bench import BenchConfig, run_bench
    from mbn_codegen.bench.results import load

    if a.run:
        folder = run_bench(BenchConfig(target=a.target), log=lambda s: print(s, flush=True))
    elif a.report:
        folder = Path(a.report)
    else:
        p.error("give a report folder or --run")
    doc = load(folder)
    verdict = {True: "met", False: "MISSED", None: "-"}
    print(f"{'target':<48}{'threads':>8}  {'measured':<28}verdict")
    for what, t, r, ok in judge(doc):
        print(f"{what:<48}{t:>8}  {r:<28}{verdict[ok]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
