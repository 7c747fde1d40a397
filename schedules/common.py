"""What our schedules share: recognising conv blocks, the target's vector width, and helpers that
either sample a knob (under tuning) or take a given decision (our untuned defaults)."""
from __future__ import annotations

from mbn_codegen._tvm import IRModule, find_anchor_sblock, target_has_features, tirx


def simd(target) -> tuple[int, int]:
    """(fp32 lanes of one vector register, number of vector registers), asked of LLVM's view of
    the target (its -mcpu/-mattr), not looked up by CPU name: AVX-512 16 x 32, AVX/AVX2 8 x 16,
    NEON 4 x 32, SSE 4 x 16."""
    if target.kind.name != "llvm":
        return 1, 0
    if target_has_features("avx512f", target):
        return 16, 32
    if target_has_features("avx", target):
        return 8, 16
    if target_has_features("neon", target):
        return 4, 32
    return 4, 16


def vector_lanes(target) -> int:
    return simd(target)[0]


def conv_info(func) -> dict | None:
    """For a fused PrimFunc around an NHWC conv2d: the anchor block name, the extents of its
    iter vars by role, and whether it is depthwise. None for anything else."""
    try:
        b = find_anchor_sblock(IRModule({"main": func}))
    except Exception:
        return None
    if b is None or not b.name_hint.endswith("conv2d_nhwc") or len(b.iter_vars) != 7:
        return None
    ext = {}
    for iv, role in zip(b.iter_vars, ("n", "y", "x", "f", "ry", "rx", "rc")):
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return None
        ext[role] = int(iv.dom.extent)
    depthwise = b.name_hint.startswith("group_conv2d") and ext["rc"] == 1
    if b.name_hint.startswith("group_conv2d") and not depthwise:
        return None                        # grouped but not depthwise: not ours
    kind = "depthwise" if depthwise else ("pointwise" if ext["ry"] == ext["rx"] == 1 else "conv")
    return {"block": b.name_hint, "kind": kind, **ext}


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def lanes_for(channels: int, lanes: int) -> int:
    """The widest power-of-two vector <= lanes that divides the channel count."""
    v = lanes
    while v > 1 and channels % v:
        v //= 2
    return v


def tile(sch, loop, n: int, max_inner: int, decision: list[int] | None):
    """Split `loop` in n perfect factors: sampled under tuning, fixed to `decision` otherwise.
    Either way the trace holds a SamplePerfectTile, so a default is a point of the tuned space."""
    factors = sch.sample_perfect_tile(loop, n=n, max_innermost_factor=max_inner, decision=decision)
    return sch.split(loop, factors)


def choose(sch, candidates: list[int], decision: int | None):
    """A categorical knob (index `decision` into candidates when fixed)."""
    return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates), decision=decision)


def inline_producers(sch, block) -> None:
    for p in sch.get_producers(block):
        sch.compute_inline(p)


def fuse_epilogue(sch, block):
    """conv -> add -> relu(/min/max): inline all but the last elementwise consumer into the last,
    which is returned (it writes the function's output)."""
    chain = []
    cur = block
    while True:
        cs = sch.get_consumers(cur)
        if len(cs) != 1:
            break
        chain.append(cs[0])
        cur = cs[0]
    for b in chain[:-1]:
        sch.compute_inline(b)
    return chain[-1] if chain else None


def cpu_conv_prologue(sch, block, rule: str, lanes: int, k: dict):
    """The shared start of our NHWC CPU conv schedules: mark the block (the marker survives into
    the built IR, proof of use), inline the padding, fuse the epilogue, and tile the row of
    pixels (x) and the output channels into vectors (f). Returns the epilogue block, the vector
    width and the loops (n, y, x0, x1, f0, f1, fv, ry, rx, rc)."""
    sch.annotate(block, "mbn_schedule", rule)
    inline_producers(sch, block)
    out = fuse_epilogue(sch, block)
    n, y, x, f, ry, rx, rc = sch.get_loops(block)
    v = lanes_for(int(sch.get(f).extent), lanes)
    x0, x1 = tile(sch, x, 2, 8, k.get("x"))
    fo, fv = sch.split(f, [None, v])
    f0, f1 = tile(sch, fo, 2, 4, k.get("f"))
    return out, v, (n, y, x0, x1, f0, f1, fv, ry, rx, rc)
