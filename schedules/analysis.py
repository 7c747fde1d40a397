"""One structural analysis of a kernel (a fused PrimFunc), shared by the rules, the build's kernel
report and the bench: what its anchor block computes, told by the roles of its iteration
variables and its access pattern, not by the function's name."""
from __future__ import annotations

from mbn_codegen._tvm import IRModule, find_anchor_sblock, tirx

# iteration-variable roles of TOPI's conv2d blocks, by data layout
_CONV_ROLES = {"nhwc": ("n", "y", "x", "f", "ry", "rx", "rc"), "nchw": ("n", "f", "y", "x", "rc", "ry", "rx")}


def _extents(iter_vars) -> list[int] | None:
    ext = [iv.dom.extent for iv in iter_vars]
    return [int(e) for e in ext] if all(isinstance(e, tirx.IntImm) for e in ext) else None


def _conv(b, ext) -> dict | None:
    layout = next((lay for lay in _CONV_ROLES if b.name_hint.endswith(f"conv2d_{lay}")), None)
    if layout is None or len(ext) != 7:
        return None
    e = dict(zip(_CONV_ROLES[layout], ext))
    grouped = b.name_hint.startswith("group_conv2d")
    if grouped and e["rc"] != 1:
        return {"kind": "grouped", "layout": layout.upper(), "block": b.name_hint, **e}
    kind = "depthwise" if grouped else ("pointwise" if e["ry"] == e["rx"] == 1 else "conv")
    macs = e["n"] * e["y"] * e["x"] * e["f"] * e["ry"] * e["rx"] * e["rc"]
    return {"kind": kind, "layout": layout.upper(), "block": b.name_hint, "macs": macs,
            "stride": max(conv_stride(b, layout)), **e}


def conv_stride(b, layout: str = "nhwc") -> tuple[int, int]:
    """(stride along y, along x) of a conv block: the coefficient of its output row (column)
    variable in the index of the 4-D input it reads."""
    iy, ix = (1, 2) if layout == "nhwc" else (2, 3)
    yv, xv = b.iter_vars[iy].var, b.iter_vars[ix].var
    return max([(1, 1)] + [(_coefficient(r.region[iy].min, yv), _coefficient(r.region[ix].min, xv))
                           for r in b.reads if len(r.region) == 4])


def _coefficient(e, var) -> int:
    if isinstance(e, tirx.Var):
        return int(e.same_as(var))
    if isinstance(e, tirx.Cast):
        return _coefficient(e.value, var)
    if isinstance(e, (tirx.Add, tirx.Sub)):
        return _coefficient(e.a, var) + (1 if isinstance(e, tirx.Add) else -1) * _coefficient(e.b, var)
    if isinstance(e, tirx.Mul):
        for v, c in ((e.a, e.b), (e.b, e.a)):
            if isinstance(c, tirx.IntImm):
                return _coefficient(v, var) * int(c.value)
    return 0


def global_pool_shape(b) -> tuple[int, int] | None:
    """(pixels, channels) when block `b` sums a 4-D NHWC tensor over its two middle axes into
    [n, 1, 1, C] with the channel innermost in both; None otherwise."""
    ivs = list(b.iter_vars)
    kinds = [iv.iter_type for iv in ivs]
    if kinds != [tirx.IterVar.DataPar] * 4 + [tirx.IterVar.CommReduce] * 2 or len(b.reads) != 1:
        return None
    ext = _extents(ivs)
    idx = [r.min for r in b.reads[0].region]
    if ext is None or ext[1] != 1 or ext[2] != 1 or len(idx) != 4:
        return None
    want = [ivs[0].var, ivs[4].var, ivs[5].var, ivs[3].var]
    if not all(i.same_as(w) for i, w in zip(idx, want)):
        return None
    return ext[4] * ext[5], ext[3]


def _dense(b, ext) -> dict | None:
    """out[i, n] += x[i, k] * W[k, n]: three iter vars (spatial i, n; reduction k), the weight read
    indexed [k, n] (after the transpose of Gemm's W is folded at compile time)."""
    if len(ext) != 3 or len(b.reads) != 2 or ext[0] != 1:
        return None
    idx = [r.min for r in b.reads[1].region]
    k_var, n_var = b.iter_vars[2].var, b.iter_vars[1].var
    if len(idx) != 2 or not (idx[0].same_as(k_var) and idx[1].same_as(n_var)):
        return None
    return {"kind": "dense", "block": b.name_hint, "n": ext[1], "k": ext[2], "macs": ext[1] * ext[2]}


def analyze(func) -> dict | None:
    """{"kind": depthwise | pointwise | conv | grouped | dense | reduction, "block": anchor block,
    extents by role, "macs"}; None for kernels without a compute anchor (copies, reshapes)."""
    if not isinstance(func, tirx.PrimFunc):
        return None
    try:
        b = find_anchor_sblock(IRModule({"main": func}))
    except Exception:          # several anchors, or none: not a single-operator kernel
        return None
    if b is None:
        return None
    ext = _extents(b.iter_vars)
    if ext is None:
        return None
    info = _conv(b, ext) or _dense(b, ext)
    if info is not None:
        return info
    if any(iv.iter_type == tirx.IterVar.CommReduce for iv in b.iter_vars):
        shape = global_pool_shape(b)
        pool = {"pixels": shape[0], "c": shape[1]} if shape else {}
        return {"kind": "reduction", "block": b.name_hint, **pool}
    return None
