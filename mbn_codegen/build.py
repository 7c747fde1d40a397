"""The build: model (or ONNX file) -> lowered, scheduled, compiled artifact directory.

An artifact directory holds everything a board needs: lib.so (weights inside), manifest.json,
a reference input/output pair from ONNX Runtime, and the class labels.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, targets
from .errors import MbnError, ModelConfigError
from .export import INPUT_NAME, export_onnx, fix_input_shape, graph_inputs, load_onnx, onnxruntime_run
from .runtime import MANIFEST, sha256

LIB_FILE = "lib.so"


@dataclass
class BuildConfig:
    model: str = "mobilenet_v1"
    alpha: float = 1.0
    resolution: int = 224
    num_classes: int = 1000
    weights: str | None = None        # state_dict path, "pretrained" (v2), or None: live random
    onnx: str | None = None           # a user's ONNX file instead of a zoo model
    target: str = "x86_64"
    out: str | None = None
    dump_ir: str | None = None
    database: str | None = None       # MetaSchedule database dir; None: the target's shipped one
    use_shipped_database: bool = True
    schedules: str = "ours"           # "ours" (our rules, NHWC) or "stock" (TVM's defaults, NCHW)
    layout: str | None = None
    seed: int = 0

    def default_out(self) -> Path:
        if self.onnx:
            stem = Path(self.onnx).stem
        else:
            stem = f"{self.model}-{self.alpha:g}-{self.resolution}"
        return Path("artifacts") / f"{stem}-{Path(self.target).stem}"


def _reference_input(cfg: BuildConfig, shape: tuple[int, ...]) -> np.ndarray:
    """A real photo for pretrained ImageNet models (selfcheck then also checks the class);
    otherwise seeded noise."""
    if cfg.weights == "pretrained" and shape[2] == shape[3]:
        from .images import preprocess, sample_images
        return preprocess(sample_images()["chelsea"], shape[2])
    return np.random.default_rng(cfg.seed + 12345).standard_normal(shape).astype("float32")


def _zoo_onnx(cfg: BuildConfig, path: Path) -> dict:
    from .models import create
    from .models.calibrate import make_live

    model = create(cfg.model, cfg.alpha, cfg.resolution, cfg.num_classes, cfg.weights)
    if cfg.weights is None:
        make_live(model, seed=cfg.seed)
    export_onnx(model, path, cfg.resolution)
    return {"name": cfg.model, "alpha": cfg.alpha, "resolution": cfg.resolution,
            "num_classes": cfg.num_classes,
            "weights": cfg.weights or f"random (live, seed={cfg.seed}): not trained, for testing only"}


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> Path:
    spec = targets.load(cfg.target)
    cc = spec.compiler()                 # fails early, naming the apt package, if it is missing
    if cfg.onnx:
        load_onnx(cfg.onnx)              # errors name the user's file, before anything is written
    else:
        from .models.mobilenet_v1 import validate
        validate(cfg.alpha, cfg.resolution, cfg.num_classes)
    out = Path(cfg.out) if cfg.out else cfg.default_out()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _build(cfg, spec, cc, out, tmp, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)      # an interrupted or failed build leaves nothing


def _build(cfg: BuildConfig, spec, cc, out: Path, tmp: Path, log) -> Path:
    from ._tvm import TVM_FFI_VERSION, TVM_VERSION
    from .lower import LowerContext, build_module, lower

    t_start = time.perf_counter()

    onnx_path = tmp / "model.onnx"
    if cfg.onnx:
        shutil.copyfile(cfg.onnx, onnx_path)
        onnx_model = load_onnx(onnx_path)
        model_info = {"name": "onnx:" + Path(cfg.onnx).name, "source_onnx": str(cfg.onnx)}
    else:
        log(f"export {cfg.model} alpha={cfg.alpha:g} resolution={cfg.resolution} -> ONNX")
        model_info = _zoo_onnx(cfg, onnx_path)
        onnx_model = load_onnx(onnx_path)
    input_name, shape = fix_input_shape(onnx_model)
    model_info["onnx_sha256"] = sha256(onnx_path)

    x = _reference_input(cfg, shape)
    y = onnxruntime_run(onnx_path, x)
    np.save(tmp / "reference_input.npy", x)
    np.save(tmp / "reference_output.npy", y)

    from .database import open_database, select
    database, db_path = None, select(spec, cfg.database, log=log,
                                     automatic=cfg.use_shipped_database and cfg.schedules == "ours")
    if db_path:
        database = open_database(db_path.path, log, writable=False)
    target = spec.tvm_target()
    ctx = LowerContext(target, spec.device, input_name, shape, schedules=cfg.schedules,
                       layout=cfg.layout, database=database)
    log(f"lower for {spec.name} ({spec.description})")
    mod = lower(onnx_model, ctx, dump_ir=cfg.dump_ir, log=log)
    log("compile")
    t0 = time.perf_counter()
    if spec.device == "cuda":
        from .cuda import compile_with_nvcc
        with compile_with_nvcc(spec.cuda_arch):
            ex = build_module(mod, ctx)
            ex.export_library(str(tmp / LIB_FILE), cc=cc) if cc else ex.export_library(str(tmp / LIB_FILE))
    else:
        ex = build_module(mod, ctx)
        ex.export_library(str(tmp / LIB_FILE), cc=cc) if cc else ex.export_library(str(tmp / LIB_FILE))
    compile_s = time.perf_counter() - t0
    gpu = None
    if spec.device == "cuda":
        from .cuda import cuda_payloads, nvcc_version
        pay = cuda_payloads(tmp / LIB_FILE)
        gpu = {"cuda_arch": spec.cuda_arch, "nvcc": nvcc_version(),
               "kernel_formats": sorted({p.format for p in pay})}

    labels_file = None
    if shape and y.shape[-1] == 1000 and (cfg.onnx or cfg.num_classes == 1000):
        from .models import LABELS_FILE
        shutil.copyfile(LABELS_FILE, tmp / "labels.txt")
        labels_file = "labels.txt"
    rtol, atol = 1e-3, 1e-3 * max(1.0, float(np.abs(y).max()))
    manifest = {
        "format": 1,
        "model": model_info,
        "input": {"name": input_name, "shape": list(shape), "dtype": "float32", "layout": "NCHW"},
        "output": {"shape": list(y.shape), "dtype": str(y.dtype)},
        "target": spec.to_dict(),
        "arch": spec.arch,
        "device": spec.device,
        "gpu": gpu,
        "library": {"file": LIB_FILE, "sha256": sha256(tmp / LIB_FILE),
                    "bytes": (tmp / LIB_FILE).stat().st_size},
        "reference": {"input": "reference_input.npy", "output": "reference_output.npy",
                      "oracle": "onnxruntime", "rtol": rtol, "atol": atol},
        "labels_file": labels_file,
        "schedules": cfg.schedules,
        "layout": ctx.layout,
        "tuning_database": _db_info(db_path),
        "kernels": ctx.notes.get("kernels", []),
        "phase_seconds": {**ctx.notes.get("phase_seconds", {}), "compile": compile_s},
        "versions": {"mbn_codegen": __version__, "tvm": TVM_VERSION, "tvm_ffi": TVM_FFI_VERSION,
                     "onnx_opset": int(onnx_model.opset_import[0].version)},
        "built": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "host": socket.gethostname(), "host_arch": platform.machine(),
                  "seconds": round(time.perf_counter() - t_start, 2)},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)          # an interrupted build never leaves a half-written artifact
    n = len(manifest["kernels"])
    by_source: dict[str, int] = {}
    for k in manifest["kernels"]:
        src = k["source"].split(":")[0]
        by_source[src] = by_source.get(src, 0) + 1
    log("kernels: " + ", ".join(f"{v} {k}" for k, v in sorted(by_source.items())) +
        "  (tuned = database record, ours-default = our schedule untuned, tvm-stock/dlight = TVM's)")
    log(f"wrote {out}/ ({manifest['library']['bytes'] / 1e6:.1f} MB library, {n} kernels, "
        f"{manifest['built']['seconds']:.1f} s)")
    return out


def _db_info(selected) -> dict | None:
    return selected.manifest() if selected else None
