"""One benchmark subprocess: loads one runtime at one thread count and times it on request.

Why a process per (variant, threads): TVM reads TVM_NUM_THREADS when its thread pool starts,
OpenMP/OpenBLAS read their variables at load, and runtimes that spin-wait (ONNX Runtime, TVM's
pool) must not steal cores from each other. The coordinator sets the environment and talks JSON
lines over stdin/stdout; everything else a runtime prints goes to stderr (a log file).

Protocol: first line = spec {"runtime", "threads", "input", "reference", ...}; reply
{"ok": true, "check": {...}, "load_s": ...}. Then commands:
  {"cmd": "time", "n": N, "warmup": W}   -> {"samples_ms": [...]}   (N calls, each timed)
  {"cmd": "layers", "rounds": R}         -> per-kernel timing (TVM only, see layers.py)
  {"cmd": "peak"}                        -> SGEMM / bandwidth (runtime "peak", see peak.py)
  {"cmd": "quit"} or end of input        -> exit
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback

import numpy as np


def _tvm(spec):
    from ..runtime import load
    m = load(spec["artifact"])
    return m.run


def _torch(spec):
    import torch

    from ..models import create
    from ..models.calibrate import make_live

    torch.set_num_threads(spec["threads"])
    m = create(spec["model"], spec["alpha"], spec["resolution"], spec["num_classes"], spec.get("weights"))
    if spec.get("weights") is None:
        make_live(m, seed=spec["seed"])
    m.eval()

    def run(x):
        with torch.inference_mode():
            return m(torch.from_numpy(x)).numpy()
    return run


def _onnxruntime(spec):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads = spec["threads"]
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(spec["onnx"], o, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})[0]


def _openvino(spec):
    import openvino as ov

    core = ov.Core()
    cfg = {"INFERENCE_NUM_THREADS": spec["threads"], "PERFORMANCE_HINT": "LATENCY",
           "NUM_STREAMS": 1}
    if spec.get("precision", "f32") == "f32":
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    cm = core.compile_model(core.read_model(spec["onnx"]), "CPU", cfg)
    req = cm.create_infer_request()
    spec["_info"] = {"openvino": ov.__version__,
                     "inference_precision": _ov_str(cm.get_property("INFERENCE_PRECISION_HINT")),
                     "threads": int(cm.get_property("INFERENCE_NUM_THREADS"))}
    return lambda x: req.infer({0: x})[0]


def _ov_str(x) -> str:
    return x.to_string() if hasattr(x, "to_string") else str(x)


RUNTIMES = {"tvm": _tvm, "torch": _torch, "onnxruntime": _onnxruntime, "openvino": _openvino}


def _check(out: np.ndarray, ref: np.ndarray) -> dict:
    scale = max(1e-12, float(np.abs(ref).max()))
    err = float(np.abs(out.astype(np.float64) - ref).max())
    ok = bool(np.allclose(out, ref, rtol=1e-3, atol=1e-3 * scale)) and int(out.argmax()) == int(ref.argmax())
    return {"max_abs_err": err, "rel_err": err / scale, "ok": ok, "oracle": "onnxruntime"}


def _time(run, x, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run(x)
    out, clock = [], time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        run(x)
        out.append((clock() - t0) / 1e6)
    return out


def serve(spec: dict, proto) -> None:
    def reply(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    try:
        t0 = time.perf_counter()
        if spec["runtime"] == "peak":
            from .peak import measure_peak
            reply({"ok": True, "load_s": 0.0})
            run = None
        elif spec.get("mode") == "layers":
            from .layers import LayerProfiler
            prof = LayerProfiler(spec["artifact"], np.load(spec["input"]))
            reply({"ok": True, "load_s": time.perf_counter() - t0})
            run = None
        else:
            run = RUNTIMES[spec["runtime"]](spec)
            x = np.load(spec["input"])
            out = np.asarray(run(x))
            check = _check(out, np.load(spec["reference"])) if spec.get("reference") else None
            reply({"ok": True, "load_s": time.perf_counter() - t0, "check": check,
                   "info": spec.get("_info", {})})
    except Exception as e:  # reported, not raised: the variant becomes "failed" with this reason
        traceback.print_exc()
        reply({"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:500]}"})
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["cmd"] == "quit":
                return
            if cmd["cmd"] == "time":
                reply({"samples_ms": _time(run, x, int(cmd["n"]), int(cmd.get("warmup", 0)))})
            elif cmd["cmd"] == "layers":
                reply(prof.measure(int(cmd.get("rounds", 5)), int(cmd.get("min_repeat_ms", 5))))
            elif cmd["cmd"] == "peak":
                reply(measure_peak(spec["threads"], quick=bool(cmd.get("quick"))))
            else:
                reply({"error": f"unknown command {cmd['cmd']!r}"})
        except Exception as e:
            traceback.print_exc()
            reply({"error": f"{type(e).__name__}: {str(e).strip()[:500]}"})


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the coordinator decides when we stop
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                     # stray prints (TVM's "Scope Loaded") -> log
    line = sys.stdin.readline()
    if not line:
        return
    serve(json.loads(line), proto)


if __name__ == "__main__":
    main()
