"""The coordinator side: worker subprocesses and interleaved timing. Each round visits every variant
once, in a fresh random order, for a block of `reps` timed calls; before each block a fence waits
until the workers' CPU time stops growing: no pool of the previous variant spins any more."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil

THREAD_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
# With spin=False (--no-spin) pools block as soon as they are idle: OpenMP (torch), TVM's pool
# (libtvm_runtime reads this variable), ONNX Runtime (a session entry, worker.py). OpenVINO's TBB
# has no such switch. It costs TVM 1.5-2x at 2 threads on small models (a futex wake per kernel),
# so by default runtimes spin inside their own block and the fence keeps that out of the next one.
NO_SPIN_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TVM_THREAD_POOL_SPIN_COUNT": "0", "KMP_BLOCKTIME": "0"}


def spin_settings(spin: bool) -> dict:
    if spin:
        return {"all runtimes": "their default spin-wait inside their own block; the fence waits it out"}
    return {**NO_SPIN_ENV, "onnxruntime session.intra_op.allow_spinning": "0", "openvino (TBB)": "no switch"}


FENCE_WINDOW_S, FENCE_IDLE_CPU_S, FENCE_TIMEOUT_S = 0.02, 0.002, 2.0


class WorkerError(RuntimeError):
    pass


class Worker:
    """A `python -m mbn_codegen.bench.worker` child in its own session (a terminal's Ctrl-C reaches
    only the coordinator); it exits when its stdin closes."""

    def __init__(self, spec: dict, log_path: Path):
        env = {**os.environ, **({} if spec.get("spin", True) else NO_SPIN_ENV),
               **{k: str(spec["threads"]) for k in THREAD_ENV}}
        env.setdefault("TVM_BIND_THREADS", "1")
        self.name = f"{spec['variant']}@{spec['threads']}t"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mbn_codegen.bench.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, env=env, text=True,
                                     start_new_session=True, bufsize=1)
        self.ps = psutil.Process(self.proc.pid)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()

    def request(self, obj: dict | None = None) -> dict:
        """Send obj (None: read the ready reply); WorkerError if the worker is gone or failed."""
        try:
            if obj is not None:
                self.proc.stdin.write(json.dumps(obj) + "\n")
                self.proc.stdin.flush()
            r = json.loads(self.proc.stdout.readline() or "null")
        except OSError:
            r = None
        if r is None:
            raise WorkerError(f"{self.name}: worker exited (code {self.proc.poll()}); see {self._log.name}")
        if "error" in r and "ok" not in r:
            raise WorkerError(f"{self.name}: {r['error']}")
        return r

    def cpu_s(self) -> float:
        try:
            t = self.ps.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    def close(self) -> None:
        try:
            self.proc.stdin.close()           # the worker exits at the end of its input
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()                  # our own child, by its handle
            self.proc.wait()
        self._log.close()


def start_workers(specs: list[dict], log_dir: Path) -> list[tuple[dict, Worker | None, dict]]:
    """Start all at once (loading is the slow part), then collect their ready replies."""
    out = []
    for s, w in [(s, Worker(s, log_dir / f"{s['variant']}-{s['threads']}t.log")) for s in specs]:
        try:
            r = w.request()
        except WorkerError as e:
            r = {"ok": False, "error": str(e)}
        if not r["ok"]:
            w.close()
        out.append((s, w if r["ok"] else None, r))
    return out


def fence(workers, window=FENCE_WINDOW_S, idle=FENCE_IDLE_CPU_S, timeout=FENCE_TIMEOUT_S) -> tuple[float, bool]:
    """Wait until the workers together use less than `idle` CPU seconds per `window`. Returns
    (seconds waited, whether it timed out). Our workers' own CPU time, not the machine's: other
    users of a shared machine never let it go idle."""
    t0, before = time.perf_counter(), sum(w.cpu_s() for w in workers)
    while True:
        time.sleep(window)
        now, waited = sum(w.cpu_s() for w in workers), time.perf_counter() - t0
        if now - before < idle or waited > timeout:
            return waited, waited > timeout
        before = now


def noise(block_medians: list[float]) -> float | None:
    """(p90 - p10) / median of one variant's per-block medians: how far two runs of it drift."""
    a = np.asarray(block_medians)
    return float((np.percentile(a, 90) - np.percentile(a, 10)) / np.median(a)) if a.size >= 3 else None


def interleaved(workers: dict[str, Worker], rounds: int, reps: int, warmup: int,
                on_block: Callable[[str, int, list[float]], None], progress: Callable[[str], None],
                seed: int = 0) -> dict:
    """on_block(variant, round, samples_ms) after every block, so an interruption loses at most one
    block. Returns the fence statistics."""
    rng, waits, timeouts, t0 = random.Random(seed), [], 0, time.perf_counter()
    for w in workers.values():
        w.request({"cmd": "time", "n": 0, "warmup": warmup})
    for r in range(rounds):
        order = rng.sample(list(workers), len(workers))
        for name in order:
            waited, to = fence(workers.values())
            waits, timeouts = waits + [waited], timeouts + to
            try:
                on_block(name, r, workers[name].request({"cmd": "time", "n": reps, "warmup": 1})["samples_ms"])
            except WorkerError as e:
                progress(f"  {name}: {e}; dropped from the remaining rounds")
                workers.pop(name).close()
        el = time.perf_counter() - t0
        progress(f"  round {r + 1}/{rounds} ({' '.join(order)}), {el:.0f} s, "
                 f"~{el / (r + 1) * (rounds - r - 1):.0f} s left")
    return {"blocks": len(waits), "median_wait_ms": float(np.median(waits) * 1e3) if waits else 0.0,
            "max_wait_ms": float(max(waits, default=0) * 1e3), "timeouts": timeouts}
