"""The runtime wrapper (mbn_codegen.runtime): TVM-runtime-only import, numerics against ONNX
Runtime, input validation, predict, and refusal of tampered or foreign artifacts.

One small x86_64 artifact (and, where the cross compiler exists, one arm64 artifact) is built per
module. Everything that executes compiled code in a fresh interpreter runs in a subprocess first,
so a native crash shows up as a failed test instead of killing pytest.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import check_correctness, copy_artifact as _copy, distinct_inputs, edit_manifest as _edit_manifest
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.errors import (ArchitectureMismatchError, ArtifactError, InputDtypeError,
                                InputShapeError, SelfCheckError)
from mbn_codegen.runtime import MANIFEST, load, machine_arch

ALPHA, RES = 0.25, 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rt") / "v1-x86_64"
    return build(BuildConfig(model="mobilenet_v1", alpha=ALPHA, resolution=RES, target="x86_64",
                             out=str(out)), log=lambda s: None)


@pytest.fixture(scope="module")
def model(artifact):
    return load(artifact)     # loading alone executes no kernel


def _run_py(code: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def _tail(s: str, n: int = 15) -> str:
    return "\n".join(s.strip().splitlines()[-n:])


# ---------------------------------------------------------------------------------------------
# A numpy array that is not 64-byte aligned (np.load and ordinary slicing give such arrays).

UNALIGNED_PROBE = textwrap.dedent("""
    import sys, json, numpy as np
    from mbn_codegen.runtime import load
    d = sys.argv[1]
    m = load(d)
    x = np.load(d + "/reference_input.npy")
    want = np.load(d + "/reference_output.npy")
    buf = np.empty(x.nbytes + 128, np.uint8)
    off = (-buf.ctypes.data) % 64 + 16                 # 16-byte aligned, never 32- or 64-byte
    xu = buf[off:off + x.nbytes].view(np.float32).reshape(x.shape)
    xu[...] = x
    assert xu.ctypes.data % 64 == 16 and xu.flags.c_contiguous
    print("running", flush=True)
    got = m.run(xu)
    print(json.dumps({"max_abs_err": float(np.abs(got - want).max()),
                      "scale": float(np.abs(want).max())}))
""")


@pytest.fixture(scope="module")
def unaligned_probe(artifact) -> subprocess.CompletedProcess:
    return _run_py(UNALIGNED_PROBE, str(artifact))


@pytest.fixture
def can_run(unaligned_probe):
    """Call can_run() first in a test that executes the library in the pytest process: if the
    subprocess probe crashed, running here would take the whole session down with it (and the
    test shows as FAILED, not as a setup ERROR)."""
    def check():
        if unaligned_probe.returncode != 0:
            pytest.fail("not executed in-process: Model.run crashes (exit code "
                        f"{unaligned_probe.returncode}) on an input that is not 64-byte aligned, as "
                        "np.load and most numpy arrays are; see test_run_accepts_unaligned_input")
    return check


def test_run_accepts_unaligned_input(unaligned_probe):
    p = unaligned_probe
    assert p.returncode == 0, (
        f"Model.run on a C-contiguous float32 input at a 16-byte (not 64-byte) aligned address "
        f"exited with {p.returncode} (-11 = SIGSEGV): the kernels assume 64-byte aligned buffers "
        f"but run() hands numpy's memory over as is.\n{_tail(p.stdout + p.stderr)}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["max_abs_err"] <= 1e-3 * max(1.0, r["scale"])


# ---------------------------------------------------------------------------------------------
# The runtime needs only tvm_ffi and libtvm_runtime.so: no torch, onnx, onnxruntime, `import tvm`.

RUNTIME_ONLY_PROBE = textwrap.dedent("""
    import importlib.abc, importlib.machinery, json, sys, time

    ABSENT = {"torch", "onnx", "onnxruntime"}

    class _RefuseLoader(importlib.abc.Loader):
        def create_module(self, spec):
            raise ImportError(f"test: importing {spec.name} is forbidden (runtime-only process)")

        def exec_module(self, module):
            raise ImportError("test: unreachable")

    class _Block(importlib.abc.MetaPathFinder):
        # torch/onnx/onnxruntime: not installed at all. tvm: the wheel is on disk (its
        # lib/libtvm_runtime.so is what the runtime loads) but the Python package must not be
        # imported: locating it (importlib.util.find_spec) works, importing it raises.
        def find_spec(self, name, path=None, target=None):
            top = name.split(".")[0]
            if top in ABSENT:
                raise ImportError(f"test: {name} is not available in a runtime-only process")
            if top == "tvm":
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                if spec is not None:
                    spec.loader = _RefuseLoader()
                return spec
            return None

    sys.meta_path.insert(0, _Block())
    for probe in ("torch", "onnx", "onnxruntime", "tvm"):
        try:
            __import__(probe)
        except ImportError:
            pass
        else:
            raise SystemExit(f"blocker failed: {probe} imported")

    def emit(stage, **kw):
        print("STAGE " + json.dumps({"stage": stage, **kw}), flush=True)

    t0 = time.perf_counter()
    from mbn_codegen.runtime import load
    t1 = time.perf_counter()
    emit("import", import_s=t1 - t0)
    m = load(sys.argv[1])
    t2 = time.perf_counter()
    maps = open("/proc/self/maps").read()
    heavy = sorted(k for k in sys.modules if k.split(".")[0] in ABSENT | {"tvm"})
    emit("load", load_s=t2 - t1, compiler_mapped="libtvm_compiler.so" in maps,
         runtime_mapped="libtvm_runtime.so" in maps, heavy_modules=heavy,
         tvm_ffi_imported="tvm_ffi" in sys.modules)
    r = m.selfcheck()
    t3 = time.perf_counter()
    maps = open("/proc/self/maps").read()
    emit("selfcheck", first_run_s=t3 - t2, ok=r["ok"], max_abs_err=r["max_abs_err"],
         compiler_mapped="libtvm_compiler.so" in maps, runtime_mapped="libtvm_runtime.so" in maps,
         heavy_modules=sorted(k for k in sys.modules if k.split(".")[0] in ABSENT | {"tvm"}))
""")


def test_runtime_import_needs_only_tvm_runtime(artifact):
    p = _run_py(RUNTIME_ONLY_PROBE, str(artifact))
    stages = {}
    for line in p.stdout.splitlines():
        if line.startswith("STAGE "):
            s = json.loads(line[6:])
            stages[s.pop("stage")] = s
    timing = {"import_s": stages.get("import", {}).get("import_s"),
              "load_s": stages.get("load", {}).get("load_s"),
              "first_run_s": stages.get("selfcheck", {}).get("first_run_s")}
    timing["load_and_first_run_s"] = (None if None in (timing["load_s"], timing["first_run_s"])
                                      else timing["load_s"] + timing["first_run_s"])
    print(f"\nruntime-only process: import mbn_codegen.runtime {timing['import_s']} s, "
          f"load {timing['load_s']} s, first run (selfcheck) {timing['first_run_s']} s")
    if os.environ.get("MBN_IMPORT_TIME_JSON"):
        Path(os.environ["MBN_IMPORT_TIME_JSON"]).write_text(
            json.dumps({"artifact": f"mobilenet_v1-{ALPHA:g}-{RES}-x86_64", **timing}, indent=2) + "\n")

    assert "import" in stages, f"importing mbn_codegen.runtime failed:\n{_tail(p.stdout + p.stderr)}"
    assert "load" in stages, f"load() failed in a runtime-only process:\n{_tail(p.stdout + p.stderr)}"
    ld = stages["load"]
    assert ld["runtime_mapped"], "libtvm_runtime.so is not mapped after load()"
    assert not ld["compiler_mapped"], "libtvm_compiler.so is mapped: the runtime pulled in the compiler"
    assert ld["heavy_modules"] == [], ld["heavy_modules"]
    assert ld["tvm_ffi_imported"]
    assert "selfcheck" in stages, (f"selfcheck() in a runtime-only process exited with {p.returncode} "
                                   f"(-11 = SIGSEGV):\n{_tail(p.stdout + p.stderr)}")
    sc = stages["selfcheck"]
    assert p.returncode == 0, _tail(p.stderr)
    assert sc["ok"]
    assert sc["runtime_mapped"] and not sc["compiler_mapped"]
    assert sc["heavy_modules"] == []


# ---------------------------------------------------------------------------------------------
# Numerics.

def test_selfcheck(model, can_run):
    can_run()
    r = model.selfcheck()
    assert r["ok"] and r["arch"] == machine_arch() and r["device"] == "cpu"
    assert r["max_abs_err"] <= r["atol"] + r["rtol"] * 10
    assert 0 <= r["margin"] < 1


def test_matches_onnxruntime_on_distinct_inputs(artifact, model, can_run):
    can_run()
    inputs = distinct_inputs(model.input_shape, n=4, seed=7)
    worst = check_correctness(model.run, artifact / "model.onnx", inputs)
    assert np.isfinite(worst)
    # __call__ is run
    np.testing.assert_array_equal(model(inputs[0]), model.run(inputs[0]))


def test_predict_top_k(model, can_run):
    can_run()
    labels = (model.dir / "labels.txt").read_text().splitlines()
    assert len(labels) == 1000 and model.labels == labels
    x = distinct_inputs(model.input_shape, n=1, seed=3)[0]
    for k in (1, 5, 10):
        top = model.predict(x, k=k)
        assert len(top) == k
        probs = [p for _, _, p in top]
        assert probs == sorted(probs, reverse=True)
        assert all(0.0 <= p <= 1.0 for p in probs) and sum(probs) <= 1.0 + 1e-9
        for idx, label, _ in top:
            assert isinstance(idx, int) and 0 <= idx < 1000 and label == labels[idx]
    logits = model.run(x)[0]
    assert model.predict(x, k=1)[0][0] == int(np.argmax(logits))


# ---------------------------------------------------------------------------------------------
# Wrong inputs: named errors that say how to fix the call. No kernel runs.

def test_input_without_batch_dim(model):
    x = np.zeros(model.input_shape[1:], np.float32)
    with pytest.raises(InputShapeError, match=r"batch dimension") as e:
        model.run(x)
    assert "x[None]" in str(e.value) and str(model.input_shape) in str(e.value)


def test_input_nhwc(model):
    n, c, h, w = model.input_shape
    with pytest.raises(InputShapeError, match="NCHW") as e:
        model.run(np.zeros((n, h, w, c), np.float32))
    assert "transpose" in str(e.value)


def test_input_other_resolution(model):
    with pytest.raises(InputShapeError, match=rf"resolution {RES}") as e:
        model.run(np.zeros((1, 3, 2 * RES, 2 * RES), np.float32))
    assert str((1, 3, 2 * RES, 2 * RES)) in str(e.value)


@pytest.mark.parametrize("dtype", [np.float64, np.uint8])
def test_input_wrong_dtype(model, dtype):
    x = np.zeros(model.input_shape, dtype)
    with pytest.raises(InputDtypeError) as e:
        model.run(x)
    msg = str(e.value)
    assert np.dtype(dtype).name in msg and "float32" in msg and "astype" in msg


@pytest.mark.parametrize("x", [[[0.0]], None, "image.png"], ids=["list", "None", "str"])
def test_input_not_ndarray(model, x):
    with pytest.raises(InputDtypeError, match="numpy array") as e:
        model.run(x)
    assert type(x).__name__ in str(e.value)


def test_predict_validates_input(model):
    with pytest.raises(InputShapeError):
        model.predict(np.zeros(model.input_shape[1:], np.float32))


# ---------------------------------------------------------------------------------------------
# Tampered artifacts.

def test_manifest_for_other_arch(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    _edit_manifest(d, lambda m: m.update(arch="aarch64"))
    with pytest.raises(ArchitectureMismatchError) as e:
        load(d)
    assert "aarch64" in str(e.value) and machine_arch() in str(e.value)


def test_manifest_requires_missing_cpu_flag(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    flag = "mbn_test_no_such_cpu_flag"
    _edit_manifest(d, lambda m: m["target"]["required_cpu_flags"].append(flag))
    with pytest.raises(ArchitectureMismatchError, match=flag) as e:
        load(d)
    assert "lacks" in str(e.value)


def test_changed_library_byte(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    lib = d / "lib.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load(d)


def test_truncated_library(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    lib = d / "lib.so"
    lib.write_bytes(lib.read_bytes()[:4096])
    with pytest.raises(ArtifactError, match="sha256"):
        load(d)


def test_missing_library(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    (d / "lib.so").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        load(d)


def test_missing_manifest(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    (d / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="not an artifact directory") as e:
        load(d)
    assert "mbn-codegen build" in str(e.value)


def test_invalid_manifest_json(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    (d / MANIFEST).write_text('{"format": 1, "arch": ')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load(d)


def test_modified_reference_output(artifact, tmp_path, can_run):
    can_run()
    d = _copy(artifact, tmp_path)
    ref = np.load(d / "reference_output.npy")
    np.save(d / "reference_output.npy", ref + 1.0 + np.abs(ref).max())
    m = load(d)
    with pytest.raises(SelfCheckError, match="self-check failed") as e:
        m.selfcheck()
    assert machine_arch() in str(e.value)


# ---------------------------------------------------------------------------------------------
# A real arm64 artifact on this x86-64 machine: refused before dlopen, never a crash.

@pytest.fixture(scope="module")
def arm64_artifact(tmp_path_factory) -> Path:
    from mbn_codegen import targets
    spec = targets.load("arm64")
    if shutil.which(spec.cross_compiler) is None:
        pytest.skip(f"{spec.cross_compiler} not installed (apt-get install {spec.cross_compiler_package})")
    out = tmp_path_factory.mktemp("rt-arm64") / "v1-arm64"
    return build(BuildConfig(model="mobilenet_v1", alpha=ALPHA, resolution=RES, target="arm64",
                             out=str(out)), log=lambda s: None)


def test_real_arm64_artifact_is_refused(arm64_artifact):
    if machine_arch() == "aarch64":
        pytest.skip("this machine is aarch64: the arm64 artifact is native here")
    assert (arm64_artifact / "lib.so").read_bytes()[18:20] == (183).to_bytes(2, "little")  # EM_AARCH64
    with pytest.raises(ArchitectureMismatchError) as e:
        load(arm64_artifact)
    msg = str(e.value)
    assert "aarch64" in msg and machine_arch() in msg and "arm64" in msg
