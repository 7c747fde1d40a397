"""ModelSpec: the model half of a build or a tune (validation, artifact name, flat construction),
and the model registry it looks names up in. Nothing here compiles."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from mbn_codegen import models
from mbn_codegen.build import BuildConfig
from mbn_codegen.errors import ModelConfigError, OnnxModelError
from mbn_codegen.model_spec import ModelSpec
from mbn_codegen.tuning import TuneConfig


def test_flat_keywords_compose_a_model_spec():
    cfg = BuildConfig(model="mobilenet_v2", alpha=0.5, resolution=96, seed=3, target="arm64")
    assert cfg.model == ModelSpec("mobilenet_v2", alpha=0.5, resolution=96, seed=3)
    assert cfg.target == "arm64"
    assert BuildConfig(alpha=0.5).model == ModelSpec(alpha=0.5)
    assert BuildConfig().model == ModelSpec()
    assert not hasattr(BuildConfig(), "alpha")       # one place holds it: cfg.model


def test_flat_keywords_override_a_given_spec_so_replace_works():
    spec = ModelSpec("mobilenet_v2", alpha=0.5, resolution=96)
    assert BuildConfig(model=spec).model is spec
    assert BuildConfig(model=spec, alpha=0.25).model == dataclasses.replace(spec, alpha=0.25)
    cfg = dataclasses.replace(BuildConfig(model=spec, target="arm64"), resolution=128)
    assert cfg.model.resolution == 128 and cfg.model.name == "mobilenet_v2" and cfg.target == "arm64"


def test_tune_config_keeps_its_own_search_seed():
    cfg = TuneConfig(alpha=0.25, resolution=32, seed=7)
    assert cfg.seed == 7 and cfg.model == ModelSpec(alpha=0.25, resolution=32)


@pytest.mark.parametrize("spec, stem", [
    (ModelSpec(), "mobilenet_v1-1-224"),
    (ModelSpec("mobilenet_v2", alpha=0.75, resolution=160), "mobilenet_v2-0.75-160"),
    (ModelSpec(onnx="some/dir/mine.onnx", resolution=96), "mine"),
])
def test_artifact_stem(spec, stem):
    assert spec.stem() == stem
    assert BuildConfig(model=spec, target="targets/rpi5.toml").default_out() == Path("artifacts") / f"{stem}-rpi5"


@pytest.mark.parametrize("name", models.names())
@pytest.mark.parametrize("bad, words", [
    (dict(alpha=1.5), ["alpha=1.5", "(0, 1]"]),
    (dict(resolution=100), ["resolution=100", "multiple of 32"]),
    (dict(num_classes=0), ["num_classes=0", "positive"]),
])
def test_validation_goes_through_the_registry(name, bad, words):
    with pytest.raises(ModelConfigError) as e:
        ModelSpec(name, **bad).validate()
    for w in words:
        assert w in str(e.value)


def test_unknown_model_lists_the_registry():
    with pytest.raises(ModelConfigError) as e:
        ModelSpec("resnet50").validate()
    assert "unknown model 'resnet50'" in str(e.value)
    for name in models.names():
        assert name in str(e.value)


def test_onnx_spec_validates_the_users_file(tmp_path):
    with pytest.raises(OnnxModelError, match="does not exist"):
        ModelSpec(onnx=str(tmp_path / "nope.onnx")).validate()


def test_registry_entries_build_their_modules():
    assert models.names() == ["mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"]
    for name in models.names():
        entry = models.get(name)
        m = models.create(name, 0.25, 32, num_classes=10)
        assert type(m) is entry.module_class() and m.resolution == 32
        assert entry.labels is not None and len(entry.labels.read_text().splitlines()) == 1000


def test_reference_input_is_seeded_noise_or_the_cat_photo():
    shape = (1, 3, 32, 32)
    a, b = ModelSpec(seed=1).reference_input(shape), ModelSpec(seed=1).reference_input(shape)
    assert a.dtype == np.float32 and a.shape == shape and np.array_equal(a, b)
    assert not np.array_equal(a, ModelSpec(seed=2).reference_input(shape))
    photo = ModelSpec("mobilenet_v2", weights="pretrained").reference_input((1, 3, 64, 64))
    assert photo.shape == (1, 3, 64, 64) and not np.array_equal(photo, ModelSpec().reference_input((1, 3, 64, 64)))


def test_labels_only_for_the_registrys_class_count():
    assert ModelSpec().labels_file(1000) == models.LABELS_FILE
    assert ModelSpec(num_classes=10).labels_file(10) is None
    assert ModelSpec(onnx="m.onnx").labels_file(1000) == models.LABELS_FILE
    assert ModelSpec(onnx="m.onnx").labels_file(7) is None
