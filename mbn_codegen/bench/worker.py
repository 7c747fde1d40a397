"""One benchmark subprocess per (variant, threads): pools read their thread count at start, and
its CPU time tells the coordinator its pools are idle. JSON lines: spec -> {"ok", "check", "load_s"},
then {"cmd": "time"|"layers"|"peak", ...} until the input ends; runtime prints go to stderr (a log)."""
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
    return load(spec["artifact"]).run


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
    o.intra_op_num_threads, o.inter_op_num_threads = spec["threads"], 1
    o.add_session_config_entry("session.intra_op.allow_spinning", "1" if spec["spin"] else "0")
    sess = ort.InferenceSession(spec["onnx"], o, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _openvino(spec):
    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": spec["threads"], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if spec.get("precision", "f32") == "f32":
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    req = ov.Core().compile_model(spec["onnx"], "CPU", cfg).create_infer_request()
    return lambda x: req.infer({0: x})[0]


RUNTIMES = {"tvm": _tvm, "torch": _torch, "onnxruntime": _onnxruntime, "openvino": _openvino}


def _check(out: np.ndarray, ref: np.ndarray) -> dict:
    scale = max(1e-12, float(np.abs(ref).max()))
    ok = bool(np.allclose(out, ref, rtol=1e-3, atol=1e-3 * scale)) and int(out.argmax()) == int(ref.argmax())
    return {"max_abs_err": float(np.abs(out.astype(np.float64) - ref).max()), "ok": ok, "oracle": "onnxruntime"}


def _time(run, x, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run(x)
    out, clock = [], time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        run(x)
        out.append((clock() - t0) / 1e6)
    return out


def _do(spec: dict, cmd: dict, run, x):
    if cmd["cmd"] == "time":
        return {"samples_ms": _time(run, x, int(cmd["n"]), int(cmd["warmup"]))}
    if cmd["cmd"] == "layers":
        from .layers import measure_layers
        return measure_layers(spec["artifact"], x, int(cmd["rounds"]))
    from .. import targets
    from .peak import measure_peak
    return measure_peak(targets.load(spec["target"]), spec["threads"], bool(cmd["quick"]))


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the coordinator decides when we stop
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                     # stray prints (TVM's "Scope Loaded") -> log
    spec, run, x, reply = json.loads(sys.stdin.readline()), None, None, lambda o: proto.write(json.dumps(o) + "\n")
    try:
        t0, check = time.perf_counter(), None
        if spec["runtime"] != "peak":
            x = np.load(spec["input"])
        if spec["runtime"] != "peak" and spec.get("mode") != "layers":
            run = RUNTIMES[spec["runtime"]](spec)
            check = _check(np.asarray(run(x)), np.load(spec["reference"]))
        reply({"ok": True, "load_s": time.perf_counter() - t0, "check": check})
    except Exception as e:  # reported, not raised: the variant becomes "failed" with this reason
        traceback.print_exc()
        return reply({"ok": False, "error": f"{type(e).__name__}: {str(e).strip()[:500]}"})
    for line in sys.stdin:
        try:
            reply(_do(spec, json.loads(line), run, x))
        except Exception as e:
            traceback.print_exc()
            reply({"error": f"{type(e).__name__}: {str(e).strip()[:500]}"})


if __name__ == "__main__":
    main()
