"""`mbn-codegen`: a thin command line over the Python API (parsing and validation only)."""
from __future__ import annotations

import argparse
import sys

from ..errors import MbnError
from . import bench, build, cost, demo, run, targets_cmd, tune

COMMANDS = {"build": build, "tune": tune, "bench": bench, "cost": cost, "run": run, "demo": demo, "targets": targets_cmd}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbn-codegen", description=__doc__.split(":", 1)[1].strip()
                                + ". MobileNet -> ONNX -> TVM Relax -> native library.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in COMMANDS.items():
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return COMMANDS[args.command].main(args) or 0
    except MbnError as e:
        print(f"mbn-codegen {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mbn-codegen {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
