"""The whole bench: build the TVM variants, measure the machine's peak, end to end (interleaved), per
layer, the optional alpha x rho grid; write results.json after every step, then the report."""
from __future__ import annotations

import datetime as _dt
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..model_spec import ModelSpec, with_model_fields
from . import variants as V
from .results import add_block, new_series

GRID_DEFAULT_VARIANTS = ("stock", "ours", "onnxruntime")
# Howard et al. 2017, Table 6 (width multiplier at 224) and Table 7 (resolution at alpha 1.0).
PAPER_TOP1 = {(1.0, 224): 70.6, (1.0, 192): 69.1, (1.0, 160): 67.2, (1.0, 128): 64.4,
              (0.75, 224): 68.4, (0.5, 224): 63.7, (0.25, 224): 50.6}


@with_model_fields
@dataclass
class BenchConfig:
    model: ModelSpec = field(default_factory=ModelSpec)   # flat keywords (alpha=...) work too
    target: str = "x86_64"
    variants: list[str] = field(default_factory=lambda: list(V.DEFAULT_VARIANTS))
    database: str | None = None
    ms_database: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)   # extra variants: label -> artifact dir
    threads: list[int] | None = None    # default: 1 and all usable cores
    rounds: int = 10
    reps: int = 5
    warmup: int = 5
    layers: bool = True
    layer_rounds: int = 5
    grid: bool = False
    grid_variants: list[str] = field(default_factory=lambda: list(GRID_DEFAULT_VARIANTS))
    grid_points: list[tuple[float, int]] | None = None   # default: the paper's 16 (alpha, rho)
    grid_threads: int | None = None
    grid_rounds: int = 3
    grid_reps: int = 2
    peak: bool = True
    quick_peak: bool = False
    spin: bool = True                   # False: every pool blocks when idle (worker.NO_SPIN_ENV)
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


def prepare_model(cfg: BenchConfig, d: Path) -> dict:
    """The ONNX every peer loads, a seeded input, ONNX Runtime's output on it (the oracle) and the
    graph's compute layers with their mult-adds."""
    from .layers import onnx_layers

    d.mkdir(parents=True, exist_ok=True)
    prepared = cfg.model.write_onnx(d / "model.onnx", log=lambda s: None)
    x, y = cfg.model.reference(prepared)
    np.save(d / "input.npy", x)
    np.save(d / "reference.npy", y)
    return {"onnx": str(prepared.path), "input": str(d / "input.npy"), "reference": str(d / "reference.npy"),
            "input_shape": list(prepared.shape), "layers": onnx_layers(prepared.path)}


def build_variant(v: V.Variant, out: Path | None, log_file: Path) -> None:
    """Build v into out (None: v.artifact is built already); v.build_facts from its manifest."""
    from ..build import BuildConfig, build
    from ..runtime import read_manifest

    t0, seconds = time.perf_counter(), None
    if out:
        with open(log_file, "a") as lf:
            v.artifact = str(build(BuildConfig(**v.build_kwargs, database=v.database, out=str(out)),
                                   log=lambda s: print(s, file=lf, flush=True)))
        seconds = round(time.perf_counter() - t0, 2)
    man = read_manifest(v.artifact)
    v.build_facts = {"seconds": seconds, "kernels": man.get("kernels", []), "library_bytes": man["library"]["bytes"]}


def worker_spec(v: V.Variant, cfg: BenchConfig, threads: int, model: dict) -> dict:
    return {**cfg.base_build(), "variant": v.name, "runtime": v.runtime, "threads": threads, "artifact": v.artifact,
            "spin": cfg.spin, **{k: model[k] for k in ("input", "reference", "onnx")},
            "precision": "default" if v.name == "openvino-bf16" else "f32"}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> Path:
    import psutil

    from .. import targets
    from ..errors import MbnError
    from ..runtime import machine_arch
    from .results import FORMAT, provenance

    spec, remote, names = targets.load(cfg.target), None, cfg.variants
    if cfg.rpc_tracker:
        from . import board as B
        remote, machine, board = B.connect(cfg, spec)
        cores, names = board["cores"] or 1, [n for n in cfg.variants if n in V.TVM_VARIANTS]
    elif spec.arch != machine_arch() or spec.device != "cpu":
        raise MbnError(f"target {spec.name!r} ({spec.arch}, {spec.device}) does not run on this {machine_arch()} "
                       "CPU: bench on the board with --rpc-tracker HOST:PORT --rpc-key KEY")
    else:
        cores = len(psutil.Process().cpu_affinity())
    out = Path(cfg.out) if cfg.out else Path("reports") / (f"{cfg.model.stem()}-{Path(cfg.target).stem}-"
                                                           f"{_dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    threads = sorted(set(cfg.threads or [1, cores]))
    vs = V.resolve(cfg, names, cfg.base_build(), cfg.artifacts)
    if remote:
        vs += [V.Variant(n, "peer", label, runtime=n) for n, label in B.PEERS.items()]
    for v in vs:
        if v.database and v.ok:      # build from a copy: a tuner may be appending to the original
            v.database = str(shutil.copytree(v.database, out / "databases" / v.name, dirs_exist_ok=True))
            v.label += f" ({V.database_records(v.database)} trials)"
    m = cfg.model
    doc = {
        "format": FORMAT, "status": "running", "config": {**asdict(cfg), "threads": threads, "out": str(out)},
        "provenance": provenance(spec), "peak": [], "variants": [], "e2e": [], "layers": [], "grid": [],
        "model": {"name": Path(m.onnx).name if m.onnx else f"{m.name} alpha={m.alpha:g} res={m.zoo_resolution}",
                  "onnx": m.onnx, "weights": "from the ONNX file" if m.onnx else m.weights or
                  f"random (live, seed={m.seed})"},
        "isolation": {}, "log": []}
    if remote:
        doc["provenance"].update(host_machine=doc["provenance"]["machine"], machine=machine,
                                 board={**board, "tracker": cfg.rpc_tracker, "key": cfg.rpc_key})
    run = Run(cfg, out, threads, vs, doc, log, remote)
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
        doc["provenance"]["load_average_end"] = [round(x, 2) for x in psutil.getloadavg()]
        doc["provenance"]["seconds"] = round(time.perf_counter() - run.t0, 1)
        from .report import closing_line, summarize, write_report
        doc["summary"] = summarize(doc)
        run.save()                      # the raw samples first: a report error must not lose them
        write_report(out, doc)
        run.save()
        log(f"report: {out}/report.html ({doc['status']})")
        log(closing_line(doc))
    return out


@dataclass
class Run:
    """One bench in progress: its variants, results.json's document and the progress log."""
    cfg: BenchConfig
    out: Path
    threads: list[int]
    vs: list[V.Variant]
    doc: dict
    log: Callable[[str], None]
    remote: object = None
    model: dict = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)

    def say(self, msg: str) -> None:
        self.log(msg)
        self.doc["log"].append({"t": round(time.perf_counter() - self.t0, 2), "message": msg})

    def save(self) -> None:
        from .results import RESULTS, save

        self.doc["variants"] = [asdict(v) for v in self.vs]
        save(self.out / RESULTS, self.doc)

    def fail(self, v: V.Variant, note: str) -> None:
        v.status, v.note = "failed", note
        self.say(f"  {v.name}: {note}")

    def ok(self, kind: str | None = None) -> list[V.Variant]:
        return [v for v in self.vs if v.ok and kind in (None, v.kind)]

    def all(self) -> None:
        from .worker import NO_SPIN_ENV, ask

        cfg, doc, logs = self.cfg, self.doc, self.out / "logs"
        self.say(f"bench {doc['model']['name']} on {cfg.target}, threads {self.threads}, variants "
                 f"{', '.join(v.name for v in self.ok())}" + "".join(f"\n  {v.name}: {v.note}" for v in self.vs
                                                                      if not v.ok))
        self.model = prepare_model(cfg, self.out / "model")
        doc["model"].update(input_shape=self.model["input_shape"], layers=self.model["layers"],
                            mult_adds=sum(l["mult_adds"] for l in self.model["layers"]))
        spin = ({"all runtimes": "their default spin-wait inside their own block; the fence waits it out"} if cfg.spin
                else {**NO_SPIN_ENV, "onnxruntime session.intra_op.allow_spinning": "0", "openvino (TBB)": "no switch"})
        doc["isolation"] = {"spin_settings": spin, "order": "random per round", "fence": {}}
        logs.mkdir(parents=True, exist_ok=True)
        for v in self.ok("tvm"):
            self.say(f"{v.name}: {v.artifact}" if v.artifact else f"build {v.name} ...")
            try:
                build_variant(v, None if v.artifact else self.out / "builds" / v.name, logs / "build.log")
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
            doc["isolation"]["fence"][str(t)] = self.e2e(cfg, self.ok(), t, self.model, doc["e2e"], logs)
        for v in self.ok("tvm") if cfg.layers else []:
            for t in self.threads:
                self.layers(v, t, logs)
        if cfg.grid:
            self.grid()

    def e2e(self, cfg: BenchConfig, vs: list[V.Variant], t: int, model: dict, dest: list, logs: Path,
            say: Callable[[str], None] | None = None) -> dict:
        """Time vs at t threads, each in its own worker, interleaved; returns the fence statistics."""
        from .worker import fence, start_workers

        say = say or self.say
        say(f"end to end, {t} thread(s): loading {len(vs)} variants ...")
        workers = {}
        try:
            for (w, r), v in zip(start_workers([worker_spec(v, cfg, t, model) for v in vs], logs), vs):
                v.checks.append({"threads": t, **(r["check"] if w else r)})
                if not w:
                    say(f"  {v.name}: failed to load: {r['error']}")
                    continue
                if not r["check"]["ok"]:
                    say(f"  {v.name}: output differs from ONNX Runtime (max |err| {r['check']['max_abs_err']:.3g})")
                workers[v.name] = w
                w.request({"cmd": "time", "n": 0, "warmup": cfg.warmup})
            timers = {n: (lambda w=w: w.request({"cmd": "time", "n": cfg.reps, "warmup": 1})["samples_ms"])
                      for n, w in workers.items()}
            return self.interleave(t, timers, cfg.rounds, dest, say, lambda: fence(workers.values()))
        finally:
            for w in workers.values():
                w.close()

    def interleave(self, t: int, timers: dict[str, Callable[[], list[float]]], rounds: int, dest: list,
                   say: Callable[[str], None], fence: Callable[[], tuple[float, bool]] | None = None) -> dict:
        """Each round visits every variant once, in a fresh random order, for one block of timed
        calls, after `fence` (if any) has waited out the previous block's spinning pools; results.json
        is saved after every block, so an interruption loses at most one."""
        from .worker import WorkerError

        series = {n: new_series(n, t) for n in timers}
        dest += series.values()
        rng, waits, timeouts, t0 = random.Random(self.cfg.model.seed + t), [], 0, time.perf_counter()
        for r in range(rounds):
            order = rng.sample(list(timers), len(timers))
            for n in order:
                if fence:
                    waited, late = fence()
                    waits.append(waited)
                    timeouts += late
                try:
                    add_block(series[n], r, timers[n]())
                except WorkerError as e:
                    say(f"  {n}: {e}; dropped from the remaining rounds")
                    del timers[n]
                self.save()
            el = time.perf_counter() - t0
            say(f"  {t} thread(s), round {r + 1}/{rounds} ({' '.join(order)}), {el:.0f} s, ~"
                f"{el / (r + 1) * (rounds - r - 1):.0f} s left   " + "  ".join(
                    f"{n} {e['stats']['median']:.2f}" for n, e in series.items() if e["stats"]["n"]) + " ms")
        return {"blocks": len(waits), "median_wait_ms": float(np.median(waits) * 1e3) if waits else 0.0,
                "max_wait_ms": float(max(waits, default=0) * 1e3), "timeouts": timeouts}

    def layers(self, v: V.Variant, t: int, logs: Path) -> None:
        from .layers import layer_entry
        from .worker import WorkerError, ask

        self.say(f"per layer: {v.name} at {t} thread(s) ...")
        try:
            m = ask(worker_spec(v, self.cfg, t, self.model), {"cmd": "layers", "rounds": self.cfg.layer_rounds}, logs)
        except WorkerError as e:
            return self.say(f"  failed: {e}")
        e = {"variant": v.name, "threads": t, **layer_entry(m, v.build_facts["kernels"], self.model["layers"])}
        self.doc["layers"].append(e)
        self.save()
        c = e["consistency"]
        self.say(f"  {len(e['calls'])} kernel calls: warm sum {c['kernel_sum_ms']:.2f} ms, end to end "
                 f"{c['e2e_ms']:.2f} ms, overhead {c['unattributed_ms']:.2f} ms: "
                 f"{'consistent' if c['ok'] else 'NOT bracketed'}"
                 + (f"; {e['mapping_problem']}" if e["mapping_problem"] else ""))

    def grid(self) -> None:
        """MobileNet v1's alpha x rho variants: measured latency against mult-adds (the paper's Figures
        4-5 with time), few repetitions; each point's builds are deleted once measured."""
        from ..models.mobilenet_v1 import PAPER_ALPHAS, PAPER_RESOLUTIONS

        cfg, out = self.cfg, self.out
        points = cfg.grid_points or [(a, r) for a in PAPER_ALPHAS for r in PAPER_RESOLUTIONS]
        t = cfg.grid_threads or max(self.threads)
        self.say(f"alpha x rho grid: {len(points)} points x {', '.join(cfg.grid_variants)} at {t} thread(s)")
        for a, r in points:
            pcfg, d, entries = replace(cfg, alpha=a, resolution=r, rounds=cfg.grid_rounds, reps=cfg.grid_reps,
                                       warmup=1), out / "grid" / f"{a:g}-{r}", []
            model = prepare_model(pcfg, d / "model")
            vs = V.resolve(cfg, cfg.grid_variants, pcfg.base_build())
            for v in [v for v in vs if v.ok and v.kind == "tvm"]:
                if v.database:
                    v.database = str(out / "databases" / v.name)
                build_variant(v, d / v.name, out / "logs" / "build-grid.log")
            self.e2e(pcfg, [v for v in vs if v.ok], t, model, entries, out / "logs" / "grid", lambda m: None)
            madds = sum(l["mult_adds"] for l in model["layers"])
            self.doc["grid"] += [{**e, "alpha": a, "resolution": r, "mult_adds": madds,
                                  "accuracy": PAPER_TOP1.get((a, r))} for e in entries]
            self.save()
            shutil.rmtree(d, ignore_errors=True)
            self.say(f"  {a:g}-{r} ({madds / 1e6:.0f}M mult-adds): " + "  ".join(
                f"{e['variant']} {e['stats']['median']:.2f} ms" for e in entries if e["stats"]["n"]))
