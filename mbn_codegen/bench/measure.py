"""The coordinator side: worker subprocesses and interleaved (round-robin) timing.

Each round visits every (variant) once at one thread count, in an order rotated every round, and
takes a block of `reps` timed calls after one untimed call; so load drift, thermal or frequency
changes hit every variant alike. Only one worker runs at a time; the others wait on a pipe.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

THREAD_ENV = ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class WorkerError(RuntimeError):
    pass


class Worker:
    """A `python -m mbn_codegen.bench.worker` child in its own session (so a terminal's Ctrl-C
    reaches only the coordinator, which then stops it); it exits when its stdin closes."""

    def __init__(self, spec: dict, log_path: Path):
        env = dict(os.environ)
        for k in THREAD_ENV:
            env[k] = str(spec["threads"])
        env.setdefault("TVM_BIND_THREADS", "1")
        self.name = f"{spec.get('variant', spec['runtime'])}@{spec['threads']}t"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "mbn_codegen.bench.worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     env=env, text=True, start_new_session=True, bufsize=1)
        self._send(spec)
        self.ready: dict | None = None

    def _send(self, obj: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(obj) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as e:
            raise WorkerError(f"{self.name}: worker is gone ({e}); see {self._log.name}") from None

    def _recv(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise WorkerError(f"{self.name}: worker exited (code {code}); see {self._log.name}")
        return json.loads(line)

    def wait_ready(self) -> dict:
        self.ready = self._recv()
        return self.ready

    def request(self, obj: dict) -> dict:
        self._send(obj)
        r = self._recv()
        if "error" in r:
            raise WorkerError(f"{self.name}: {r['error']}")
        return r

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            except (BrokenPipeError, OSError, ValueError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()              # our own child, by its handle
                self.proc.wait()
        self._log.close()


def start_workers(specs: list[dict], log_dir: Path) -> list[tuple[dict, Worker | None, dict]]:
    """Start all at once (loading is the slow part), then collect their ready replies."""
    started = []
    for s in specs:
        try:
            started.append((s, Worker(s, log_dir / f"{s['variant']}-{s['threads']}t.log")))
        except (OSError, WorkerError) as e:
            started.append((s, None, {"ok": False, "error": str(e)}))
    out = []
    for item in started:
        if len(item) == 3:
            out.append(item)
            continue
        s, w = item
        try:
            r = w.wait_ready()
        except WorkerError as e:
            r = {"ok": False, "error": str(e)}
        if not r.get("ok"):
            w.close()
            w = None
        out.append((s, w, r))
    return out


SETTLE_S = 0.15


def interleaved(workers: dict[str, Worker], rounds: int, reps: int, warmup: int,
                on_block: Callable[[str, int, list[float]], None],
                progress: Callable[[str], None] | None = None, settle_s: float = SETTLE_S) -> None:
    """Round-robin timing. on_block(variant, round, samples_ms) is called after every block (the
    caller records and saves), so an interruption loses at most one block.

    settle_s: pause before each block. Thread pools spin-wait after their last job (TVM's ~50 ms,
    ONNX Runtime's ~30 ms, measured here as CPU time of an idle worker); without the pause the
    previous variant's spinning threads take a core from the next one, which halved 2-thread
    results on a 2-core machine."""
    names = list(workers)
    for name in names:                         # warm-up: caches, thread pools, lazy init
        workers[name].request({"cmd": "time", "n": 0, "warmup": warmup})
    t_start = time.perf_counter()
    for r in range(rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            time.sleep(settle_s)
            try:
                res = workers[name].request({"cmd": "time", "n": reps, "warmup": 1})
            except WorkerError as e:
                if progress:
                    progress(f"  {name}: {e}; dropped from the remaining rounds")
                workers.pop(name).close()
                names.remove(name)
                continue
            on_block(name, r, res["samples_ms"])
        if progress:
            el = time.perf_counter() - t_start
            eta = el / (r + 1) * (rounds - r - 1)
            progress(f"  round {r + 1}/{rounds} done, {el:.0f} s elapsed, ~{eta:.0f} s left")
