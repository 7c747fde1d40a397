"""The whole bench: build the TVM variants, measure peak, end to end (interleaved), per layer, the
optional alpha x rho grid; write results.json after every step, then the report."""
from __future__ import annotations

import datetime as _dt
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from .variants import DEFAULT_VARIANTS

GRID_DEFAULT_VARIANTS = ("stock", "ours", "onnxruntime")


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
    database: str | None = None         # ours-tuned (default: variants.DEFAULT_DATABASE)
    ms_database: str | None = None      # generic MetaSchedule (default: variants.DEFAULT_MS_DATABASE)
    artifacts: dict[str, str] = field(default_factory=dict)   # extra variants: label -> artifact dir
    threads: list[int] | None = None    # default: 1 and all usable cores
    rounds: int = 10                    # interleaved rounds ...
    reps: int = 5                       # ... of this many timed calls each (samples = rounds x reps)
    warmup: int = 5
    layers: bool = True
    layer_rounds: int = 5
    grid: bool = False
    grid_variants: list[str] = field(default_factory=lambda: list(GRID_DEFAULT_VARIANTS))
    grid_points: list[tuple[float, int]] | None = None   # default: the paper's 16 (alpha, rho)
    grid_threads: int | None = None     # default: the largest of `threads`
    grid_rounds: int = 3
    grid_reps: int = 2
    quick_peak: bool = False
    out: str | None = None

    def default_out(self) -> Path:
        stem = Path(self.onnx).stem if self.onnx else f"{self.model}-{self.alpha:g}-{self.resolution}"
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("reports") / f"{stem}-{Path(self.target).stem}-{stamp}"

    def base_build(self) -> dict:
        return {"model": self.model, "alpha": self.alpha, "resolution": self.resolution,
                "num_classes": self.num_classes, "weights": self.weights, "onnx": self.onnx,
                "target": self.target, "seed": self.seed}


def _check_machine(spec) -> None:
    from ..errors import MbnError
    from ..runtime import machine_arch

    if spec.arch != machine_arch() or spec.run != "native" and spec.device == "cpu":
        raise MbnError(f"target {spec.name!r} runs on {spec.arch}, this machine is {machine_arch()}: a "
                       "bench times the library where it runs. Run `mbn-codegen bench` on the board "
                       "(timings under qemu emulation mean nothing); RPC-tracker benches are not yet "
                       "supported")
    if spec.device == "cuda":
        raise MbnError(f"target {spec.name!r} is a CUDA target: the bench measures CPU libraries only "
                       "so far (the peers it compares against run on the CPU)")


def prepare_model(cfg: BenchConfig, d: Path) -> dict:
    """The ONNX every peer loads, a seeded input, and ONNX Runtime's output on it (the oracle each
    variant's output is checked against)."""
    import shutil

    import numpy as np

    from ..export import export_onnx, fix_input_shape, load_onnx, onnxruntime_run

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
            "input_shape": list(shape)}


def build_variant(v, out: Path, log_file: Path) -> dict:
    """Build a TVM variant's artifact into `out`. Returns build facts for results.json."""
    import json

    from ..build import BuildConfig, build

    t0 = time.perf_counter()
    with open(log_file, "a") as lf:
        path = build(BuildConfig(**v.build_kwargs, out=str(out)), log=lambda s: print(s, file=lf, flush=True))
    man = json.loads((Path(path) / "manifest.json").read_text())
    v.artifact = str(path)
    return {"seconds": round(time.perf_counter() - t0, 2), "kernels": man.get("kernels", []),
            "library_bytes": man["library"]["bytes"]}


def snapshot_database(src: str, dst: Path) -> Path:
    """Copy a tuning database's JSON files: the report keeps exactly what was applied, and applying
    it (which may rewrite a truncated last line) never touches a database a tuner is writing."""
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).glob("*.json"):
        shutil.copyfile(f, dst / f.name)
    return dst


def worker_spec(v, cfg: BenchConfig, threads: int, model: dict) -> dict:
    s = {"variant": v.name, "runtime": v.runtime, "threads": threads, "input": model["input"],
         "reference": model["reference"], "onnx": model["onnx"]}
    if v.runtime == "tvm":
        s["artifact"] = v.artifact
    if v.runtime == "torch":
        s.update(model=cfg.model, alpha=cfg.alpha, resolution=cfg.resolution,
                 num_classes=cfg.num_classes, weights=cfg.weights, seed=cfg.seed)
    if v.name == "openvino-bf16":
        s["precision"] = "default"
    return s


class _Term(Exception):
    pass


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = print) -> Path:
    from .. import targets
    from . import provenance, variants
    from .results import FORMAT, RESULTS, Results

    spec = targets.load(cfg.target)
    _check_machine(spec)
    out = Path(cfg.out) if cfg.out else cfg.default_out()
    out.mkdir(parents=True, exist_ok=True)
    threads = sorted(set(cfg.threads or [1, provenance.usable_cores()]))
    vs = variants.resolve(cfg.variants, cfg.base_build(), cfg.target, cfg.database, cfg.ms_database,
                          onnx_only=bool(cfg.onnx), artifacts=cfg.artifacts)
    dbs = {}
    for v in vs:
        if v.database:
            dbs[v.name] = variants.database_info(v.database)
            if v.ok:                      # build from a snapshot: a tuner may be appending to the original
                snap = snapshot_database(v.database, out / "databases" / v.name)
                v.build_kwargs["database"] = str(snap)
                dbs[v.name] = {**variants.database_info(str(snap)), "path": v.database, "snapshot": str(snap)}
    for v in vs:                                  # the budget belongs in the headline's label
        n = (dbs.get(v.name) or {}).get("tuning_records")
        if n:
            v.label = v.label[:-1] + f", {n} trials)" if v.label.endswith(")") else f"{v.label} ({n} trials)"
    cost = None
    if cfg.model == "mobilenet_v1" and not cfg.onnx:
        from ..cost import cost_model
        cost = cost_model(cfg.alpha, cfg.resolution, cfg.num_classes).to_dict()
    res = Results(out / RESULTS, {
        "format": FORMAT, "status": "running",
        "config": {**asdict(cfg), "threads": threads, "out": str(out)},
        "provenance": provenance.collect(spec, dbs),
        "model": {"name": cfg.model, "alpha": cfg.alpha, "resolution": cfg.resolution,
                  "num_classes": cfg.num_classes, "weights": cfg.weights or f"random (live, seed={cfg.seed})",
                  "onnx": cfg.onnx, "mult_adds": cost["total_mult_adds"] if cost else None,
                  "cost_layers": cost["layers"] if cost else None},
        "peak": [], "variants": [dict(v.to_dict(), checks=[]) for v in vs],
        "e2e": [], "layers": [], "grid": [], "log": []})
    t_start = time.perf_counter()

    def say(msg: str) -> None:
        log(msg)
        res.doc["log"].append({"t": round(time.perf_counter() - t_start, 2), "message": msg})

    def vrec(name: str) -> dict:
        return next(r for r in res.doc["variants"] if r["name"] == name)

    def term(_sig, _frm):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, term)
    try:
        _run(cfg, out, threads, vs, res, say, vrec)
        res.doc["status"] = "complete"
    except KeyboardInterrupt:
        res.doc["status"] = "interrupted"
        say("interrupted: keeping what was measured")
        raise
    except BaseException as e:
        res.doc["status"] = "failed"
        say(f"failed: {type(e).__name__}: {e}")
        raise
    finally:
        signal.signal(signal.SIGTERM, old)
        res.doc["provenance"]["machine"]["load_average_end"] = provenance.load_average()
        res.doc["provenance"]["seconds"] = round(time.perf_counter() - t_start, 1)
        from .report import summarize, write_report
        res.doc["summary"] = summarize(res.doc)
        res.save()                      # the raw samples first: a report error must not lose them
        write_report(out, res.doc)
        res.save()
        log(f"report: {out}/report.md, {out}/report.html ({res.doc['status']})")
    return out


def _run(cfg, out, threads, vs, res, say, vrec) -> None:
    from . import layers as L
    from .measure import WorkerError, interleaved, start_workers
    from .peak import nominal_peak
    from .provenance import cpu_flags, cpu_mhz
    from .results import stats

    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    say(f"bench {cfg.model} alpha={cfg.alpha:g} res={cfg.resolution} on {cfg.target}, threads {threads}, "
        f"variants {', '.join(v.name for v in vs if v.ok)}")
    for v in vs:
        if not v.ok:
            say(f"  {v.name}: {v.note}")
    model = prepare_model(cfg, out / "model")
    res.doc["model"]["input_shape"] = model["input_shape"]
    res.save()

    for v in vs:
        if v.ok and v.kind == "tvm" and not v.artifact:
            say(f"build {v.name} ...")
            try:
                facts = build_variant(v, out / "builds" / v.name, logs / f"build-{v.name}.log")
                vrec(v.name).update(build_facts=facts, artifact=v.artifact)
                say(f"  built in {facts['seconds']:.1f} s, {len(facts['kernels'])} kernels")
            except Exception as e:
                v.status, v.note = "failed", f"build failed: {type(e).__name__}: {str(e)[:300]}"
                vrec(v.name).update(status=v.status, note=v.note)
                say(f"  {v.note}")
            res.save()
        elif v.ok and v.artifact and "build_facts" not in vrec(v.name):
            import json
            man = json.loads((Path(v.artifact) / "manifest.json").read_text())
            vrec(v.name)["build_facts"] = {"seconds": None, "kernels": man.get("kernels", []),
                                           "library_bytes": man["library"]["bytes"]}

    flags, mhz, arch = cpu_flags(), cpu_mhz(), res.doc["provenance"]["machine"]["arch"]
    for t in threads:
        say(f"peak at {t} thread(s) ...")
        (s, w, r), = start_workers([{"variant": "peak", "runtime": "peak", "threads": t}], logs)
        try:
            p = w.request({"cmd": "peak", "quick": cfg.quick_peak}) if w else None
        except WorkerError as e:
            r, p = {"error": str(e)}, None
        finally:
            if w:
                w.close()
        if p is None:
            p = {"threads": t, "peak_gflops": 0.0, "copy_bandwidth_gbs": 0.0,
                 "method": f"failed: {r.get('error')}"}
        p["nominal"] = nominal_peak(t, flags, mhz, arch)
        res.doc["peak"].append(p)
        say(f"  SGEMM {p.get('peak_gflops', 0):.1f} GFLOP/s, copy {p.get('copy_bandwidth_gbs', 0):.1f} GB/s")
        res.save()

    for t in threads:
        runnable = [v for v in vs if v.ok]
        say(f"end to end, {t} thread(s): loading {len(runnable)} variants ...")
        started = start_workers([worker_spec(v, cfg, t, model) for v in runnable], logs)
        workers = {}
        try:
            for s, w, r in started:
                chk = {"threads": t, "ok": bool(r.get("ok")), "load_s": r.get("load_s"),
                       **(r.get("check") or {}), "info": r.get("info", {})}
                if not r.get("ok"):
                    chk["error"] = r.get("error")
                    say(f"  {s['variant']}: failed to load: {r.get('error')}")
                elif r.get("check") and not r["check"]["ok"]:
                    say(f"  {s['variant']}: output differs from ONNX Runtime (max |err| "
                        f"{r['check']['max_abs_err']:.3g}): timed, flagged in the report")
                vrec(s["variant"])["checks"].append(chk)
                if w:
                    workers[s["variant"]] = w
                    res.doc["e2e"].append({"variant": s["variant"], "threads": t, "samples_ms": [],
                                           "rounds": [], "stats": {"n": 0}})
            res.save()
            entry = {e["variant"]: e for e in res.doc["e2e"] if e["threads"] == t}

            def on_block(name, r, samples):
                e = entry[name]
                e["samples_ms"] += samples
                e["rounds"].append(r)
                e["stats"] = stats(e["samples_ms"])
                res.save()

            interleaved(workers, cfg.rounds, cfg.reps, cfg.warmup, on_block,
                        progress=lambda m: say(m + "   " + "  ".join(
                            f"{n} {entry[n]['stats']['median']:.2f}" for n in workers
                            if entry[n]["stats"].get("n")) + " ms"))
        finally:
            for w in workers.values():
                w.close()

    if cfg.layers:
        kinds_by_variant = {r["name"]: {k.get("symbol", k["name"]): k["kind"] for k in (r.get("build_facts") or {}).get("kernels", [])}
                            for r in res.doc["variants"]}
        src_by_variant = {r["name"]: {k.get("symbol", k["name"]): k.get("source") for k in (r.get("build_facts") or {}).get("kernels", [])}
                          for r in res.doc["variants"]}
        for v in [v for v in vs if v.ok and v.kind == "tvm"]:
            for t in threads:
                say(f"per layer: {v.name} at {t} thread(s) ...")
                spec = dict(worker_spec(v, cfg, t, model), mode="layers")
                (s, w, r), = start_workers([spec], logs)
                if not w:
                    say(f"  failed: {r.get('error')}")
                    continue
                try:
                    m = w.request({"cmd": "layers", "rounds": cfg.layer_rounds})
                except WorkerError as e:
                    say(f"  failed: {e}")
                    continue
                finally:
                    w.close()
                rows, problem = L.map_to_layers(m["calls"], kinds_by_variant.get(v.name, {}),
                                                res.doc["model"]["cost_layers"])
                for row in rows:
                    row["median_ms"] = stats(row["samples_ms"])["median"]
                    row["cold_median_ms"] = (stats(row["cold_samples_ms"])["median"]
                                             if row.get("cold_samples_ms") else None)
                    row["source"] = L.manifest_lookup(row["symbol"], src_by_variant.get(v.name, {}))
                e2e = stats(m["e2e_samples_ms"])["median"]
                cold = (sum(r_["cold_median_ms"] for r_ in rows)
                        if all(r_["cold_median_ms"] is not None for r_ in rows) else None)
                cons = L.consistency(sum(r_["median_ms"] for r_ in rows), cold, e2e,
                                     vm_calls=len(rows) + sum(m["other_calls"].values()))
                res.doc["layers"].append({"variant": v.name, "threads": t, "calls": rows,
                                          "e2e_samples_ms": m["e2e_samples_ms"], "other_calls": m["other_calls"],
                                          "mapping_problem": problem, "consistency": cons, "method": m["method"]})
                res.save()
                say(f"  {len(rows)} kernel calls: warm sum {cons['kernel_sum_ms']:.2f} ms, cold sum "
                    f"{cons['cold_kernel_sum_ms'] or 0:.2f} ms, end to end {cons['e2e_ms']:.2f} ms: "
                    f"{'consistent' if cons['ok'] else 'NOT bracketed'} ({cons['lower_ms']:.2f}..{cons['upper_ms']:.2f})"
                    + (f"; {problem}" if problem else ""))

    if cfg.grid:
        from .grid import run_grid
        run_grid(cfg, out, threads, res, say)
