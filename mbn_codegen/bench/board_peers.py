"""The peers on a board, run there: `python -m mbn_codegen.bench.board_peers model.onnx [--tflite
model.tflite] [--input x.npy --reference y.npy] --rounds N > peers.json`, then on the host
`mbn-codegen bench --target arm64 --rpc-tracker ... --board-peers peers.json` merges the JSON.
Needs only numpy plus the peer's own package; a peer that does not load says why."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

from .results import check_output
from .worker import RUNTIMES, time_calls

INSTALL = {"onnxruntime": "pip install onnxruntime (aarch64 wheels on PyPI)",
           "litert": "pip install ai-edge-litert, and a .tflite of the model (--tflite)"}


def measure(a) -> dict:
    x = np.load(a.input) if a.input else np.random.default_rng(0).standard_normal(a.shape).astype("float32")
    ref = np.load(a.reference) if a.reference else None
    out = {"machine": platform.machine(), "cores": os.cpu_count(), "peers": {}}
    for name, install in INSTALL.items():
        try:
            runs = {t: RUNTIMES[name]({"onnx": a.onnx, "tflite": a.tflite, "threads": t}) for t in a.threads}
        except Exception as e:       # ImportError, a missing model: the report names the peer and why
            out["peers"][name] = {"status": "unavailable", "note": f"{type(e).__name__}: {e}; {install}"}
            continue
        series = []
        for t, run in runs.items():
            check = None if ref is None else check_output(run(x), ref, "onnxruntime (host)")
            time_calls(run, x, 0, a.warmup)
            series.append({"threads": t, "blocks_ms": [time_calls(run, x, a.reps) for _ in range(a.rounds)],
                           "check": check})
        out["peers"][name] = {"status": "ok", "series": series}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mbn_codegen.bench.board_peers", description=__doc__.split("\n\n")[0])
    ap.add_argument("onnx")
    ap.add_argument("--tflite")
    ap.add_argument("--input", help=".npy input (default: seeded random of --shape)")
    ap.add_argument("--reference", help=".npy output to check against")
    ap.add_argument("--shape", type=lambda s: [int(d) for d in s.split(",")], default=[1, 3, 224, 224])
    ap.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")], default=[1, os.cpu_count()])
    for name, default in (("--rounds", 10), ("--reps", 5), ("--warmup", 5)):
        ap.add_argument(name, type=int, default=default)
    print(json.dumps(measure(ap.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
