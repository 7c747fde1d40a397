"""MobileNet v3 small and large: torchvision's parameter names, HardSwish/HardSigmoid lowered
without layout transposes and fused into the conv kernels, squeeze-and-excitation in NHWC, and
every kernel served by our rules; numbers against ONNX Runtime and PyTorch."""
from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from helpers import check_correctness, distinct_inputs
from mbn_codegen import targets
from mbn_codegen._tvm import relax, tvm
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.errors import ModelConfigError
from mbn_codegen.export import export_onnx
from mbn_codegen.lower import LowerContext, build_module, lower
from mbn_codegen.models import create
from mbn_codegen.models.calibrate import make_live
from mbn_codegen.runtime import load

EDGES = 2          # NCHW input -> NHWC, and NHWC -> the classifier's flatten


def _torchvision():
    try:
        import torchvision
    except Exception as e:      # absent, or a build whose C extension does not fit this torch
        pytest.skip(f"torchvision unavailable: {type(e).__name__}: {str(e)[:100]}")
    return torchvision


@pytest.mark.parametrize("variant,alpha", [("small", 1.0), ("large", 1.0), ("small", 0.75)])
def test_torchvision_state_dict_loads(variant, alpha):
    tv = _torchvision()
    torch.manual_seed(0)
    ref = make_live(getattr(tv.models, f"mobilenet_v3_{variant}")(weights=None, width_mult=alpha))
    ours = create(f"mobilenet_v3_{variant}", alpha, 224)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        a, b = ours(x), ref(x)
    torch.testing.assert_close(a, b)
    assert (a[0] - a[1]).abs().max() > 1e-2 * a.abs().max()       # live weights: outputs differ


def test_registry_and_validation():
    m = create("mobilenet_v3_large", 0.5, 96, num_classes=10)
    assert m(torch.zeros(1, 3, 96, 96)).shape == (1, 10)
    names = set(create("mobilenet_v3_small").state_dict())
    assert {"features.0.0.weight", "features.1.block.1.fc1.weight", "classifier.3.bias"} <= names
    with pytest.raises(ModelConfigError, match="resolution"):
        create("mobilenet_v3_small", 1.0, 100)
    with pytest.raises(ModelConfigError, match="alpha"):
        create("mobilenet_v3_small", 1.5, 224)


def _kernel_checks(kernels):
    edges = [k for k in kernels if "transpose" in k["name"] or "layout_transform" in k["name"]]
    assert len(edges) == EDGES and sum(k["calls"] for k in edges) == EDGES, edges
    for k in kernels:
        if k in edges:
            continue
        want = {"depthwise": "mbn_depthwise", "pointwise": "mbn_pointwise", "conv": "mbn_pointwise",
                "dense": "mbn_dense", "reduction": "mbn_global_pool"}[k["kind"]]
        assert k["source"].startswith(f"ours-default:{want}"), k
    names = [k["name"] for k in kernels]
    hardswish = [n for n in names if "conv2d" in n and "maximum" in n and "divide" in n]
    assert hardswish, names          # HardSwish fused into the conv kernels
    assert any(n.startswith("mean") for n in names)


def _lower(name, alpha, res, tmp_path):
    model = make_live(create(name, alpha, res))
    path = export_onnx(model, tmp_path / f"{name}.onnx")
    ctx = LowerContext(targets.load("x86_64").tvm_target(), "cpu", "input", (1, 3, res, res))
    return model, path, ctx


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory):
    d = tmp_path_factory.mktemp("v3s")
    out = build(BuildConfig(model="mobilenet_v3_small", alpha=0.5, resolution=128, out=str(d / "art"),
                            dump_ir=str(d / "ir")), log=lambda s: None)
    return out, load(out)


def test_v3_small_builds_and_matches(small_artifact):
    out, m = small_artifact
    torch_model = make_live(create("mobilenet_v3_small", 0.5, 128), seed=0)
    check_correctness(m.run, out / "model.onnx", distinct_inputs((1, 3, 128, 128), 3), torch_model)
    assert m.selfcheck()["ok"]


def test_v3_small_kernels_ours_and_no_transposes(small_artifact):
    _, m = small_artifact
    assert m.manifest["layout"] == "NHWC"
    _kernel_checks(m.manifest["kernels"])


@pytest.mark.slow
def test_v3_large_lowers_and_matches(tmp_path):
    model, path, ctx = _lower("mobilenet_v3_large", 0.5, 128, tmp_path)
    mod = lower(onnx.load(str(path)), ctx)
    _kernel_checks(ctx.notes["kernels"])
    vm = relax.VirtualMachine(build_module(mod, ctx), tvm.cpu())
    check_correctness(lambda x: vm["main"](tvm.runtime.tensor(x)).numpy(), path,
                      distinct_inputs((1, 3, 128, 128), 2), model)


@pytest.mark.slow
def test_v3_small_224(tmp_path):
    out = build(BuildConfig(model="mobilenet_v3_small", out=str(tmp_path / "art")), log=lambda s: None)
    check_correctness(load(out).run, out / "model.onnx", distinct_inputs((1, 3, 224, 224), 2),
                      make_live(create("mobilenet_v3_small", 1.0, 224), seed=0))


def _prim_funcs(script: str) -> dict[str, str]:
    """PrimFunc name -> its text, from a module's printed IR (the build's --dump-ir files)."""
    parts = re.split(r"\n    @T\.prim_func[^\n]*\n    def ", script)
    return {p.split("(", 1)[0]: p for p in parts[1:]}


def _dump(out, phase: str) -> str:
    """The IR the build dumped after `phase` (files are NN-<phase>.py)."""
    return next((out.parent / "ir").glob(f"[0-9][0-9]-{phase}.py")).read_text()


def test_activations_become_min_max_before_layout(small_artifact):
    out, _ = small_artifact
    assert "R.clip(" in _dump(out, "import")       # the frontend's HardSwish/HardSigmoid
    assert "R.clip(" not in _dump(out, "decompose")
    layout = _dump(out, "layout")
    assert layout.count("R.permute_dims(") == EDGES


def test_hardswish_epilogue_is_one_block_after_the_conv(small_artifact):
    """x * min(max(x + 3, 0), 6) / 6 reads the conv output twice; after legalize-fuse the kernel
    is pad -> conv -> a single epilogue block, which our rules fold into the conv's loops."""
    out, _ = small_artifact
    funcs = _prim_funcs(_dump(out, "legalize-fuse"))
    hardswish = {n: t for n, t in funcs.items() if "conv2d" in n and "maximum" in n and "divide" in n}
    assert len(hardswish) >= 3, list(funcs)
    for n, text in hardswish.items():
        blocks = re.findall(r'T\.sblock\("(\w+)"\)', text)
        rest = [b for b in blocks if b != "root" and not b.startswith(("pad_temp", "conv2d", "group_conv2d", "PaddedInput"))]
        assert len(rest) == 1, (n, blocks)


def test_squeeze_excite_pool_is_vectorised(small_artifact):
    """The squeeze (global mean) reads channels innermost, vectorised, instead of TVM's
    channel-outer loops; the excite conv carries HardSigmoid and the scale multiply."""
    out, m = small_artifact
    funcs = _prim_funcs(_dump(out, "schedule"))
    pools = [t for n, t in funcs.items() if n.startswith("mean")]
    assert pools and all("T.vectorized" in t and "mbn_global_pool" in t for t in pools)
    excite = [k for k in m.manifest["kernels"] if "multiply" in k["name"] and "minimum" in k["name"]
              and k["kind"] == "pointwise" and "divide" not in k["name"]]
    assert excite and all(k["source"].startswith("ours-default:mbn_pointwise") for k in excite)


def test_make_live_keeps_v3_outputs_input_dependent():
    m = make_live(create("mobilenet_v3_small", 0.5, 96))
    with torch.no_grad():
        y = m(torch.from_numpy(np.stack(distinct_inputs((1, 3, 96, 96), 2))[:, 0]))
    assert (y[0] - y[1]).abs().max() > 1e-2 * y.abs().max()


def test_v3_small_cuda_kernels_ours_and_compile(tmp_path):
    """On CUDA the convs and the SE pools get our rules too, and the module compiles to CUDA
    source (no GPU needed to generate it; running it is the GPU tests' job)."""
    from mbn_codegen.cuda import module_binary_format

    model = make_live(create("mobilenet_v3_small", 0.25, 32))
    path = export_onnx(model, tmp_path / "m.onnx")
    ctx = LowerContext(targets.load("cuda").tvm_target(), "cuda", "input", (1, 3, 32, 32))
    mod = lower(onnx.load(str(path)), ctx)
    sources = {k["kind"]: k["source"] for k in ctx.notes["kernels"]}
    assert sources["reduction"] == "ours-default:mbn_global_pool_cuda"
    assert sources["depthwise"] == "ours-default:mbn_depthwise_cuda"
    assert sources["pointwise"] == "ours-default:mbn_pointwise_cuda"
    assert module_binary_format(build_module(mod, ctx)) in ("cu", "ptx", "fatbin")
