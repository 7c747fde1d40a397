"""The whole bench: build the TVM variants, measure the machine's peak, end to end (interleaved), per
layer; write results.json after every step, then the report."""
from __future__ import annotations

import datetime as _dt
import importlib.util
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import MbnError
from ..model_spec import ModelSpec, with_model_fields
from .layers import layer_entry, onnx_layers
from .results import FORMAT, RESULTS, add_block, new_series, provenance, save
from .worker import FENCE_TIMEOUT_S, SPIN, Worker, WorkerError, ask, fence

# name -> (label, a TVM variant's BuildConfig fields or the Python package a peer runs in); the generic
# space is tuned on stock NHWC (tuning.prepare_module).
VARIANTS = {"stock": ("TVM stock (untuned)", {"schedules": "stock"}),
            "metaschedule": ("TVM MetaSchedule (generic space)", {"schedules": "stock", "layout": "NHWC"}),
            "ours": ("ours (default knobs)", {"schedules": "ours", "use_shipped_database": False}),
            "ours-tuned": ("ours (tuned)", {"schedules": "ours"}),
            "pytorch": ("PyTorch eager", "torch"), "onnxruntime": ("ONNX Runtime", "onnxruntime"),
            "openvino": ("OpenVINO (f32)", "openvino"),
            "openvino-bf16": ("OpenVINO (bf16, its default on AMX CPUs)", "openvino")}
ALL_VARIANTS = tuple(VARIANTS)
DEFAULT_VARIANTS = ALL_VARIANTS[:-1]


@with_model_fields
@dataclass
class BenchConfig:
    model: ModelSpec = field(default_factory=ModelSpec)   # flat keywords (alpha=...) work too
    target: str = "x86_64"
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    database: str | None = None
    ms_database: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)   # extra variants: label -> artifact dir
    threads: list[int] | None = None    # default: 1 and all usable cores
    rounds: int = 10
    reps: int = 5
    warmup: int = 5
    layers: bool = True
    layer_rounds: int = 5
    peak: bool = True
    quick_peak: bool = False
    out: str | None = None
    rpc_tracker: str | None = None      # HOST:PORT: measure on the board registered under rpc_key
    rpc_key: str | None = None
    board_peers: str | None = None      # board_peers' JSON, produced on the board

    def base_build(self) -> dict:
        """The model and target as flat keywords (BuildConfig takes them; workers get them as JSON)."""
        m = self.model
        return {"model": m.name, "alpha": m.alpha, "resolution": m.zoo_resolution if not m.onnx else m.resolution,
                "seed": m.seed, "num_classes": m.num_classes, "weights": m.weights, "onnx": m.onnx,
                "target": self.target}


@dataclass
class Variant:
    """Also its record in results.json (asdict)."""
    name: str
    kind: str                      # "tvm" | "peer"
    label: str
    status: str = "ok"             # ok | unavailable | failed
    note: str = ""
    database: str | None = None
    artifact: str | None = None
    runtime: str = "tvm"
    checks: list = field(default_factory=list)
    build_facts: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def unless(self, why: str | None, status: str = "unavailable") -> Variant:
        if why:
            self.status, self.note = status, why
        return self


def variants(cfg: BenchConfig, names: list[str]) -> list[Variant]:
    from ..database import database_dir

    dbs = {"ours-tuned": cfg.database or str(database_dir(cfg.target, "ours")),
           "metaschedule": cfg.ms_database or str(database_dir(cfg.target, "generic"))}
    out = []
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}: choose from {', '.join(ALL_VARIANTS)}")
        label, how = VARIANTS[name]
        if isinstance(how, dict):
            v = Variant(name, "tvm", label, database=dbs.get(name))
            out.append(v.unless(v.database and not Path(v.database).is_dir() and f"no database at {v.database}"))
        else:
            out.append(Variant(name, "peer", label, runtime=how).unless(
                f"not installed: Python package {how!r}" if importlib.util.find_spec(how) is None else
                "an --onnx model has no PyTorch definition" if name == "pytorch" and cfg.model.onnx else None))
    return out + [Variant(label, "tvm", f"{label} ({Path(p).name})", artifact=str(p)).unless(
        not (Path(p) / "manifest.json").is_file() and f"not an artifact directory: {p}")
        for label, p in cfg.artifacts.items()]


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> Path:
    import psutil

    from .report import closing_line, summarize, write_report

    run = Run(cfg, log)
    doc = run.doc
    old = signal.signal(signal.SIGTERM, signal.default_int_handler)     # SIGTERM: KeyboardInterrupt
    try:
        run.all()
        doc["status"] = "complete"
    except BaseException as e:
        doc["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        run.say(f"{doc['status']}: {type(e).__name__}: {e}; keeping what was measured")
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        doc["provenance"].update(load_average_end=[round(x, 2) for x in psutil.getloadavg()],
                                 seconds=round(time.perf_counter() - run.t0, 1))
        doc["summary"] = summarize(doc)
        run.save()                      # the raw samples first: a report error must not lose them
        write_report(run.out, doc)
        run.save()
        log(f"report: {run.out}/report.html ({doc['status']})")
        log(closing_line(doc))
    return run.out


class Run:
    """One bench in progress: its variants, results.json's document and the progress log."""

    def __init__(self, cfg: BenchConfig, log: Callable[[str], None]):
        import psutil

        from .. import targets
        from ..database import summary
        from ..runtime import machine_arch

        spec, m, self.remote, peers = targets.load(cfg.target), cfg.model, None, {}
        self.cfg, self.log, self.t0, names = cfg, log, time.perf_counter(), cfg.variants
        if cfg.rpc_tracker:
            from .board import PEERS as peers, connect
            self.remote, machine, board = connect(cfg, spec)
            cores, names = board["cores"] or 1, [n for n in names if isinstance(VARIANTS[n][1], dict)]
        elif spec.arch != machine_arch() or spec.device != "cpu":
            raise MbnError(f"target {spec.name!r} ({spec.arch}, {spec.device}) does not run on this "
                           f"{machine_arch()} CPU: bench on the board with --rpc-tracker HOST:PORT --rpc-key KEY")
        else:
            cores = len(psutil.Process().cpu_affinity())
        out = self.out = Path(cfg.out or f"reports/{m.stem()}-{Path(cfg.target).stem}-"
                                         f"{_dt.datetime.now():%Y%m%d-%H%M%S}")
        out.mkdir(parents=True, exist_ok=True)
        self.threads = sorted(set(cfg.threads or [1, cores]))
        self.vs = variants(cfg, names) + [Variant(n, "peer", label, runtime=n) for n, label in peers.items()]
        for v in self.vs:
            if v.database and v.ok:      # build from a copy: a tuner may be appending to the original
                v.database = str(shutil.copytree(v.database, out / "databases" / v.name, dirs_exist_ok=True))
                v.label += f" ({summary(v.database).records} trials)"
        self.doc = {
            "format": FORMAT, "status": "running", "config": {**asdict(cfg), "threads": self.threads, "out": str(out)},
            "provenance": provenance(spec), "peak": [], "variants": [], "e2e": [], "layers": [],
            "model": {"name": Path(m.onnx).name if m.onnx else f"{m.name} alpha={m.alpha:g} res={m.zoo_resolution}",
                      "onnx": m.onnx, "weights": "from the ONNX file" if m.onnx else m.weights or
                      f"random (live, seed={m.seed})"},
            "isolation": {}, "log": []}
        if self.remote:
            self.doc["provenance"].update(host_machine=self.doc["provenance"]["machine"], machine=machine,
                                          board={**board, "tracker": cfg.rpc_tracker, "key": cfg.rpc_key})

    def say(self, msg: str) -> None:
        self.log(msg)
        self.doc["log"].append({"t": round(time.perf_counter() - self.t0, 2), "message": msg})

    def save(self) -> None:
        self.doc["variants"] = [asdict(v) for v in self.vs]
        save(self.out / RESULTS, self.doc)

    def fail(self, v: Variant, note: str) -> None:
        self.say(f"  {v.name}: {v.unless(note, 'failed').note}")

    def ok(self, kind: str | None = None) -> list[Variant]:
        return [v for v in self.vs if v.ok and kind in (None, v.kind)]

    def spec(self, v: Variant, t: int) -> dict:
        return {**self.cfg.base_build(), "variant": v.name, "runtime": v.runtime, "threads": t, "artifact": v.artifact,
                **{k: self.model[k] for k in ("input", "reference", "onnx")}}

    def all(self) -> None:
        from ..build import BuildConfig, build
        from ..runtime import read_manifest

        cfg, doc, logs = self.cfg, self.doc, self.out / "logs"
        self.say(f"bench {doc['model']['name']} on {cfg.target}, threads {self.threads}, variants "
                 f"{', '.join(v.name for v in self.ok())}" + "".join(f"\n  {v.name}: {v.note}" for v in self.vs
                                                                      if not v.ok))
        d = self.out / "model"            # the ONNX every peer loads, a seeded input, ONNX Runtime's output on it
        d.mkdir(parents=True, exist_ok=True)
        prepared = cfg.model.write_onnx(d / "model.onnx", log=lambda s: None)
        for name, a in zip(("input", "reference"), cfg.model.reference(prepared)):
            np.save(d / f"{name}.npy", a)
        self.model = {"onnx": str(prepared.path), "input": str(d / "input.npy"), "reference": str(d / "reference.npy")}
        layers = onnx_layers(prepared.path)
        doc["model"].update(input_shape=list(prepared.shape), layers=layers,
                            mult_adds=sum(l["mult_adds"] for l in layers))
        doc["isolation"] = {"spin_settings": SPIN, "order": "random per round", "fence": {}}
        logs.mkdir(parents=True, exist_ok=True)
        for v in self.ok("tvm"):
            self.say(f"{v.name}: {v.artifact}" if v.artifact else f"build {v.name} ...")
            try:
                if not v.artifact:
                    with open(logs / "build.log", "a") as lf:
                        kw = {**cfg.base_build(), **VARIANTS[v.name][1], "database": v.database}
                        v.artifact = str(build(BuildConfig(**kw, out=str(self.out / "builds" / v.name)),
                                               log=lambda s: print(s, file=lf, flush=True)))
                v.build_facts = {"kernels": read_manifest(v.artifact).get("kernels", [])}
            except Exception as e:
                self.fail(v, f"build failed: {type(e).__name__}: {str(e)[:300]}")
            self.save()
        if self.remote:
            from .board import measure
            return measure(self)
        for t in self.threads if cfg.peak else []:
            p = ask({"variant": "peak", "runtime": "peak", "threads": t, "target": cfg.target},
                    {"cmd": "peak", "quick": cfg.quick_peak}, logs)
            doc["peak"].append(p)
            self.save()
            self.say(f"peak at {t} thread(s): FMA loop {p['fma_gflops']:.1f} GFLOP/s (hot loop "
                     f"{'registers only' if p['asm_check']['ok'] else 'NOT register-resident'}), "
                     f"triad {p['triad_gbs']:.1f} GB/s")
        for t in self.threads:
            doc["isolation"]["fence"][str(t)] = self.e2e(t, logs)
        for v in [*self.ok("tvm"), *(v for v in self.ok("peer") if v.runtime == "onnxruntime")] if cfg.layers else []:
            for t in self.threads:
                self.layers(v, t, logs)

    def e2e(self, t: int, logs: Path) -> dict:
        """The fence statistics of timing the variants at t threads, each in its own worker."""
        vs = self.ok()
        self.say(f"end to end, {t} thread(s): loading {len(vs)} variants ...")
        workers = {v.name: Worker(self.spec(v, t), logs) for v in vs}     # all at once: loading is the slow part
        try:
            for v in vs:
                try:
                    check = workers[v.name].request()["check"]
                    workers[v.name].request({"cmd": "time", "n": 0, "warmup": self.cfg.warmup})
                except WorkerError as e:
                    check = {"ok": False, "error": str(e)}
                    workers.pop(v.name).close()
                    self.say(f"  {v.name}: failed to load: {e}")
                v.checks.append({"threads": t, **check})
                if "max_abs_err" in check and not check["ok"]:
                    self.say(f"  {v.name}: output differs from ONNX Runtime (max |err| {check['max_abs_err']:.3g})")
            timers = {n: (lambda w=w: w.request({"cmd": "time", "n": self.cfg.reps, "warmup": 1})["samples_ms"])
                      for n, w in workers.items()}
            return self.interleave(t, timers, lambda: fence(workers.values()))
        finally:
            for w in workers.values():
                w.close()

    def interleave(self, t: int, timers: dict[str, Callable[[], list[float]]],
                   fence: Callable[[], float] | None = None) -> dict:
        """Each round times every variant once, a block of calls in a fresh random order, after `fence`
        has waited out the previous block's spinning pools; saved after every block, so an interruption
        loses at most one."""
        series, rounds = {n: new_series(n, t) for n in timers}, self.cfg.rounds
        self.doc["e2e"] += series.values()
        rng, waits, t0 = random.Random(self.cfg.model.seed + t), [], time.perf_counter()
        for r in range(rounds):
            order = rng.sample(list(timers), len(timers))
            for n in order:
                waits += [fence()] if fence else []
                try:
                    add_block(series[n], r, timers[n]())
                except WorkerError as e:
                    self.say(f"  {n}: {e}; dropped from the remaining rounds")
                    del timers[n]
                self.save()
            el = time.perf_counter() - t0
            self.say(f"  {t} thread(s), round {r + 1}/{rounds} ({' '.join(order)}), {el:.0f} s, ~"
                     f"{el / (r + 1) * (rounds - r - 1):.0f} s left   " + "  ".join(
                         f"{n} {e['stats']['median']:.2f}" for n, e in series.items() if e["stats"]["n"]) + " ms")
        return {"blocks": len(waits), "median_wait_ms": float(np.median(waits) * 1e3) if waits else 0.0,
                "max_wait_ms": float(max(waits, default=0) * 1e3), "timeouts": sum(w > FENCE_TIMEOUT_S for w in waits)}

    def layers(self, v: Variant, t: int, logs: Path) -> None:
        self.say(f"per layer: {v.name} at {t} thread(s) ...")
        try:
            m = ask(self.spec(v, t), {"cmd": "layers", "rounds": self.cfg.layer_rounds}, logs)
        except WorkerError as e:
            return self.say(f"  failed: {e}")
        kernels = v.build_facts["kernels"] if v.kind == "tvm" else None
        e = {"variant": v.name, "threads": t, **layer_entry(m, kernels, self.doc["model"]["layers"])}
        self.doc["layers"].append(e)
        self.save()
        c = e["consistency"]
        self.say(f"  {len(e['calls'])} kernel calls, sum {c['kernel_sum_ms']:.2f} ms, end to end {c['e2e_ms']:.2f} ms; "
                 + (e["mapping_problem"] or "mapped to the layers"))
