"""CUDA artifacts carry compiled GPU code (a fatbin for the target's arch), never CUDA source.

Without help, TVM 0.27 on a build machine without the NVIDIA driver keeps the kernels as CUDA C++
in the exported library (compiled only when loaded, which needs nvcc/NVRTC and the full tvm
package on the board). mbn_codegen.cuda.compile_with_nvcc compiles them with nvcc at build time.
"""
from __future__ import annotations

import json
import platform
import shutil
import time

import numpy as np
import pytest

from mbn_codegen import cuda
from mbn_codegen.errors import CrossCompilerMissingError

C, H, W, C_OUT = 8, 16, 16, 16
COMMON = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152,
          "thread_warp_size": 32}
ORIN = {"kind": "cuda", "arch": "sm_87", **COMMON,
        "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78",
                 "mattr": ["+neon"]}}


def x86_cuda(arch: str = "sm_90") -> dict:
    return {"kind": "cuda", "arch": arch, **COMMON,
            "host": {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64-v3"}}


def _cxx_for(machine: str) -> str | None:
    """A C++ compiler that links shared libraries for `machine` ('aarch64' / 'x86_64')."""
    if platform.machine() == machine and shutil.which("g++"):
        return "g++"
    return shutil.which(f"{machine}-linux-gnu-g++")


NVCC = cuda.find_nvcc()
AARCH64_CXX = _cxx_for("aarch64")
X86_CXX = _cxx_for("x86_64")
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: install the CUDA toolkit (Debian: nvidia-cuda-toolkit) "
                         "or set CUDA_PATH")
needs_aarch64_cxx = pytest.mark.skipif(
    AARCH64_CXX is None, reason="no aarch64 C++ cross compiler (apt install g++-aarch64-linux-gnu)")
needs_x86_cxx = pytest.mark.skipif(
    X86_CXX is None, reason="no x86_64 C++ compiler (g++ on an x86-64 host, or "
                            "x86_64-linux-gnu-g++)")


# --------------------------------------------------------------------------------------------
# the network: depthwise 3x3 + ReLU6 + pointwise 1x1 + ReLU, the MobileNet building block


def _weights():
    rng = np.random.default_rng(7)
    return {"dw_w": (rng.standard_normal((C, 1, 3, 3)) * 0.5).astype("float32"),
            "dw_b": (rng.standard_normal(C) * 0.1).astype("float32"),
            "pw_w": (rng.standard_normal((C_OUT, C, 1, 1)) * 0.5).astype("float32"),
            "pw_b": (rng.standard_normal(C_OUT) * 0.1).astype("float32"),
            "lo": np.array(0.0, "float32"), "hi": np.array(6.0, "float32")}


def tiny_onnx():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Conv", ["input", "dw_w", "dw_b"], ["dw"], group=C, kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["dw", "lo", "hi"], ["act"]),
        helper.make_node("Conv", ["act", "pw_w", "pw_b"], ["pw"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["pw"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_dw_pw",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, C, H, W])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, C_OUT, H, W])],
        initializer=[numpy_helper.from_array(v, k) for k, v in _weights().items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tiny_relax():
    from mbn_codegen._tvm import from_onnx
    return from_onnx(tiny_onnx(), shape_dict={"input": [1, C, H, W]})


def reference(x: np.ndarray) -> np.ndarray:
    w = _weights()
    xp = np.pad(x[0], ((0, 0), (1, 1), (1, 1)))
    dw = sum(xp[:, i:i + H, j:j + W] * w["dw_w"][:, 0, i, j][:, None, None]
             for i in range(3) for j in range(3)) + w["dw_b"][:, None, None]
    act = np.clip(dw, 0.0, 6.0)
    pw = np.einsum("oc,chw->ohw", w["pw_w"][:, :, 0, 0], act) + w["pw_b"][:, None, None]
    return np.maximum(pw, 0.0)[None]


def build(target: dict, path, cc: str | None, toolkit: str | None = None):
    """tvm.compile + export under compile_with_nvcc; returns (executable, compiler, s)."""
    from mbn_codegen._tvm import Target, tvm

    mod = tiny_relax()
    t0 = time.perf_counter()
    with cuda.compile_with_nvcc(target["arch"], toolkit=toolkit) as nv:
        ex = tvm.compile(mod, target=Target(target))
        nv.export_library(ex, path, **({"cc": cc} if cc else {}))
    return ex, nv, time.perf_counter() - t0


def pypi_toolkit(major: str) -> cuda.Toolkit:
    """CUDA `major`'s NVRTC from the cache, installed on first use; skips if pip cannot reach it."""
    try:
        return cuda.find_toolkit(major, log=lambda s: None)
    except cuda.CudaToolkitMissingError as e:
        pytest.skip(f"CUDA {major} NVRTC could not be installed from PyPI: {str(e)[:300]}")


def _assert_binary_artifact(path, arch: str, machine: str, fmt: str = "fatbin"):
    assert cuda.elf_machine(path) == machine
    assert cuda.module_binary_format(path) == fmt
    payloads = cuda.cuda_payloads(path)
    assert payloads and all(p.archs == (arch,) for p in payloads), payloads
    data = open(path, "rb").read()
    assert b"__global__" not in data and b"extern \"C\"" not in data, "CUDA source left in the .so"


def test_reference_matches_cpu_build():
    """The numpy oracle of the GPU test, checked where it can run: against a CPU build."""
    from mbn_codegen._tvm import Target, relax, tvm

    vm = relax.VirtualMachine(tvm.compile(tiny_relax(), target=Target({"kind": "llvm"})),
                              tvm.cpu())
    rng = np.random.default_rng(1)
    outs = []
    for _ in range(2):
        x = rng.uniform(-1, 1, (1, C, H, W)).astype("float32")
        got = vm["main"](tvm.runtime.tensor(x)).numpy()
        np.testing.assert_allclose(got, reference(x), rtol=1e-5, atol=1e-5)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2


# --------------------------------------------------------------------------------------------
# errors


def test_missing_nvcc_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_PATH", str(tmp_path))          # a toolkit root without bin/nvcc
    assert cuda.find_nvcc() is None
    with pytest.raises(CrossCompilerMissingError) as e:
        cuda.require_nvcc()
    msg = str(e.value)
    assert "nvidia-cuda-toolkit" in msg and "CUDA_PATH" in msg and str(tmp_path) in msg
    with pytest.raises(CrossCompilerMissingError):
        with cuda.compile_with_nvcc("sm_87"):
            pass


def test_missing_pypi_toolkit_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MBN_CUDA_CACHE", str(tmp_path))
    monkeypatch.setenv("MBN_CUDA_NO_INSTALL", "1")
    with pytest.raises(cuda.CudaToolkitMissingError) as e:
        cuda.find_toolkit("11")
    msg = str(e.value)
    assert "-m mbn_codegen.cuda install 11" in msg and str(tmp_path / "cuda-11") in msg
    with pytest.raises(cuda.CudaToolkitMissingError, match="cuda_toolkit may be"):
        cuda.install_toolkit("10")


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_53", "sm_72"])
def test_arch_nvcc_cannot_target(arch):
    if arch in cuda.nvcc_gpu_codes():
        pytest.skip(f"this nvcc ({cuda.nvcc_version()}) still supports {arch}")
    with pytest.raises(CrossCompilerMissingError) as e:
        with cuda.compile_with_nvcc(arch):
            pass
    assert arch in str(e.value) and cuda.nvcc_version() in str(e.value)


@needs_nvcc
def test_malformed_arch():
    with pytest.raises(CrossCompilerMissingError, match="sm_XY"):
        cuda.check_arch("87")


# --------------------------------------------------------------------------------------------
# the scope


@needs_nvcc
def test_scope_registers_and_restores_callback():
    from mbn_codegen._tvm import tvm, tvm_ffi

    name = cuda.CALLBACK_NAME
    original = tvm_ffi.get_global_func(name, allow_missing=True)
    export = tvm.runtime.module.Module.export_library
    tvm_ffi.register_global_func(name, lambda code: b"sentinel", override=True)
    try:
        with cuda.compile_with_nvcc("sm_87"):
            kernel = 'extern "C" __global__ void k(float* a) { a[threadIdx.x] *= 2.0f; }\n'
            binary = bytes(tvm_ffi.get_global_func(name)(kernel))
            assert cuda.payload_format(binary) == "fatbin"
            assert cuda.payload_archs(binary) == ("sm_87",)
            assert tvm.runtime.module.Module.export_library is export      # nothing patched
        assert bytes(tvm_ffi.get_global_func(name)("x")) == b"sentinel"
        assert tvm.runtime.module.Module.export_library is export
    finally:
        if original is not None:
            tvm_ffi.register_global_func(name, original, override=True)
        else:
            tvm_ffi.remove_global_func(name)


# --------------------------------------------------------------------------------------------
# artifacts


@needs_x86_cxx
def test_without_scope_the_artifact_keeps_cuda_source(tmp_path):
    """The problem being solved (where no driver is loaded, as on a CPU-only build machine)."""
    from mbn_codegen._tvm import Target, tvm, tvm_ffi

    if tvm_ffi.get_global_func("ffi.Module.create.cuda", allow_missing=True) is not None:
        pytest.skip("the CUDA runtime is loaded here: codegen compiles through TVM's own callback")
    ex = tvm.compile(tiny_relax(), target=Target(x86_cuda()))
    ex.export_library(str(tmp_path / "src.so"), cc=X86_CXX)
    assert cuda.module_binary_format(ex) == "cu"
    assert cuda.module_binary_format(tmp_path / "src.so") == "cu"


@needs_nvcc
@needs_aarch64_cxx
def test_orin_sm87_artifact_holds_fatbin(tmp_path):
    path = tmp_path / "orin.so"
    ex, nv, seconds = build(ORIN, path, AARCH64_CXX)
    _assert_binary_artifact(path, "sm_87", "aarch64")
    assert nv.compiled <= 1                 # one CUDA module, compiled once
    print(f"sm_87/aarch64 build+export {seconds:.2f}s, nvcc {nv.seconds:.2f}s")


@needs_nvcc
@needs_x86_cxx
def test_x86_sm90_artifact_holds_fatbin(tmp_path):
    path = tmp_path / "x86.so"
    ex, nv, seconds = build(x86_cuda("sm_90"), path, X86_CXX)
    _assert_binary_artifact(path, "sm_90", "x86_64")
    # only the code and its format tag changed: the kernel table still names the kernels
    (payload,) = cuda._file_cuda_payloads(path)
    tag, fmap, _ = cuda._split_cuda_payload(payload)
    assert tag == "fatbin" and b"_kernel" in fmap
    # the .tar export path packs the same way
    ex.export_library(str(tmp_path / "x86.tar"), fpack_imports=nv.pack_imports)
    assert cuda.module_binary_format(tmp_path / "x86.tar") == "fatbin"
    print(f"sm_90/x86_64 build+export {seconds:.2f}s, nvcc {nv.seconds:.2f}s")


@pytest.mark.gpu
@needs_nvcc
def test_x86_cuda_artifact_runs_on_gpu(tmp_path):
    from mbn_codegen._tvm import Target, relax, tvm

    if platform.machine() != "x86_64":
        pytest.skip("the x86 CUDA artifact runs on an x86-64 host")
    dev = tvm.cuda(0)
    if not dev.exist:
        pytest.skip("no CUDA GPU visible to TVM (tvm.cuda().exist is False)")
    arch = "sm_" + dev.compute_version.replace(".", "")
    if arch not in cuda.nvcc_gpu_codes():
        pytest.skip(f"nvcc {cuda.nvcc_version()} cannot compile for this GPU ({arch})")
    path = tmp_path / "gpu.so"
    build(x86_cuda(arch), path, X86_CXX or "g++")
    _assert_binary_artifact(path, arch, "x86_64")

    lib = tvm.runtime.load_module(str(path))
    assert cuda.module_binary_format(lib) == "fatbin"
    vm = relax.VirtualMachine(lib, dev)
    cpu_vm = relax.VirtualMachine(tvm.compile(tiny_relax(), target=Target({"kind": "llvm"})),
                                  tvm.cpu())
    rng = np.random.default_rng(0)
    outs = []
    for _ in range(2):
        x = rng.uniform(-1, 1, (1, C, H, W)).astype("float32")
        got = vm["main"](tvm.runtime.tensor(x, dev)).numpy()
        ref = reference(x)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got, cpu_vm["main"](tvm.runtime.tensor(x)).numpy(),
                                   rtol=1e-4, atol=1e-4)
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2, "outputs do not depend on the input"


# --------------------------------------------------------------------------------------------
# Jetson: CUDA 12 (JetPack 6) and CUDA 11 (JetPack 5) through NVRTC from PyPI


@needs_aarch64_cxx
@pytest.mark.parametrize("major,arch", [("12", "sm_87"), ("11", "sm_87"), ("11", "sm_72")])
def test_jetson_artifact_holds_sass_of_the_boards_cuda(tmp_path, major, arch):
    tk = pypi_toolkit(major)
    assert tk.compiler == "nvrtc" and tk.version.startswith(major + ".")
    path = tmp_path / "jetson.so"
    target = dict(ORIN, arch=arch)
    _ex, nv, seconds = build(target, path, AARCH64_CXX, toolkit=major)
    _assert_binary_artifact(path, arch, "aarch64", fmt="cubin")
    (payload,) = cuda._file_cuda_payloads(path)
    _tag, _fmap, code = cuda._split_cuda_payload(payload)
    # from the bytes: ELF ABI 7 (CUDA 11/12; CUDA 13 writes 8, which JetPack's drivers refuse),
    # SASS only (a cubin has no PTX), for exactly the board's arch
    assert cuda.cubin_abi_version(code) == 7
    assert b".version" not in code and b".target" not in code
    assert nv.toolkit.version == tk.version
    print(f"CUDA {tk.version} NVRTC {arch}/aarch64 build+export {seconds:.2f}s, compile {nv.seconds:.2f}s")


@pytest.mark.parametrize("name,major,arch", [("jetson-orin", "12", "sm_87"),
                                             ("jetson-orin-jp5", "11", "sm_87"),
                                             ("jetson-xavier", "11", "sm_72")])
def test_jetson_targets_name_the_boards_cuda(name, major, arch):
    from mbn_codegen import targets

    spec = targets.load(name)
    assert spec.raw["cuda_toolkit"] == major and spec.cuda_arch == arch == spec.target["arch"]


def test_kernel_choice_from_timings(tmp_path, monkeypatch):
    from mbn_codegen import targets

    spec = targets.load("cuda")
    path = tmp_path / "t.json"
    monkeypatch.setenv("MBN_CUDA_KERNEL_TIMINGS", str(path))
    logs = []
    assert cuda.kernel_timings(spec, logs.append).pick("pointwise", 10) == ("ours", "")
    assert "no GPU timings" in logs[-1]
    path.write_text(json.dumps({"arch": "sm_80", "kernels": {
        "k": {"kind": "pointwise", "macs": 10, "ours_ms": 2, "dlight_ms": 1}}}))
    assert cuda.kernel_timings(spec, logs.append).pick("pointwise", 10) == ("ours", "")
    assert "not used" in logs[-1]
    path.write_text(json.dumps({"arch": spec.cuda_arch, "device": "H100", "kernels": {
        "a": {"kind": "pointwise", "macs": 10, "ours_ms": 2.0, "dlight_ms": 1.0},
        "a2": {"kind": "pointwise", "macs": 30, "ours_ms": 1.0, "dlight_ms": 1.5},
        "b": {"kind": "depthwise", "macs": 5, "ours_ms": 1.0, "dlight_ms": 3.0},
        "old": {"ours_ms": 9.0, "dlight_ms": 1.0}}}))
    c = cuda.kernel_timings(spec, logs.append)
    # the same shape (kind and MACs), whatever the kernel is called in this model
    assert c.pick("pointwise", 10) == ("dlight", "measured") and c.pick("pointwise", 30) == ("ours", "measured")
    assert c.pick("depthwise", 5) == ("ours", "measured")
    # an unmeasured shape: its kind's measured total (pointwise: ours 3.0 ms, dlight 2.5 ms)
    assert c.pick("pointwise", 99) == ("dlight", "measured-pointwise")
    assert c.pick("depthwise", 99) == ("ours", "measured-depthwise")
    # a kind nobody measured, and entries without a kind, give ours
    assert c.pick("dense", 7) == ("ours", "") and c.pick(None, None) == ("ours", "")
    monkeypatch.setenv("MBN_CUDA_KERNELS", "dlight")
    assert cuda.kernel_timings(spec, logs.append).pick("depthwise", 5) == ("dlight", "forced")
    monkeypatch.setenv("MBN_CUDA_KERNELS", "fastest")
    with pytest.raises(cuda.CudaCompileError, match="MBN_CUDA_KERNELS"):
        cuda.kernel_timings(spec, logs.append)


@needs_nvcc
@needs_x86_cxx
def test_cuda_build_replays_a_cuda_graph_unless_told_not_to(tmp_path, monkeypatch):
    """The default CUDA build captures the kernels after the input's as one CUDA graph (the VM
    calls run_or_capture); MBN_CUDA_GRAPH=0 launches each kernel; anything else is refused."""
    from mbn_codegen.build import BuildConfig, build as build_model

    libs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MBN_CUDA_GRAPH", flag)
        art = build_model(BuildConfig(alpha=0.25, resolution=32, target="cuda", out=str(tmp_path / flag)),
                          log=lambda s: None)
        assert json.loads((art / "manifest.json").read_text())["gpu"]["cuda_graph"] is (flag == "1")
        libs[flag] = (art / "lib.so").read_bytes()
    assert b"vm.builtin.cuda_graph.run_or_capture" in libs["1"]
    assert b"vm.builtin.cuda_graph.run_or_capture" not in libs["0"]
    monkeypatch.setenv("MBN_CUDA_GRAPH", "yes")
    with pytest.raises(cuda.CudaCompileError, match="MBN_CUDA_GRAPH"):
        cuda.use_cuda_graph(lambda s: None)
