from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("inspect", help="static report of a CPU artifact: per kernel, the hot loop's vector FMAs, "
                       "scalar FP ops and spills, and llvm-mca's estimate of its speed on the target's core")
    p.add_argument("artifact", help="artifact directory written by `mbn-codegen build`")
    p.add_argument("--mcpu", help="core for llvm-mca (default: the target's mcpu, e.g. cortex-a72)")
    p.add_argument("--clock-ghz", type=float, help="core clock for the time estimate (default: the target file's)")
    p.add_argument("--out", help="folder for static_report.json/.txt (default: print only)")


def main(args) -> None:
    from ..asm_report import render, report, write

    r = report(args.artifact, mcpu=args.mcpu, clock_ghz=args.clock_ghz)
    print(render(r))
    if args.out:
        print(f"wrote {write(r, args.out)}/static_report.json")
