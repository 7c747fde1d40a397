"""The named lowering phases."""
from __future__ import annotations

import numpy as np
import onnx

from mbn_codegen import targets
from mbn_codegen._tvm import relax, tvm
from mbn_codegen.export import export_onnx, onnxruntime_run
from mbn_codegen.lower import PHASES, LowerContext, build_module, import_onnx, lower
from mbn_codegen.models import create
from mbn_codegen.models.calibrate import make_live


def _ctx(res):
    return LowerContext(targets.load("x86_64").tvm_target(), "cpu", "input", (1, 3, res, res))


def test_phases_named_and_dumped(tmp_path):
    model = make_live(create("mobilenet_v1", 0.25, 64))
    path = export_onnx(model, tmp_path / "m.onnx", do_constant_folding=False)
    ctx = _ctx(64)
    mod = lower(onnx.load(str(path)), ctx, dump_ir=tmp_path / "ir")
    names = ["import"] + [n for n, _ in PHASES]
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == [f"{i:02d}-{n}.py" for i, n in enumerate(names)]
    assert set(ctx.notes["phase_seconds"]) == set(names)
    ex = build_module(mod, ctx)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype("float32")
    np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), onnxruntime_run(path, x),
                               rtol=1e-3, atol=1e-4)


def test_batchnorm_folded_into_conv_weights(tmp_path):
    model = make_live(create("mobilenet_v1", 0.25, 64))
    path = export_onnx(model, tmp_path / "m.onnx", do_constant_folding=False)
    ctx = _ctx(64)
    mod = import_onnx(onnx.load(str(path)), ctx)
    n_bn = mod.script(show_meta=False).count("R.nn.batch_norm(")
    assert n_bn == 27
    folded = dict(PHASES)["fold-batchnorm"](mod, ctx)
    text = folded.script(show_meta=False)
    assert "batch_norm" not in text and text.count("R.nn.conv2d(") == 27


def test_kernels_classified(tmp_path):
    model = make_live(create("mobilenet_v1", 0.5, 96))
    path = export_onnx(model, tmp_path / "m.onnx")
    ctx = _ctx(96)
    lower(onnx.load(str(path)), ctx)
    kinds = [r["kind"] for r in ctx.notes["kernels"]]
    assert kinds.count("conv") == 1 and kinds.count("dense") == 1
    # 13 dw and 13 pw layers; the five identical 14x14 blocks share one kernel each
    assert kinds.count("depthwise") == 9 and kinds.count("pointwise") == 9
    src = {k["kind"]: k["source"] for k in ctx.notes["kernels"]}
    assert src["depthwise"].startswith("ours-default:mbn_depthwise")
    assert src["pointwise"].startswith("ours-default:mbn_pointwise")
    assert src["conv"].startswith("ours-default:mbn_pointwise")       # the 3x3 stem is a GEMM too
    assert src["dense"].startswith("ours-default:mbn_dense")


def test_stock_keeps_nchw_and_tvm_defaults(tmp_path):
    model = make_live(create("mobilenet_v1", 0.25, 64))
    path = export_onnx(model, tmp_path / "m.onnx")
    ctx = LowerContext(targets.load("x86_64").tvm_target(), "cpu", "input", (1, 3, 64, 64), schedules="stock")
    lower(onnx.load(str(path)), ctx)
    assert ctx.layout == "NCHW"
    assert {k["source"] for k in ctx.notes["kernels"]} == {"tvm-stock"}


def test_failed_phase_is_a_lowering_error(tmp_path, monkeypatch):
    import mbn_codegen.lower as lower_mod
    from mbn_codegen.errors import LoweringError, MbnError

    model = make_live(create("mobilenet_v1", 0.25, 32))
    path = export_onnx(model, tmp_path / "m.onnx")

    def broken(mod, ctx):
        raise AssertionError("emit_te now only supports Tensor that has ShapeExpr shape\n  (detail)")

    monkeypatch.setattr(lower_mod, "PHASES", [(n, broken if n == "layout" else fn) for n, fn in PHASES])
    try:
        lower(onnx.load(str(path)), _ctx(32))
    except LoweringError as e:
        msg = str(e)
    else:
        raise AssertionError("no LoweringError")
    assert issubclass(LoweringError, MbnError)
    assert "lowering phase 'layout' failed" in msg and "AssertionError" in msg
    assert "emit_te now only supports" in msg and "(detail)" in msg and "\n" not in msg
    assert "--dump-ir" in msg


def _export_shuffle(tmp_path):
    """ShuffleNet's channel shuffle and split export as Shape->Gather->...->Reshape/Slice."""
    import warnings

    import torch
    from torch import nn

    class Shuffle(nn.Module):
        def forward(self, x):
            b, c, h, w = x.size()
            x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
            x1, x2 = x.chunk(2, dim=1)
            return torch.cat([x1, torch.relu(x2)], 1).mean((2, 3))

    path = tmp_path / "shuffle.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Shuffle().eval(), (torch.zeros(1, 6, 8, 8),), str(path), input_names=["input"],
                          opset_version=17, dynamo=False, do_constant_folding=False)
    return path


def test_shape_arithmetic_folded_before_import(tmp_path):
    """With the input shape fixed, the shape arithmetic folds to constants: no dynamic ops reach
    Relax, and the model lowers and matches ONNX Runtime."""
    from mbn_codegen.export import fold_shapes

    path = _export_shuffle(tmp_path)
    model = onnx.load(str(path))
    assert {"Shape", "Gather"} <= {n.op_type for n in model.graph.node}
    folded = fold_shapes(model, (1, 6, 8, 8))
    assert not {"Shape", "Gather"} & {n.op_type for n in folded.graph.node}
    ctx = LowerContext(targets.load("x86_64").tvm_target(), "cpu", "input", (1, 6, 8, 8))
    mod = lower(model, ctx)
    text = mod.script(show_meta=False)
    assert "shape_of" not in text and "dynamic_strided_slice" not in text
    vm = relax.VirtualMachine(build_module(mod, ctx), tvm.cpu())
    for seed in range(2):
        x = np.random.default_rng(seed).standard_normal((1, 6, 8, 8)).astype("float32")
        np.testing.assert_allclose(vm["main"](tvm.runtime.tensor(x)).numpy(), onnxruntime_run(path, x),
                                   rtol=1e-5, atol=1e-6)


def test_graph_without_shape_ops_is_not_copied(tmp_path):
    from mbn_codegen.export import fold_shapes

    path = export_onnx(make_live(create("mobilenet_v1", 0.25, 32)), tmp_path / "m.onnx")
    model = onnx.load(str(path))
    assert fold_shapes(model, (1, 3, 32, 32)) is model


def test_failure_after_shape_folding_names_phase_and_operator(tmp_path, monkeypatch):
    """A failure in a phase after the import stays a LoweringError naming the phase and the op."""
    import mbn_codegen.lower as lower_mod
    from mbn_codegen.errors import LoweringError

    path = _export_shuffle(tmp_path)

    def broken(mod, ctx):
        raise ValueError("cannot lower\n  R.nn.conv2d(lv, w) in the failing op")

    monkeypatch.setattr(lower_mod, "PHASES", [(n, broken if n == "legalize-fuse" else fn) for n, fn in PHASES])
    ctx = LowerContext(targets.load("x86_64").tvm_target(), "cpu", "input", (1, 6, 8, 8))
    try:
        lower(onnx.load(str(path)), ctx)
    except LoweringError as e:
        msg = str(e)
    else:
        raise AssertionError("no LoweringError")
    assert "lowering phase 'legalize-fuse' failed at operator 'nn.conv2d'" in msg


def test_propagate_nan_clip_keeps_fusion_and_nan(tmp_path):
    """ReLU6 (ONNX Clip) with propagate_nan: where(isnan(x), x, clip(x)) fuses into the same
    kernels with the same schedules, and NaN reaches the output as in ONNX Runtime."""
    model = make_live(create("mobilenet_v2", 0.25, 32))
    path = export_onnx(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    x_nan = x.copy()
    x_nan[0, 2, 3, 4] = np.nan
    runs = {}
    for propagate in (False, True):
        ctx = LowerContext(targets.load("x86_64").tvm_target(), "cpu", "input", (1, 3, 32, 32),
                           propagate_nan=propagate)
        mod = lower(onnx.load(str(path)), ctx)
        assert "R.permute_dims" not in mod.script(show_meta=False)
        vm = relax.VirtualMachine(build_module(mod, ctx), tvm.cpu())
        runs[propagate] = (ctx.notes["kernels"],
                           vm["main"](tvm.runtime.tensor(x)).numpy(), vm["main"](tvm.runtime.tensor(x_nan)).numpy())
    (k0, y0, n0), (k1, y1, n1) = runs[False], runs[True]
    assert len(k1) == len(k0) and [k["source"] for k in k1] == [k["source"] for k in k0]
    assert any("isnan" in k["name"] and "conv2d" in k["name"] for k in k1)       # fused into the convs
    np.testing.assert_allclose(y1, onnxruntime_run(path, x), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(y1, y0)
    assert np.isnan(onnxruntime_run(path, x_nan)).all()
    assert np.isnan(n1).all() and np.isfinite(n0).all()
