"""`mbn-codegen`: a thin command line over the Python API (parsing and validation only)."""
from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading

from ..bundle import compiler_missing
from ..errors import MbnError

# command -> module in this package, imported one by one so that a runtime-only install (no
# `compile` extra) still runs `run` and `bundle` and names the extra for the others
COMMANDS = {"build": "build", "tune": "tune", "bench": "bench", "cost": "cost", "run": "run", "demo": "demo",
            "targets": "targets_cmd", "bundle": "bundle", "inspect": "inspect_cmd"}
_modules: dict = {}
_missing: dict[str, MbnError] = {}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mbn-codegen", description=__doc__.split(":", 1)[1].strip()
                                + ". MobileNet -> ONNX -> TVM Relax -> native library.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            _modules[name] = importlib.import_module(f".{module}", __package__)
        except ImportError as e:
            if (err := compiler_missing(e)) is None:
                raise
            _missing[name] = err
            sub.add_parser(name, help="(needs the compile extra)", add_help=False).add_argument(
                "rest", nargs=argparse.REMAINDER)
            continue
        _modules[name].add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    seen = _SigintSeen()
    try:
        with seen:
            if args.command in _missing:
                raise _missing[args.command]
            try:
                return _modules[args.command].main(args) or 0
            except ImportError as e:
                if (err := compiler_missing(e)) is None:
                    raise
                raise err from None
    except MbnError as e:
        if seen.hit:
            return _interrupted(args.command)
        print(f"mbn-codegen {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return _interrupted(args.command)
    except Exception as e:
        # a KeyboardInterrupt raised inside a Python callback comes back from TVM as a
        # RuntimeError, sometimes with an empty message: the flag tells
        if seen.hit or "KeyboardInterrupt" in str(e):
            return _interrupted(args.command)
        raise


class _SigintSeen:
    """Ctrl-C as usual (KeyboardInterrupt), but remembered: whatever error it turns into on its
    way through TVM's C++ frames, the command still ends as 'interrupted'."""

    hit = False
    _prev = None

    def _handler(self, _signum, _frame):
        self.hit = True
        raise KeyboardInterrupt

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._prev = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False


def _interrupted(command: str) -> int:
    print(f"mbn-codegen {command}: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    sys.exit(main())
