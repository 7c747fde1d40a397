from __future__ import annotations

import os

from .common import add_model_args, model_spec


def add_parser(sub) -> None:
    p = sub.add_parser("tune", help="auto-tune the kernels with MetaSchedule (our schedules as the "
                       "design space), locally or on a board over TVM's RPC tracker")
    add_model_args(p, onnx=True)
    p.add_argument("--target", default="x86_64")
    p.add_argument("--space", default="ours", choices=["ours", "generic"],
                   help="ours (default), or TVM's generic space (for comparisons)")
    p.add_argument("--database", metavar="DIR", help="the database to tune into (created if missing; "
                   "resumed if it has records). Default: your per-user database, "
                   "$XDG_DATA_HOME/mbn-codegen/databases/<target>[-generic] "
                   "(~/.local/share/... without XDG_DATA_HOME), which builds for <target> then apply")
    p.add_argument("--trials", type=int, default=1000, help="total trial budget (default 1000)")
    p.add_argument("--trials-per-task", type=int, default=64)
    p.add_argument("--trials-per-iter", type=int, default=8, help="candidates per measured batch "
                   "(default 8); records are written after each batch, so a kill loses at most one")
    p.add_argument("--time-limit", type=float, metavar="MINUTES",
                   help="stop after this many MINUTES (e.g. 0.5 = 30 s, 60 = one hour): the running "
                   "batch is finished and kept, no new batch starts")
    p.add_argument("--wait", action="store_true", help="if another tune holds the database's lock, "
                   "wait for it instead of stopping with an error")
    p.add_argument("--rpc-tracker", default=os.environ.get("RPC_TRACKER") or None, metavar="HOST:PORT")
    p.add_argument("--rpc-key", default=os.environ.get("RPC_KEY") or None)
    p.add_argument("--rpc-workers", type=int, default=1, help="boards measuring in parallel")
    p.add_argument("--only", nargs="*", default=[], metavar="NAME",
                   help="tune only the kernels whose names contain one of these")


def main(args) -> None:
    from ..tuning import TuneConfig, tune

    for name in ("trials", "trials_per_task", "trials_per_iter", "rpc_workers", "time_limit"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise SystemExit(f"mbn-codegen tune: error: --{name.replace('_', '-')} must be positive")
    tune(TuneConfig(model=model_spec(args), target=args.target, space=args.space,
                    work_dir=args.database, max_trials=args.trials, trials_per_task=args.trials_per_task,
                    trials_per_iter=args.trials_per_iter,
                    time_limit_s=args.time_limit * 60 if args.time_limit else None,
                    rpc_tracker=args.rpc_tracker, rpc_key=args.rpc_key, rpc_workers=args.rpc_workers,
                    only=args.only, wait=args.wait), log=lambda s: print(s, flush=True))
