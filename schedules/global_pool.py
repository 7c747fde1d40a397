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
from .common import OneSpaceRule, cpu_epilogue, fuse_epilogue, lanes_for, largest_divisor, tile

RULE = "mbn_global_pool"
PARALLEL_MIN_READS = 1 << 16


def pool_shape(sch, block) -> tuple[int, int] | None:
    """(pixels, channels) of a global pool (see analysis.global_pool_shape); None otherwise."""
    return global_pool_shape(sch.get(block))


def _spatial_loops(sch, block) -> tuple[list, list]:
    loops = sch.get_loops(block)
    kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
    n_spatial = len(kinds) - sum(k == tirx.IterVar.CommReduce for k in kinds)
    return loops[:n_spatial], loops[n_spatial:]


def cpu_knobs(info: dict, lanes: int, _registers: int) -> dict:
    c = info.get("c")
    if c is None:
        return {}
    v = lanes_for(c, lanes)
    vecs = c // v
    c_in = largest_divisor(vecs, 4)
    return {"c": [vecs // c_in, c_in]}


def schedule_cpu(sch, block, lanes: int, knobs: dict | None = None) -> None:
    """Knob: c (vectors of channels per register tile)."""
    k = knobs or {}
    sch.annotate(block, "mbn_schedule", RULE)
    out = fuse_epilogue(sch, block)
    shape = pool_shape(sch, block)
    if shape is None:
        spatial, _ = _spatial_loops(sch, block)
        if spatial:
            outer = sch.fuse(*spatial)
            sch.parallel(outer)
            if out is not None:
                sch.reverse_compute_at(out, outer, preserve_unit_loops=True)
        return
    pixels, c = shape
    n, one_y, one_x, f, ry, rx = sch.get_loops(block)
    v = lanes_for(c, lanes)
    fo, fv = sch.split(f, [None, v])
    f0, f1 = tile(sch, fo, 2, 8, k.get("c"))
    sch.reorder(n, one_y, one_x, f0, ry, rx, f1, fv)
    if pixels * c >= PARALLEL_MIN_READS:
        sch.parallel(f0)
    if out is not None:
        sch.reverse_compute_at(out, f0, preserve_unit_loops=True)
    sch.vectorize(fv)
    sch.unroll(f1)
    sch.decompose_reduction(block, ry)
    cpu_epilogue(sch, out, v)


def cuda_knobs(info: dict) -> dict:
    c = info.get("c")
    if c is None:
        return {}
    t = largest_divisor(c, 256)
    return {"t": [c // t, t]}


def schedule_cuda(sch, block, knobs: dict | None = None) -> None:
    """One thread per output channel (a warp reads 32 consecutive channels of a pixel:
    coalesced in NHWC), summing the pixels in a register. Knob: t (threads per block)."""
    k = knobs or {}
    sch.annotate(block, "mbn_schedule", RULE)
    out = fuse_epilogue(sch, block)
    spatial, reduce = _spatial_loops(sch, block)
    s = sch.fuse(*spatial) if spatial else sch.add_unit_loop(block)
    if pool_shape(sch, block) is not None:
        b, t = tile(sch, s, 2, 512, k.get("t"))
    else:
        b, t = sch.split(s, [None, 64 if int(sch.get(s).extent) >= 64 else int(sch.get(s).extent)])
    sch.bind(b, "blockIdx.x")
    sch.bind(t, "threadIdx.x")
    sch.set_scope(block, 0, "local")
    if out is not None:
        sch.reverse_compute_at(out, t, preserve_unit_loops=True)
    if reduce:
        sch.decompose_reduction(block, reduce[0])


class GlobalPool(OneSpaceRule):
    """Reductions; global average pooling over H, W in NHWC gets a vectorised register tile."""
    name = RULE
    vector_axis = "c"

    def matches(self, info: dict) -> bool:
        return info["kind"] == "reduction"

    schedule_cpu = staticmethod(schedule_cpu)
    schedule_cuda = staticmethod(schedule_cuda)
    cpu_knobs = staticmethod(cpu_knobs)
    cuda_knobs = staticmethod(cuda_knobs)
