"""Bad input fails early with a named MbnError whose message says what is wrong and how to fix it.

No test here compiles a model: every error is raised before TVM lowering starts.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest

from mbn_codegen import targets
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.errors import (CrossCompilerMissingError, LoweringError, MbnError, ModelConfigError,
                                NonFiniteModelError, OnnxModelError, OutputDirError, TargetFileError,
                                UnknownTargetError, VersionMismatchError, WeightsFileError)
from mbn_codegen.export import export_onnx, load_onnx
from mbn_codegen.models import create

QUIET = dict(log=lambda s: None)


def _build(tmp_path: Path, **kw) -> Path:
    kw.setdefault("alpha", 0.25)
    kw.setdefault("resolution", 32)
    out = tmp_path / "artifact"
    build(BuildConfig(out=str(out), **kw), **QUIET)
    return out


def test_all_named_errors_are_mbn_errors():
    for cls in (CrossCompilerMissingError, ModelConfigError, OnnxModelError, UnknownTargetError,
                VersionMismatchError, OutputDirError, WeightsFileError, TargetFileError,
                NonFiniteModelError, LoweringError):
        assert issubclass(cls, MbnError)


# ---------------------------------------------------------------------------------------------
# ONNX files

@pytest.fixture(scope="module")
def valid_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "v1.onnx"
    export_onnx(create("mobilenet_v1", 0.25, 32), path, 32)
    return path


def _onnx_file(tmp_path: Path, name: str, inputs: list[tuple[str, list, int]]) -> Path:
    """A checker-valid ONNX file: every input goes through Identity to an output."""
    import onnx
    from onnx import helper

    nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n, _, _ in inputs]
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info(n, t, s) for n, s, t in inputs],
        [helper.make_tensor_value_info(n + "_out", t, s) for n, s, t in inputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def test_valid_onnx_loads(valid_onnx):
    from mbn_codegen.export import graph_inputs
    assert graph_inputs(load_onnx(valid_onnx)) == [("input", [1, 3, 32, 32], "float32")]


def test_malformed_onnx(tmp_path):
    path = tmp_path / "random.onnx"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(OnnxModelError) as e:
        load_onnx(path)
    assert str(path) in str(e.value)
    assert "is not a readable ONNX model" in str(e.value) and "re-export it" in str(e.value)


def test_truncated_onnx(valid_onnx, tmp_path):
    data = valid_onnx.read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxModelError) as e:
        load_onnx(path)
    assert str(path) in str(e.value)
    # cut inside a weight tensor, which protobuf cannot parse
    assert "is not a readable ONNX model" in str(e.value) and "truncated" in str(e.value)


def test_missing_onnx(tmp_path):
    with pytest.raises(OnnxModelError, match="does not exist"):
        load_onnx(tmp_path / "nope.onnx")


def test_onnx_with_two_inputs(tmp_path):
    from onnx import TensorProto

    path = _onnx_file(tmp_path, "two", [("a", [1, 3, 8, 8], TensorProto.FLOAT),
                                        ("b", [1, 3, 8, 8], TensorProto.FLOAT)])
    with pytest.raises(OnnxModelError, match="2 inputs") as e:
        load_onnx(path)
    assert "exactly one image input" in str(e.value)


@pytest.mark.parametrize("shape", [[1, 10], [1, 8, 8, 3], [1, 4, 8, 8]], ids=["vector", "NHWC", "4-channel"])
def test_onnx_non_image_input(tmp_path, shape):
    from onnx import TensorProto
    path = _onnx_file(tmp_path, "nonimage", [("x", shape, TensorProto.FLOAT)])
    with pytest.raises(OnnxModelError, match="NCHW") as e:
        load_onnx(path)
    assert str(shape) in str(e.value)


def test_onnx_non_float_input(tmp_path):
    from onnx import TensorProto
    path = _onnx_file(tmp_path, "int", [("x", [1, 3, 8, 8], TensorProto.INT64)])
    with pytest.raises(OnnxModelError, match="float32"):
        load_onnx(path)


@pytest.mark.parametrize("kind", ["random", "truncated", "two-inputs"])
def test_build_rejects_bad_onnx(valid_onnx, tmp_path, kind):
    from onnx import TensorProto
    if kind == "random":
        path = tmp_path / "random.onnx"
        path.write_bytes(os.urandom(2048))
    elif kind == "truncated":
        path = tmp_path / "half.onnx"
        path.write_bytes(valid_onnx.read_bytes()[: valid_onnx.stat().st_size // 2])
    else:
        path = _onnx_file(tmp_path, "two", [("a", [1, 3, 8, 8], TensorProto.FLOAT),
                                            ("b", [1, 3, 8, 8], TensorProto.FLOAT)])
    with pytest.raises(OnnxModelError):
        _build(tmp_path, onnx=str(path))
    assert not (tmp_path / "artifact").exists()


def test_build_bad_onnx_names_the_users_file(tmp_path):
    """The message must point at the file the user passed, not at build's internal copy."""
    path = tmp_path / "mine.onnx"
    path.write_bytes(os.urandom(2048))
    with pytest.raises(OnnxModelError) as e:
        _build(tmp_path, onnx=str(path))
    assert str(path) in str(e.value), str(e.value)
    assert ".partial" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Targets

def test_unknown_target_lists_known_names():
    with pytest.raises(UnknownTargetError) as e:
        targets.load("nope")
    msg = str(e.value)
    assert "'nope'" in msg
    names = targets.names()
    assert {"x86_64", "arm64"} <= set(names)
    for n in names:
        assert n in msg


def test_build_unknown_target(tmp_path):
    with pytest.raises(UnknownTargetError) as e:
        _build(tmp_path, target="nope")
    for n in targets.names():
        assert n in str(e.value)
    assert not (tmp_path / "artifact").exists()


def test_missing_target_file_path(tmp_path):
    with pytest.raises(UnknownTargetError, match="unknown target"):
        targets.load(tmp_path / "board.toml")


GOOD_TOML = """\
description = "my board"
arch = "aarch64"
device = "cpu"
run = "qemu"
cross_compiler = "aarch64-linux-gnu-g++"

[target]
kind = "llvm"
mtriple = "aarch64-linux-gnu"
"""


def test_custom_target_file_loads(tmp_path):
    p = tmp_path / "board.toml"
    p.write_text(GOOD_TOML)
    spec = targets.load(p)
    assert spec.name == "board" and spec.arch == "aarch64"


@pytest.mark.parametrize("bad, words", [
    (GOOD_TOML.replace('arch = "aarch64"', 'arch = "arm64"'), ["arch='arm64'", "aarch64", "x86_64"]),
    (GOOD_TOML.replace('arch = "aarch64"', 'arch = "riscv64"'), ["arch='riscv64'"]),
    (GOOD_TOML.replace('device = "cpu"', 'device = "tpu"'), ["device='tpu'"]),
    (GOOD_TOML.replace('run = "qemu"', 'run = "ssh"'), ["run='ssh'"]),
    (GOOD_TOML.replace('device = "cpu"\n', ""), ["lacks", "device"]),
    (GOOD_TOML.split("[target]")[0].replace('description = "my board"\n', ""),
     ["lacks", "description", "target"]),
    (GOOD_TOML.replace('device = "cpu"', 'device = "cuda"'), ["cuda_arch"]),
    ("arch = aarch64\n", ["not valid TOML"]),
], ids=["arch-arm64", "arch-riscv", "device", "run", "no-device", "no-description-target",
        "cuda-no-arch", "bad-syntax"])
def test_bad_target_file(tmp_path, bad, words):
    p = tmp_path / "board.toml"
    p.write_text(bad)
    with pytest.raises(UnknownTargetError) as e:
        targets.load(p)
    for w in words:
        assert w in str(e.value)
    assert str(p) in str(e.value)
    with pytest.raises(UnknownTargetError):      # build goes through the same check
        _build(tmp_path, target=str(p))


@pytest.fixture
def no_cross_compiler(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))


CROSS = [n for n in targets.names() if targets.load(n).cross_compiler]


def test_some_targets_cross_compile():
    assert "arm64" in CROSS


@pytest.mark.parametrize("name", CROSS)
def test_missing_cross_compiler(no_cross_compiler, name):
    spec = targets.load(name)
    with pytest.raises(CrossCompilerMissingError) as e:
        spec.compiler()
    msg = str(e.value)
    assert "aarch64-linux-gnu-g++" in msg and "apt-get install g++-aarch64-linux-gnu" in msg
    assert repr(name) in msg


def test_build_missing_cross_compiler(no_cross_compiler, tmp_path):
    with pytest.raises(CrossCompilerMissingError, match="g\\+\\+-aarch64-linux-gnu"):
        _build(tmp_path, target="arm64")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty-bin"]      # fails before any work


def test_native_target_needs_no_cross_compiler(no_cross_compiler):
    assert targets.load("x86_64").compiler() is None


# ---------------------------------------------------------------------------------------------
# Model configuration

BAD_CONFIGS = [
    dict(alpha=0.0), dict(alpha=1.5), dict(alpha=math.nan), dict(alpha=-0.5),
    dict(resolution=100), dict(resolution=0), dict(resolution=-32),
    dict(num_classes=0), dict(num_classes=-3),
]
IDS = ["alpha0", "alpha1.5", "alpha-nan", "alpha-neg", "res100", "res0", "res-32", "classes0", "classes-3"]


def _expected_words(cfg: dict) -> list[str]:
    if "alpha" in cfg:
        return ["alpha", "(0, 1]"]
    if "resolution" in cfg:
        return [f"resolution={cfg['resolution']}", "multiple of 32"]
    return [f"num_classes={cfg['num_classes']}", "positive"]


@pytest.mark.parametrize("cfg", BAD_CONFIGS, ids=IDS)
@pytest.mark.parametrize("model", ["mobilenet_v1", "mobilenet_v2"])
def test_create_bad_config(model, cfg):
    kw = dict(alpha=0.25, resolution=32, num_classes=10) | cfg
    with pytest.raises(ModelConfigError) as e:
        create(model, **kw)
    for w in _expected_words(cfg):
        assert w in str(e.value)


@pytest.mark.parametrize("cfg", BAD_CONFIGS, ids=IDS)
def test_build_bad_config(tmp_path, cfg):
    with pytest.raises(ModelConfigError) as e:
        _build(tmp_path, **cfg)
    for w in _expected_words(cfg):
        assert w in str(e.value)
    assert not (tmp_path / "artifact").exists()


def test_unknown_model_name(tmp_path):
    with pytest.raises(ModelConfigError, match="mobilenet_v1, mobilenet_v2"):
        create("resnet50")
    with pytest.raises(ModelConfigError, match="unknown model"):
        _build(tmp_path, model="mobilenet_v3")


@pytest.fixture(scope="module")
def weights_alpha_half(tmp_path_factory) -> Path:
    import torch
    p = tmp_path_factory.mktemp("weights") / "v1-0.5.pt"
    torch.save(create("mobilenet_v1", 0.5, 32).state_dict(), p)
    return p


def test_weights_fit(weights_alpha_half):
    create("mobilenet_v1", 0.5, 32, weights=weights_alpha_half)


def test_weights_do_not_fit(weights_alpha_half, tmp_path):
    with pytest.raises(WeightsFileError) as e:
        create("mobilenet_v1", 0.25, 32, weights=weights_alpha_half)
    msg = str(e.value)
    assert "do not fit" in msg and "alpha=0.25" in msg and str(weights_alpha_half) in msg
    assert "size mismatch" in msg
    with pytest.raises(ModelConfigError, match="do not fit"):
        _build(tmp_path, alpha=0.25, weights=str(weights_alpha_half))
    assert not (tmp_path / "artifact").exists()


def test_weights_other_num_classes(weights_alpha_half):
    with pytest.raises(ModelConfigError, match="num_classes=10"):
        create("mobilenet_v1", 0.5, 32, num_classes=10, weights=weights_alpha_half)


def test_weights_file_missing(tmp_path):
    with pytest.raises(WeightsFileError, match="does not exist"):
        create("mobilenet_v1", 0.25, 32, weights=tmp_path / "nope.pt")


def test_pretrained_only_for_v2_alpha1():
    with pytest.raises(ModelConfigError, match="mobilenet_v2 alpha=1.0"):
        create("mobilenet_v1", 0.25, 32, weights="pretrained")


# ---------------------------------------------------------------------------------------------
# The tvm / tvm-ffi version pair

def test_versions_exact_pair_only(monkeypatch):
    """Only the verified pair passes; a near miss of apache-tvm itself is refused, naming the fix."""
    from mbn_codegen import _tvm

    pinned = {"apache-tvm": _tvm.TVM_VERSION, "apache-tvm-ffi": _tvm.TVM_FFI_VERSION}
    monkeypatch.setattr(_tvm, "_installed", pinned.get)
    _tvm.check_versions()
    monkeypatch.setattr(_tvm, "_installed", {**pinned, "apache-tvm": "0.27.0"}.get)
    with pytest.raises(VersionMismatchError) as e:
        _tvm.check_versions()
    msg = str(e.value)
    assert f"apache-tvm==0.27.0 (need {_tvm.TVM_VERSION})" in msg
    assert f"apache-tvm-ffi=={_tvm.TVM_FFI_VERSION} (need" not in msg      # tvm-ffi is fine
    assert f"pip install apache-tvm=={_tvm.TVM_VERSION} apache-tvm-ffi=={_tvm.TVM_FFI_VERSION}" in msg


def test_tvm_ffi_version_mismatch(monkeypatch):
    from mbn_codegen import _tvm

    real = _tvm._installed
    monkeypatch.setattr(_tvm, "_installed",
                        lambda dist: "0.1.15.post2" if dist == "apache-tvm-ffi" else real(dist))
    with pytest.raises(VersionMismatchError) as e:
        _tvm.check_versions()
    msg = str(e.value)
    assert "0.1.15.post2" in msg and _tvm.TVM_FFI_VERSION in msg and "apache-tvm-ffi" in msg
    assert (f"pip install apache-tvm=={_tvm.TVM_VERSION} apache-tvm-ffi=={_tvm.TVM_FFI_VERSION}"
            in msg)
    assert "apache-tvm==" + _tvm.TVM_VERSION + " (need" not in msg   # tvm itself is fine


def test_tvm_missing(monkeypatch):
    from mbn_codegen import _tvm

    monkeypatch.setattr(_tvm, "_installed", lambda dist: None)
    with pytest.raises(VersionMismatchError) as e:
        _tvm.check_versions()
    assert "apache-tvm==None" in str(e.value) and "pip install" in str(e.value)
