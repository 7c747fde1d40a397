"""Which schedule serves each kernel: classification of fused PrimFuncs and the schedule phase."""
from __future__ import annotations

from collections import Counter

from ._tvm import IRModule, Schedule, dlight, ms, relax, tirx, tvm
from . import schedules
from .schedules import analyze


def _call_tir_sites(mod: IRModule):
    """Every call_tir binding of the module's Relax functions: (kernel GlobalVar, its arguments)."""
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            for block in func.body.blocks:
                for b in block.bindings:
                    if isinstance(b.value, relax.Call) and b.value.op.same_as(call_tir):
                        yield b.value.args[0], b.value.args[1].fields


def _scheduled(f) -> bool:
    return bool((f.attrs or {}).get("tirx.is_scheduled", False))


def _kernels(mod: IRModule) -> dict:
    """The module's PrimFuncs by name."""
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}


def prepacks_weights(ctx) -> bool:
    """CPU kernels read constant weights in a layout packed for their loop order (a GEMM library
    packs its B panel the same way): HWIO's 4 KB row stride in the 1024-channel layers put every
    weight row of the channel loop on another page. The packing runs at compile time."""
    default = ctx.schedules == "ours" or ctx.database is not None
    return ctx.device == "cpu" and (default if ctx.prepack_weights is None else ctx.prepack_weights)


def mark_layout_free(mod: IRModule, ctx) -> IRModule:
    """Tell MetaSchedule which PrimFunc params are constant weights (free to re-layout); tuning
    extracts its tasks after this too, so database keys match. (TVM's AttachAttrLayoutFreeBuffers
    does the same but renames every kernel; this keeps the names users see in reports.)"""
    if not prepacks_weights(ctx):
        return mod
    from ._tvm import Constant

    seen: dict = {}
    for gv, args in _call_tir_sites(mod):
        seen.setdefault(gv, set()).add(tuple(i for i, a in enumerate(args) if isinstance(a, Constant)))
    out = IRModule(mod.functions, attrs=mod.attrs)
    for gv, idx_sets in seen.items():
        if len(idx_sets) == 1:
            out[gv] = mod[gv].with_attr("layout_free_buffers", list(next(iter(idx_sets))))
    return out


def apply_schedules(mod: IRModule, ctx) -> IRModule:
    """The schedule phase: each kernel gets the first of a tuned record from the database, our
    rule with its default knobs, dlight (CUDA) or TVM's naive loops (CPU)."""
    mod = mark_layout_free(mod, ctx)          # keeps kernel names (those reports show)
    prepack = prepacks_weights(ctx)
    info = {n: analyze(f) or {} for n, f in _kernels(mod).items()}
    kinds = {n: i.get("kind", "other") for n, i in info.items()}
    macs = {n: i.get("macs") for n, i in info.items()}
    calls = Counter(gv.name_hint for gv, _ in _call_tir_sites(mod))   # identical layers share a kernel
    source: dict[str, str] = {}
    if ctx.database is not None:
        with ctx.target, ctx.database, tvm.transform.PassContext(opt_level=3):
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        source.update({n: "tuned" for n, f in _kernels(mod).items() if _scheduled(f)})
    if ctx.schedules == "ours":
        choice = ctx.kernel_timings                          # CUDA: ours or dlight, per kernel
        for gv, f in list(mod.functions.items()):
            if isinstance(f, tirx.PrimFunc) and not _scheduled(f):
                pick, why = choice.pick(kinds.get(gv.name_hint), macs.get(gv.name_hint)) if choice else ("ours", "")
                if pick == "dlight":
                    source[gv.name_hint] = f"dlight:{why}"
                    continue
                r = schedules.default_schedule(f, ctx.target)
                if r is not None:
                    fn = r[0]
                    if prepack:
                        sch = Schedule(fn)
                        ms.postproc.RewriteLayout().apply(sch)      # what tuning's postproc does
                        fn = sch.mod["main"]
                    mod[gv] = fn
                    source[gv.name_hint] = f"ours-default:{r[1]}" + (f":{why}" if why else "")
    if ctx.device == "cuda":
        with ctx.target:
            mod = dlight.ApplyDefaultSchedule(dlight.gpu.Matmul(), dlight.gpu.GEMV(), dlight.gpu.Reduction(),
                                              dlight.gpu.GeneralReduction(), dlight.gpu.Fallback())(mod)
    if prepack:
        # the packing blocks become their own functions on constants, then are folded away
        mod = relax.transform.SplitLayoutRewritePreproc()(mod)
        mod = relax.transform.FoldConstant()(mod)
    fallback = "dlight" if ctx.device == "cuda" else "tvm-stock"
    names = {gv.name_hint for gv in mod.functions}
    ctx.notes["kernels"] = [{"name": n, "symbol": f"{n}_prepacked" if f"{n}_prepacked" in names else n,
                             "kind": k, "source": source.get(n, fallback), "macs": macs.get(n),
                             "calls": calls.get(n, 0)}
                            for n, k in sorted(kinds.items())]
    return mod
