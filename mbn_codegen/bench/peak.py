"""The machine's ceilings, measured with kernels TVM builds for the bench's target: an FMA loop whose
accumulators stay in vector registers (the compute peak "% of peak" divides by) and a STREAM triad
(the memory roof). A library SGEMM is no peak: our kernels beat it."""
from __future__ import annotations

import re
import timeit

ACCUMULATORS = 12      # independent chains >= FMA latency (4-5) x FMA units (2) on Zen 3 / Skylake
FMA = re.compile(r"^(vfmadd\w+|fmla)\s")


def _kernels(lanes: int, threads: int, n_triad: int):
    from tvm.script import tirx as T        # after mbn_codegen._tvm's version check (measure_peak)

    acc, blk = ACCUMULATORS, n_triad // threads

    @T.prim_func
    def fma(out: T.Buffer((threads, acc, lanes), "float32"), n: T.int32, a: T.float32, b: T.float32):
        T.func_attr({"global_symbol": "fma", "tir.noalias": True})
        for t in T.parallel(threads):
            r = T.alloc_buffer((acc, lanes), "float32", scope="local")
            for j in T.unroll(acc):
                for v in T.vectorized(lanes):
                    r[j, v] = T.Cast("float32", j * lanes + v)
            for _ in range(n):
                for j in T.unroll(acc):
                    for v in T.vectorized(lanes):
                        r[j, v] = r[j, v] * a + b
            for j in T.unroll(acc):
                for v in T.vectorized(lanes):
                    out[t, j, v] = r[j, v]

    @T.prim_func
    def triad(x: T.Buffer((n_triad,), "float32"), y: T.Buffer((n_triad,), "float32"),
              z: T.Buffer((n_triad,), "float32"), s: T.float32):
        T.func_attr({"global_symbol": "triad", "tir.noalias": True})
        for t in T.parallel(threads):
            for i in range(blk // lanes):
                for v in T.vectorized(lanes):
                    x[t * blk + i * lanes + v] = y[t * blk + i * lanes + v] + s * z[t * blk + i * lanes + v]
    return fma, triad


def hot_loop_check(asm: str) -> dict:
    """The basic block with the most FMAs must be FMAs on vector registers plus loop control: an
    FMA with a memory operand, or a spill, would make the loop measure the load ports instead."""
    blocks = [[]]
    for s in (line.strip() for line in asm.splitlines()):
        if re.match(r"^\.?[\w$.]+:", s):
            blocks.append([])
        elif s and not s.startswith((".", "#", "//", ";")):
            blocks[-1].append(s)
    hot = max(blocks, key=lambda b: sum(bool(FMA.match(i)) for i in b))
    fmas, others = [i for i in hot if FMA.match(i)], [i for i in hot if not FMA.match(i)]
    ok = (len(fmas) >= ACCUMULATORS and not any("(" in i or "[" in i for i in fmas)
          and all(re.match(r"^(add|sub|dec|inc|cmp|test|j|b\.|cbnz)", i) for i in others))
    return {"ok": ok, "fmas_in_loop": len(fmas), "registers": sorted({r for i in fmas
                                                                      for r in re.findall(r"[xyz]mm\d+|v\d+", i)}),
            "other_instructions": others}


def measure_peak(spec, threads: int, quick: bool = False) -> dict:
    import numpy as np

    from .._tvm import tir_build, tvm
    from ..schedules import simd

    lanes, runs = simd(spec.tvm_target())[0], 10 if quick else 40       # lanes: what our schedules vectorise with
    n_triad = (4 if quick else 16) * (1 << 20) // (threads * lanes) * threads * lanes
    lib = tir_build(tvm.IRModule(dict(zip(("fma", "triad"), _kernels(lanes, threads, n_triad)))),
                    target=spec.tvm_target())
    out = tvm.runtime.tensor(np.zeros((threads, ACCUMULATORS, lanes), "float32"))
    iters = 100_000_000 // lanes             # ~25 ms a run: many short runs find a slice nobody shares
    lib["fma"](out, iters // 10, 0.9999, 1e-4)
    best = min(timeit.repeat(lambda: lib["fma"](out, iters, 0.9999, 1e-4), number=1, repeat=runs))
    gflops = 2 * ACCUMULATORS * lanes * iters * threads / best / 1e9
    x, y, z = (tvm.runtime.tensor(np.full(n_triad, 1.0, "float32")) for _ in range(3))
    lib["triad"](x, y, z, 3.0)
    best_triad = min(timeit.repeat(lambda: lib["triad"](x, y, z, 3.0), number=1, repeat=max(5, runs // 4)))
    gbs = 3 * 4 * n_triad / best_triad / 1e9
    return {"threads": threads, "fma_gflops": gflops, "triad_gbs": gbs, "ridge_flop_per_byte": gflops / gbs,
            "lanes": lanes, "accumulators": ACCUMULATORS, "asm_check": hot_loop_check(lib.inspect_source("asm")),
            "method": f"TVM-built FMA loop on {spec.name}: {ACCUMULATORS} accumulators x {lanes} fp32 lanes, "
                      f"{iters} iterations per thread, {threads} thread(s), best of {runs} runs; triad x = y + s*z "
                      f"on 3 x {4 * n_triad >> 20} MB, 12 bytes per element"}
