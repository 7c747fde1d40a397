"""The runtime-only parts of scripts/gpu_check.py (what `--prebuilt` runs on a GPU machine without
the TVM compiler), exercised on a CPU artifact: the same calls, device type 1 instead of 2."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from mbn_codegen.build import BuildConfig, build
from mbn_codegen.export import onnxruntime_run

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gc") / "art-default"
    return build(BuildConfig(alpha=0.25, resolution=96, target="x86_64", out=str(out)), log=lambda s: None)


def test_reference_and_two_threads(artifact, tmp_path):
    gc = _script()
    got = gc.write_reference(artifact, tmp_path, 96)
    assert got["inputs"] == 3 and got["spread"] > 0
    d = np.load(tmp_path / gc.REFERENCE)
    np.testing.assert_allclose(d["outputs"][1], onnxruntime_run(artifact / "model.onnx", d["inputs"][1]))
    assert gc.two_threads(str(artifact), tmp_path / gc.REFERENCE, calls=3) == {"threads": 2, "calls_each": 3}
    # a wrong reference must fail, also though the comparison runs in worker threads
    np.savez(tmp_path / "wrong.npz", inputs=d["inputs"], outputs=d["outputs"][[1, 0, 2]])
    with pytest.raises(AssertionError, match="thread 0: max error"):
        gc.two_threads(str(artifact), tmp_path / "wrong.npz", calls=1)
    with pytest.raises(RuntimeError, match="not cuda"):
        gc.check_against_reference(str(artifact), tmp_path / gc.REFERENCE)


def test_kernel_times_with_the_runtime_alone(artifact):
    gc = _script()
    times = gc.time_kernels(str(artifact), 96)
    kernels = {k["name"] for k in json.loads((artifact / "manifest.json").read_text())["kernels"] if k["calls"]}
    assert set(times) == kernels and all(t > 0 for t in times.values())


def test_prebuilt_folder_must_hold_a_dry_run(tmp_path, capsys, monkeypatch):
    gc = _script()
    monkeypatch.setattr(gc, "nvidia_smi", lambda: ("fake", "sm_90", "13.0"))
    assert gc.main(["--prebuilt", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "make it with --dry-run" in capsys.readouterr().err
