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
import signal
import socket
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__, targets
from .errors import OutputDirError
from .model_spec import ModelSpec, with_model_fields
from .runtime import MANIFEST, sha256

LIB_FILE = "lib.so"
GENERATOR = "mbn-codegen"            # manifest.json's marker: a folder we may replace


@with_model_fields
@dataclass
class BuildConfig:
    """One build: a model, a target, options. Also takes ModelSpec's fields flat:
    BuildConfig(alpha=0.5, resolution=128, target="arm64")."""
    model: ModelSpec = field(default_factory=ModelSpec)
    target: str = "x86_64"
    out: str | None = None
    dump_ir: str | None = None
    database: str | None = None       # MetaSchedule database dir; None: the target's shipped one
    use_shipped_database: bool = True
    schedules: str = "ours"           # "ours" (our rules, NHWC) or "stock" (TVM's defaults, NCHW)
    layout: str | None = None
    propagate_nan: bool = False       # Relu/Clip pass NaN through, as ONNX Runtime does

    def default_out(self) -> Path:
        return Path("artifacts") / f"{self.model.stem()}-{Path(self.target).stem}"


def kernel_sources(kernels: list[dict]) -> dict[str, int]:
    """How many kernels each schedule source gave: tuned, ours-default, tvm-stock or dlight."""
    return dict(Counter(k["source"].split(":")[0] for k in kernels))


def _is_our_artifact(d: Path) -> bool:
    try:
        m = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(m, dict) and "format" in m and (
        m.get("generator") == GENERATOR or {"library", "target"} <= m.keys())   # or pre-marker


def check_out_dir(out: Path, cfg: BuildConfig) -> None:
    """--out gets replaced as a whole, so it must be new, empty, or an artifact of ours, and must
    not hold the working directory or any of the build's inputs."""
    real = out.resolve()

    def refuse(why: str):
        raise OutputDirError(f"--out {out} {why}. Pick a new folder for the artifact, e.g. "
                             f"--out {cfg.default_out()}")

    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        refuse("is the current directory or one of its parents; the build replaces the whole "
               "--out folder, so it never uses one that holds the directory you work in")
    # what the build reads or writes outside --out, which the swap must not delete
    named = [("the input ONNX file", cfg.model.onnx), ("the weights file", cfg.model.weights),
             ("the tuning database", cfg.database), ("the --dump-ir folder", cfg.dump_ir)]
    for what, p in [(what, Path(p).resolve()) for what, p in named if p and p != "pretrained"]:
        if p == real or real in p.parents:
            refuse(f"holds {what} ({p}); replacing the folder would delete it")
    if not os.path.lexists(out):
        return
    if not real.is_dir():
        refuse("exists and is not a folder")
    entries = sorted(e.name for e in real.iterdir())
    if entries and not _is_our_artifact(real):
        shown = ", ".join(entries[:4]) + (f" (+{len(entries) - 4} more)" if len(entries) > 4 else "")
        refuse(f"already holds files that are not an mbn-codegen artifact ({shown}); the build "
               "replaces the whole folder, so it writes only into a new or empty folder or over an "
               "earlier artifact")


class _Interrupts:
    """The SIGINT handler while a build runs (as a context): raise KeyboardInterrupt at once (and
    remember it, since TVM may wrap it into its own error or a library may swallow it), or only
    remember it while the finished artifact is being swapped in."""

    def __init__(self):
        self.hit = self.defer = False
        self.prev = None

    def __call__(self, _signum, _frame):
        self.hit = True
        if not self.defer:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
            self.prev = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *_exc):
        if self.prev is not None:
            signal.signal(signal.SIGINT, self.prev)


def _swap_in(tmp: Path, out: Path, interrupts: _Interrupts) -> None:
    """Rename the old artifact aside, the new one in, then delete the old: at every moment `out`
    is either the old artifact or the new one. An interrupt before the old one is deleted puts
    it back."""
    holder = old = None
    interrupts.defer = True
    try:
        interrupts.check()
        if os.path.lexists(out):
            holder = Path(tempfile.mkdtemp(prefix=out.name + ".", suffix=".old", dir=out.parent))
            old = holder / "artifact"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
            interrupts.check()
        except BaseException:
            if os.path.lexists(out) and not os.path.lexists(tmp):
                os.rename(out, tmp)
            if old is not None:
                os.rename(old, out)
            raise
    finally:
        if holder is not None:
            shutil.rmtree(holder, ignore_errors=True)


def build(cfg: BuildConfig, log: Callable[[str], None] = print) -> Path:
    spec = targets.load(cfg.target)
    cc = spec.compiler()                 # fails early, naming the apt package, if it is missing
    spec.tvm_target()                    # a TargetFileError now rather than after the export
    cfg.model.validate()                 # errors name the user's file, before anything is written
    out = Path(cfg.out) if cfg.out else cfg.default_out()
    check_out_dir(out, cfg)
    target_dir = Path(os.path.abspath(out))
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    with _Interrupts() as interrupts:
        tmp = Path(tempfile.mkdtemp(prefix=target_dir.name + ".", suffix=".partial", dir=target_dir.parent))
        try:
            return _build(cfg, spec, cc, out, target_dir, tmp, log, interrupts)
        except BaseException as e:
            if interrupts.hit and not isinstance(e, KeyboardInterrupt):
                raise KeyboardInterrupt from None       # TVM wrapped it, or a failure it caused
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)      # an interrupted or failed build leaves nothing


def _build(cfg: BuildConfig, spec, cc, out: Path, target_dir: Path, tmp: Path, log,
           interrupts: _Interrupts) -> Path:
    from ._tvm import TVM_FFI_VERSION, TVM_VERSION
    from .lower import LowerContext, build_module, lower

    t_start = time.perf_counter()

    prepared = cfg.model.write_onnx(tmp / "model.onnx", log)
    onnx_model, input_name, shape = prepared.onnx_model, prepared.input_name, prepared.shape
    model_info = {**prepared.info, "onnx_sha256": sha256(prepared.path)}
    x, y = cfg.model.reference(prepared)
    np.save(tmp / "reference_input.npy", x)
    np.save(tmp / "reference_output.npy", y)

    from .database import open_database, select
    db_path = select(spec, cfg.database, log=log, automatic=cfg.use_shipped_database and cfg.schedules == "ours")
    database = open_database(db_path.path, log, writable=False) if db_path else None
    ctx = LowerContext(spec.tvm_target(), spec.device, input_name, shape, schedules=cfg.schedules,
                       layout=cfg.layout, database=database, propagate_nan=cfg.propagate_nan)
    if spec.device == "cuda":
        from .cuda import kernel_timings, use_cuda_graph
        ctx.kernel_timings = kernel_timings(spec, log)
        ctx.cuda_graph = use_cuda_graph(log)
    log(f"lower for {spec.name} ({spec.description})")
    mod = lower(onnx_model, ctx, dump_ir=cfg.dump_ir, log=log)
    log("compile")
    t0 = time.perf_counter()
    cc_arg = {"cc": cc} if cc else {}
    if spec.device == "cuda":
        from .cuda import compile_with_nvcc, cuda_payloads
        with compile_with_nvcc(spec.cuda_arch, toolkit=spec.raw.get("cuda_toolkit"), log=log) as nv:
            nv.export_library(build_module(mod, ctx), tmp / LIB_FILE, **cc_arg)
    else:
        build_module(mod, ctx).export_library(str(tmp / LIB_FILE), **cc_arg)
    compile_s = time.perf_counter() - t0
    gpu = None
    if spec.device == "cuda":
        pay = cuda_payloads(tmp / LIB_FILE)
        gpu = {"cuda_arch": spec.cuda_arch, "toolkit": nv.toolkit.to_dict(),
               "kernel_formats": sorted({p.format for p in pay}),
               "archs": sorted({a for p in pay for a in p.archs}), "cuda_graph": ctx.cuda_graph}

    if (labels := cfg.model.labels_file(y.shape[-1])) is not None:
        shutil.copyfile(labels, tmp / "labels.txt")
    rtol, atol = 1e-3, 1e-3 * max(1.0, float(np.abs(y).max()))
    manifest = {
        "format": 1,
        "generator": GENERATOR,
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
        "labels_file": None if labels is None else "labels.txt",
        "schedules": cfg.schedules,
        "layout": ctx.layout,
        "nan_semantics": "propagate" if cfg.propagate_nan else "ieee-maxnum",
        "tuning_database": db_path.manifest() if db_path else None,
        "kernels": ctx.notes.get("kernels", []),
        "phase_seconds": {**ctx.notes.get("phase_seconds", {}), "compile": compile_s},
        "versions": {"mbn_codegen": __version__, "tvm": TVM_VERSION, "tvm_ffi": TVM_FFI_VERSION,
                     "onnx_opset": int(onnx_model.opset_import[0].version)},
        "built": {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                  "host": socket.gethostname(), "host_arch": platform.machine(),
                  "seconds": round(time.perf_counter() - t_start, 2)},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _swap_in(tmp, target_dir, interrupts)
    n = len(manifest["kernels"])
    log("kernels: " + ", ".join(f"{v} {k}" for k, v in sorted(kernel_sources(manifest["kernels"]).items())) +
        "  (tuned = database record, ours-default = our schedule untuned, tvm-stock/dlight = TVM's)")
    log(f"wrote {out}/ ({manifest['library']['bytes'] / 1e6:.1f} MB library, {n} kernels, "
        f"{manifest['built']['seconds']:.1f} s)")
    return out
