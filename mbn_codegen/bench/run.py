"""The whole bench: build the TVM variants, measure the machine's peak, end to end (interleaved), per
layer, the optional alpha x rho grid; write results.json after every step, then the report."""
from __future__ import annotations

import datetime as _dt
import json
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..model_spec import ModelSpec, with_model_fields
from .results import add_block, new_series
from .variants import DEFAULT_VARIANTS

GRID_DEFAULT_VARIANTS = ("stock", "ours", "onnxruntime")
# Howard et al. 2017, Table 6 (width multiplier at 224) and Table 7 (resolution at alpha 1.0).
PAPER_TOP1 = {(1.0, 224): 70.6, (1.0, 192): 69.1, (1.0, 160): 67.2, (1.0, 128): 64.4,
              (0.75, 224): 68.4, (0.5, 224): 63.7, (0.25, 224): 50.6}


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
    grid: bool = False
    grid_variants: list[str] = field(default_factory=lambda: list(GRID_DEFAULT_VARIANTS))
    grid_points: list[tuple[float, int]] | None = None   # default: the paper's 16 (alpha, rho)
    grid_threads: int | None = None
    grid_rounds: int = 3
    grid_reps: int = 2
    peak: bool = True
    quick_peak: bool = False
    spin: bool = True                   # False: every pool blocks when idle (measure.NO_SPIN_ENV)
    out: str | None = None
    rpc_tracker: str | None = None      # HOST:PORT: measure on the board registered under rpc_key
    rpc_key: str | None = None
    board_peers: str | None = None      # board_peers' JSON, produced on the board

    @property
    def seed(self) -> int:
        return self.model.seed

    def default_out(self) -> Path:
        return Path("reports") / f"{self.model.stem()}-{Path(self.target).stem}-{_dt.datetime.now():%Y%m%d-%H%M%S}"

    def base_build(self) -> dict:
        """The model and target as flat keywords (BuildConfig takes them; workers get them as JSON)."""
        m = self.model
        return {"model": m.name, "alpha": m.alpha, "resolution": m.zoo_resolution if not m.onnx else m.resolution,
                "seed": m.seed, "num_classes": m.num_classes, "weights": m.weights, "onnx": m.onnx,
                "target": self.target}


def prepare_model(cfg: BenchConfig, d: Path) -> dict:
    """The ONNX every peer loads, a seeded input, ONNX Runtime's output on it (the oracle) and the
    graph's compute layers with their mult-adds."""
    import numpy as np

    from .layers import onnx_layers

    d.mkdir(parents=True, exist_ok=True)
    prepared = cfg.model.write_onnx(d / "model.onnx", log=lambda s: None)
    onnx, shape = prepared.path, prepared.shape
    x, y = cfg.model.reference(prepared)
    np.save(d / "input.npy", x)
    np.save(d / "reference.npy", y)
    return {"onnx": str(onnx), "input": str(d / "input.npy"), "reference": str(d / "reference.npy"),
            "input_shape": list(shape), "layers": onnx_layers(onnx)}


def build_variant(v, out: Path, log_file: Path) -> dict:
    from ..build import BuildConfig, build

    t0 = time.perf_counter()
    with open(log_file, "a") as lf:
        v.artifact = str(build(BuildConfig(**v.build_kwargs, out=str(out)),
                               log=lambda s: print(s, file=lf, flush=True)))
    return {**_manifest_facts(v.artifact), "seconds": round(time.perf_counter() - t0, 2)}


def _manifest_facts(artifact: str) -> dict:
    man = json.loads((Path(artifact) / "manifest.json").read_text())
    return {"seconds": None, "kernels": man.get("kernels", []), "library_bytes": man["library"]["bytes"]}


def worker_spec(v, cfg: BenchConfig, threads: int, model: dict) -> dict:
    return {**cfg.base_build(), "variant": v.name, "runtime": v.runtime, "threads": threads, "artifact": v.artifact,
            "spin": cfg.spin, **{k: model[k] for k in ("input", "reference", "onnx")},
            "precision": "default" if v.name == "openvino-bf16" else "f32"}


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> Path:
    from .. import targets
    from ..errors import MbnError
    from ..runtime import machine_arch
    from . import variants
    from .results import FORMAT, RESULTS, provenance, save as _save

    import psutil

    spec, remote, names = targets.load(cfg.target), None, cfg.variants
    if cfg.rpc_tracker:
        from . import board as B
        B.check_config(cfg, spec)
        remote = B.connect(cfg.rpc_tracker, cfg.rpc_key)
        machine, board = B.identity(remote)
        cores, names = board["cores"] or 1, [n for n in cfg.variants if n in variants.TVM_VARIANTS]
    elif spec.arch != machine_arch() or spec.device != "cpu":
        raise MbnError(f"target {spec.name!r} ({spec.arch}, {spec.device}) does not run on this {machine_arch()} "
                       "CPU: bench on the board with --rpc-tracker HOST:PORT --rpc-key KEY")
    else:
        cores = len(psutil.Process().cpu_affinity())
    out = Path(cfg.out) if cfg.out else cfg.default_out()
    out.mkdir(parents=True, exist_ok=True)
    threads = sorted(set(cfg.threads or [1, cores]))
    vs = variants.resolve(names, cfg.base_build(), cfg.target, cfg.database, cfg.ms_database,
                          onnx_only=bool(cfg.model.onnx), artifacts=cfg.artifacts)
    if remote:
        vs += [variants.Variant(n, "peer", label, runtime=n) for n, label in B.PEERS.items()]
    for v in vs:
        if v.database and v.ok:      # build from a copy: a tuner may be appending to the original
            snap = out / "databases" / v.name
            shutil.copytree(v.database, snap, dirs_exist_ok=True)
            v.build_kwargs["database"] = str(snap)
            v.label += f" ({variants.database_records(str(snap))} trials)"
    m = cfg.model
    name = Path(m.onnx).name if m.onnx else f"{m.name} alpha={m.alpha:g} res={m.zoo_resolution}"
    weights = "from the ONNX file" if m.onnx else m.weights or f"random (live, seed={m.seed})"
    doc = {
        "format": FORMAT, "status": "running", "config": {**asdict(cfg), "threads": threads, "out": str(out)},
        "provenance": provenance(spec), "model": {"name": name, "onnx": m.onnx, "weights": weights},
        "peak": [], "variants": [dict(asdict(v), checks=[]) for v in vs], "e2e": [], "layers": [],
        "grid": [], "isolation": {}, "log": []}
    if remote:
        doc["provenance"].update(host_machine=doc["provenance"]["machine"], machine=machine,
                                 board={**board, "tracker": cfg.rpc_tracker, "key": cfg.rpc_key})
    save = lambda: _save(out / RESULTS, doc)  # noqa: E731
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        log(msg)
        doc["log"].append({"t": round(time.perf_counter() - t_start, 2), "message": msg})

    def term(_sig, _frm):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, term)
    try:
        _run(cfg, out, threads, vs, doc, save, say, remote)
        doc["status"] = "complete"
    except BaseException as e:
        doc["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        say(f"{doc['status']}: {type(e).__name__}: {e}; keeping what was measured")
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        doc["provenance"]["load_average_end"] = [round(x, 2) for x in psutil.getloadavg()]
        doc["provenance"]["seconds"] = round(time.perf_counter() - t_start, 1)
        from .report import closing_line, summarize, write_report
        doc["summary"] = summarize(doc)
        save()                      # the raw samples first: a report error must not lose them
        write_report(out, doc)
        save()
        log(f"report: {out}/report.html ({doc['status']})")
        log(closing_line(doc))
    return out


def _run(cfg: BenchConfig, out: Path, threads: list[int], vs, doc: dict, save, say, remote=None) -> None:
    from .measure import spin_settings

    logs, vrec = out / "logs", {r["name"]: r for r in doc["variants"]}
    say(f"bench {doc['model']['name']} on {cfg.target}, threads {threads}, variants "
        f"{', '.join(v.name for v in vs if v.ok)}" + "".join(f"\n  {v.name}: {v.note}" for v in vs if not v.ok))
    model = prepare_model(cfg, out / "model")
    doc["model"].update(input_shape=model["input_shape"], layers=model["layers"],
                            mult_adds=sum(l["mult_adds"] for l in model["layers"]))
    doc["isolation"] = {"spin_settings": spin_settings(cfg.spin), "order": "random per round", "fence": {}}
    if remote:
        doc["isolation"]["spin_settings"] = {"board": "one RPC server process; TVM's pool set per thread count "
                                             "by runtime.config_threadpool"}
    for v in [v for v in vs if v.ok and v.kind == "tvm"]:
        try:
            say(f"build {v.name} ..." if not v.artifact else f"{v.name}: {v.artifact}")
            logs.mkdir(parents=True, exist_ok=True)
            facts = (_manifest_facts(v.artifact) if v.artifact else
                     build_variant(v, out / "builds" / v.name, logs / "build.log"))
            vrec[v.name].update(build_facts=facts, artifact=v.artifact)
        except Exception as e:
            v.status, v.note = "failed", f"build failed: {type(e).__name__}: {str(e)[:300]}"
            vrec[v.name].update(status=v.status, note=v.note)
            say(f"  {v.note}")
        save()
    if remote:
        from . import board as B
        tvm_vs = [v for v in vs if v.ok and v.kind == "tvm"]
        say(f"on the board ({doc['provenance']['machine']['cpu_model']}): {', '.join(v.name for v in tvm_vs)}")
        B.measure(cfg, remote, tvm_vs, threads, model, doc, save, say)
        B.merge_peers(B.peers(cfg, model, doc["provenance"]["board"], threads, say),
                      [v for v in vs if v.kind == "peer"], doc)
        return say("per layer and machine peak: not measured on boards (end to end only)")
    for t in threads if cfg.peak else []:
        p = _ask({"variant": "peak", "runtime": "peak", "threads": t, "target": cfg.target},
                 {"cmd": "peak", "quick": cfg.quick_peak}, logs)
        doc["peak"].append(p)
        save()
        say(f"peak at {t} thread(s): FMA loop {p['fma_gflops']:.1f} GFLOP/s (hot loop "
            f"{'registers only' if p['asm_check']['ok'] else 'NOT register-resident'}), "
            f"triad {p['triad_gbs']:.1f} GB/s")
    for t in threads:
        doc["isolation"]["fence"][str(t)] = _interleave(cfg, [v for v in vs if v.ok], t, model, logs, doc["e2e"],
                                                            save, say, cfg.rounds, cfg.reps, cfg.warmup, vrec)
    for v in [v for v in vs if v.ok and v.kind == "tvm"] if cfg.layers else []:
        for t in threads:
            _layers(cfg, v, t, model, logs, doc, save, say, vrec[v.name]["build_facts"]["kernels"])
    if cfg.grid:
        _grid(cfg, out, threads, doc, save, say)


def _ask(spec: dict, cmd: dict, logs: Path) -> dict:
    from .measure import WorkerError, start_workers

    (_, w, r), = start_workers([spec], logs)
    if not w:
        raise WorkerError(r["error"])
    try:
        return w.request(cmd)
    finally:
        w.close()


def _interleave(cfg, vs, t, model, logs, dest: list, save, say, rounds, reps, warmup, vrec=None) -> dict:
    """Time `vs` at `t` threads, appending one series per variant to `dest` as it grows."""
    from .measure import interleaved, start_workers

    say(f"end to end, {t} thread(s): loading {len(vs)} variants ...")
    workers, entry = {}, {}
    try:
        for s, w, r in start_workers([worker_spec(v, cfg, t, model) for v in vs], logs):
            if vrec:
                vrec[s["variant"]]["checks"].append({"threads": t, **{k: r[k] for k in ("ok", "error") if k in r},
                                                     **(r.get("check") or {})})
            if not w or not r["check"]["ok"]:
                say(f"  {s['variant']}: " + (f"failed to load: {r['error']}" if not w else "output differs from "
                                             f"ONNX Runtime (max |err| {r['check']['max_abs_err']:.3g})"))
            if w:
                workers[s["variant"]] = w
                entry[s["variant"]] = new_series(s["variant"], t)
        dest += entry.values()

        def on_block(name, r, samples):
            add_block(entry[name], r, samples)
            save()

        def progress(msg):
            say(msg + "   " + "  ".join(f"{n} {e['stats']['median']:.2f}" for n, e in entry.items() if e["stats"]["n"])
                + " ms")
        return interleaved(workers, rounds, reps, warmup, on_block, progress, seed=cfg.seed + t)
    finally:
        for w in workers.values():
            w.close()


def _layers(cfg, v, t, model, logs, doc, save, say, kernels) -> None:
    from . import layers as L
    from .measure import WorkerError
    from .results import stats

    say(f"per layer: {v.name} at {t} thread(s) ...")
    try:
        m = _ask(dict(worker_spec(v, cfg, t, model), mode="layers"),
                 {"cmd": "layers", "rounds": cfg.layer_rounds}, logs)
    except WorkerError as e:
        return say(f"  failed: {e}")
    rows, problem = L.map_to_layers(m["calls"], kernels, model["layers"])
    src = {k.get("symbol", k["name"]): k.get("source") for k in kernels}
    for row in rows:
        row.update(median_ms=stats(row["samples_ms"])["median"], cold_median_ms=stats(row["cold_samples_ms"])["median"],
                   source=src.get(row["symbol"]))
    cons = L.consistency(sum(x["median_ms"] for x in rows), sum(x["cold_median_ms"] for x in rows),
                         stats(m["e2e_samples_ms"])["median"], vm_calls=len(rows) + sum(m["other_calls"].values()))
    doc["layers"].append({"variant": v.name, "threads": t, "calls": rows, "e2e_samples_ms": m["e2e_samples_ms"],
                              "other_calls": m["other_calls"], "mapping_problem": problem, "consistency": cons,
                              "method": m["method"]})
    save()
    say(f"  {len(rows)} kernel calls: warm sum {cons['kernel_sum_ms']:.2f} ms, end to end {cons['e2e_ms']:.2f} ms, "
        f"overhead {cons['unattributed_ms']:.2f} ms: {'consistent' if cons['ok'] else 'NOT bracketed'}"
        + (f"; {problem}" if problem else ""))


def _grid(cfg, out, threads, doc, save, say) -> None:
    """MobileNet v1's alpha x rho variants: measured latency against mult-adds (the paper's Figures
    4-5 with time), few repetitions; each point's builds are deleted once measured."""
    from ..models.mobilenet_v1 import PAPER_ALPHAS, PAPER_RESOLUTIONS
    from . import variants

    points = cfg.grid_points or [(a, r) for a in PAPER_ALPHAS for r in PAPER_RESOLUTIONS]
    t = cfg.grid_threads or max(threads)
    say(f"alpha x rho grid: {len(points)} points x {', '.join(cfg.grid_variants)} at {t} thread(s)")
    for a, r in points:
        pcfg, d, entries = replace(cfg, alpha=a, resolution=r), out / "grid" / f"{a:g}-{r}", []
        model = prepare_model(pcfg, d / "model")
        vs = variants.resolve(cfg.grid_variants, pcfg.base_build(), cfg.target, cfg.database, cfg.ms_database)
        for v in [v for v in vs if v.ok and v.kind == "tvm"]:
            if v.database:
                v.build_kwargs["database"] = str(out / "databases" / v.name)
            build_variant(v, d / v.name, out / "logs" / "build-grid.log")
        _interleave(pcfg, [v for v in vs if v.ok], t, model, out / "logs" / "grid", entries, lambda: None,
                    lambda m: None, cfg.grid_rounds, cfg.grid_reps, 1)
        madds = sum(l["mult_adds"] for l in model["layers"])
        doc["grid"] += [{**e, "alpha": a, "resolution": r, "mult_adds": madds, "accuracy": PAPER_TOP1.get((a, r))}
                            for e in entries]
        save()
        shutil.rmtree(d, ignore_errors=True)
        say(f"  {a:g}-{r} ({madds / 1e6:.0f}M mult-adds): " + "  ".join(
            f"{e['variant']} {e['stats']['median']:.2f} ms" for e in entries if e["stats"]["n"]))
