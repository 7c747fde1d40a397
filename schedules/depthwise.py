"""3x3 depthwise convolution in NHWC with HWIO weights (3, 3, 1, C): one filter per channel.

CPU: channels are the contiguous axis, so a vector holds `lanes` channels of one pixel; the
register tile is `x_in` pixels of a row x one vector: x_in accumulators, 9 weight vectors loaded
once per tile and reused x_in times, and the padded input read straight from the producer
(padding inlined as a select that does not depend on the channel, so it vectorises).
AVX-512: x_in = 7 or 8 keeps 8 + 9 + 1 registers of 32. Depthwise is memory-bound (2 flops per
4-byte load without reuse), so the win is in reuse across the 3x3 window and in the fused
bias+ReLU epilogue, which writes the output once.
"""
from __future__ import annotations

from .common import (OneSpaceRule, cpu_conv_prologue, cpu_epilogue, cuda_accumulate, cuda_prologue, lanes_for,
                     largest_divisor, tile)

RULE = "mbn_depthwise"


def cpu_knobs(info: dict, lanes: int) -> dict:
    v = lanes_for(info["f"], lanes)
    x_in = largest_divisor(info["x"], 8)
    f_vecs = info["f"] // v
    return {"x": [info["x"] // x_in, x_in], "f": [f_vecs, 1]}


def schedule_cpu(sch, block, lanes: int, knobs: dict | None = None) -> None:
    """Knobs: x (pixels per register tile), f (vectors of channels per tile)."""
    out, v, (n, y, x0, x1, f0, f1, fv, ry, rx, rc) = cpu_conv_prologue(sch, block, RULE, lanes, knobs or {})
    sch.reorder(n, y, x0, f0, rc, ry, rx, f1, x1, fv)
    sch.parallel(sch.fuse(n, y))
    if out is not None:
        sch.reverse_compute_at(out, f0, preserve_unit_loops=True)
    sch.vectorize(fv)
    sch.unroll(x1)
    sch.unroll(f1)
    sch.unroll(rx)
    sch.decompose_reduction(block, rc)
    cpu_epilogue(sch, out, v)


def cuda_knobs(info: dict) -> dict:
    total = info["n"] * info["y"] * info["x"] * info["f"]
    t = largest_divisor(total, 256)
    return {"t": [total // t, t]}


def schedule_cuda(sch, block, knobs: dict | None = None) -> None:
    """One thread per output element, channels fastest so a warp reads 32 consecutive channels
    of a pixel (coalesced in NHWC) and the 3x3 weights (HWIO, channels contiguous). The 9-tap
    reduction is unrolled in registers and the bias+ReLU epilogue is computed before the single
    store. Knob: t (threads per block)."""
    k = knobs or {}
    out = cuda_prologue(sch, block, RULE)
    n, y, x, f, ry, rx, rc = sch.get_loops(block)
    s = sch.fuse(n, y, x, f)
    b, t = tile(sch, s, 2, 512, k.get("t"))
    sch.bind(b, "blockIdx.x")
    sch.bind(t, "threadIdx.x")
    sch.unroll(ry)
    sch.unroll(rx)
    cuda_accumulate(sch, block, out, t, ry)


class Depthwise(OneSpaceRule):
    """3x3 depthwise convolutions (one filter per channel), NHWC."""
    name = RULE

    def matches(self, info: dict) -> bool:
        return info.get("layout") == "NHWC" and info["kind"] == "depthwise"

    schedule_cpu = staticmethod(schedule_cpu)
    schedule_cuda = staticmethod(schedule_cuda)
    cpu_knobs = staticmethod(cpu_knobs)
    cuda_knobs = staticmethod(cuda_knobs)
