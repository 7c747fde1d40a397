"""1x1 pointwise convolution (and the dense 3x3 stem) in NHWC with HWIO weights: a GEMM
out[y, x, f] = sum_c in[y, x, c] * W[c, f].

CPU register tile: a block of y_in x x_in output pixels x `f_in` vectors of `lanes` output channels
live in registers; each step of the channel loop loads one weight row segment (f_in vectors,
contiguous in HWIO) and broadcasts one input value per pixel, so it issues pixels * f_in FMAs for
f_in + pixels loads. AVX2 (16 ymm) takes 2 x 2 x 2 (8 accumulators), NEON and AVX-512 (32
registers) 2 x 2 x 4 (16); see `register_tile`.

Weights are re-laid out at compile time for the chosen loop order (RewriteLayout, see
mbn_codegen/kernels.py): in HWIO the 1024-channel layers put each weight row 4 KB apart, a new
page per step of the channel loop.

Measured (Xeon, AVX-512, 2 threads, knobs swept by hand): 14x14x512 k512 reaches 143 GFLOP/s with
x_in=7, f_in=2 (72% of the 199 GFLOP/s a 2-thread SGEMM reaches); 7x7x1024 k1024 only 67 GFLOP/s
before weight packing.
Measured (AMD EPYC Zen 3, AVX2, whole v1 1.0-224 with default knobs, interleaved with ONNX Runtime):
register-budget tiles + order 1 for weights over 256 KiB took 1/2 threads from 26.5/16.1 ms (7-8 x 1
tiles, order 1 everywhere) to 22.0/11.7 ms, against ONNX Runtime's 18.3/11.0 ms; with order 0 on the
14x14 layers the new tiles gave 25.0/13.3 ms (per-layer: their weights came from L3 per pixel block).
2 x 2 pixel blocks then took the 14x14-112x112 layers from 78-86% to 91-96% of the FMA peak (CPU time,
1 thread, one interleaved run). 7x7 layers have no such tile (7 is prime: 7 x 1, 7 accumulators,
~65%): the pad-channels phase gives them a zero column (`column_padding`, 7 x 8 -> 1 x 4 x 2);
where padding would cost too much (5x5) the channel loop is split in two interleaved chains
instead (`reduction_chains`). Whole v1 1.0-224, default knobs, 1 thread, CPU time interleaved with
ONNX Runtime on a busy machine, two runs: median ratio 1.103 -> 1.062 and 1.055 -> 1.045 (chains
-> zero column; minimums within 1%).
"""
from __future__ import annotations

from itertools import product
from math import prod

from .common import (OneSpaceRule, attach, cpu_conv_prologue, cpu_finish, cuda_accumulate, divisors, is_cuda, lanes_for,
                     prologue, simd, split_by, tile, tile_knobs)

RULE = "mbn_pointwise"
L2_SHARE = 256 * 1024


def register_tile(y: int, x: int, f_vecs: int, registers: int, lanes: int) -> tuple[int, int, int]:
    """(y_in, x_in, f_in): a y_in x x_in block of output pixels times f_in vectors of channels in
    registers. y_in * x_in * f_in accumulators + f_in weight vectors + one broadcast must fit the
    register file, or LLVM spills an accumulator and every step of the channel loop waits on a
    store-reload (seen on AVX2 with 7 x 2: 17 registers of 16; 2 x 7 x 1 = 16 spilled too: one
    register stays reserved). Among the tiles that fit, in order:
    1. >= 8 accumulators: FMA latency x FMA pipes (Zen 3: 7 accumulators reached 60% of the FMA
       peak, 8 reached 85%);
    2. the fewest loads per FMA, (pixels + f_in) / accumulators;
    3. a weight step of one 64-byte cache line (f_in * lanes * 4 bytes): AVX2 2 x 2 x 2 ran
       14x14, 28x28, 56x56 layers at 90-95% of the FMA peak where 1 x 2 x 4 / 1 x 4 x 2 (same
       loads per FMA) ran at 78-85% (Zen 3, 1 thread, one interleaved run);
    4. the squarer pixel block."""
    def key(t):
        px, acc = t[0] * t[1], prod(t)
        return acc >= 8, -(px + t[2]) / acc, -abs(t[2] * lanes * 4 - 64), acc, -abs(t[0] - t[1])

    fits = [t for t in product(divisors(y, 4), divisors(x, 8), divisors(f_vecs, 4))
            if prod(t) + t[2] + 1 <= registers - (1 if t[0] > 1 else 0) and t[0] * t[1] <= 8]
    return max(fits, key=key, default=(1, 1, 1))


def loop_order(rc: int, f: int) -> int:
    """Order 0 re-reads all the weights for every block of pixels, order 1 keeps a weight panel in
    cache and re-reads the input per block of channels. Weights that fit a core's share of L2
    (256 KiB: Zen 3 has 512 KiB, a Pi 4's A72s share 1 MiB) cost little to re-read; larger ones
    (14x14 layers: 1 MiB, 7x7: 2-4 MiB) came from L3 98 times per layer with order 0."""
    return 1 if rc * f * 4 > L2_SHARE else 0


def column_padding(y: int, x: int, f: int, rc: int, lanes: int, registers: int, max_cost: float = 0.15) -> int:
    """Columns of zeros to add on the right of a pointwise layer's input (its output is sliced back)
    so that the register tile reaches 8 accumulators, or 0 (7x7 on AVX2, see above; two chains
    still load one weight vector per 7 broadcasts). At most `max_cost` more work (7 -> 8 is 14%). Zen 3, 1 thread, 7x7x1024->1024, per call interleaved with ONNX
    Runtime's Conv kernel (its profiler's time, without its layout reorders), on a busy machine:
    1.42x -> 1.25-1.28x its time (2 chains -> padded). NEON and AVX-512 (32 registers) fit 7 x 2.
    Only layers that take loop order 1 (weights over L2_SHARE, the 7x7 layers of v1, v2 and v3
    large): under order 0 the sliced epilogue's bounds test lands on the parallel loop and TVM's
    weight prepacking (RewriteLayout) rejects the kernel (v3 small's 14x14x96->40)."""
    v = lanes_for(f, lanes)
    if loop_order(rc, f) == 0 or prod(register_tile(y, x, f // v, registers, v)) >= 8:
        return 0
    for pad in range(1, int(x * max_cost) + 1):
        if prod(register_tile(y, x + pad, f // v, registers, v)) >= 8:
            return pad
    return 0


def cpu_knobs(info: dict, lanes: int, registers: int) -> dict:
    v = lanes_for(info["f"], lanes)
    t = register_tile(info["y"], info["x"], info["f"] // v, registers, v)
    rc0, kc = split_by(info["rc"], 64)
    chains = reduction_chains(prod(t), t[2], info["rc"], registers)
    return {**tile_knobs(info, v, t), "rc": [rc0, kc // chains], "order": loop_order(info["rc"], info["f"]),
            "chains": chains}


def reduction_chains(acc: int, f_in: int, rc: int, registers: int) -> int:
    """2 where the best register tile has fewer than 8 accumulators (7x7 layers on AVX2: 7 is prime,
    so 7 x 1 x 1) and twice its accumulators still fit: the channel loop is split in two interleaved
    halves (even/odd channels, rfactor) with their own accumulators, summed after the loop. 7x7 on
    AVX2: 2 x 7 accumulators + 1 weight + 1 broadcast = 16 ymm, no spills (asm checked). Zen 3, 1
    thread, CPU time, 4 interleaved runs on a busy machine: 7x7x512->1024 from 61-74% to 65-76% of the
    FMA peak (1-11% faster each run), 7x7x1024->1024 from 44-64% to 51-64% (0-14%): far from the
    ~100% of 14 accumulators in a register-only loop, so loads/caches limit these layers now.
    Whole v1 1.0-224 at 1 thread, same tree built with 1 and 2 chains, 3 interleaved runs: min
    16.18/16.32/16.65 -> 15.76/15.84/16.25 ms (2.4-2.9%), medians 0.7-3.3% lower. Otherwise 1."""
    return 2 if acc < 8 and rc % 2 == 0 and 2 * acc + f_in + 1 <= registers else 1


ORDERS = (0, 1)


def schedule_cpu(sch, block, lanes: int, order: int, knobs: dict | None = None, chains: int = 1) -> None:
    """order 0: pixel blocks outer (weights re-streamed per pixel block); order 1: output-channel
    blocks outer (a weight panel stays in cache across all pixels). `chains` > 1 splits the channel
    loop in that many interleaved partial sums (see `reduction_chains`). The order and the chains
    are separate design spaces, not sampled knobs: MetaSchedule traces cannot branch on sampled
    values. Knobs: y, x (rows and pixels along a row in the register tile), f (vector tile), rc
    (channel blocking, in steps of `chains` channels)."""
    k = knobs or {}
    out, v, (n, y, x0, x1, f0, f1, fv, ry, rx, rc) = cpu_conv_prologue(sch, block, RULE, lanes, k)
    y0, y1 = tile(sch, y, 2, 4, k.get("y"))
    if chains > 1:
        rc, rc2 = sch.split(rc, [None, chains])
    rc0, rc1 = tile(sch, rc, 2, 64, k.get("rc"))
    outer = [n, y0, x0, f0] if order == 0 else [n, f0, y0, x0]
    inner = [rc0, ry, rx, rc1] + ([rc2] if chains > 1 else []) + [y1, x1, f1, fv]
    sch.reorder(*outer, *inner)
    total = None
    if chains > 1:
        block = sch.rfactor(rc2, 0)             # the partial sums; `total` adds them up
        outer, inner = sch.get_loops(block)[:4], sch.get_loops(block)[4:]
        rc0, rc2, y1, x1, f1, fv = inner[0], *inner[-5:]
        total = sch.get_consumers(block)[0]
    sch.parallel(sch.fuse(*outer[:3]))          # before the epilogue joins this loop nest
    if chains > 1:
        attach(sch, total, outer[-1])
        sch.unroll(rc2)
    cpu_finish(sch, block, out, outer[-1], fv, (f1, x1, y1), rc0, v, total)


def cuda_knobs(info: dict) -> dict:
    return {"s": split_by(info["n"] * info["y"] * info["x"], 16, 2), "f": split_by(info["f"], 16, 4),
            "rc": split_by(info["rc"], 16)}


def schedule_cuda(sch, block, knobs: dict | None = None) -> None:
    """A thread block computes an (s_t*s_i) x (f_t*f_i) output tile; each thread keeps s_i x f_i
    accumulators in registers. Threads of a warp take consecutive output channels, so weight
    reads (HWIO: channels contiguous) and output writes coalesce. Knobs: s, f (block/thread/inner
    tiles), rc (reduction step)."""
    k = knobs or {}
    out = prologue(sch, block, RULE)
    n, y, x, f, ry, rx, rc = sch.get_loops(block)
    s = sch.fuse(n, y, x)
    s0, s1, s2 = tile(sch, s, 3, 4, k.get("s"))
    f0, f1, f2 = tile(sch, f, 3, 4, k.get("f"))
    rc0, rc1 = tile(sch, rc, 2, 16, k.get("rc"))
    sch.reorder(s0, f0, s1, f1, rc0, ry, rx, rc1, s2, f2)
    sch.bind(sch.fuse(s0, f0), "blockIdx.x")
    tx = sch.fuse(s1, f1)
    sch.bind(tx, "threadIdx.x")
    cuda_accumulate(sch, block, out, tx, rc0)


class Pointwise(OneSpaceRule):
    """1x1 convolutions and the dense 3x3 stem, NHWC; on CPUs a design space per loop order and
    per number of reduction chains."""
    name = RULE
    kinds = ("pointwise", "conv")

    def spaces(self, info: dict, target) -> list:
        if is_cuda(target):
            return super().spaces(info, target)
        lanes, v = simd(target)[0], self.vector_width(info, target)
        chains = {1, cpu_knobs(info, *simd(target))["chains"]}
        return [(f"{RULE}_v{v}_o{o}" + (f"_c{c}" if c > 1 else ""),
                 (lambda o, c: lambda sch, b, k: schedule_cpu(sch, b, lanes, o, k, c))(o, c))
                for c in sorted(chains) for o in ORDERS]

    def default_knobs(self, info: dict, target) -> tuple[int, dict]:
        i, k = super().default_knobs(info, target)
        return (i, k) if is_cuda(target) else (k["order"] + (len(ORDERS) if k["chains"] > 1 else 0), k)
