"""ONNX -> Relax -> scheduled IRModule, as named phases (mlc-llm style).

Each phase is `fn(mod, ctx) -> mod`; `lower(..., dump_ir=DIR)` writes the IR after every phase to
DIR/NN-<phase>.py, so a user can see exactly what each step did.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ._tvm import Constant, IRModule, Schedule, Target, dpl, from_onnx, onnx_frontend, relax, tirx, tvm
from .channel_pad import conv2d_like, pad_channels, pad_columns, rewrite_relax
from .errors import LoweringError, MbnError, OnnxModelError
from .kernels import apply_schedules
from .schedules import analyze, simd
from .schedules.pointwise import column_padding


@dataclass
class LowerContext:
    target: Target
    device: str                        # "cpu" | "cuda"
    input_name: str
    input_shape: tuple[int, ...]
    schedules: str = "ours"            # "ours": our rules (NHWC); "stock": TVM's defaults (NCHW)
    layout: str | None = None          # None: NHWC with our schedules, NCHW for stock
    database: object | None = None     # a MetaSchedule database; its records win where present
    prepack_weights: bool | None = None  # None: on CPU with our schedules or a database
    propagate_nan: bool = False        # Relu/Clip as ONNX defines them (NaN in, NaN out)
    kernel_timings: object | None = None  # CUDA: cuda.KernelChoice, ours or dlight per kernel
    cuda_graph: bool = False           # CUDA: the kernels after the input's are one captured graph
    notes: dict = field(default_factory=dict)   # phases report what they did here


@contextlib.contextmanager
def _clip_as_min_max():
    """ONNX Clip (torch's ReLU6) imports as call_tir to TE min/max PrimFuncs plus an isnan/where
    guard, which layout conversion and fusion cannot see through. With constant bounds it is just
    minimum(maximum(x, lo), hi)."""
    orig = onnx_frontend.Clip._impl_v13.__func__

    def _clip(cls, bb, inputs, attr, params):
        x, lo, hi = (list(inputs) + [None, None])[:3]
        if isinstance(lo, Constant) and isinstance(hi, Constant):
            return relax.op.minimum(relax.op.maximum(x, lo), hi)
        return orig(cls, bb, inputs, attr, params)

    onnx_frontend.Clip._impl_v13 = classmethod(_clip)
    try:
        yield
    finally:
        onnx_frontend.Clip._impl_v13 = classmethod(orig)


def import_onnx(onnx_model, ctx: LowerContext) -> IRModule:
    from .export import fold_shapes

    try:
        onnx_model = fold_shapes(onnx_model, ctx.input_shape)
        with _clip_as_min_max():
            return from_onnx(onnx_model, shape_dict={ctx.input_name: list(ctx.input_shape)})
    except Exception as e:
        if "KeyboardInterrupt" in str(e):
            raise KeyboardInterrupt from None
        raise OnnxModelError(f"TVM's ONNX frontend cannot import this model: {type(e).__name__}: "
                             f"{str(e).strip().splitlines()[-1][:300]}") from None


def _fold_bn_into_conv(mod: IRModule, _ctx: LowerContext) -> IRModule:
    """conv2d(x, W) -> batch_norm(.., g, b, mean, var)[0]  ==>  conv2d(x, W*s) + (b - mean*s),
    s = g / sqrt(var + eps). Removes the BN from the graph instead of leaving four elementwise
    ops per layer for the fuser."""
    w = dpl.is_const()
    conv = dpl.is_op("relax.nn.conv2d")(dpl.wildcard(), w)
    gamma, beta, mean, var = dpl.is_const(), dpl.is_const(), dpl.is_const(), dpl.is_const()
    bn = dpl.is_op("relax.nn.batch_norm")(conv, gamma, beta, mean, var)

    def rewriter(_expr, m):
        conv_call, bn_call = m[conv], m[bn]
        if conv_call.attrs.kernel_layout != "OIHW" or int(bn_call.attrs.axis) != 1:
            return _expr
        g, b, mu, v = (m[p].value.numpy().astype("float64") for p in (gamma, beta, mean, var))
        s = g / np.sqrt(v + float(bn_call.attrs.epsilon))
        wt = m[w].value.numpy()
        new_w = (wt.astype("float64") * s[:, None, None, None]).astype(wt.dtype)
        bias = (b - mu * s).astype(wt.dtype).reshape(1, -1, 1, 1)
        new_conv = conv2d_like(conv_call.attrs, conv_call.args[0], relax.const(new_w))
        return relax.op.add(new_conv, relax.const(bias))

    return relax.transform.DeadCodeElimination()(rewrite_relax(mod, (dpl.is_tuple_get_item(bn, 0), rewriter)))


def _decompose(mod: IRModule, _ctx: LowerContext) -> IRModule:
    """BatchNorm not after a conv (and any other training-style op) becomes plain arithmetic, and
    R.clip with constant bounds (the frontend's HardSwish and HardSigmoid) becomes min/max:
    ConvertLayout has no rule for R.clip and would wrap every one in NHWC->NCHW->NHWC transposes;
    minimum/maximum are elementwise ops it converts in place."""
    x, lo, hi = dpl.wildcard(), dpl.wildcard(), dpl.wildcard()
    clip = dpl.is_op("relax.clip")(x, lo, hi)

    def _bound(e):           # an IntImm/FloatImm, or one wrapped in a PrimValue
        while e is not None and not isinstance(e, (int, float)):
            e = getattr(e, "value", None)
        return None if e is None else float(e)

    def _rewrite(expr, m):
        v, a, b = m[x], _bound(m[lo]), _bound(m[hi])
        dtype = str(getattr(v.ty, "dtype", ""))
        if a is None or b is None or not dtype.startswith("float"):
            return expr
        return relax.op.minimum(relax.op.maximum(v, relax.const(a, dtype)), relax.const(b, dtype))

    mod = relax.transform.DecomposeOpsForInference()(mod)
    return relax.transform.FoldConstant()(rewrite_relax(mod, (clip, _rewrite)))


def _layout(mod: IRModule, ctx: LowerContext) -> IRModule:
    """NHWC activations with HWIO weights for our schedules: channels are contiguous, so SIMD
    lanes (CPU) and warp lanes (CUDA) run along channels, which every MobileNet layer has in
    multiples of 8; HWIO puts a pointwise weight row (all output channels of one input channel)
    in one contiguous run."""
    if ctx.layout is None:
        ctx.layout = "NHWC" if ctx.schedules == "ours" else "NCHW"
    if ctx.layout == "NCHW":
        return mod
    return relax.transform.FoldConstant()(relax.transform.ConvertLayout({"relax.nn.conv2d": [ctx.layout, "HWIO"]})(mod))


def _pad_channels(mod: IRModule, ctx: LowerContext) -> IRModule:
    """Channel counts that are not a multiple of the vector width (alpha 0.3 gives 10, 19, ...,
    307) padded to one, so our CPU schedules run them on full vectors, not scalars (see
    mbn_codegen/channel_pad.py). At most 8 lanes: AVX-512's 16 would pad MobileNet v2's 24-channel
    layers by a third, and they already run on 8-lane vectors. Then pointwise rows too narrow for
    a full register tile (7x7 maps on AVX2) get zero columns (`column_padding`)."""
    if ctx.layout != "NHWC" or ctx.device != "cpu":
        return mod
    lanes, registers = simd(ctx.target)
    mod = pad_channels(mod, min(lanes, 8))
    return pad_columns(mod, lambda y, x, f, c: column_padding(y, x, f, c, lanes, registers))


def _legalize_fuse(mod: IRModule, ctx: LowerContext) -> IRModule:
    """TVM's legalize+fuse passes, minus the GPU backend's trailing dlight pass: scheduling is the
    next phase's job, so tuned records and our rules get the unscheduled kernels first."""
    passes = [relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
              relax.transform.FoldConstant(), relax.transform.FuseOps(), relax.transform.FuseTIR()]
    if ctx.propagate_nan:
        mod = _guard_nan(mod)
    with ctx.target:
        mod = tvm.transform.Sequential(passes)(mod)
    return _merge_branching_epilogues(mod)


def _guard_nan(mod: IRModule) -> IRModule:
    """Compiled max/min return the non-NaN operand (IEEE maxNum), so ReLU/ReLU6 turn a NaN into 0
    or 6, while ONNX (and ONNX Runtime) pass NaN through. relu(x) and min(max(x, lo), hi) become
    where(isnan(x), x, ...). Done after the layout phase: ConvertLayout has no rule for where and
    would wrap it in transposes."""
    x, lo, hi = dpl.wildcard(), dpl.is_const(), dpl.is_const()
    relu = dpl.is_op("relax.nn.relu")(x)
    clip = dpl.is_op("relax.minimum")(dpl.is_op("relax.maximum")(x, lo), hi)

    # the guarded forms (maximum(x, 0), maximum(minimum(x, hi), lo)) do not match again
    def _relu(_expr, m):
        v = m[x]
        zero = relax.const(0, v.ty.dtype)
        return relax.op.where(relax.op.isnan(v), v, relax.op.maximum(v, zero))

    def _clip(_expr, m):
        v = m[x]
        return relax.op.where(relax.op.isnan(v), v, relax.op.maximum(relax.op.minimum(v, m[hi]), m[lo]))

    return rewrite_relax(mod, (relu, _relu), (clip, _clip))


def _merge_branching_epilogues(mod: IRModule) -> IRModule:
    """A fused kernel whose elementwise epilogue reads an intermediate twice (HardSwish:
    t * min(max(t + 3, 0), 6) / 6; the NaN guard where(isnan(t), t, relu(t))) branches, and our
    schedules follow one chain of consumers from the conv, so they would leave it as naive loops
    after the conv's nest. Inlining every elementwise block into the output block leaves
    conv -> one epilogue block. Kernels with a linear epilogue are left as they are (the tuning
    databases hold them by their structure)."""
    out = IRModule(mod.functions, attrs=mod.attrs)
    for gv, f in mod.functions.items():
        info = analyze(f) if isinstance(f, tirx.PrimFunc) else None
        if info is None or "block" not in info:
            continue
        sch = Schedule(f)
        root = sch.get_sblock("root")
        outputs = {sch.get(b).name_hint for b in sch.get_output_blocks(root)}
        anchor = sch.get_sblock(info["block"])
        epilogue, seen, frontier = [], set(outputs), [anchor]
        while frontier:
            for c in sch.get_consumers(frontier.pop()):
                name = sch.get(c).name_hint
                if name not in seen:
                    seen.add(name)
                    epilogue.append(c)
                    frontier.append(c)
        if not any(len(sch.get_consumers(b)) > 1 for b in [anchor, *epilogue]):
            continue
        for b in epilogue:
            sch.compute_inline(b)
        out[gv] = sch.mod["main"]
    return out


PHASES: list[tuple[str, Callable[[IRModule, LowerContext], IRModule]]] = [
    ("fold-batchnorm", _fold_bn_into_conv),
    ("decompose", _decompose),
    ("layout", _layout),
    ("pad-channels", _pad_channels),
    ("legalize-fuse", _legalize_fuse),
    ("schedule", apply_schedules),
]


def lower(onnx_model, ctx: LowerContext, dump_ir: str | Path | None = None,
          log: Callable[[str], None] | None = None) -> IRModule:
    """Run every phase; returns the scheduled module that `build_module` compiles."""
    dump = Path(dump_ir) if dump_ir else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
    seconds = ctx.notes.setdefault("phase_seconds", {})
    mod = None
    for i, (name, fn) in enumerate([("import", lambda _mod, c: import_onnx(onnx_model, c)), *PHASES]):
        t0 = time.perf_counter()
        try:
            mod = fn(mod, ctx)
        except Exception as e:
            raise phase_error(name, e) from None
        seconds[name] = time.perf_counter() - t0
        if log and i:
            log(f"  phase {name:<15} {seconds[name]:6.2f} s")
        if dump:
            (dump / f"{i:02d}-{name}.py").write_text(mod.script(show_meta=False))
    return mod


_OP = re.compile(r"\b(?:R|relax)\.((?:nn\.|image\.)?[a-z_][a-z0-9_]*)\(")


def phase_error(phase: str, e: BaseException) -> BaseException:
    """A failure inside TVM as a LoweringError naming the phase (and the operator, when TVM's
    message shows one); a KeyboardInterrupt that TVM wrapped into its own error stays one."""
    if isinstance(e, MbnError):
        return e
    text = str(e)
    if "KeyboardInterrupt" in text:
        return KeyboardInterrupt()
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # TVM's messages end with the error after a C++ traceback; Python's start with it
    msg = (lines[-1] if "Traceback" in text else " ".join(lines)) if lines else "(no message)"
    if len(msg) > 300:
        msg = msg[:300] + "..."
    ops = [m for m in _OP.findall(text)
           if m not in ("call_tir", "const", "dataflow", "function", "output", "shape", "prim_value", "tuple")]
    op = f" at operator {ops[0]!r}" if ops else ""
    return LoweringError(
        f"lowering phase {phase!r} failed{op}: {type(e).__name__}: {msg}. The model uses a "
        "construct this pipeline does not handle there: run `mbn-codegen build --dump-ir DIR` to "
        f"see the IR that entered {phase!r}, and simplify the export (e.g. torch.onnx.export with "
        "do_constant_folding=True and fixed input shapes) or report it with the ONNX file")


def build_module(mod: IRModule, ctx: LowerContext):
    """The VM executable: dataflow lowering and finalisation of the already-fused module."""
    try:
        backend = relax.backend.cuda.pipeline if ctx.device == "cuda" else relax.backend.cpu_generic.pipeline
        # relax.build runs the pipeline inside the target's scope
        pipeline = tvm.transform.Sequential(backend.dataflow_lower_passes(ctx.target)
                                            + backend.finalize_passes(ctx.target))
        # RewriteCUDAGraph (in the CUDA finalize passes) does nothing unless asked: it lifts the
        # kernels on statically planned memory into a function captured once and replayed
        config = {"relax.backend.use_cuda_graph": ctx.device == "cuda" and ctx.cuda_graph}
        with tvm.transform.PassContext(opt_level=3, config=config):
            return tvm.compile(mod, target=ctx.target, relax_pipeline=pipeline)
    except Exception as e:
        raise phase_error("compile", e) from None
