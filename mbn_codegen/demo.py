"""The newcomer's first run: pretrained MobileNet v2 -> TVM -> native library -> real photos."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from . import targets
from .build import BuildConfig, build, kernel_sources
from .runtime import cpu_flags, load, machine_arch

_SOURCE_WORDS = {"tuned": "tuned (tuning database)", "ours-default": "our schedules with default knobs",
                 "tvm-stock": "TVM's stock untuned loops", "dlight": "TVM's dlight GPU schedules"}


def host_target() -> str:
    """The best shipped target this machine runs natively."""
    if machine_arch() == "aarch64":
        return "arm64"
    flags = cpu_flags()
    need = set(targets.load("x86_64-avx512").required_cpu_flags)
    return "x86_64-avx512" if need <= flags else "x86_64"


def run_demo(target: str | None = None, out: str | None = None, log: Callable[[str], None] = print) -> dict:
    from .images import preprocess, sample_images
    from .models import create

    target = target or host_target()
    cfg = BuildConfig(model="mobilenet_v2", weights="pretrained", target=target,
                      out=out or f"artifacts/mobilenet_v2-pretrained-{target}")
    art = build(cfg, log=log)
    model = load(art)
    check = model.selfcheck()
    log(f"self-check on this {check['arch']} machine: ok (max |error| vs ONNX Runtime "
        f"{check['max_abs_err']:.2g})")
    torch_model = create("mobilenet_v2", weights="pretrained")
    import torch
    results = {}
    log("")
    log(f"{'photo':<11} {'TVM top-1 (ours)':<28} {'prob':>6}   {'PyTorch top-1':<22} agree")
    for name, img in sample_images().items():
        x = preprocess(img, 224)
        top = model.predict(x, k=5)
        with torch.no_grad():
            ref = int(torch_model(torch.from_numpy(x)).argmax())
        idx, label, p = top[0]
        results[name] = {"top5": top, "torch_top1": ref}
        log(f"{name:<11} {label[:27]:<28} {p:6.1%}   {model.labels[ref][:22]:<22} {'yes' if ref == idx else 'NO'}")
    x = preprocess(sample_images()["chelsea"], 224)
    for _ in range(3):
        model(x)
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    med = float(np.median(times)) * 1e3
    log("")
    log(f"artifact: {art}/  (lib.so + manifest.json; copy it to the board and use mbn_codegen.runtime)")
    log(f"latency: {med:.1f} ms median of 10 ({schedule_summary(model.manifest.get('kernels', []))})")
    return {"artifact": str(art), "results": results, "median_ms": med}


def schedule_summary(kernels: list[dict]) -> str:
    """Where the artifact's kernels came from, in words, from the manifest's kernel sources."""
    counts = kernel_sources(kernels)
    if not counts:
        return "kernel sources not recorded in the manifest"
    n = sum(counts.values())
    order = [*_SOURCE_WORDS, *sorted(set(counts) - set(_SOURCE_WORDS))]
    parts = [f"{counts[s]} of {n} kernels {_SOURCE_WORDS.get(s, s)}" for s in order if s in counts]
    untuned = n - counts.get("tuned", 0)
    return "; ".join(parts) + (f"; `make tune` tunes the other {untuned}" if 0 < untuned < n else
                               "; `make tune` tunes them" if untuned else "")
