from __future__ import annotations

import argparse

from ..bench.variants import ALL_VARIANTS, DEFAULT_VARIANTS
from .common import add_model_args


def _ints(s: str) -> list[int]:
    try:
        v = [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected comma-separated thread counts, e.g. 1,4") from None
    if not v or min(v) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: thread counts must be >= 1")
    return v


def _names(s: str) -> list[str]:
    v = [x.strip() for x in s.split(",") if x.strip()]
    bad = [x for x in v if x not in ALL_VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(bad)}: choose from {', '.join(ALL_VARIANTS)}")
    return v


def _artifact(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"{s!r}: expected LABEL=ARTIFACT_DIR")
    k, v = s.split("=", 1)
    return k, v


def _points(s: str) -> list[tuple[float, int]]:
    try:
        return [(float(a), int(r)) for a, r in (p.split("-") for p in s.split(",") if p)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected ALPHA-RES,..., e.g. 0.25-128,0.5-160") from None


def add_parser(sub) -> None:

    p = sub.add_parser("bench", help="benchmark report: tuned vs stock TVM vs PyTorch / ONNX Runtime / "
                       "OpenVINO, end to end and per layer, with plots",
                       description="Writes a report folder (report.html, report.md, PNG plots, "
                       "results.json). Progress goes to stdout; Ctrl-C keeps what was measured.")
    add_model_args(p)
    p.add_argument("--weights", help="state_dict file or 'pretrained' (v2); default: live random weights")
    p.add_argument("--onnx", help="bench this ONNX file instead of a zoo model (no PyTorch variant)")
    p.add_argument("--target", default="x86_64", help="target file name or .toml path (must run on this machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", type=_names, default=list(DEFAULT_VARIANTS), metavar="A,B,...",
                   help=f"what to measure (default {','.join(DEFAULT_VARIANTS)}; also openvino-bf16). "
                   "Unavailable ones are listed in the report with the reason")
    p.add_argument("--database", metavar="DIR", help="tuning database of our schedules (ours-tuned; "
                   "default: where `mbn-codegen tune` writes, targets/databases/<target>)")
    p.add_argument("--ms-database", metavar="DIR", help="database of TVM's generic MetaSchedule space "
                   "(metaschedule; default: where `mbn-codegen tune --space generic` writes)")
    p.add_argument("--artifact", type=_artifact, action="append", default=[], metavar="LABEL=DIR",
                   help="also measure an already-built artifact directory (repeatable)")
    p.add_argument("--threads", type=_ints, metavar="N,M", help="thread counts (default: 1 and all cores)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per variant per round (default 5)")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls per variant (default 5)")
    p.add_argument("--layer-rounds", type=int, default=5, help="rounds of per-layer timing (default 5)")
    p.add_argument("--no-layers", action="store_true", help="skip per-layer timing")
    p.add_argument("--grid", action="store_true", help="also measure the 16 alpha x rho variants (minutes)")
    p.add_argument("--grid-variants", type=_names, default=None, metavar="A,B",
                   help="variants in the grid (default stock,ours,onnxruntime where available)")
    p.add_argument("--grid-points", type=_points, default=None, metavar="A-R,...",
                   help="grid points instead of the paper's 16, e.g. 0.25-128,0.5-160")
    p.add_argument("--grid-threads", type=int, help="thread count of the grid (default: the largest)")
    p.add_argument("--no-spin", action="store_true", help="every runtime's idle threads block at once "
                   "(OMP_WAIT_POLICY=PASSIVE, TVM_THREAD_POOL_SPIN_COUNT=0, ONNX Runtime allow_spinning=0)")
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke test; numbers are rough)")
    p.add_argument("--out", help="report folder (default reports/<model>-<alpha>-<res>-<target>-<date>)")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="compare two report folders (A = before, B = after) instead of measuring")
    p.add_argument("--report-only", metavar="DIR", help="regenerate the report and plots from DIR/results.json")


def main(args) -> int:
    if args.compare:
        from ..bench.compare import compare
        r = compare(*args.compare, out=args.out, variants=None if args.variants == list(DEFAULT_VARIANTS) else args.variants)
        print(r["text"] + f"wrote {r['files']['md']}")
        return 0
    if args.report_only:
        from ..bench.report import write_report
        from ..bench.results import load, validate
        doc = load(args.report_only)
        errs = validate(doc)
        for e in errs[:20]:
            print(f"schema: {e}")
        print(f"wrote {write_report(args.report_only, doc)['html']}")
        return 1 if errs else 0

    from ..bench import BenchConfig, run_bench
    from ..bench.run import GRID_DEFAULT_VARIANTS

    cfg = BenchConfig(model=args.model, alpha=args.alpha, resolution=args.resolution,
                      num_classes=args.num_classes, weights=args.weights, onnx=args.onnx,
                      target=args.target, seed=args.seed, variants=args.variants, database=args.database,
                      ms_database=args.ms_database, artifacts=dict(args.artifact), threads=args.threads,
                      rounds=args.rounds, reps=args.reps, warmup=args.warmup, layers=not args.no_layers,
                      layer_rounds=args.layer_rounds, grid=args.grid,
                      grid_variants=args.grid_variants or list(GRID_DEFAULT_VARIANTS),
                      grid_points=args.grid_points, grid_threads=args.grid_threads, out=args.out,
                      spin=not args.no_spin)
    if args.quick:
        cfg.rounds, cfg.reps, cfg.warmup, cfg.layer_rounds = 3, 2, 2, 2
        cfg.grid_rounds, cfg.grid_reps, cfg.quick_peak = 2, 1, True
    run_bench(cfg, log=lambda s: print(s, flush=True))
    return 0
