"""3x3 depthwise convolution in NHWC with HWIO weights (3, 3, 1, C): one filter per channel.

CPU: channels are the contiguous axis, so a vector holds `lanes` channels of one pixel; the
register tile is y_in x x_in output pixels x f_in vectors, with all 9 taps unrolled inside it (see
`register_tile`), and the padded input read straight from the producer (padding inlined as a
select that does not depend on the channel, so it vectorises). Depthwise does 9 MACs per input
element, so the limit is latency and loads, not the arithmetic: with the taps in a loop (the old
schedule) each tap step waited on its x_in accumulators; unrolled, the 9 taps of all the tile's
accumulators interleave, each input vector feeds up to 3 x 3 outputs of the tile, and the fused
bias+ReLU epilogue writes the output once.

Measured (AMD EPYC Zen 3, AVX2, 1 thread, CPU time, % of a concurrently measured FMA peak, min
over 15/20 rounds on a shared machine; old and new interleaved in each of two runs): the old
default (1 x 8 (or 7) x 1, taps ry in a loop) against this one (2 x 2 x 2 where the sizes allow,
1 x 7 x 1 at 7x7, all taps unrolled):
  112x112x32 s1  44/44% -> 54/50%     112x112x64 s2  24/23% -> 32/32%
  56x56x128 s1   38/33% -> 38/34%     56x56x128 s2   25/25% -> 31/27%
  28x28x256 s1   44/44% -> 45/42%     14x14x512 s1   36/34% -> 42/42%
  7x7x1024 s1    28/28% -> 27/29%
Whole v1 1.0-224 at 1 thread, the same tree built with the old and the new depthwise default,
interleaved with ONNX Runtime, two runs: min 16.78 -> 16.47 and 17.87 -> 16.21 ms (medians
21.43 -> 20.79, 22.92 -> 22.50).
Tried and dropped: 1 x 4 x 2 (tie at 112 and stride 2, 8 points behind at 56), 2 x 4 x 1 (ahead
at 112x112 in one run, 11 points behind at 56x56), 1 x 2 x 4 (6-9 points behind), the vector loop outside the taps so one vector's 9 weights stay
in registers (2-10 points behind: it leaves 4 independent accumulators per step, not 8), the
channel loop outside the row loop (29-33%: a pixel's channels are 512 B apart per row step), and
the padded input materialised per row block (slower: an extra store per input element), and
loop_partition of the border tiles (TVM 0.27 segfaults, or cannot reverse_compute_at the epilogue
into the partitioned copies). The inlined padding remains the limit: its select guards a load, so
LLVM emits branches between the tile's loads.

Registers (`register_tile`, `live_inputs`): accumulators + the input vectors held at once + the
tap's weight <= the vector registers. Per f-vector and tile row, a row of taps holds x_in inputs
at stride 1 and 2 x_in - 1 at stride 2 (the x_in - 1 columns shared with the next output wait
for the third tap); at stride 2 the input row a tile row shares with the next returns two tap
rows later, so all y_in rows' worth are live (at stride 1 LLVM reloads them). NEON, 32: the
stride-1 2 x 2 x 4 is 16 + 8 + 1 = 25; the old stride-2 2 x 2 x 4 was 16 + 4 x 2 x 3 + 1 = 41
(15-21 spills); 1 x 8 x 1 is 8 + 15 + 1 = 24. AVX2, 16: the old stride-2 2 x 2 x 2 was 8 + 12 +
1 = 21 (7 ymm spills), 2 x 1 x 2 is 4 + 4 + 1 = 9. Against the vector spills of 47 tiles tried
(A72 and Zen 3 models, both strides) the count fits where LLVM did not spill and exceeds where it
did, but for 2 x 4 x 2 and (at 112x112) 2 x 2 x 4 at stride 1 (fit, 2 spills), and 1 x 7 x 2,
1 x 2 x 8 (NEON), 1 x 2 x 4, 1 x 7 x 1 at 7x7 (AVX2) at stride 2 (over, 0-2 spills). Stride-1
choices are unchanged on NEON, AVX2 and AVX-512 (4-lane SSE: 1 x 2 x 4 -> 2 x 1 x 4, 17 > 16).
Stride 2, 32 registers: one output row, the longest first. Two-row tiles that fit NEON's count
still fall to 38-68% in the A72 report (2 x 2 x 2 51%, 2 x 4 x 1 68%, 2 x 1 x 4 38%; LLVM splits
them around the padding guards and spills address registers), x_in = 2 to 45-52%; 1 x 8 x 1,
1 x 7 x 1, 1 x 4 x 2: 76-77%, no spills. Stride 2, 16 registers: a one-row tile of 8 chains does
not fit, the one-row tiles that do have 4 (1 x 4 x 1: 21-49% slower than 2 x 2 x 2 on Zen 3 at
112->56, two runs), so the stride-1 order, ties to the fewer live inputs: 2 x 1 x 2 (1 x 1 x 4
at 7x7).
Static report, v1 1.0-224, stride-2 layers, % of the FMA peak / spills in the hot loop, old -> new:
  Pi 4 (A72)  112->56: 46.2/21 -> 77.4/0   56->28: 49.1/17 -> 77.3/0   28->14: 46.7/15 -> 77.3/0
              14->7: 77.6/0 -> 75.7/0 (1 x 7 x 2 -> 1 x 7 x 1); est. one core 99.2 -> 98.8 ms
  Pi 3 (A53)  14.1/17 -> 19.0/0   14.4/16 -> 17.9/0   14.0/19 -> 17.0/0   18.2/6 -> 18.1/0;
              est. 318.1 -> 317.1 ms
  Pi 5 (A76)  as the Pi 4, 46.2-49.1/15-21 -> 77.3-77.4/0; est. 62.0 -> 61.7 ms
  x86 (znver3 model, defaults without the shipped database, which serves all v1 1.0-224 depthwise
  kernels): 85.3/21 (7 ymm) -> 69.8-74.1/7 (general registers only); 14->7: 91.4/0 -> 63.7/0.
  AVX-512 (one layer each, skylake-avx512 model, no such CPU here to time): 64.2/41 -> 61.5/0,
  63.7/40 -> 61.7/0, 24.8/4 -> 61.7/0, 69.2/0 -> 63.5/0 (old 4 x 4 x 1, 4 x 4 x 1, 2 x 2 x 4, 1 x 7 x 2).
Measured instead on Zen 3 (1 thread, CPU time, min over 20 rounds, old and new interleaved, two
runs, shared machine): 112->56 0.152/0.117 -> 0.127/0.112 ms, 56->28 0.076/0.059 -> 0.073/0.056,
28->14 0.042/0.031 -> 0.038/0.035 (medians 0.046/0.045 -> 0.042/0.042), 14->7 0.035/0.028 ->
0.027/0.021: LLVM's Zen 3 model of the two-row tiles is pessimistic.
"""
from __future__ import annotations

from itertools import product
from math import prod
from operator import itemgetter

from .common import (OneSpaceRule, cpu_conv_prologue, cpu_finish, cuda_accumulate, cuda_threads, divisors,
                     lanes_for, prologue, split_by, tile, tile_knobs)

RULE = "mbn_depthwise"
CHAINS = 8                 # FMA latency x pipes: independent accumulators needed to keep the FMA pipes busy


def live_inputs(y_in: int, x_in: int, f_in: int, stride: int) -> int:
    """Input vectors a tile holds in registers at once, its taps unrolled tap row by tap row (see
    Registers above): per f-vector and tile row s * (x_in - 1) + 1, for every tile row at stride 2
    and one at stride 1; stride 3 shares nothing (x_in)."""
    rows = y_in if stride == 2 else 1
    cols = stride * (x_in - 1) + 1 if stride <= 2 else x_in
    return f_in * rows * cols


def loads_per_output(y_in: int, x_in: int, stride: int) -> float:
    return (stride * (y_in - 1) + 3) * (stride * (x_in - 1) + 3) / (y_in * x_in)


def register_tile(y: int, x: int, f_vecs: int, registers: int, lanes: int, stride: int = 1) -> tuple[int, int, int]:
    """(y_in, x_in, f_in): output pixels (rows x along a row) x vectors of channels in registers,
    fitting them (see Registers above) with at most registers / 2 accumulators. Among those:
    1. the most accumulators: each chains 9 dependent FMAs, and FMA latency x pipes needs >= 8
       chains in flight (Zen 3);
    2. a pixel's f_in vectors closest to one 64-byte cache line (2 x 2 x 2 beat 2 x 4 x 1 by 11
       points at 56x56, 1 x 4 x 2 by 8);
    3. the fewest input vectors loaded per output (`loads_per_output`);
    4. the squarer pixel block.
    Stride 2: when a one-row tile of CHAINS accumulators fits, one output row, the fewest loads
    first; otherwise the order above, then the fewer live inputs."""
    fits = [t for t in product(divisors(y, 4), divisors(x, 8), divisors(f_vecs, 4))
            if prod(t) <= registers // 2 and prod(t) + live_inputs(*t, stride) + 1 <= registers]

    def key(t):
        return prod(t), -abs(t[2] * lanes * 4 - 64), -loads_per_output(t[0], t[1], stride), -abs(t[0] - t[1])

    if stride == 1:
        return max(fits, key=key, default=(1, 1, 1))
    rows = [t for t in fits if t[0] == 1]
    if CHAINS + live_inputs(1, CHAINS, 1, stride) + 1 <= registers and rows:
        loads_first = itemgetter(2, 0, 1, 3)
        return max(rows, key=lambda t: loads_first(key(t)))
    return max(fits, key=lambda t: (*key(t), -live_inputs(*t, stride)), default=(1, 1, 1))


def cpu_knobs(info: dict, lanes: int, registers: int) -> dict:
    v = lanes_for(info["f"], lanes)
    return tile_knobs(info, v, register_tile(info["y"], info["x"], info["f"] // v, registers, v, info["stride"]))


def schedule_cpu(sch, block, lanes: int, knobs: dict | None = None) -> None:
    """Knobs: y, x (output rows and pixels along a row in the register tile), f (vectors of
    channels in it)."""
    k = knobs or {}
    out, v, (n, y, x0, x1, f0, f1, fv, ry, rx, rc) = cpu_conv_prologue(sch, block, RULE, lanes, k)
    y0, y1 = tile(sch, y, 2, 4, k.get("y"))
    sch.reorder(n, y0, x0, f0, rc, ry, rx, f1, y1, x1, fv)
    sch.parallel(sch.fuse(n, y0, x0))          # 7x7: 7 row blocks left a second thread idle
    cpu_finish(sch, block, out, f0, fv, (x1, y1, f1, rx, ry), rc, v)        # the tile and its 9 taps unrolled


def cuda_knobs(info: dict) -> dict:
    return {"t": split_by(info["n"] * info["y"] * info["x"] * info["f"], 256)}


def schedule_cuda(sch, block, knobs: dict | None = None) -> None:
    """One thread per output element, channels fastest so a warp reads 32 consecutive channels
    of a pixel (coalesced in NHWC) and the 3x3 weights (HWIO, channels contiguous). The 9-tap
    reduction is unrolled in registers and the bias+ReLU epilogue is computed before the single
    store. Knob: t (threads per block)."""
    out = prologue(sch, block, RULE)
    n, y, x, f, ry, rx, rc = sch.get_loops(block)
    t = cuda_threads(sch, sch.fuse(n, y, x, f), (knobs or {}).get("t"))
    sch.unroll(ry)
    sch.unroll(rx)
    cuda_accumulate(sch, block, out, t, ry)


class Depthwise(OneSpaceRule):
    """3x3 depthwise convolutions (one filter per channel), NHWC."""
    name = RULE
    kinds = ("depthwise",)
