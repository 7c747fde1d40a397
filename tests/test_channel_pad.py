"""Layers whose channel count is not a multiple of the vector width (alpha 0.3: 10, 19, 38, 77, 153,
307 channels) are padded to it and run on full vectors, with the same numbers; the manifest names
the vector width each kernel really got."""
from __future__ import annotations

import json

import numpy as np
from helpers import check_correctness, distinct_inputs
from mbn_codegen._tvm import relax, tvm
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.channel_pad import pad_channels


def _graph(seed=0):
    """stem 3 -> 10, ReLU6 as min/max, depthwise, pointwise 10 -> 19, a division by a per-channel
    constant (padded with 1, not 0: 0/0 would be NaN), spatial mean, flatten, classifier."""
    rng = np.random.default_rng(seed)
    c = lambda *s: relax.const(rng.standard_normal(s).astype("float32"))  # noqa: E731
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 12, 12, 3), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            conv = lambda v, w, groups=1: relax.op.nn.conv2d(v, w, padding=w.value.shape[0] // 2, groups=groups,  # noqa: E731
                                                             data_layout="NHWC", kernel_layout="HWIO")
            y = bb.emit(relax.op.add(conv(x, c(3, 3, 3, 10)), c(1, 1, 1, 10)))
            y = bb.emit(relax.op.minimum(relax.op.maximum(y, relax.const(0.0)), relax.const(6.0)))
            y = bb.emit(relax.op.nn.relu(conv(y, c(3, 3, 1, 10), groups=10)))
            y = bb.emit(relax.op.add(conv(y, c(1, 1, 10, 19)), c(1, 1, 1, 19)))
            y = bb.emit(relax.op.divide(y, relax.const(rng.uniform(1, 2, (1, 1, 1, 19)).astype("float32"))))
            y = bb.emit(relax.op.mean(y, axis=[1, 2], keepdims=False))
            y = bb.emit(relax.op.matmul(y, c(19, 5)))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x):
    ex = tvm.compile(mod, target=tvm.target.Target("llvm"))
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _channel_counts(mod) -> set[int]:
    seen = set()

    def visit(e):
        if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.nn.conv2d":
            seen.add(int(e.ty.shape.values[-1]))

    relax.analysis.post_order_visit(mod["main"], visit)
    return seen


def test_padded_graph_computes_the_same_numbers():
    mod = _graph()
    padded = pad_channels(mod, 8)
    assert _channel_counts(mod) == {10, 19}
    assert _channel_counts(padded) == {16, 24}
    assert padded["main"].ret_ty.shape.values[-1] == 5          # the result keeps its real shape
    xs = distinct_inputs((1, 12, 12, 3), 3, seed=4)
    outs = [_run(padded, x) for x in xs]
    for x, got in zip(xs, outs):
        want = _run(mod, x)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3                  # the output depends on the input


def test_multiples_already_met_leave_the_graph_alone():
    mod = _graph()
    assert pad_channels(mod, 1) is mod
    assert _channel_counts(pad_channels(mod, 2)) == {10, 20}         # 10 is even: only 19 moves


def test_alpha_0_3_runs_on_full_vectors_and_matches_onnxruntime(tmp_path):
    out = build(BuildConfig(alpha=0.3, resolution=64, target="x86_64", out=str(tmp_path / "art")),
                log=lambda s: None)
    man = json.loads((out / "manifest.json").read_text())
    convs = [k for k in man["kernels"] if k["kind"] in ("pointwise", "depthwise", "conv")]
    assert convs and all("_v8" in k["source"] for k in convs), [k["source"] for k in convs]
    from mbn_codegen.runtime import load

    m = load(out)
    assert m.selfcheck()["ok"]
    check_correctness(m, out / "model.onnx", distinct_inputs((1, 3, 64, 64), 3, seed=5))


def test_column_padding_only_where_no_full_register_tile():
    from mbn_codegen.schedules.pointwise import column_padding

    assert column_padding(7, 7, 1024, 512, 8, 16) == 1     # AVX2: 7 x 1 x 1 -> 1 x 4 x 2 on 7 x 8
    assert column_padding(7, 7, 1024, 512, 4, 32) == 0     # NEON: 1 x 7 x 2 fits 32 registers
    assert column_padding(7, 7, 1024, 512, 16, 32) == 0    # AVX-512
    assert column_padding(14, 14, 512, 512, 8, 16) == 0    # 2 x 2 x 2 already
    assert column_padding(5, 5, 256, 256, 8, 16) == 0      # 5 -> 6 would cost 20% more work
    assert column_padding(14, 14, 40, 96, 8, 16) == 0      # small weights: loop order 0, left alone


def test_7x7_pointwise_on_a_zero_column_matches_numpy():
    """On AVX2 a 7x7 pointwise layer with weights over L2_SHARE is computed 7 x 8 wide and sliced back in the same kernel;
    the numbers are those of the unpadded layer, for inputs that change the output."""
    from mbn_codegen import targets
    from mbn_codegen.lower import PHASES, LowerContext, build_module

    rng = np.random.default_rng(7)
    w, b = rng.standard_normal((1, 1, 256, 512)).astype("float32"), rng.standard_normal((1, 1, 1, 512)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 7, 7, 256), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), data_layout="NHWC", kernel_layout="HWIO"))
            out = bb.emit_output(bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(b)))))
        bb.emit_func_output(out)
    mod = bb.get()
    ctx = LowerContext(targets.load("x86_64").tvm_target(), "cpu", "x", (1, 7, 7, 256), layout="NHWC")
    for _, fn in PHASES[2:]:
        mod = fn(mod, ctx)
    [kernel] = [k for k in ctx.notes["kernels"] if k["macs"]]
    assert "strided_slice" in kernel["name"] and kernel["source"].startswith("ours-default:mbn_pointwise"), kernel
    assert kernel["macs"] == 7 * 8 * 256 * 512               # the zero column is computed, then dropped
    vm = relax.VirtualMachine(build_module(mod, ctx), tvm.cpu())
    outs = []
    for xi in distinct_inputs((1, 7, 7, 256), 2, seed=8):
        got = vm["main"](tvm.runtime.tensor(xi)).numpy()
        assert got.shape == (1, 7, 7, 512)
        np.testing.assert_allclose(got, np.maximum(xi @ w[0, 0] + b, 0), rtol=1e-4, atol=1e-4)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-3
