"""The Raspberry Pi path without a Pi: arm64 artifacts run under qemu-aarch64 through our runtime
wrapper, in an arm64 Python with TVM's aarch64 wheels, and match ONNX Runtime on the host."""
from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import check_correctness, distinct_inputs
from mbn_codegen.build import BuildConfig, build

pytestmark = pytest.mark.qemu

SCRIPT = r"""
import json, sys, numpy as np
from mbn_codegen.runtime import load, machine_arch
m = load(sys.argv[1])
check = m.selfcheck()
outs = [m(np.load(p)).tolist() for p in sys.argv[3:]]
json.dump({"arch": machine_arch(), "selfcheck": check, "outputs": outs}, open(sys.argv[2], "w"))
"""


def _run_under_qemu(tmp_path, artifact, inputs):
    from mbn_codegen.emulation import run_python_arm64

    files = []
    for i, x in enumerate(inputs):
        np.save(tmp_path / f"x{i}.npy", x)
        files.append(str(tmp_path / f"x{i}.npy"))
    (tmp_path / "run.py").write_text(SCRIPT)
    r = run_python_arm64([str(tmp_path / "run.py"), str(artifact), str(tmp_path / "out.json"), *files],
                         timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads((tmp_path / "out.json").read_text())


@pytest.mark.parametrize("target,alpha,res", [("arm64", 0.5, 128), ("rpi3", 0.25, 96), ("rpi5", 0.3, 64)])
def test_arm64_artifact_matches_onnxruntime_under_qemu(tmp_path, target, alpha, res):
    out = build(BuildConfig(alpha=alpha, resolution=res, target=target, out=str(tmp_path / "art")),
                log=lambda s: None)
    inputs = distinct_inputs((1, 3, res, res), 3, seed=11)
    got = _run_under_qemu(tmp_path, out, inputs)
    assert got["arch"] == "aarch64"
    assert got["selfcheck"]["ok"] and got["selfcheck"]["arch"] == "aarch64"
    outs = iter(np.asarray(o, dtype="float32") for o in got["outputs"])
    check_correctness(lambda x: next(outs), out / "model.onnx", inputs)


def test_pretrained_v2_on_arm64_classifies_the_cat(tmp_path):
    from mbn_codegen.images import preprocess, sample_images

    out = build(BuildConfig(model="mobilenet_v2", weights="pretrained", target="arm64",
                            out=str(tmp_path / "art")), log=lambda s: None)
    x = preprocess(sample_images()["coffee"], 224)
    got = _run_under_qemu(tmp_path, out, [x])
    assert got["selfcheck"]["top1"] == 285                 # the shipped reference photo: a cat
    assert int(np.argmax(got["outputs"][0])) == 967        # espresso
