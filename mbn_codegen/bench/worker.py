"""One benchmark subprocess per (variant, threads): pools read their thread count at start, and its
CPU time tells the coordinator its pools are idle. Both sides of the JSON-lines protocol: the spec ->
{"ok", "check", "load_s"} or {"error"}, then {"cmd": "time"|"layers"|"peak", ...} until the input
ends; the child's prints go to its log."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import psutil

THREAD_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# With spin=False (--no-spin) pools block as soon as they are idle: OpenMP (torch), TVM's pool
# (libtvm_runtime reads this variable), ONNX Runtime (a session entry, below). OpenVINO's TBB
# has no such switch. It costs TVM 1.5-2x at 2 threads on small models (a futex wake per kernel),
# so by default runtimes spin inside their own block and the fence keeps that out of the next one.
NO_SPIN_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TVM_THREAD_POOL_SPIN_COUNT": "0", "KMP_BLOCKTIME": "0"}
FENCE_WINDOW_S, FENCE_IDLE_CPU_S, FENCE_TIMEOUT_S = 0.02, 0.002, 2.0


class WorkerError(RuntimeError):
    pass


class Worker:
    """The child runs in its own session (a terminal's Ctrl-C reaches only the coordinator) and exits
    when its stdin closes."""

    def __init__(self, spec: dict, log_dir: Path):
        env = {**os.environ, **({} if spec.get("spin", True) else NO_SPIN_ENV),
               **{k: str(spec["threads"]) for k in THREAD_ENV}}
        env.setdefault("TVM_BIND_THREADS", "1")
        self.name = f"{spec['variant']}@{spec['threads']}t"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"{spec['variant']}-{spec['threads']}t.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, text=True, start_new_session=True, bufsize=1)
        self.ps = psutil.Process(self.proc.pid)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()

    def request(self, obj: dict | None) -> dict:
        """Send obj (None: nothing), then read the reply; WorkerError if the worker failed or is gone."""
        try:
            if obj is not None:
                self.proc.stdin.write(json.dumps(obj) + "\n")
                self.proc.stdin.flush()
            r = json.loads(self.proc.stdout.readline() or "null")
        except OSError:
            r = None
        if r is None:
            raise WorkerError(f"{self.name}: worker exited (code {self.proc.poll()}); see {self.log.name}")
        if "error" in r:
            raise WorkerError(f"{self.name}: {r['error']}")
        return r

    def cpu_s(self) -> float:
        try:
            return sum(self.ps.cpu_times()[:2])
        except psutil.Error:
            return 0.0

    def close(self) -> None:
        try:
            self.proc.stdin.close()           # the worker exits at the end of its input
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()                  # our own child, by its handle
            self.proc.wait()
        self.log.close()


def start_workers(specs: list[dict], log_dir: Path) -> list[tuple[Worker | None, dict]]:
    """Start all at once (loading is the slow part), then collect their ready replies."""
    out = []
    for w in [Worker(s, log_dir) for s in specs]:
        try:
            out.append((w, w.request(None)))
        except WorkerError as e:
            w.close()
            out.append((None, {"ok": False, "error": str(e)}))
    return out


def ask(spec: dict, cmd: dict, log_dir: Path) -> dict:
    """A one-off worker's answer to cmd."""
    w = Worker(spec, log_dir)
    try:
        w.request(None)
        return w.request(cmd)
    finally:
        w.close()


def fence(workers) -> tuple[float, bool]:
    """Wait until the workers together use less than FENCE_IDLE_CPU_S CPU seconds per window.
    Returns (seconds waited, whether it timed out). Our workers' own CPU time, not the machine's:
    other users of a shared machine never let it go idle."""
    t0, before = time.perf_counter(), sum(w.cpu_s() for w in workers)
    while True:
        time.sleep(FENCE_WINDOW_S)
        now, waited = sum(w.cpu_s() for w in workers), time.perf_counter() - t0
        if now - before < FENCE_IDLE_CPU_S or waited > FENCE_TIMEOUT_S:
            return waited, waited > FENCE_TIMEOUT_S
        before = now


# --- the child -------------------------------------------------------------------------------------

def _tvm(spec):
    from ..runtime import load
    return load(spec["artifact"]).run


def _torch(spec):
    import torch

    from ..models import create
    from ..models.calibrate import make_live

    torch.set_num_threads(spec["threads"])
    m = create(spec["model"], spec["alpha"], spec["resolution"], spec["num_classes"], spec["weights"])
    if spec["weights"] is None:
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
    if spec["precision"] == "f32":
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    req = ov.Core().compile_model(spec["onnx"], "CPU", cfg).create_infer_request()
    return lambda x: req.infer({0: x})[0]


def _time(run, x, n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        run(x)
    out = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        run(x)
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


RUNTIMES = {"tvm": _tvm, "torch": _torch, "onnxruntime": _onnxruntime, "openvino": _openvino}


def _do(spec: dict, cmd: dict, run=None, x=None):
    if cmd["cmd"] == "time":
        return {"samples_ms": _time(run, x, int(cmd["n"]), int(cmd["warmup"]))}
    if cmd["cmd"] == "layers":
        from .layers import measure_layers
        return measure_layers(spec["artifact"], x, int(cmd["rounds"]))
    from .. import targets
    from .peak import measure_peak
    return measure_peak(targets.load(spec["target"]), spec["threads"], bool(cmd["quick"]))


def _reply(proto, f) -> bool:
    try:
        r = f()
    except Exception as e:  # reported, not raised: the variant becomes "failed" with this reason
        traceback.print_exc()
        r = {"error": f"{type(e).__name__}: {str(e).strip()[:500]}"}
    proto.write(json.dumps(r) + "\n")
    return "error" not in r


def main() -> None:
    from .results import check_output

    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the coordinator decides when we stop
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                     # stray prints (TVM's "Scope Loaded") -> log
    spec, state = json.loads(sys.stdin.readline()), {}

    def load():
        t0, check = time.perf_counter(), None
        if spec["runtime"] != "peak":
            state.update(x=np.load(spec["input"]), run=RUNTIMES[spec["runtime"]](spec))
            check = check_output(state["run"](state["x"]), np.load(spec["reference"]))
        return {"ok": True, "load_s": time.perf_counter() - t0, "check": check}
    if _reply(proto, load):
        for line in sys.stdin:
            _reply(proto, lambda: _do(spec, json.loads(line), **state))


if __name__ == "__main__":
    main()
