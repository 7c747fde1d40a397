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

from .variants import DEFAULT_VARIANTS

GRID_DEFAULT_VARIANTS = ("stock", "ours", "onnxruntime")
# Howard et al. 2017, Table 6 (width multiplier at 224) and Table 7 (resolution at alpha 1.0).
PAPER_TOP1 = {(1.0, 224): 70.6, (1.0, 192): 69.1, (1.0, 160): 67.2, (1.0, 128): 64.4,
              (0.75, 224): 68.4, (0.5, 224): 63.7, (0.25, 224): 50.6}


@dataclass
class BenchConfig:
    model: str = "mobilenet_v1"
    alpha: float = 1.0
    resolution: int = 224
    num_classes: int = 1000
    weights: str | None = None
    onnx: str | None = None
    target: str = "x86_64"
    seed: int = 0
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))
    database: str | None = None
    ms_database: str | None = None
    artifacts: dict[str, str] = field(default_factory=dict)   # extra variants: label -> artifact dir
    threads: list[int] | None = None    # default: 1 and all usable cores
    rounds: int = 10                    # interleaved rounds of `reps` timed calls per variant
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

    def default_out(self) -> Path:
        stem = Path(self.onnx).stem if self.onnx else f"{self.model}-{self.alpha:g}-{self.resolution}"
        return Path("reports") / f"{stem}-{Path(self.target).stem}-{_dt.datetime.now():%Y%m%d-%H%M%S}"

    def base_build(self) -> dict:
        return {"model": self.model, "alpha": self.alpha, "resolution": self.resolution, "seed": self.seed,
                "num_classes": self.num_classes, "weights": self.weights, "onnx": self.onnx, "target": self.target}


def prepare_model(cfg: BenchConfig, d: Path) -> dict:
    """The ONNX every peer loads, a seeded input, ONNX Runtime's output on it (the oracle) and the
    graph's compute layers with their mult-adds."""
    import numpy as np

    from ..export import export_onnx, fix_input_shape, load_onnx, onnxruntime_run
    from .layers import onnx_layers

    d.mkdir(parents=True, exist_ok=True)
    onnx = d / "model.onnx"
    if cfg.onnx:
        shutil.copyfile(cfg.onnx, onnx)
    else:
        from ..models import create
        from ..models.calibrate import make_live
        m = create(cfg.model, cfg.alpha, cfg.resolution, cfg.num_classes, cfg.weights)
        if cfg.weights is None:
            make_live(m, seed=cfg.seed)
        export_onnx(m, onnx, cfg.resolution)
    _, shape = fix_input_shape(load_onnx(onnx))
    x = np.random.default_rng(cfg.seed + 12345).standard_normal(shape).astype("float32")
    np.save(d / "input.npy", x)
    np.save(d / "reference.npy", onnxruntime_run(onnx, x))
    return {"onnx": str(onnx), "input": str(d / "input.npy"), "reference": str(d / "reference.npy"),
            "input_shape": list(shape), "layers": onnx_layers(onnx)}


def build_variant(v, out: Path, log_file: Path) -> dict:
    from ..build import BuildConfig, build

    t0 = time.perf_counter()
    with open(log_file, "a") as lf:
        v.artifact = str(build(BuildConfig(**v.build_kwargs, out=str(out)), log=lambda s: print(s, file=lf, flush=True)))
    return {**_manifest_facts(v.artifact), "seconds": round(time.perf_counter() - t0, 2)}


def _manifest_facts(artifact: str) -> dict:
    man = json.loads((Path(artifact) / "manifest.json").read_text())
    return {"seconds": None, "kernels": man.get("kernels", []), "library_bytes": man["library"]["bytes"]}


def worker_spec(v, cfg: BenchConfig, threads: int, model: dict) -> dict:
    s = {"variant": v.name, "runtime": v.runtime, "threads": threads, "input": model["input"],
         "reference": model["reference"], "onnx": model["onnx"], "artifact": v.artifact, "spin": cfg.spin}
    if v.runtime == "torch":
        s.update(model=cfg.model, alpha=cfg.alpha, resolution=cfg.resolution, num_classes=cfg.num_classes,
                 weights=cfg.weights, seed=cfg.seed)
    if v.name == "openvino-bf16":
        s["precision"] = "default"
    return s


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> Path:
    from .. import targets
    from ..errors import MbnError
    from ..runtime import machine_arch
    from . import variants
    from .results import FORMAT, RESULTS, Results, provenance

    spec = targets.load(cfg.target)
    if spec.arch != machine_arch() or spec.device != "cpu":
        raise MbnError(f"target {spec.name!r} ({spec.arch}, {spec.device}) does not run on this {machine_arch()} "
                       "CPU: a bench times the library where it runs (run it on the board)")
    out = Path(cfg.out) if cfg.out else cfg.default_out()
    out.mkdir(parents=True, exist_ok=True)
    import psutil
    threads = sorted(set(cfg.threads or [1, len(psutil.Process().cpu_affinity())]))
    vs = variants.resolve(cfg.variants, cfg.base_build(), cfg.target, cfg.database, cfg.ms_database,
                          onnx_only=bool(cfg.onnx), artifacts=cfg.artifacts)
    for v in vs:
        if v.database and v.ok:      # build from a copy: a tuner may be appending to the original
            snap = out / "databases" / v.name
            shutil.copytree(v.database, snap, dirs_exist_ok=True)
            v.build_kwargs["database"] = str(snap)
            v.label += f" ({variants.database_records(str(snap))} trials)"
    name = Path(cfg.onnx).name if cfg.onnx else f"{cfg.model} alpha={cfg.alpha:g} res={cfg.resolution}"
    weights = "from the ONNX file" if cfg.onnx else cfg.weights or f"random (live, seed={cfg.seed})"
    res = Results(out / RESULTS, {
        "format": FORMAT, "status": "running", "config": {**asdict(cfg), "threads": threads, "out": str(out)},
        "provenance": provenance(spec), "model": {"name": name, "onnx": cfg.onnx, "weights": weights},
        "peak": [], "variants": [dict(v.to_dict(), checks=[]) for v in vs], "e2e": [], "layers": [],
        "grid": [], "isolation": {}, "log": []})
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        log(msg)
        res.doc["log"].append({"t": round(time.perf_counter() - t_start, 2), "message": msg})

    def term(_sig, _frm):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, term)
    try:
        _run(cfg, out, threads, vs, res, say)
        res.doc["status"] = "complete"
    except BaseException as e:
        res.doc["status"] = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        say(f"{res.doc['status']}: {type(e).__name__}: {e}; keeping what was measured")
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        res.doc["provenance"]["load_average_end"] = [round(x, 2) for x in psutil.getloadavg()]
        res.doc["provenance"]["seconds"] = round(time.perf_counter() - t_start, 1)
        from .report import closing_line, summarize, write_report
        res.doc["summary"] = summarize(res.doc)
        res.save()                      # the raw samples first: a report error must not lose them
        write_report(out, res.doc)
        res.save()
        log(f"report: {out}/report.html ({res.doc['status']})")
        log(closing_line(res.doc))
    return out


def _run(cfg: BenchConfig, out: Path, threads: list[int], vs, res, say) -> None:
    from .measure import spin_settings, start_workers

    logs = out / "logs"
    say(f"bench {res.doc['model']['name']} on {cfg.target}, threads {threads}, variants "
        f"{', '.join(v.name for v in vs if v.ok)}")
    vrec = {r["name"]: r for r in res.doc["variants"]}
    for v in vs:
        if not v.ok:
            say(f"  {v.name}: {v.note}")
    model = prepare_model(cfg, out / "model")
    layers = model["layers"]
    res.doc["model"].update(input_shape=model["input_shape"], layers=layers,
                            mult_adds=sum(l["mult_adds"] for l in layers))
    res.doc["isolation"] = {"spin_settings": spin_settings(cfg.spin), "order": "random per round", "fence": {}}
    for v in vs:
        if v.ok and v.kind == "tvm":
            try:
                if v.artifact:
                    facts = _manifest_facts(v.artifact)
                else:
                    say(f"build {v.name} ...")
                    logs.mkdir(parents=True, exist_ok=True)
                    facts = build_variant(v, out / "builds" / v.name, logs / f"build-{v.name}.log")
                vrec[v.name].update(build_facts=facts, artifact=v.artifact)
            except Exception as e:
                v.status, v.note = "failed", f"build failed: {type(e).__name__}: {str(e)[:300]}"
                vrec[v.name].update(status=v.status, note=v.note)
                say(f"  {v.note}")
            res.save()

    for t in threads if cfg.peak else []:
        (_, w, r), = start_workers([{"variant": "peak", "runtime": "peak", "threads": t, "target": cfg.target}], logs)
        if not w:
            raise RuntimeError(f"peak worker: {r['error']}")
        try:
            p = w.request({"cmd": "peak", "quick": cfg.quick_peak})
        finally:
            w.close()
        res.doc["peak"].append(p)
        say(f"peak at {t} thread(s): FMA loop {p['fma_gflops']:.1f} GFLOP/s (hot loop "
            f"{'registers only' if p['asm_check']['ok'] else 'NOT register-resident'}), triad {p['triad_gbs']:.1f} GB/s")
        res.save()

    for t in threads:
        _interleave(cfg, [v for v in vs if v.ok], t, model, logs, res, say, cfg.rounds, cfg.reps, cfg.warmup, vrec)

    for v in [v for v in vs if v.ok and v.kind == "tvm"] if cfg.layers else []:
        for t in threads:
            _layers(cfg, v, t, model, logs, res, say, vrec[v.name]["build_facts"]["kernels"])

    if cfg.grid:
        _grid(cfg, out, threads, res, say)


def _interleave(cfg, vs, t, model, logs, res, say, rounds, reps, warmup, vrec=None) -> list[dict]:
    from .measure import interleaved, noise, start_workers
    from .results import stats

    say(f"end to end, {t} thread(s): loading {len(vs)} variants ...")
    workers, entry = {}, {}
    try:
        for s, w, r in start_workers([worker_spec(v, cfg, t, model) for v in vs], logs):
            chk = {"threads": t, "ok": bool(r.get("ok")), "load_s": r.get("load_s"), **(r.get("check") or {})}
            if not r.get("ok"):
                chk["error"] = r.get("error")
                say(f"  {s['variant']}: failed to load: {r.get('error')}")
            elif not r["check"]["ok"]:
                say(f"  {s['variant']}: output differs from ONNX Runtime (max |err| {r['check']['max_abs_err']:.3g})")
            if vrec is not None:
                vrec[s["variant"]]["checks"].append(chk)
            if w:
                workers[s["variant"]] = w
                entry[s["variant"]] = {"variant": s["variant"], "threads": t, "samples_ms": [], "rounds": [],
                                       "block_medians_ms": [], "stats": {"n": 0}, "noise": None}
        if vrec is not None:
            res.doc["e2e"] += entry.values()

        def on_block(name, r, samples, _fence_s):
            import numpy as np
            e = entry[name]
            e["samples_ms"] += samples
            e["rounds"].append(r)
            e["block_medians_ms"].append(float(np.median(samples)))
            e.update(stats=stats(e["samples_ms"]), noise=noise(e["block_medians_ms"]))
            if vrec is not None:
                res.save()

        fence = interleaved(workers, rounds, reps, warmup, on_block, seed=cfg.seed + t,
                            progress=lambda m: say(m + "   " + "  ".join(
                                f"{n} {e['stats']['median']:.2f}" for n, e in entry.items() if e["stats"]["n"]) + " ms"))
        if vrec is not None:
            res.doc["isolation"]["fence"][str(t)] = fence
    finally:
        for w in workers.values():
            w.close()
    return list(entry.values())


def _layers(cfg, v, t, model, logs, res, say, kernels) -> None:
    from . import layers as L
    from .measure import WorkerError, start_workers
    from .results import stats

    say(f"per layer: {v.name} at {t} thread(s) ...")
    (_, w, r), = start_workers([dict(worker_spec(v, cfg, t, model), mode="layers")], logs)
    if not w:
        return say(f"  failed: {r.get('error')}")
    try:
        m = w.request({"cmd": "layers", "rounds": cfg.layer_rounds})
    except WorkerError as e:
        return say(f"  failed: {e}")
    finally:
        w.close()
    rows, problem = L.map_to_layers(m["calls"], kernels, model["layers"])
    src = {k.get("symbol", k["name"]): k.get("source") for k in kernels}
    for row in rows:
        row["median_ms"] = stats(row["samples_ms"])["median"]
        row["cold_median_ms"] = stats(row["cold_samples_ms"])["median"] if row.get("cold_samples_ms") else None
        row["source"] = src.get(row["symbol"])
    e2e = stats(m["e2e_samples_ms"])["median"]
    cold = sum(x["cold_median_ms"] for x in rows) if all(x["cold_median_ms"] is not None for x in rows) else None
    cons = L.consistency(sum(x["median_ms"] for x in rows), cold, e2e, vm_calls=len(rows) + sum(m["other_calls"].values()))
    res.doc["layers"].append({"variant": v.name, "threads": t, "calls": rows, "e2e_samples_ms": m["e2e_samples_ms"],
                              "other_calls": m["other_calls"], "mapping_problem": problem, "consistency": cons,
                              "method": m["method"]})
    res.save()
    say(f"  {len(rows)} kernel calls: warm sum {cons['kernel_sum_ms']:.2f} ms, end to end {cons['e2e_ms']:.2f} ms, "
        f"overhead {cons['unattributed_ms']:.2f} ms: {'consistent' if cons['ok'] else 'NOT bracketed'}"
        + (f"; {problem}" if problem else ""))


def _grid(cfg, out, threads, res, say) -> None:
    """MobileNet v1's alpha x rho variants: measured latency against mult-adds (the paper's Figures
    4-5 with time), few repetitions; each point's libraries are deleted once measured."""
    from ..models.mobilenet_v1 import PAPER_ALPHAS, PAPER_RESOLUTIONS
    from . import variants

    points = cfg.grid_points or [(a, r) for a in PAPER_ALPHAS for r in PAPER_RESOLUTIONS]
    t = cfg.grid_threads or max(threads)
    say(f"alpha x rho grid: {len(points)} points x {', '.join(cfg.grid_variants)} at {t} thread(s)")
    for a, r in points:
        pcfg, d = replace(cfg, alpha=a, resolution=r), out / "grid" / f"{a:g}-{r}"
        model = prepare_model(pcfg, d / "model")
        vs = variants.resolve(cfg.grid_variants, pcfg.base_build(), cfg.target, cfg.database, cfg.ms_database)
        for v in [v for v in vs if v.ok and v.kind == "tvm"]:
            if v.database:
                v.build_kwargs["database"] = str(out / "databases" / v.name)
            build_variant(v, d / v.name, out / "logs" / "build-grid.log")
        entries = _interleave(pcfg, [v for v in vs if v.ok], t, model, out / "logs" / "grid", res, lambda m: None,
                              cfg.grid_rounds, cfg.grid_reps, 1)
        madds = sum(l["mult_adds"] for l in model["layers"])
        for e in entries:
            res.doc["grid"].append({**e, "alpha": a, "resolution": r, "mult_adds": madds, "accuracy": PAPER_TOP1.get((a, r))})
        res.save()
        shutil.rmtree(d, ignore_errors=True)
        say(f"  {a:g}-{r} ({madds / 1e6:.0f}M mult-adds): " + "  ".join(
            f"{e['variant']} {e['stats']['median']:.2f} ms" for e in entries if e["stats"]["n"]))
