"""Global average pooling in NHWC: out[n, 0, 0, c] = sum_{y,x} in[n, y, x, c] / (H*W), the squeeze of
squeeze-and-excitation blocks and the pool before the classifier.

TVM's stock loops put the channel outside the pixel loops, so every add reads a value C floats
away from the last. Here the pixels are the outer (reduction) loops and a register tile of
`c_in` vectors of channels the inner ones: each step reads c_in * lanes contiguous floats into
c_in independent accumulator chains, and the 1/(H*W) epilogue is applied per tile, vectorised.
Tiles of channels run in parallel only when the layer is large enough to pay for waking the
thread pool (a 7x7x96 pool is ~5k adds, less than one fork-join).

A reduction that is not of this shape (another ONNX model's ReduceSum or ReduceMax over other
axes) keeps its loop order and only gets its outer spatial loops parallelised (CPU) or bound to
threads (CUDA).
"""
from __future__ import annotations

from mbn_codegen._tvm import tirx

from .analysis import global_pool_shape
from .common import (OneSpaceRule, attach, cpu_finish, cuda_accumulate, cuda_threads, lanes_for, prologue,
                     split_by, tile)

RULE = "mbn_global_pool"
PARALLEL_MIN_READS = 1 << 16


def _spatial_loops(sch, block) -> tuple[list, list]:
    loops = sch.get_loops(block)
    n_spatial = sum(iv.iter_type != tirx.IterVar.CommReduce for iv in sch.get(block).iter_vars)
    return loops[:n_spatial], loops[n_spatial:]


def cpu_knobs(info: dict, lanes: int, _registers: int) -> dict:
    c = info.get("c")
    return {} if c is None else {"c": split_by(c // lanes_for(c, lanes), 4)}


def schedule_cpu(sch, block, lanes: int, knobs: dict | None = None) -> None:
    """Knob: c (vectors of channels per register tile)."""
    k = knobs or {}
    out = prologue(sch, block, RULE, inline_padding=False)
    shape = global_pool_shape(sch.get(block))
    if shape is None:
        spatial, _ = _spatial_loops(sch, block)
        if spatial:
            outer = sch.fuse(*spatial)
            sch.parallel(outer)
            attach(sch, out, outer)
        return
    pixels, c = shape
    n, one_y, one_x, f, ry, rx = sch.get_loops(block)
    v = lanes_for(c, lanes)
    fo, fv = sch.split(f, [None, v])
    f0, f1 = tile(sch, fo, 2, 8, k.get("c"))
    sch.reorder(n, one_y, one_x, f0, ry, rx, f1, fv)
    if pixels * c >= PARALLEL_MIN_READS:
        sch.parallel(f0)
    cpu_finish(sch, block, out, f0, fv, [f1], ry, v)


def cuda_knobs(info: dict) -> dict:
    c = info.get("c")
    return {} if c is None else {"t": split_by(c, 256)}


def schedule_cuda(sch, block, knobs: dict | None = None) -> None:
    """One thread per output channel (a warp reads 32 consecutive channels of a pixel:
    coalesced in NHWC), summing the pixels in a register. Knob: t (threads per block)."""
    out = prologue(sch, block, RULE, inline_padding=False)
    spatial, reduce = _spatial_loops(sch, block)
    s = sch.fuse(*spatial) if spatial else sch.add_unit_loop(block)
    if global_pool_shape(sch.get(block)) is not None:
        t = cuda_threads(sch, s, (knobs or {}).get("t"))
    else:
        b, t = sch.split(s, [None, min(64, int(sch.get(s).extent))])
        sch.bind(b, "blockIdx.x")
        sch.bind(t, "threadIdx.x")
    cuda_accumulate(sch, block, out, t, reduce[0])      # a reduction has a reduction loop


class GlobalPool(OneSpaceRule):
    """Reductions; global average pooling over H, W in NHWC gets a vectorised register tile."""
    name = RULE
    kinds = ("reduction",)
    vector_axis = "c"
