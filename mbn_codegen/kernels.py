"""Which schedule serves each kernel: classification of fused PrimFuncs and the schedule phase."""
from __future__ import annotations

from ._tvm import IRModule, find_anchor_sblock, tirx, tvm


def conv_kind(func) -> str | None:
    """'depthwise' | 'pointwise' | 'conv' | 'dense' | 'pool' | None, from the anchor block."""
    try:
        b = find_anchor_sblock(IRModule({"main": func}))
    except Exception:
        return None
    if b is None:
        return None
    name = b.name_hint
    ext = [int(v.dom.extent) if isinstance(v.dom.extent, tirx.IntImm) else -1 for v in b.iter_vars]
    if "conv2d" in name and len(ext) == 7:
        if name.startswith("group_conv2d") and ext[4] == 1:
            return "depthwise"
        return "pointwise" if ext[5] == ext[6] == 1 else "conv"
    if "matmul" in name or "dense" in name:
        return "dense"
    if "sum" in name or "mean" in name or "pool" in name:
        return "pool"
    return None


def kernel_table(mod: IRModule) -> list[dict]:
    rows = []
    for gv, f in mod.functions.items():
        if isinstance(f, tirx.PrimFunc):
            attrs = f.attrs or {}
            rows.append({"name": gv.name_hint, "kind": conv_kind(f) or "other",
                         "scheduled": bool(attrs.get("tirx.is_scheduled", False))})
    return sorted(rows, key=lambda r: r["name"])


def apply_schedules(mod: IRModule, ctx) -> IRModule:
    src = {}
    if ctx.database is not None:
        from ._tvm import relax
        with ctx.target, ctx.database, tvm.transform.PassContext(opt_level=3):
            tuned = relax.transform.MetaScheduleApplyDatabase()(mod)
        for row in kernel_table(tuned):
            src[row["name"]] = "tuned" if row["scheduled"] else None
        mod = tuned
    default_src = "dlight" if ctx.device == "cuda" else "tvm-stock"
    ctx.notes["kernels"] = [dict(r, source=src.get(r["name"]) or default_src) for r in kernel_table(mod)]
    return mod
