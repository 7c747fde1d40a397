"""The classifier: out[n] = sum_k x[k] * W[k, n] (batch 1, weights [K, N] after the transpose is
folded at compile time), a matrix-vector product bound by reading W once (4 MB for 1024x1000).

CPU: vectors run along n, which is contiguous in W, so each weight row segment is one aligned
load; `n_in` vectors per task give independent FMA chains (a single chain would wait on FMA
latency, 4 cycles, every step), and tasks over n are spread across cores.
"""
from __future__ import annotations

from mbn_codegen._tvm import IRModule, find_anchor_sblock, tirx

from .common import fuse_epilogue, lanes_for, largest_divisor, tile

RULE = "mbn_dense"


def info_of(func) -> dict | None:
    try:
        b = find_anchor_sblock(IRModule({"main": func}))
    except Exception:
        return None
    if b is None or b.name_hint != "matmul" or len(b.iter_vars) != 3 or len(b.reads) != 2:
        return None
    ext = [iv.dom.extent for iv in b.iter_vars]
    if not all(isinstance(e, tirx.IntImm) for e in ext) or int(ext[0]) != 1:
        return None
    w = b.reads[1]
    idx = [r.min for r in w.region]
    k_var, n_var = b.iter_vars[2].var, b.iter_vars[1].var
    if len(idx) != 2 or not (idx[0].same_as(k_var) and idx[1].same_as(n_var)):
        return None
    return {"block": "matmul", "kind": "dense", "n": int(ext[1]), "k": int(ext[2])}


def applies(func) -> bool:
    return info_of(func) is not None


def default_knobs(info: dict, lanes: int, registers: int) -> dict:
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
    if out is not None:
        ol = sch.get_loops(out)
        sch.vectorize(sch.split(ol[-1], [None, v])[-1])


def default_knobs_cuda(info: dict) -> dict:
    t = largest_divisor(info["n"], 256)
    return {"n": [info["n"] // t, t]}


def schedule_cuda(sch, block, knobs: dict | None = None) -> None:
    """A thread per output; consecutive threads read consecutive n of a weight row (coalesced)."""
    k = knobs or {}
    sch.annotate(block, "mbn_schedule", RULE)
    out = fuse_epilogue(sch, block)
    i0, n, kk = sch.get_loops(block)
    b, t = tile(sch, sch.fuse(i0, n), 2, 512, k.get("n"))
    sch.bind(b, "blockIdx.x")
    sch.bind(t, "threadIdx.x")
    sch.set_scope(block, 0, "local")
    if out is not None:
        sch.reverse_compute_at(out, t, preserve_unit_loops=True)
    sch.decompose_reduction(block, kk)
