"""The alpha x rho grid: measured latency against mult-adds for MobileNet v1's 16 paper variants
(the paper's Figures 4-5 with measured time instead of mult-adds), labelled with the paper's
ImageNet top-1 where the paper prints it (Tables 6 and 7; the other 9 combinations appear only as
unlabelled points of its figures). Cheap on purpose: stock builds take seconds, few repetitions."""
from __future__ import annotations

import shutil

# Howard et al. 2017, Table 6 (width multiplier at 224) and Table 7 (resolution at alpha 1.0).
PAPER_TOP1 = {(1.0, 224): 70.6, (1.0, 192): 69.1, (1.0, 160): 67.2, (1.0, 128): 64.4,
              (0.75, 224): 68.4, (0.5, 224): 63.7, (0.25, 224): 50.6}


def paper_grid() -> list[tuple[float, int]]:
    from ..models.mobilenet_v1 import PAPER_ALPHAS, PAPER_RESOLUTIONS
    return [(a, r) for a in PAPER_ALPHAS for r in PAPER_RESOLUTIONS]


def run_grid(cfg, out, threads, res, say) -> None:
    from dataclasses import replace

    from ..cost import cost_model
    from . import variants
    from .measure import interleaved, start_workers
    from .results import stats
    from .run import build_variant, prepare_model, snapshot_database, worker_spec

    points = cfg.grid_points or paper_grid()
    t = cfg.grid_threads or max(threads)
    say(f"alpha x rho grid: {len(points)} variants x {', '.join(cfg.grid_variants)} at {t} thread(s)")
    for i, (a, r) in enumerate(points):
        pcfg = replace(cfg, alpha=a, resolution=r)
        d = out / "grid" / f"{a:g}-{r}"
        vs = variants.resolve(cfg.grid_variants, pcfg.base_build(), cfg.target, cfg.database,
                              cfg.ms_database, onnx_only=bool(cfg.onnx))
        madds = cost_model(a, r, cfg.num_classes).total_mult_adds
        if i == 0:
            for v in vs:
                if not v.ok:
                    say(f"  {v.name}: {v.note}")
        vs = [v for v in vs if v.ok]
        recs = {}
        for v in vs:
            recs[v.name] = {"variant": v.name, "alpha": a, "resolution": r, "threads": t, "mult_adds": madds,
                            "accuracy": PAPER_TOP1.get((a, r)), "status": v.status, "note": v.note,
                            "samples_ms": [], "stats": {"n": 0}}
        model = prepare_model(pcfg, d / "model")
        for v in vs:
            if v.ok and v.kind == "tvm":
                if v.database:
                    snap = out / "databases" / v.name
                    v.build_kwargs["database"] = str(snap if snap.is_dir() else snapshot_database(v.database, snap))
                try:
                    build_variant(v, d / v.name, out / "logs" / "build-grid.log")
                except Exception as e:
                    v.status = recs[v.name]["status"] = "failed"
                    v.note = recs[v.name]["note"] = f"build failed: {type(e).__name__}: {str(e)[:200]}"
        started = start_workers([worker_spec(v, pcfg, t, model) for v in vs if v.ok], out / "logs" / "grid")
        workers = {}
        for s, w, rr in started:
            if w:
                workers[s["variant"]] = w
            else:
                recs[s["variant"]].update(status="failed", note=str(rr.get("error")))
        try:
            def on_block(name, _r, samples):
                recs[name]["samples_ms"] += samples
                recs[name]["stats"] = stats(recs[name]["samples_ms"])

            interleaved(workers, cfg.grid_rounds, cfg.grid_reps, 1, on_block)
        finally:
            for w in workers.values():
                w.close()
        res.doc["grid"] += list(recs.values())
        res.save()
        for v in vs:                                  # keep manifests, drop the libraries
            lib = d / v.name / "lib.so"
            if lib.exists():
                lib.unlink()
        shutil.rmtree(d / "model", ignore_errors=True)
        say(f"  [{i + 1}/{len(points)}] {a:g}-{r} ({madds / 1e6:.0f}M mult-adds): " + "  ".join(
            f"{n} {rec['stats']['median']:.2f} ms" for n, rec in recs.items() if rec["stats"].get("n")))
