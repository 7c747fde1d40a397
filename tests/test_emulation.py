"""aarch64 code under qemu user-mode emulation (mbn_codegen.emulation).

Needs Debian's qemu-user and the sysroot from scripts/arm64_sysroot.sh; the .so is cross-built on
the host with aarch64-linux-gnu-g++. Skipped, with the reason, when any of these is missing.
About 10 s in all (host build ~4 s, two emulated runs ~2 s each).
"""

from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest

from mbn_codegen.emulation import qemu_available, run_python_arm64

pytestmark = pytest.mark.qemu

A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"],
       "num-cores": 4}
EM_AARCH64 = 183  # ELF e_machine


@pytest.fixture(scope="module", autouse=True)
def _emulation():
    reason = qemu_available()
    if reason is not None:
        pytest.skip(f"arm64 emulation not available: {reason}")


def _conv2d_nchw(x: np.ndarray, w: np.ndarray, pad: int) -> np.ndarray:
    """Plain numpy reference: stride 1, no groups."""
    kh, kw = w.shape[2:]
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, :oh, :ow]
    return np.einsum("nchwij,ocij->nohw", win, w, optimize=True)


@pytest.fixture(scope="module")
def tiny_aarch64_so(tmp_path_factory):
    """A 2-layer conv net (3x3 conv, ReLU, 1x1 conv) built for Cortex-A72, plus its weights."""
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not found: install Debian package g++-aarch64-linux-gnu")
    from mbn_codegen._tvm import relax, tvm

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype("float32")
    w2 = rng.standard_normal((4, 8, 1, 1)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 3, 16, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w1), padding=1))
            y = bb.emit(relax.op.nn.relu(y))
            y = bb.emit_output(relax.op.nn.conv2d(y, relax.const(w2)))
        bb.emit_func_output(y)
    ex = tvm.compile(bb.get(), target=tvm.target.Target(A72))
    path = tmp_path_factory.mktemp("aarch64") / "tiny.so"
    ex.export_library(str(path), cc="aarch64-linux-gnu-g++")
    return path, w1, w2


def test_emulated_python_is_aarch64():
    code = textwrap.dedent("""
        import platform, numpy, tvm_ffi, mbn_codegen
        print(platform.machine(), numpy.__version__, mbn_codegen.__name__)
    """)
    r = run_python_arm64(["-c", code], timeout=120)
    assert r.returncode == 0, r.stderr
    machine, numpy_version, pkg = r.stdout.split()
    assert machine == "aarch64"
    assert numpy_version == np.__version__
    assert pkg == "mbn_codegen"


# Lightest runtime path: tvm_ffi + ctypes-loaded libtvm_runtime.so, no tvm.
_RUNNER = textwrap.dedent("""
    import ctypes, importlib.util, os, sys
    import numpy as np, tvm_ffi
    lib = os.path.join(os.path.dirname(importlib.util.find_spec("tvm").origin), "lib",
                       "libtvm_runtime.so")
    ctypes.CDLL(lib, ctypes.RTLD_GLOBAL)
    so, x_path, out_path = sys.argv[1:]
    vm = tvm_ffi.load_module(os.path.abspath(so))["vm_load_executable"]()
    vm["vm_initialization"](1, 0, 2)   # kDLCPU, device 0, pooled allocator
    out = np.from_dlpack(vm["main"](tvm_ffi.from_dlpack(np.load(x_path))))
    np.save(out_path, out)
""")


def test_aarch64_library_runs_and_matches_numpy(tiny_aarch64_so, tmp_path):
    so, w1, w2 = tiny_aarch64_so
    with open(so, "rb") as f:
        head = f.read(20)
    assert head[:4] == b"\x7fELF" and int.from_bytes(head[18:20], "little") == EM_AARCH64

    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "runner.py").write_text(_RUNNER)
    r = run_python_arm64(["runner.py", str(so), "x.npy", "out.npy"], cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr

    got = np.load(tmp_path / "out.npy")
    ref = _conv2d_nchw(np.maximum(_conv2d_nchw(x, w1, pad=1), 0), w2, pad=0)
    assert got.shape == ref.shape == (1, 4, 16, 16)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
