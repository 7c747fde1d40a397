"""End to end: PyTorch -> ONNX -> Relax -> library -> runtime wrapper, against ONNX Runtime and PyTorch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import check_correctness, distinct_inputs
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.export import export_onnx
from mbn_codegen.models import create
from mbn_codegen.models.calibrate import make_live
from mbn_codegen.models.mobilenet_v1 import PAPER_ALPHAS, PAPER_RESOLUTIONS
from mbn_codegen.runtime import load

GRID = [(a, r) for a in (1.0, 0.5, 0.25) for r in (224, 128)]
PAPER_GRID = [(a, r) for a in PAPER_ALPHAS for r in PAPER_RESOLUTIONS if (a, r) not in GRID]


def _build_and_check(tmp_path, alpha, res, model="mobilenet_v1"):
    out = build(BuildConfig(model=model, alpha=alpha, resolution=res, out=str(tmp_path / "art")),
                log=lambda s: None)
    torch_model = make_live(create(model, alpha, res), seed=0)    # the weights build() used
    m = load(out)
    check_correctness(m.run, out / "model.onnx", distinct_inputs((1, 3, res, res), 3), torch_model)
    assert m.selfcheck()["ok"]
    return m


@pytest.mark.parametrize("alpha,res", GRID, ids=[f"v1-{a:g}-{r}" for a, r in GRID])
def test_v1_grid_matches_onnxruntime_and_torch(tmp_path, alpha, res):
    _build_and_check(tmp_path, alpha, res)


@pytest.mark.slow
@pytest.mark.parametrize("alpha,res", PAPER_GRID, ids=[f"v1-{a:g}-{r}" for a, r in PAPER_GRID])
def test_v1_paper_grid(tmp_path, alpha, res):
    _build_and_check(tmp_path, alpha, res)


def test_v1_off_grid_variant(tmp_path):
    """Any alpha in (0, 1] and any multiple of 32 work, not only the paper's grid."""
    _build_and_check(tmp_path, 0.6, 96)


def test_v2_random_weights(tmp_path):
    _build_and_check(tmp_path, 0.5, 96, model="mobilenet_v2")


@pytest.fixture(scope="module")
def v2_pretrained(tmp_path_factory):
    out = build(BuildConfig(model="mobilenet_v2", weights="pretrained",
                            out=str(tmp_path_factory.mktemp("v2") / "art")), log=lambda s: None)
    return out, load(out)


def test_v2_pretrained_matches_on_random_inputs(v2_pretrained):
    out, m = v2_pretrained
    torch_model = create("mobilenet_v2", weights="pretrained")
    check_correctness(m.run, out / "model.onnx", distinct_inputs((1, 3, 224, 224), 2, seed=7), torch_model)


def test_v2_pretrained_classifies_photos_like_pytorch(v2_pretrained):
    from mbn_codegen.images import preprocess, sample_images

    _, m = v2_pretrained
    torch_model = create("mobilenet_v2", weights="pretrained")
    tops = {}
    for name, img in sample_images().items():
        x = preprocess(img, 224)
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(x)).numpy()
        got = m(x)
        assert int(got.argmax()) == int(ref.argmax()), name
        np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())
        tops[name] = m.labels[int(got.argmax())]
    assert tops["chelsea"] in {"tabby", "tiger cat", "Egyptian cat"}
    assert tops["coffee"] == "espresso"
    assert m.selfcheck()["top1"] == 285      # the shipped reference is the cat photo


def test_user_onnx_with_batchnorm_nodes(tmp_path):
    """A user's ONNX file that keeps BatchNormalization nodes: our fold phase removes them."""
    model = make_live(create("mobilenet_v1", 0.5, 128), seed=3)
    path = export_onnx(model, tmp_path / "user.onnx", do_constant_folding=False)
    import onnx
    assert any(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    out = build(BuildConfig(onnx=str(path), out=str(tmp_path / "art"), dump_ir=str(tmp_path / "ir")),
                log=lambda s: None)
    assert "batch_norm" in (tmp_path / "ir" / "00-import.py").read_text()
    assert "batch_norm" not in (tmp_path / "ir" / "01-fold-batchnorm.py").read_text()
    m = load(out)
    check_correctness(m.run, path, distinct_inputs((1, 3, 128, 128), 3), model)
    assert m.manifest["model"]["name"] == "onnx:user.onnx"


@pytest.mark.gpu
@pytest.mark.parametrize("schedules", ["ours", "stock"])
def test_cuda_artifact_matches_onnxruntime_on_gpu(tmp_path, schedules):
    """Needs an NVIDIA GPU of the `cuda` target's arch (sm_90) or a copy of targets/cuda.toml
    with the local GPU's arch passed as MBN_CUDA_TARGET."""
    import os
    target = os.environ.get("MBN_CUDA_TARGET", "cuda")
    out = build(BuildConfig(alpha=0.5, resolution=128, target=target, schedules=schedules,
                            out=str(tmp_path / "art")), log=lambda s: None)
    m = load(out)
    assert m.device == "cuda"
    check_correctness(m.run, out / "model.onnx", distinct_inputs((1, 3, 128, 128), 3))
    assert m.selfcheck()["ok"]
