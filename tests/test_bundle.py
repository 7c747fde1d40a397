"""The board side: runtime-only installs (`pip install mbn-codegen`, no `compile` extra) and the
one-file bundles that carry them to boards without internet (mbn_codegen.bundle).

- x86_64, Python 3.10 and 3.12 (pyenv's): a bundle's install.sh makes a fresh venv and pip-installs
  from the bundle's wheels only; there the artifact passes its self-check, torch and onnx are not
  importable, TVM's RPC server serves a session, and `mbn-codegen build` names the missing extra.
- aarch64: a bundle for Python 3.11 installing into the emulated Debian python3.11 (no pip, no
  ensurepip: `install.sh --site DIR`) is part of test_board_workflow.py.
- `mbn-codegen run` on an arm64 artifact: emulated when qemu is set up, else the named error.

Wheels come from PyPI once and are cached in ~/.cache/mbn-codegen/wheels; without PyPI and without
that cache the install tests skip with the reason. About 3 minutes on 2 cores, mostly two model
builds.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tarfile
import textwrap
import tomllib
from pathlib import Path

import pytest

from mbn_codegen.bundle import (COMPILE_MODULES, BundleError, CompilerNotInstalledError, build_wheel, bundle,
                                compiler_missing)

from helpers import pypi_reachable

REPO = Path(__file__).resolve().parents[1]
ALPHA, RES = 0.25, 32


def _pyenv_python(version: str) -> Path | None:
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    found = sorted(root.glob(f"{version}.*/bin/python{version}"))
    return found[-1] if found else None


def _board_env(**extra) -> dict:
    """A board's environment: none of this host's venv, Python or pip settings (no find-links to
    local wheels, no extra indexes), so the install can only use the bundle's wheels."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "LD_", "QEMU_"))}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1", **extra)
    return env


def _make_bundle(artifact: Path, python: str, arch_wheel: Path, out: Path) -> Path:
    try:
        return bundle(artifact, python=python, out=out, wheel=arch_wheel, log=lambda s: None)
    except BundleError as e:
        if "pip download" in str(e) and not pypi_reachable():
            pytest.skip(f"wheels for Python {python} are not cached and PyPI is unreachable: {e}")
        raise


def _unpack(archive: Path, dest: Path) -> Path:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="tar")
    (top,) = dest.iterdir()
    return top


@pytest.fixture(scope="module")
def own_wheel(tmp_path_factory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def x86_artifact(tmp_path_factory) -> Path:
    from mbn_codegen.build import BuildConfig, build
    out = tmp_path_factory.mktemp("art") / "v1-x86_64"
    return build(BuildConfig(model="mobilenet_v1", alpha=ALPHA, resolution=RES, target="x86_64", out=str(out)),
                 log=lambda s: None)


@pytest.fixture(scope="module")
def arm64_artifact(tmp_path_factory) -> Path:
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not found: install Debian package g++-aarch64-linux-gnu "
                    "(make apt-deps)")
    from mbn_codegen.build import BuildConfig, build
    out = tmp_path_factory.mktemp("art") / "v1-arm64"
    return build(BuildConfig(model="mobilenet_v1", alpha=ALPHA, resolution=RES, target="arm64", out=str(out)),
                 log=lambda s: None)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image
    path = tmp_path_factory.mktemp("img") / "noise.png"
    Image.fromarray((np.random.default_rng(0).random((50, 60, 3)) * 255).astype("uint8")).save(path)
    return path


# ---------------------------------------------------------------------------------------------
# The split itself

def test_compile_extra_matches_the_import_table():
    """COMPILE_MODULES (what the CLI recognises as 'compiler side missing') lists exactly the
    `compile` extra, and the base install carries none of it."""
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    name = lambda req: req.split(";")[0].split("==")[0].split(">")[0].split("<")[0].strip().lower()  # noqa: E731
    base = {name(r) for r in conf["dependencies"]}
    assert base >= {"apache-tvm", "apache-tvm-ffi", "numpy", "cloudpickle"}
    # the extra may also pin base packages exactly for the host (numpy, pillow)
    assert {name(r) for r in conf["optional-dependencies"]["compile"]} - base == set(COMPILE_MODULES.values())


def test_compiler_missing_follows_the_cause_chain():
    try:
        try:
            raise ModuleNotFoundError("No module named 'onnx'", name="onnx")
        except ModuleNotFoundError as e:
            raise ImportError("onnx is required by the ONNX frontend") from e   # as TVM raises it
    except ImportError as outer:
        err = compiler_missing(outer)
    assert isinstance(err, CompilerNotInstalledError)
    assert "pip install 'mbn-codegen[compile]'" in str(err) and "onnx" in str(err)
    assert compiler_missing(ModuleNotFoundError("x", name="yaml")) is None


def test_package_import_is_light():
    code = ("import sys, mbn_codegen, mbn_codegen.bundle, mbn_codegen.cli.main; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx', 'tvm', 'numpy', 'PIL'}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_bundle_refuses_what_it_cannot_make(x86_artifact, own_wheel, tmp_path):
    with pytest.raises(BundleError, match="3.10, 3.11, 3.12"):
        bundle(x86_artifact, python="3.9", wheel=own_wheel, out=tmp_path / "b.tar.gz")
    with pytest.raises(BundleError, match="inside the artifact"):
        bundle(x86_artifact, python="3.11", wheel=own_wheel, out=x86_artifact / "b.tar.gz")
    with pytest.raises(BundleError, match="mbn_codegen-"):
        bundle(x86_artifact, python="3.11", wheel=tmp_path, out=tmp_path / "b.tar.gz")
    from mbn_codegen.errors import ArtifactError
    with pytest.raises(ArtifactError, match="manifest.json"):
        bundle(tmp_path, python="3.11", wheel=own_wheel)
    assert not list(tmp_path.glob("*.tar.gz"))


# ---------------------------------------------------------------------------------------------
# x86_64: runtime-only venvs of Python 3.10 and 3.12, installed from a bundle

_PROBE = textwrap.dedent("""
    import importlib.util, json, sys
    import mbn_codegen, mbn_codegen.runtime
    from mbn_codegen.runtime import load
    r = load(sys.argv[1]).selfcheck()
    print(json.dumps({"pkg": mbn_codegen.__file__, "arch": r["arch"], "err": r["max_abs_err"],
                      "absent": [m for m in ("torch", "onnx", "onnxruntime", "matplotlib")
                                 if importlib.util.find_spec(m) is None],
                      "loaded": sorted({m.split(".")[0] for m in sys.modules} & {"torch", "onnx", "tvm"})}))
""")

_RPC_CLIENT = textwrap.dedent("""
    import sys, numpy as np
    from tvm import rpc, runtime
    s = rpc.connect("127.0.0.1", int(sys.argv[1]), session_timeout=60)
    a = runtime.tensor(np.arange(6, dtype="float32"), s.cpu(0))
    print(a.numpy().sum())
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("python", ["3.10", "3.12"])
def test_runtime_only_venv_from_bundle(python, x86_artifact, own_wheel, tmp_path):
    interp = _pyenv_python(python)
    if interp is None:
        pytest.skip(f"no Python {python} under pyenv ($PYENV_ROOT or ~/.pyenv/versions/{python}.*)")
    archive = _make_bundle(x86_artifact, python, own_wheel, tmp_path / f"b{python}.tar.gz")
    top = _unpack(archive, tmp_path / "board")
    env = _board_env(PYTHON=str(interp))
    r = subprocess.run(["sh", str(top / "install.sh")], capture_output=True, text=True, env=env,
                       cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "self-check: ok on x86_64" in r.stdout
    assert "tvm.exec.rpc_server --tracker" in r.stdout
    vpy = top / "venv" / "bin" / "python"

    p = subprocess.run([str(vpy), "-c", _PROBE, str(top / "artifact" / x86_artifact.name)], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr
    import json
    info = json.loads(p.stdout)
    assert Path(info["pkg"]).is_relative_to(top / "venv"), info["pkg"]       # the wheel, not this checkout
    assert info["absent"] == ["torch", "onnx", "onnxruntime", "matplotlib"]
    assert info["loaded"] == [] and info["arch"] == "x86_64"

    b = subprocess.run([str(top / "venv" / "bin" / "mbn-codegen"), "build", "--alpha", "0.25"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert b.returncode == 2, b.stderr
    assert "CompilerNotInstalledError" in b.stderr
    assert ("pip install 'mbn-codegen[compile]'" in b.stderr if python != "3.10" else "Python 3.11" in b.stderr)
    assert "Traceback" not in b.stderr

    port = _free_port()
    server = subprocess.Popen([str(vpy), "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    try:
        for _ in range(60):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                import time
                time.sleep(0.5)
        c = subprocess.run([sys.executable, "-c", _RPC_CLIENT, str(port)], capture_output=True, text=True,
                           timeout=120)
        assert c.returncode == 0, c.stderr
        assert float(c.stdout.split()[-1]) == 15.0
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


# ---------------------------------------------------------------------------------------------
# aarch64 under qemu

@pytest.mark.qemu
def test_run_arm64_artifact_is_emulated(arm64_artifact, x86_artifact, photo):
    cmd = [sys.executable, "-m", "mbn_codegen.cli.main", "run"]
    emu = subprocess.run([*cmd, str(arm64_artifact), str(photo), "-k", "3"], capture_output=True, text=True,
                         cwd=REPO, timeout=300)
    assert emu.returncode == 0, emu.stderr
    assert "emulated under qemu-aarch64: timings mean nothing" in emu.stderr
    assert "self-check: ok on aarch64" in emu.stdout
    native = subprocess.run([*cmd, str(x86_artifact), str(photo), "-k", "3"], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert native.returncode == 0, native.stderr
    top3 = lambda out: [line.split()[1] for line in out.splitlines() if line.startswith("  ")]  # noqa: E731
    assert len(top3(emu.stdout)) == 3
    assert top3(emu.stdout) == top3(native.stdout)      # same weights (seed 0), same classes


def test_run_arm64_artifact_without_emulation_names_the_fix(arm64_artifact, tmp_path):
    env = dict(os.environ, MBN_ARM64_ROOT=str(tmp_path / "no-sysroot"))
    r = subprocess.run([sys.executable, "-m", "mbn_codegen.cli.main", "run", str(arm64_artifact)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 2
    assert "ArchitectureMismatchError" in r.stderr and "make arm64-sysroot" in r.stderr
    assert "Traceback" not in r.stderr
