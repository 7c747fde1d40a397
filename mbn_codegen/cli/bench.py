from __future__ import annotations

import argparse
import dataclasses

from ..bench.run import ALL_VARIANTS, DEFAULT_VARIANTS
from .common import add_model_args


def _list(parse, check, example: str):
    def f(s: str) -> list:
        try:
            v = [parse(x.strip()) for x in s.split(",") if x.strip()]
        except ValueError:
            v = []
        if not v or not all(map(check, v)):
            raise argparse.ArgumentTypeError(f"{s!r}: expected e.g. {example}")
        return v
    return f


_ints = _list(int, lambda n: n >= 1, "1,2 (thread counts >= 1)")
_names = _list(str, ALL_VARIANTS.__contains__, f"stock,ours (of {', '.join(ALL_VARIANTS)})")


def _artifact(s: str) -> tuple[str, str]:
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"{s!r}: expected LABEL=ARTIFACT_DIR")
    return tuple(s.split("=", 1))


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmark report: tuned vs stock TVM vs PyTorch / ONNX Runtime / OpenVINO, "
                       "end to end and per layer, with plots", description="Writes a report folder (report.html, "
                       "PNG plots, results.json). Progress goes to stdout; Ctrl-C keeps what was measured.")
    add_model_args(p, resolution_default=None,
                   resolution_help="input size (default: the model's, 224; with --onnx, the file's own)")
    a = p.add_argument
    a("--weights", help="state_dict file or 'pretrained' (v2); default: live random weights")
    a("--onnx", help="bench this ONNX file instead of a zoo model (no PyTorch variant)")
    a("--target", default="x86_64", help="target file name or .toml path (must run on this machine)")
    a("--seed", type=int, default=0)
    a("--variants", type=_names, default=list(DEFAULT_VARIANTS), metavar="A,B,...", help="what to measure (default "
      f"{','.join(DEFAULT_VARIANTS)}; also openvino-bf16); unavailable ones are listed in the report with the reason")
    a("--database", metavar="DIR", help="tuning database of ours-tuned (default: where `mbn-codegen tune` writes)")
    a("--ms-database", metavar="DIR", help="database of the metaschedule variant (default: where "
      "`mbn-codegen tune --space generic` writes)")
    a("--artifact", dest="artifacts", type=_artifact, action="append", default=[], metavar="LABEL=DIR",
      help="also measure an already-built artifact directory (repeatable)")
    a("--threads", type=_ints, metavar="N,M", help="thread counts (default: 1 and all cores)")
    a("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    a("--reps", type=int, default=5, help="timed calls per variant per round (default 5)")
    a("--warmup", type=int, default=5, help="warm-up calls per variant (default 5)")
    a("--layer-rounds", type=int, default=5, help="rounds of per-layer timing (default 5)")
    a("--no-layers", dest="layers", action="store_false", help="skip per-layer timing")
    a("--quick", action="store_true", help="few repetitions (smoke test; numbers are rough)")
    a("--out", help="report folder (default reports/<model>-<alpha>-<res>-<target>-<date>)")
    a("--rpc-tracker", metavar="HOST:PORT", help="bench on the board registered with this TVM RPC tracker "
      "(TVM variants built for --target, uploaded, timed there end to end)")
    a("--rpc-key", help="the board's key at the tracker (its rpc_server --key)")
    a("--board-peers", metavar="FILE.json", help="peers measured on the board by "
      "`python -m mbn_codegen.bench.board_peers model.onnx > FILE.json`, merged into the board report")
    a("--report-only", metavar="DIR", help="regenerate the report and plots from DIR/results.json")


def main(args) -> int:
    if args.report_only:
        from ..bench.report import write_report
        from ..bench.results import load, validate
        doc = load(args.report_only)
        errs = validate(doc)
        print("".join(f"schema: {e}\n" for e in errs[:20]) + f"wrote {write_report(args.report_only, doc)}")
        return 1 if errs else 0
    from ..bench import BenchConfig, run_bench

    from .common import model_spec

    cfg = BenchConfig(model=model_spec(args), **{f.name: vars(args)[f.name] for f in dataclasses.fields(BenchConfig)
                                                 if f.name in vars(args) and f.name != "model"})
    cfg.artifacts = dict(args.artifacts)
    if args.quick:
        cfg = dataclasses.replace(cfg, rounds=3, reps=2, warmup=2, layer_rounds=2, quick_peak=True)
    run_bench(cfg, log=lambda s: print(s, flush=True))
    return 0
