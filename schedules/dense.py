"""The classifier: out[n] = sum_k x[k] * W[k, n] (batch 1, weights [K, N] after the transpose is
folded at compile time), a matrix-vector product bound by reading W once (4 MB for 1024x1000).

CPU: vectors run along n, which is contiguous in W, so each weight row segment is one aligned
load; `n_in` vectors per task give independent FMA chains (a single chain would wait on FMA
latency, 4 cycles, every step), and tasks over n are spread across cores.
"""
from __future__ import annotations

from .common import (OneSpaceRule, cpu_epilogue, cuda_accumulate, cuda_prologue, fuse_epilogue, lanes_for,
                     largest_divisor, tile)

RULE = "mbn_dense"


def cpu_knobs(info: dict, lanes: int, _registers: int) -> dict:
    v = lanes_for(info["n"], lanes)
    vecs = info["n"] // v
    n_in = largest_divisor(vecs, 4)
    kc = largest_divisor(info["k"], 64)
    return {"n": [vecs // n_in, n_in], "k": [info["k"] // kc, kc]}


def schedule_cpu(sch, block, lanes: int, knobs: dict | None = None) -> None:
    """Knobs: n (vectors per task), k (reduction blocking)."""
    k = knobs or {}
    sch.annotate(block, "mbn_schedule", RULE)
    out = fuse_epilogue(sch, block)
    i0, n, kk = sch.get_loops(block)
    v = lanes_for(int(sch.get(n).extent), lanes)
    no, nv = sch.split(n, [None, v])
    n0, n1 = tile(sch, no, 2, 8, k.get("n"))
    k0, k1 = tile(sch, kk, 2, 64, k.get("k"))
    sch.reorder(i0, n0, k0, k1, n1, nv)
    sch.parallel(n0)
    if out is not None:
        sch.reverse_compute_at(out, n0, preserve_unit_loops=True)
    sch.vectorize(nv)
    sch.unroll(n1)
    sch.decompose_reduction(block, k0)
    cpu_epilogue(sch, out, v)


def cuda_knobs(info: dict) -> dict:
    t = largest_divisor(info["n"], 256)
    return {"n": [info["n"] // t, t]}


def schedule_cuda(sch, block, knobs: dict | None = None) -> None:
    """A thread per output; consecutive threads read consecutive n of a weight row (coalesced)."""
    k = knobs or {}
    out = cuda_prologue(sch, block, RULE)
    i0, n, kk = sch.get_loops(block)
    b, t = tile(sch, sch.fuse(i0, n), 2, 512, k.get("n"))
    sch.bind(b, "blockIdx.x")
    sch.bind(t, "threadIdx.x")
    cuda_accumulate(sch, block, out, t, kk)


class Dense(OneSpaceRule):
    """The classifier's matrix-vector product, weights [K, N]."""
    name = RULE
    vector_axis = "n"

    def matches(self, info: dict) -> bool:
        return info["kind"] == "dense"

    schedule_cpu = staticmethod(schedule_cpu)
    schedule_cuda = staticmethod(schedule_cuda)
    cpu_knobs = staticmethod(cpu_knobs)
    cuda_knobs = staticmethod(cuda_knobs)
