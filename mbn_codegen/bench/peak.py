"""The machine's peak, measured (what "% of peak" divides by), plus a nominal figure for context.

Measured, in a worker with the bench's thread count: the best of numpy's SGEMM (OpenBLAS) and
torch.mm (oneDNN/MKL) on 2048x2048 fp32 matrices: tuned GEMMs, so "100%" is what a good library
reaches on this machine at these threads. Memory bandwidth for the roofline: the best of a 256 MB
torch copy (read + write counted: DRAM), and of a 512 KB one (cache-resident: MobileNet's per-layer
operands mostly fit in L2, so its kernels can sit above the DRAM roof). Nominal: SIMD lanes x 2 (FMA) x FMA units x clock x threads,
with the number of FMA units assumed (it cannot be read from the OS), so it is only context.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def _best(f, reps: int) -> float:
    f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_peak(threads: int, quick: bool = False) -> dict:
    import numpy as np

    n = 1024 if quick else 2048
    reps = 3 if quick else 5
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    flops = 2.0 * n ** 3
    res = {"threads": threads, "gemm_n": n,
           "numpy_sgemm_gflops": flops / _best(lambda: a @ b, reps) / 1e9}
    try:
        import torch
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        res["torch_sgemm_gflops"] = flops / _best(lambda: torch.mm(ta, tb), reps) / 1e9
        m = (16 if quick else 64) * 1024 * 1024      # floats
        src, dst = torch.ones(m), torch.empty(m)
        res["copy_bandwidth_gbs"] = 2 * 4 * m / _best(lambda: dst.copy_(src), reps) / 1e9
        res["bandwidth_method"] = f"torch copy of {4 * m >> 20} MB, read + write, {threads} threads"
        small_src, small_dst = torch.ones(1 << 17), torch.empty(1 << 17)        # 512 KB: in L2

        def loop():
            for _ in range(50):
                small_dst.copy_(small_src)
        res["cache_bandwidth_gbs"] = 50 * 2 * 4 * (1 << 17) / _best(loop, reps) / 1e9
    except ImportError:
        m = 16 * 1024 * 1024
        src, dst = np.ones(m, np.float32), np.empty(m, np.float32)
        res["copy_bandwidth_gbs"] = 2 * 4 * m / _best(lambda: np.copyto(dst, src), reps) / 1e9
        res["bandwidth_method"] = "numpy copy of 64 MB, read + write, 1 thread"
    best = max(("numpy_sgemm_gflops", "torch_sgemm_gflops"), key=lambda k: res.get(k, 0.0))
    res["peak_gflops"] = res[best]
    res["method"] = (f"measured: best of numpy SGEMM (OpenBLAS) and torch.mm on {n}x{n} fp32, "
                     f"{threads} thread(s); best was {best.split('_')[0]}")
    return res


def nominal_peak(threads: int, flags: set[str], mhz: float | None, arch: str) -> dict:
    if arch == "x86_64":
        lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags or "avx" in flags else 4
        fma = 2 if "fma" in flags or "avx512f" in flags else 1
        units, units_note = 2, "2 FMA units per core assumed (Intel server cores, Zen 4 runs AVX-512 as 2x256)"
        if lanes == 16 and "amd" in _vendor().lower():
            units, units_note = 1, "AVX-512 as 2x256-bit on Zen 4: 1 full-width FMA per cycle assumed"
    else:
        lanes, fma, units, units_note = 4, 2, 2, "NEON 128-bit, 2 FMA pipes per core assumed (A72/A76)"
    if not mhz:
        return {"gflops": None, "note": "clock not readable"}
    g = lanes * fma * units * mhz / 1e3 * threads
    return {"gflops": g, "lanes_fp32": lanes, "flops_per_fma": fma, "fma_units": units, "mhz": mhz,
            "threads": threads, "note": f"lanes x FMA x units x clock x threads; {units_note}"}


def _vendor() -> str:
    from ..runtime import cpuinfo
    return cpuinfo().get("vendor_id") or os.uname().machine