"""Channel counts padded to the vector width, so a layer of 9, 19 or 307 channels (alpha 0.3) runs
on full vectors instead of scalars.

Works on the NHWC graph after the layout phase, where channels are the last axis of every
activation. A convolution whose output channels are not a multiple of `multiple` gets zero
weight columns up to the next multiple; every consumer that treats channels independently
(bias, activations, depthwise convolutions, spatial means, elementwise products) runs on the
padded tensor, with its constants padded by a neutral value; the next convolution gets zero
weight rows for the padded input channels, so whatever the padded channels hold never reaches a
real output. Anything that mixes channels or reshapes (flatten, matmul, concat, ...) gets the
real channels sliced back first. Cost: at most multiple - 1 extra channels per layer (9 -> 16 is
the worst of alpha 0.3: 1.8x that layer's work on 8x wider vectors).

`pad_columns` pads rows the same way for the register tile: a pointwise convolution whose row
width leaves no tile of 8 accumulators (7x7 maps on AVX2) computes a few zero columns more and
slices them off (see schedules/pointwise.py, `column_padding`).
"""
from __future__ import annotations

import contextlib

import numpy as np

from ._tvm import Constant, IRModule, dpl, relax, tvm

# ops that act on each channel alone and keep channels on the last axis
_UNARY = {"relax.nn.relu", "relax.clip", "relax.sigmoid", "relax.tanh", "relax.nn.silu", "relax.nn.gelu",
          "relax.negative", "relax.abs", "relax.exp", "relax.isnan"}
# binary elementwise ops and the value that keeps a padded constant finite
_BINARY = {"relax.add": 0.0, "relax.subtract": 0.0, "relax.multiply": 1.0, "relax.divide": 1.0,
           "relax.maximum": 0.0, "relax.minimum": 0.0, "relax.power": 1.0, "relax.where": 0.0}
_REDUCE = {"relax.mean", "relax.sum", "relax.max", "relax.min"}


def round_up(c: int, multiple: int) -> int:
    return -(-c // multiple) * multiple


def _shape(expr) -> list[int] | None:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    try:
        return [int(d) for d in ty.shape.values]
    except (TypeError, AttributeError):
        return None


def _keeps_last_axis(call: relax.Call, ndim: int) -> bool:
    """A reduction over some axes that leaves the last (channel) axis alone."""
    axes = [int(a) % ndim for a in (call.attrs.axis or [])]
    return bool(axes) and ndim - 1 not in axes


def conv2d_like(attrs, x, w, **changes):
    """relax.op.nn.conv2d with the attributes of an existing conv2d call, `changes` replacing some."""
    keys = ("strides", "padding", "dilation", "groups", "data_layout", "kernel_layout", "out_layout", "out_dtype")
    return relax.op.nn.conv2d(x, w, **({k: getattr(attrs, k) for k in keys} | changes))


def rewrite_relax(mod: IRModule, *rules) -> IRModule:
    """Every Relax function of `mod` through dpl.rewrite_call with each (pattern, rewriter) in turn."""
    out = IRModule(mod.functions, attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            for pattern, rewriter in rules:
                func = dpl.rewrite_call(pattern, rewriter, func)
            out[gv] = func
    return out


def _needs_padding(func, multiple: int) -> bool:
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.nn.conv2d":
            shape = _shape(e)
            if e.attrs.data_layout == "NHWC" and shape and shape[-1] % multiple:
                found.append(e)

    relax.analysis.post_order_visit(func, visit)
    return bool(found)


class _Padder:
    def __init__(self, bb: relax.BlockBuilder, multiple: int):
        self.bb, self.multiple = bb, multiple
        self.env: dict = {}            # old var -> new var
        self.real: dict = {}           # new var -> real channel count, for padded vars only

    def arg(self, e):
        return self.env.get(e, e) if isinstance(e, relax.Var) else e

    def unpadded(self, e):
        """`e` with its real channels only (a slice of the padded tensor)."""
        e = self.arg(e)
        if isinstance(e, relax.Var) and e in self.real:
            c = self.real[e]
            return self.bb.emit(relax.op.strided_slice(e, axes=[len(_shape(e)) - 1], begin=[0], end=[c]))
        if isinstance(e, relax.Tuple):
            return relax.Tuple([self.unpadded(f) for f in e.fields])
        return e

    def emit(self, value, real: int | None, is_output: bool):
        if is_output and real is None:
            return self.bb.emit_output(value)
        var = self.bb.emit(value)
        if real is not None:
            self.real[var] = real
        # the function's results keep their real channels
        return self.bb.emit_output(self.unpadded(var)) if is_output else var

    def keep(self, call: relax.Call):
        """`call` as it is, on the real channels of its operands."""
        return relax.Call(call.op, [self.unpadded(a) for a in call.args], call.attrs, call.ty_args), None

    def rewrite(self, call: relax.Call):
        """(new value, real channel count if the result is padded, else None)."""
        name = call.op.name if isinstance(call.op, tvm.ir.Op) else ""
        if name == "relax.nn.conv2d":
            return self.conv2d(call)
        args = [self.arg(a) for a in call.args]
        reals = {self.real[a] for a in args if isinstance(a, relax.Var) and a in self.real}
        if not reals:
            return relax.Call(call.op, args, call.attrs, call.ty_args), None
        if len(reals) == 1:
            real = reals.pop()
            if name in _BINARY:
                args = [self.broadcast_operand(a, real, _BINARY[name]) for a in args]
            if (name in _UNARY or (name in _BINARY and all(a is not None for a in args))
                    or (name in _REDUCE and _keeps_last_axis(call, len(_shape(args[0]))))):
                return relax.Call(call.op, args, call.attrs, call.ty_args), real
        return self.keep(call)

    def broadcast_operand(self, a, real: int, neutral: float):
        """An operand of an elementwise op on a padded tensor: padded vars as they are, constants
        over the channels padded with `neutral`; None when it cannot follow the padding."""
        if isinstance(a, relax.Var):
            if a in self.real:
                return a
            shape = _shape(a)
            return a if shape is not None and (not shape or shape[-1] == 1) else None
        if isinstance(a, Constant):
            v = a.value.numpy()
            if v.ndim == 0 or v.shape[-1] == 1:
                return a
            if v.shape[-1] != real:
                return None
            pad = [(0, 0)] * (v.ndim - 1) + [(0, round_up(real, self.multiple) - real)]
            return relax.const(np.pad(v, pad, constant_values=neutral).astype(v.dtype))
        return a if isinstance(a, relax.PrimValue) else None

    def conv2d(self, call: relax.Call):
        a, w = call.attrs, call.args[1]
        if a.data_layout != "NHWC" or a.kernel_layout != "HWIO" or not isinstance(w, Constant):
            return self.keep(call)
        x = self.arg(call.args[0])
        wt = w.value.numpy()                     # (kh, kw, in/groups, out)
        cin_real, cout, groups = _shape(call.args[0])[-1], wt.shape[-1], int(a.groups)
        cin = round_up(cin_real, self.multiple) if x in self.real else cin_real
        cout_p = round_up(cout, self.multiple)
        depthwise = groups == cin_real == cout and wt.shape[2] == 1      # one filter per channel
        # other grouped convolutions mix channel ranges; a depthwise on an unpadded input stays so
        if groups != 1 and not (depthwise and cin == cout_p):
            return self.keep(call)
        wt = np.pad(wt, [(0, 0), (0, 0), (0, cin - wt.shape[2] if groups == 1 else 0), (0, cout_p - cout)])
        new = conv2d_like(a, x, relax.const(wt), groups=1 if groups == 1 else cout_p)
        return new, (cout if cout_p != cout else None)


def _pad_function(name: str, func: relax.Function, multiple: int) -> relax.Function:
    bb = relax.BlockBuilder()
    attrs = {k: v for k, v in func.attrs.items()} if func.attrs else None
    with bb.function(name, list(func.params), attrs=attrs, pure=func.is_pure):
        p = _Padder(bb, multiple)
        for block in func.body.blocks:
            dataflow = isinstance(block, relax.DataflowBlock)
            with bb.dataflow() if dataflow else contextlib.nullcontext():
                for b in block.bindings:
                    v = b.value
                    value, real = p.rewrite(v) if isinstance(v, relax.Call) else (p.unpadded(v), None)
                    p.env[b.var] = p.emit(value, real, dataflow and not isinstance(b.var, relax.DataflowVar))
        bb.emit_func_output(p.unpadded(func.body.body))
    return bb.get()[name]


def pad_channels(mod: IRModule, multiple: int) -> IRModule:
    """Every Relax function of `mod` with a convolution of uneven channel count, padded (see the
    module docstring); others unchanged."""
    if multiple <= 1:
        return mod
    out = IRModule(mod.functions, attrs=mod.attrs)
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function) and _needs_padding(func, multiple):
            out[gv] = _pad_function(gv.name_hint, func, multiple)
    return out


def pad_columns(mod: IRModule, choose) -> IRModule:
    """Every NHWC 1x1 stride-1 unpadded convolution with constant HWIO weights, computed on
    `choose(height, width, out_channels, in_channels)` more zero columns (conv padding on the right) and sliced
    back to its width; others unchanged."""
    conv = dpl.is_op("relax.nn.conv2d")(dpl.wildcard(), dpl.is_const())

    def rewrite(expr, _m):
        a, shape, w = expr.attrs, _shape(expr), _shape(expr.args[1])
        if (a.data_layout != "NHWC" or a.kernel_layout != "HWIO" or int(a.groups) != 1 or shape is None
                or w is None or w[:2] != [1, 1] or any(int(v) != 1 for v in (*a.strides, *a.dilation))
                or any(int(v) for v in a.padding)):
            return expr
        pad = choose(shape[1], shape[2], shape[3], w[2])
        if not pad:
            return expr
        padded = conv2d_like(a, *expr.args, padding=(0, 0, 0, pad))
        return relax.op.strided_slice(padded, axes=[2], begin=[0], end=[shape[2]])

    return rewrite_relax(mod, (conv, rewrite))
