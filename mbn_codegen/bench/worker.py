"""One benchmark subprocess per (variant, threads): pools read their thread count at start, and its CPU
time tells the coordinator its pools are idle. JSON lines: the spec -> {"check"} or {"error"}, then
{"cmd": "time"|"layers"|"peak", ...} -> its answer, until the input ends; the child's prints go to its log."""
from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
import timeit
import traceback
from pathlib import Path

import numpy as np

THREAD_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# Blocking idle pools (OMP_WAIT_POLICY=PASSIVE, TVM_THREAD_POOL_SPIN_COUNT=0) costs TVM 1.5-2x at 2 threads on
# small models (a futex wake per kernel), so runtimes spin inside their own block and the fence keeps that
# out of the next one.
SPIN = {"all runtimes": "their default spin-wait inside their own block; the fence waits it out"}
FENCE_WINDOW_S, FENCE_IDLE_CPU_S, FENCE_TIMEOUT_S = 0.02, 0.002, 2.0


class WorkerError(RuntimeError):
    pass


class Worker:
    """The child runs in its own session: a terminal's Ctrl-C reaches only the coordinator."""

    def __init__(self, spec: dict, log_dir: Path):
        import psutil           # here: board_peers imports this module on boards without it

        env = {"TVM_BIND_THREADS": "1", **os.environ, **{k: str(spec["threads"]) for k in THREAD_ENV}}
        self.name = f"{spec['variant']}-{spec['threads']}t"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log = open(log_dir / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, text=True, start_new_session=True, bufsize=1)
        self.ps, self.gone = psutil.Process(self.proc.pid), psutil.Error
        self.proc.stdin.write(json.dumps(spec) + "\n")

    def request(self, cmd: dict | None = None) -> dict:
        """cmd's reply; None: the spec's (the load)."""
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n" if cmd else "")
            self.proc.stdin.flush()
            r = json.loads(self.proc.stdout.readline() or "null")
        except OSError:
            r = None
        if r is None or "error" in r:
            raise WorkerError(f"{self.name}: " + (r["error"] if r else f"worker exited (code {self.proc.poll()}); "
                                                  f"see {self.log.name}"))
        return r

    def cpu_s(self) -> float:
        try:
            return sum(self.ps.cpu_times()[:2])
        except self.gone:
            return 0.0

    def close(self) -> None:
        try:
            self.proc.stdin.close()           # the worker exits at the end of its input
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()                  # our own child, by its handle
            self.proc.wait()
        self.log.close()


def ask(spec: dict, cmd: dict, log_dir: Path) -> dict:
    w = Worker(spec, log_dir)
    try:
        w.request()
        return w.request(cmd)
    finally:
        w.close()


def fence(workers) -> float:
    """Seconds waited (at most ~FENCE_TIMEOUT_S) until our workers' CPU time stops growing: not the
    machine's, which other users of a shared machine never let go idle."""
    t0, before = time.perf_counter(), sum(w.cpu_s() for w in workers)
    while time.perf_counter() - t0 <= FENCE_TIMEOUT_S:
        time.sleep(FENCE_WINDOW_S)
        now = sum(w.cpu_s() for w in workers)
        if now - before < FENCE_IDLE_CPU_S:
            break
        before = now
    return time.perf_counter() - t0


# --- the child (and board_peers): a runtime makes run(x) from the spec --------------------------------

def _tvm(spec):
    from ..runtime import load
    return load(spec["artifact"]).run


def _torch(spec):
    import torch

    from ..models import create
    from ..models.calibrate import make_live

    torch.set_num_threads(spec["threads"])
    m = create(spec["model"], spec["alpha"], spec["resolution"], spec["num_classes"], spec["weights"])
    m = (make_live(m, seed=spec["seed"]) if spec["weights"] is None else m).eval()

    def run(x):
        with torch.inference_mode():
            return m(torch.from_numpy(x)).numpy()
    return run


def _onnxruntime(spec):
    from .layers import ort_session

    sess = ort_session(spec)
    return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _openvino(spec):
    import openvino as ov

    cfg = {"INFERENCE_NUM_THREADS": spec["threads"], "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if spec["variant"] != "openvino-bf16":
        cfg["INFERENCE_PRECISION_HINT"] = "f32"
    req = ov.Core().compile_model(spec["onnx"], "CPU", cfg).create_infer_request()
    return lambda x: req.infer({0: x})[0]


def _litert(spec):
    from ai_edge_litert.interpreter import Interpreter     # XNNPACK is its default CPU delegate

    if not spec["tflite"]:
        raise FileNotFoundError("no --tflite model given (LiteRT does not load ONNX)")
    it = Interpreter(model_path=spec["tflite"], num_threads=spec["threads"])
    it.allocate_tensors()
    i, o = it.get_input_details()[0], it.get_output_details()[0]

    def run(x):
        it.set_tensor(i["index"], x if tuple(i["shape"]) == x.shape else x.transpose(0, 2, 3, 1))
        it.invoke()
        return it.get_tensor(o["index"])
    return run


RUNTIMES = {"tvm": _tvm, "torch": _torch, "onnxruntime": _onnxruntime, "openvino": _openvino, "litert": _litert}


def time_calls(run, x, n: int, warmup: int = 0) -> list[float]:
    """Milliseconds of n calls after `warmup` untimed ones (timeit: perf_counter, GC paused)."""
    for _ in range(warmup):
        run(x)
    return [s * 1e3 for s in timeit.repeat(lambda: run(x), number=1, repeat=n)]


def _answer(spec: dict, cmd: dict | None, state: dict) -> dict:
    from .results import check_output

    if cmd is None:                                   # the load; a peak worker has nothing to load
        if spec["runtime"] == "peak":
            return {"check": None}
        state.update(x=np.load(spec["input"]), run=RUNTIMES[spec["runtime"]](spec))
        return {"check": check_output(state["run"](state["x"]), np.load(spec["reference"]))}
    if cmd["cmd"] == "time":
        return {"samples_ms": time_calls(state["run"], state["x"], cmd["n"], cmd["warmup"])}
    if cmd["cmd"] == "layers":
        from .layers import measure_layers, measure_peer_layers
        if spec["runtime"] == "onnxruntime":
            return measure_peer_layers(spec, state["x"], cmd["rounds"])
        return measure_layers(spec["artifact"], state["x"], cmd["rounds"])
    from .. import targets
    from .peak import measure_peak
    return measure_peak(targets.load(spec["target"]), spec["threads"], cmd["quick"])


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the coordinator decides when we stop
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                                     # stray prints (TVM's "Scope Loaded") -> log
    spec, state = json.loads(sys.stdin.readline()), {}
    for line in itertools.chain([None], sys.stdin):
        try:
            r = _answer(spec, line and json.loads(line), state)
        except Exception as e:  # reported, not raised: the variant becomes "failed" with this reason
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {str(e).strip()[:500]}"}
        proto.write(json.dumps(r) + "\n")
        if line is None and "error" in r:
            break


if __name__ == "__main__":
    main()
