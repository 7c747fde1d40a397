"""What a build does with what users actually hand it: the --out folder (never delete their
files), Ctrl-C at any moment, weights files that are not state_dicts, bad target files,
NaN/Inf models, ONNX files with dynamic height/width, and the NaN semantics of ReLU."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mbn_codegen import targets
from mbn_codegen.build import BuildConfig, build, check_out_dir
from mbn_codegen.errors import (ModelConfigError, NonFiniteModelError, OnnxModelError, OutputDirError,
                                TargetFileError, UnknownTargetError, WeightsFileError)
from mbn_codegen.export import export_onnx
from mbn_codegen.models import create

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(alpha=0.25, resolution=32)
QUIET = dict(log=lambda s: None)


def snapshot(d: Path) -> dict[str, str]:
    """Every file under d (relative path -> sha256): equal snapshots mean byte-for-byte equal."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.endswith((".partial", ".old")))


@pytest.fixture(scope="module")
def small_onnx(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "mymodel.onnx"
    export_onnx(create("mobilenet_v1", 0.25, 32), path, 32)
    return path


@pytest.fixture(scope="module")
def base_artifact(tmp_path_factory) -> Path:
    """One real small build; tests copy it before writing over it."""
    out = tmp_path_factory.mktemp("base") / "artifact"
    build(BuildConfig(out=str(out), **SMALL), **QUIET)
    return out


@pytest.fixture
def old_artifact(base_artifact, tmp_path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(base_artifact, art)
    return art


def user_folder(d: Path, onnx: Path | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "photos").mkdir()
    (d / "photos" / "cat.jpg").write_bytes(os.urandom(3000))
    if onnx is not None:
        shutil.copyfile(onnx, d / "mymodel.onnx")
    return d


# ---------------------------------------------------------------------------------------------
# 1. --out: only a new/empty folder or an artifact of ours; never the input's or cwd's folder

def test_out_is_the_users_folder_holding_the_onnx(small_onnx, tmp_path):
    userdir = user_folder(tmp_path / "userdir", small_onnx)
    before = snapshot(userdir)
    with pytest.raises(OutputDirError) as e:
        build(BuildConfig(onnx=str(userdir / "mymodel.onnx"), out=str(userdir)), **QUIET)
    msg = str(e.value)
    assert "input ONNX file" in msg and "Pick a new folder" in msg and str(userdir) in msg
    assert snapshot(userdir) == before
    assert leftovers(tmp_path) == []


def test_out_is_a_users_folder_without_the_input(small_onnx, tmp_path):
    userdir = user_folder(tmp_path / "userdir")
    before = snapshot(userdir)
    with pytest.raises(OutputDirError) as e:
        build(BuildConfig(onnx=str(small_onnx), out=str(userdir)), **QUIET)
    msg = str(e.value)
    assert "not an mbn-codegen artifact" in msg and "notes.txt" in msg and "Pick a new folder" in msg
    assert snapshot(userdir) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("out", ["..", "."])
def test_out_is_the_working_directory_or_its_parent(small_onnx, tmp_path, monkeypatch, out):
    parent = user_folder(tmp_path / "project")
    sub = parent / "sub"
    sub.mkdir()
    shutil.copyfile(small_onnx, sub / "m.onnx")
    before = snapshot(parent)
    monkeypatch.chdir(sub)
    with pytest.raises(OutputDirError, match="current directory"):
        build(BuildConfig(onnx="m.onnx", out=out), **QUIET)
    assert sub.is_dir() and snapshot(parent) == before
    assert leftovers(parent) == [] and leftovers(tmp_path) == []


def test_out_is_an_artifact_holding_the_input(old_artifact, tmp_path):
    """`--onnx art/model.onnx --out art`: an artifact of ours, but the swap would delete the input."""
    before = snapshot(old_artifact)
    with pytest.raises(OutputDirError, match="input ONNX file"):
        build(BuildConfig(onnx=str(old_artifact / "model.onnx"), out=str(old_artifact)), **QUIET)
    assert snapshot(old_artifact) == before


def test_out_holds_the_weights_file(old_artifact, tmp_path):
    import torch
    w = old_artifact / "w.pt"
    torch.save(create("mobilenet_v1", 0.25, 32).state_dict(), w)
    before = snapshot(old_artifact)
    with pytest.raises(OutputDirError, match="weights file"):
        build(BuildConfig(weights=str(w), out=str(old_artifact), **SMALL), **QUIET)
    assert snapshot(old_artifact) == before


def test_out_is_a_file(tmp_path):
    f = tmp_path / "out"
    f.write_text("data")
    with pytest.raises(OutputDirError, match="not a folder"):
        build(BuildConfig(out=str(f), **SMALL), **QUIET)
    assert f.read_text() == "data"


@pytest.mark.parametrize("manifest, ok", [
    ({"format": 1, "generator": "mbn-codegen"}, True),
    ({"format": 1, "library": {"file": "lib.so"}, "target": {"name": "x86_64"}}, True),   # older builds
    ({"format": 1}, False),
    ({"library": {}, "target": {}}, False),
    ("not json", False),
], ids=["marked", "pre-marker", "format-only", "no-format", "garbage"])
def test_which_folders_count_as_our_artifact(tmp_path, manifest, ok):
    d = tmp_path / "a"
    d.mkdir()
    (d / "manifest.json").write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
    cfg = BuildConfig(out=str(d), **SMALL)
    if ok:
        check_out_dir(d, cfg)
    else:
        with pytest.raises(OutputDirError, match="not an mbn-codegen artifact"):
            check_out_dir(d, cfg)


def test_new_and_empty_folders_are_fine(tmp_path):
    cfg = BuildConfig(**SMALL)
    check_out_dir(tmp_path / "new" / "deeper", cfg)
    (tmp_path / "empty").mkdir()
    check_out_dir(tmp_path / "empty", cfg)


def test_interrupt_during_the_swap_puts_the_old_artifact_back(tmp_path, monkeypatch):
    """A Ctrl-C between renaming the new artifact in and deleting the old one undoes the swap."""
    from mbn_codegen import build as build_mod

    out, tmp = tmp_path / "art", tmp_path / "art.x.partial"
    out.mkdir()
    (out / "lib.so").write_bytes(b"old")
    tmp.mkdir()
    (tmp / "lib.so").write_bytes(b"new")
    real_rename = os.rename

    def rename(a, b):
        real_rename(a, b)
        if Path(b) == out:
            os.kill(os.getpid(), signal.SIGINT)      # lands right after the new one is in place

    monkeypatch.setattr(build_mod.os, "rename", rename)
    with build_mod._Interrupts() as interrupts:
        with pytest.raises(KeyboardInterrupt):
            build_mod._swap_in(tmp, out, interrupts)
    assert (out / "lib.so").read_bytes() == b"old"
    assert (tmp / "lib.so").read_bytes() == b"new"        # build()'s cleanup removes it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "art.x.partial"]


# ---------------------------------------------------------------------------------------------
# 2. Ctrl-C: always exit 130 "interrupted", old artifact untouched, nothing partial left

@pytest.mark.parametrize("moment", ["export ", "lower for", "phase layout", "compile"])
def test_ctrl_c_at_any_moment(old_artifact, tmp_path, moment):
    before = snapshot(old_artifact)
    lib_sha = hashlib.sha256((old_artifact / "lib.so").read_bytes()).hexdigest()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "mbn_codegen.cli.main", "build", "--alpha", "0.25",
                          "--resolution", "32", "--seed", "7", "--out", str(old_artifact)],
                         cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)           # its own process group, like a terminal's
    seen = []
    try:
        for line in p.stdout:
            seen.append(line)
            if line.lstrip().startswith(moment):
                time.sleep(0.3)
                os.killpg(p.pid, signal.SIGINT)            # Ctrl-C reaches the whole group
                break
        out, err = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert any(line.lstrip().startswith(moment) for line in seen), "".join(seen)
    assert p.returncode == 130, (p.returncode, "".join(seen) + out, err[-3000:])
    assert "interrupted" in err and "Traceback" not in err, err[-3000:]
    assert hashlib.sha256((old_artifact / "lib.so").read_bytes()).hexdigest() == lib_sha
    assert snapshot(old_artifact) == before
    assert leftovers(tmp_path) == []


def test_ctrl_c_inside_a_tvm_callback(old_artifact, tmp_path, monkeypatch):
    """A KeyboardInterrupt raised inside a Python callback comes back from TVM as a RuntimeError
    with an empty message; the build still ends as an interrupt, not a failure."""
    from mbn_codegen import lower as lower_mod
    from mbn_codegen._tvm import tvm
    from mbn_codegen.cli.main import main

    @tvm.transform.module_pass(opt_level=0)
    def ctrl_c(mod, _ctx):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        return mod

    phases = [(n, (lambda mod, ctx: ctrl_c(mod)) if n == "layout" else fn) for n, fn in lower_mod.PHASES]
    monkeypatch.setattr(lower_mod, "PHASES", phases)
    before = snapshot(old_artifact)
    with pytest.raises(KeyboardInterrupt):
        build(BuildConfig(out=str(old_artifact), seed=5, **SMALL), **QUIET)
    assert snapshot(old_artifact) == before and leftovers(tmp_path) == []
    assert main(["build", "--alpha", "0.25", "--resolution", "32", "--out", str(old_artifact)]) == 130
    assert snapshot(old_artifact) == before and leftovers(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # restored


# ---------------------------------------------------------------------------------------------
# 3. Weights files that are not a state_dict of the model

@pytest.fixture(scope="module")
def weight_files(tmp_path_factory) -> dict[str, Path]:
    import torch
    d = tmp_path_factory.mktemp("weights")
    model = create("mobilenet_v1", 0.25, 32)
    sd = model.state_dict()
    files = {
        "whole-module": lambda p: torch.save(model, p),
        "bare-tensor": lambda p: torch.save(torch.zeros(3, 4), p),
        "text": lambda p: p.write_text("these are not weights\n"),
        "empty": lambda p: p.write_bytes(b""),
        "non-tensor-dict": lambda p: torch.save({"epoch": 3, "lr": 0.1}, p),
        "missing-keys": lambda p: torch.save({k: v for k, v in sd.items() if not k.startswith("classifier.")}, p),
        "unexpected-keys": lambda p: torch.save({**sd, "extra.weight": torch.zeros(2)}, p),
        "data-parallel": lambda p: torch.save({"module." + k: v for k, v in sd.items()}, p),
        "other-alpha": lambda p: torch.save(create("mobilenet_v1", 0.5, 32).state_dict(), p),
        "checkpoint": lambda p: torch.save({"state_dict": sd, "epoch": 9}, p),
    }
    out = {}
    for name, write in files.items():
        out[name] = d / f"{name}.pt"
        write(out[name])
    return out


@pytest.mark.parametrize("kind, words", [
    ("whole-module", ["whole pickled object", "MobileNetV1", "torch.save(model.state_dict(), path)"]),
    ("bare-tensor", ["single tensor", "(3, 4)", "torch.save(model.state_dict(), path)"]),
    ("text", ["no PyTorch data", "torch.save(model.state_dict(), path)"]),
    ("empty", ["no PyTorch data", "torch.save(model.state_dict(), path)"]),
    ("non-tensor-dict", ["not tensors", "epoch", "torch.save(model.state_dict(), path)"]),
    ("missing-keys", ["2 missing keys", "classifier.weight", "classifier.bias", "--alpha"]),
    ("unexpected-keys", ["1 unexpected keys", "extra.weight"]),
    ("data-parallel", ["unexpected keys", "module.", "model.module.state_dict()"]),
    ("other-alpha", ["size mismatch in", "features.0.0.weight: file (16, 3, 3, 3), model (8, 3, 3, 3)"]),
])
def test_weights_file_errors(weight_files, kind, words):
    path = weight_files[kind]
    with pytest.raises(WeightsFileError) as e:
        create("mobilenet_v1", 0.25, 32, weights=path)
    msg = str(e.value)
    assert str(path) in msg
    for w in words:
        assert w in msg, msg
    assert len(msg) < 700, msg                       # short: a few keys, not the whole list
    assert isinstance(e.value, ModelConfigError)     # older callers catch that


def test_weights_checkpoint_with_state_dict_loads(weight_files):
    create("mobilenet_v1", 0.25, 32, weights=weight_files["checkpoint"])


def test_weights_onnx_file_points_to_onnx_option(small_onnx):
    with pytest.raises(WeightsFileError, match="--onnx"):
        create("mobilenet_v1", 0.25, 32, weights=small_onnx)


def test_build_with_whole_module_weights(weight_files, tmp_path):
    with pytest.raises(WeightsFileError, match="torch.save"):
        build(BuildConfig(weights=str(weight_files["whole-module"]), out=str(tmp_path / "a"), **SMALL),
              **QUIET)
    assert not (tmp_path / "a").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 4. Target files with bad fields

TOML = """\
description = "my board"
arch = "x86_64"
device = "cpu"
run = "native"

[target]
kind = "llvm"
mcpu = "haswell"
"""


@pytest.mark.parametrize("bad, words", [
    (TOML.replace('kind = "llvm"', 'kind = "llvmx"'), ["[target] kind", "'llvmx'", "llvm"]),
    (TOML.replace('kind = "llvm"\n', ""), ["[target] lacks kind", "llvm"]),
    (TOML.replace('device = "cpu"', 'device = "cuda"\ncuda_arch = "sm_87"'),
     ["[target] kind", "'llvm'", "cuda"]),
    (TOML.replace('mcpu = "haswell"', 'mattr = "+avx2"'), ["[target] mattr", "list of strings"]),
    (TOML.replace('mcpu = "haswell"', 'num-cores = "4"'), ["[target] num-cores", "positive integer"]),
    (TOML.replace('run = "native"', 'run = "native"\nrequired_cpu_flags = "avx2"'),
     ["required_cpu_flags", "list"]),
    (TOML.replace('description = "my board"', "description = 3"), ["description", "string"]),
    (TOML + '\n[host]\nkind = "cuda"\n', ["[host] kind", "'cuda'", "llvm"]),
], ids=["kind", "no-kind", "cuda-kind", "mattr-string", "cores-string", "flags-string", "description",
        "host-kind"])
def test_bad_target_fields(tmp_path, bad, words):
    p = tmp_path / "board.toml"
    p.write_text(bad)
    with pytest.raises(TargetFileError) as e:
        targets.load(p)
    msg = str(e.value)
    assert str(p) in msg
    for w in words:
        assert w in msg, msg
    assert isinstance(e.value, UnknownTargetError)
    with pytest.raises(TargetFileError):
        build(BuildConfig(target=str(p), out=str(tmp_path / "a"), **SMALL), **QUIET)
    assert not (tmp_path / "a").exists()


def test_target_attribute_tvm_rejects(tmp_path):
    p = tmp_path / "board.toml"
    p.write_text(TOML.replace('mcpu = "haswell"', "mcpu = 3"))
    with pytest.raises(TargetFileError) as e:
        build(BuildConfig(target=str(p), out=str(tmp_path / "a"), **SMALL), **QUIET)
    assert str(p) in str(e.value) and "mcpu" in str(e.value) and "Traceback" not in str(e.value)
    assert not (tmp_path / "a").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# 5. NaN/Inf weights or reference output

def _state_dict_file(tmp_path: Path, edit) -> Path:
    import torch
    from mbn_codegen.models.calibrate import make_live
    sd = make_live(create("mobilenet_v1", 0.25, 32)).state_dict()
    edit(sd)
    p = tmp_path / "w.pt"
    torch.save(sd, p)
    return p


@pytest.mark.parametrize("edit, words", [
    (lambda sd: [v.fill_(float("nan")) for v in sd.values() if v.is_floating_point()],
     ["NaN", "features.0.0.weight", "more"]),
    (lambda sd: sd["features.3.0.weight"].view(-1)[:5].fill_(float("nan")),
     ["1 of", "features.3.0.weight (5 NaN of"]),
    (lambda sd: sd["classifier.bias"].fill_(float("inf")), ["classifier.bias", "Inf"]),
    (lambda sd: sd["features.2.1.running_var"].fill_(-1.0), ["running_var < 0", "features.2.1.running_var"]),
], ids=["all-nan", "some-nan", "inf", "negative-variance"])
def test_non_finite_weights(tmp_path, edit, words):
    w = _state_dict_file(tmp_path, edit)
    with pytest.raises(NonFiniteModelError) as e:
        build(BuildConfig(weights=str(w), out=str(tmp_path / "a"), **SMALL), **QUIET)
    for word in words:
        assert word in str(e.value), str(e.value)
    assert not (tmp_path / "a").exists() and leftovers(tmp_path) == []


def test_overflowing_model(tmp_path):
    w = _state_dict_file(tmp_path, lambda sd: [sd[k].mul_(1e12) for k in sd if k.endswith("0.weight")])
    with pytest.raises(NonFiniteModelError, match="overflows"):
        build(BuildConfig(weights=str(w), out=str(tmp_path / "a"), **SMALL), **QUIET)
    assert not (tmp_path / "a").exists()


def test_onnx_with_nan_initializer(small_onnx, tmp_path):
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(small_onnx))
    init = m.graph.initializer[0]
    a = numpy_helper.to_array(init).copy()
    a.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(a, init.name))
    path = tmp_path / "nan.onnx"
    onnx.save(m, str(path))
    with pytest.raises(NonFiniteModelError) as e:
        build(BuildConfig(onnx=str(path), out=str(tmp_path / "a")), **QUIET)
    assert str(path) in str(e.value) and f"{init.name} (1 NaN of {a.size})" in str(e.value)


# ---------------------------------------------------------------------------------------------
# 6. Dynamic height/width in a user's ONNX

@pytest.fixture(scope="module")
def dynamic_onnx(tmp_path_factory) -> Path:
    import warnings

    import torch
    from mbn_codegen.models.calibrate import make_live
    path = tmp_path_factory.mktemp("dyn") / "dyn.onnx"
    model = make_live(create("mobilenet_v1", 0.25, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={"input": {0: "N", 2: "H", 3: "W"}})
    return path


def test_dynamic_hw_needs_resolution(dynamic_onnx, tmp_path):
    with pytest.raises(OnnxModelError) as e:
        build(BuildConfig(onnx=str(dynamic_onnx), out=str(tmp_path / "a")), **QUIET)
    assert "--resolution" in str(e.value) and str(dynamic_onnx) in str(e.value)
    assert not (tmp_path / "a").exists()


def test_fixed_hw_cannot_be_changed(small_onnx, tmp_path):
    with pytest.raises(OnnxModelError, match="cannot change"):
        build(BuildConfig(onnx=str(small_onnx), resolution=64, out=str(tmp_path / "a")), **QUIET)


def test_dynamic_hw_fixed_by_resolution_cli(dynamic_onnx, tmp_path, capsys):
    from mbn_codegen.cli.main import main
    out = tmp_path / "a"
    rc = main(["build", "--onnx", str(dynamic_onnx), "--resolution", "64", "--out", str(out)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["input"]["shape"] == [1, 3, 64, 64] and m["model"]["resolution"] == 64
    assert np.load(out / "reference_input.npy").shape == (1, 3, 64, 64)
    p = subprocess.run([sys.executable, "-m", "mbn_codegen.cli.main", "run", str(out)],
                       capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0 and "self-check: ok" in p.stdout, p.stdout[-1000:] + p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# 7. NaN semantics: --propagate-nan makes ReLU pass NaN through like ONNX Runtime

def _vm_run(artifact: Path, x: np.ndarray) -> np.ndarray:
    from mbn_codegen._tvm import relax, tvm
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(artifact / "lib.so")), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_propagate_nan_build_replaces_artifact(base_artifact, old_artifact, tmp_path):
    from mbn_codegen.export import onnxruntime_run

    old = json.loads((old_artifact / "manifest.json").read_text())
    assert old["nan_semantics"] == "ieee-maxnum" and old["generator"] == "mbn-codegen"
    build(BuildConfig(out=str(old_artifact), propagate_nan=True, **SMALL), **QUIET)
    new = json.loads((old_artifact / "manifest.json").read_text())
    assert new["nan_semantics"] == "propagate"
    assert len(new["kernels"]) == len(old["kernels"])                  # still fused
    assert [k["source"] for k in new["kernels"]] == [k["source"] for k in old["kernels"]]
    assert leftovers(tmp_path) == []

    x = np.load(old_artifact / "reference_input.npy")
    np.testing.assert_allclose(_vm_run(old_artifact, x), np.load(old_artifact / "reference_output.npy"),
                               rtol=1e-3, atol=1e-3)
    x_nan = x.copy()
    x_nan[0, 1, 10, 10] = np.nan
    ort = onnxruntime_run(old_artifact / "model.onnx", x_nan)
    assert np.isnan(ort).all()
    assert np.isnan(_vm_run(old_artifact, x_nan)).all()              # like ONNX Runtime
    assert np.isfinite(_vm_run(base_artifact, x_nan)).all()          # the default drops NaN


# ---------------------------------------------------------------------------------------------
# the CLI side of the rows above

def test_cli_prints_named_errors(small_onnx, tmp_path, capsys, weight_files):
    from mbn_codegen.cli.main import main
    userdir = user_folder(tmp_path / "userdir", small_onnx)
    before = snapshot(userdir)
    rc = main(["build", "--onnx", str(userdir / "mymodel.onnx"), "--out", str(userdir)])
    _, err = capsys.readouterr()
    assert rc == 2 and "OutputDirError" in err and "Traceback" not in err
    assert snapshot(userdir) == before
    rc = main(["build", "--alpha", "0.25", "--resolution", "32", "--weights",
               str(weight_files["bare-tensor"]), "--out", str(tmp_path / "b")])
    _, err = capsys.readouterr()
    assert rc == 2 and "WeightsFileError" in err and "state_dict" in err
