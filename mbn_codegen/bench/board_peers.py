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
import time

import numpy as np

INSTALL = {"onnxruntime": "pip install onnxruntime (aarch64 wheels on PyPI)",
           "litert": "pip install ai-edge-litert, and a .tflite of the model (--tflite)"}


def _onnxruntime(a, threads):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = threads, 1
    s = ort.InferenceSession(a.onnx, o, providers=["CPUExecutionProvider"])
    return lambda x: s.run(None, {s.get_inputs()[0].name: x})[0]


def _litert(a, threads):
    from ai_edge_litert.interpreter import Interpreter     # XNNPACK is its default CPU delegate

    if not a.tflite:
        raise FileNotFoundError("no --tflite model given (LiteRT does not load ONNX)")

    it = Interpreter(model_path=a.tflite, num_threads=threads)
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]

    def run(x):
        it.set_tensor(i["index"], x if tuple(i["shape"]) == x.shape else x.transpose(0, 2, 3, 1))
        it.invoke()
        return it.get_tensor(o["index"])
    return run


def measure(a) -> dict:
    x = np.load(a.input) if a.input else np.random.default_rng(0).standard_normal(a.shape).astype("float32")
    ref = np.load(a.reference) if a.reference else None
    out = {"machine": platform.machine(), "cores": os.cpu_count(), "peers": {}}
    for name, make in (("onnxruntime", _onnxruntime), ("litert", _litert)):
        try:
            runs = {t: make(a, t) for t in a.threads}
        except Exception as e:       # ImportError, a missing model: the report names the peer and why
            out["peers"][name] = {"status": "unavailable", "note": f"{type(e).__name__}: {e}; {INSTALL[name]}"}
            continue
        series = []
        for t, run in runs.items():
            y = np.asarray(run(x))
            check = None if ref is None else {"ok": bool(np.allclose(y, ref, rtol=1e-3, atol=1e-3 * abs(ref).max())),
                                              "max_abs_err": float(np.abs(y - ref).max())}
            for _ in range(a.warmup):
                run(x)
            blocks = []
            for _ in range(a.rounds):
                b = []
                for _ in range(a.reps):
                    t0 = time.perf_counter_ns()
                    run(x)
                    b.append((time.perf_counter_ns() - t0) / 1e6)
                blocks.append(b)
            series.append({"threads": t, "blocks_ms": blocks, "check": check})
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
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=5)
    json.dump(measure(ap.parse_args(argv)), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
