"""The classifier: out[n] = sum_k x[k] * W[k, n] (batch 1, weights [K, N] after the transpose is
folded at compile time), a matrix-vector product bound by reading W once (4 MB for 1024x1000).

CPU: vectors run along n, which is contiguous in W, so each weight row segment is one aligned
load; `n_in` vectors per task give independent FMA chains (a single chain would wait on FMA
latency, 4 cycles, every step), and tasks over n are spread across cores.
"""
from __future__ import annotations

from .common import OneSpaceRule, cpu_finish, cuda_accumulate, cuda_threads, lanes_for, prologue, split_by, tile

RULE = "mbn_dense"


def cpu_knobs(info: dict, lanes: int, _registers: int) -> dict:
    vecs = info["n"] // lanes_for(info["n"], lanes)
    return {"n": split_by(vecs, 4), "k": split_by(info["k"], 64)}


def schedule_cpu(sch, block, lanes: int, knobs: dict | None = None) -> None:
    """Knobs: n (vectors per task), k (reduction blocking)."""
    k = knobs or {}
    out = prologue(sch, block, RULE, inline_padding=False)
    i0, n, kk = sch.get_loops(block)
    v = lanes_for(int(sch.get(n).extent), lanes)
    no, nv = sch.split(n, [None, v])
    n0, n1 = tile(sch, no, 2, 8, k.get("n"))
    k0, k1 = tile(sch, kk, 2, 64, k.get("k"))
    sch.reorder(i0, n0, k0, k1, n1, nv)
    sch.parallel(n0)
    cpu_finish(sch, block, out, n0, nv, [n1], k0, v)


def cuda_knobs(info: dict) -> dict:
    return {"n": split_by(info["n"], 256)}


def schedule_cuda(sch, block, knobs: dict | None = None) -> None:
    """A thread per output; consecutive threads read consecutive n of a weight row (coalesced)."""
    out = prologue(sch, block, RULE)
    i0, n, kk = sch.get_loops(block)
    t = cuda_threads(sch, sch.fuse(i0, n), (knobs or {}).get("n"))
    cuda_accumulate(sch, block, out, t, kk)


class Dense(OneSpaceRule):
    """The classifier's matrix-vector product, weights [K, N]."""
    name = RULE
    kinds = ("dense",)
    vector_axis = "n"
