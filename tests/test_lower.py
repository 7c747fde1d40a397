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
    path = export_onnx(model, tmp_path / "m.onnx", fold_batchnorm=False)
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
    path = export_onnx(model, tmp_path / "m.onnx", fold_batchnorm=False)
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
