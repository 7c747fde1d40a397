"""Run a built artifact. Needs only the TVM runtime: numpy, apache-tvm-ffi and the apache-tvm wheel's
libtvm_runtime.so, loaded directly (no `import tvm`, so no compiler, and no torch or onnx).

    from mbn_codegen.runtime import load
    m = load("artifacts/mobilenet_v2-1.0-224-x86_64")
    m.selfcheck(); logits = m(x); m.predict(x, k=5)
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import platform
from pathlib import Path

import numpy as np

from .errors import (ArchitectureMismatchError, ArtifactError, InputDtypeError, InputShapeError,
                     SelfCheckError)

MANIFEST = "manifest.json"
_DEVICE_TYPE = {"cpu": 1, "cuda": 2}
_POOLED_ALLOCATOR = 2
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def _runtime_lib_dir() -> Path:
    spec = importlib.util.find_spec("tvm")      # locates the wheel without importing it
    if spec is None or spec.origin is None:
        raise ArtifactError("the TVM runtime is not installed: pip install apache-tvm==0.27.0.post1 "
                            "apache-tvm-ffi==0.1.14.post0")
    return Path(spec.origin).parent / "lib"


_loaded: set[str] = set()


def _load_runtime(device: str):
    import tvm_ffi

    libs = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if device == "cuda" else [])
    for name in libs:
        if name not in _loaded:
            path = _runtime_lib_dir() / name
            try:
                ctypes.CDLL(str(path), ctypes.RTLD_GLOBAL)   # same file as `import tvm` loads: no-op then
            except OSError as e:
                hint = " (CUDA artifacts need the NVIDIA driver's libcuda.so.1)" if "cuda" in name else ""
                raise ArtifactError(f"cannot load the TVM runtime {path}: {e}{hint}") from None
            _loaded.add(name)
    return tvm_ffi


def machine_arch() -> str:
    m = platform.machine().lower()
    return _ARCH_ALIASES.get(m, m)


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                k, v = (x.strip() for x in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return info


def cpu_flags() -> set[str]:
    """SIMD flags from /proc/cpuinfo: x86 lists them as `flags`, arm64 as `Features`. Empty when
    the file does not describe this architecture (qemu-user shows the host's), so no check then."""
    return set(cpuinfo().get("Features" if machine_arch() == "aarch64" else "flags", "").split())


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    p = Path(artifact_dir) / MANIFEST
    if not p.is_file():
        raise ArtifactError(f"{artifact_dir} is not an artifact directory (no {MANIFEST}); "
                            "build one with `mbn-codegen build`")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{p} is not valid JSON ({e}); rebuild the artifact") from None


def check_machine(manifest: dict) -> None:
    """Refuse, with a named error, what would otherwise crash: another CPU architecture (dlopen
    fails with 'wrong ELF class' at best), or missing SIMD extensions (SIGILL mid-inference)."""
    want, here = manifest["arch"], machine_arch()
    if want != here:
        raise ArchitectureMismatchError(
            f"this artifact was built for {want} (target {manifest['target']['name']!r}) but this "
            f"machine is {here}: copy it to an {want} board, or build for this machine with "
            f"`mbn-codegen build --target {'x86_64' if here == 'x86_64' else 'arm64'}`")
    need = set(manifest["target"].get("required_cpu_flags", []))
    have = cpu_flags()
    if have and need - have:
        raise ArchitectureMismatchError(
            f"this CPU lacks {', '.join(sorted(need - have))}, which target {manifest['target']['name']!r} "
            "compiled in; build for a lower target (e.g. --target x86_64 for AVX2)")


_opened: dict[str, str] = {}


def _unique_path(lib: Path, digest: str) -> str:
    """dlopen returns the already-loaded library for a path it has seen, even if the file was
    rebuilt since; a rebuilt artifact at the same path is loaded from a copy instead."""
    path = str(lib.resolve())
    if _opened.setdefault(path, digest) == digest:
        return path
    import shutil
    import tempfile
    copy = Path(tempfile.mkdtemp(prefix="mbn-")) / f"{digest[:16]}.so"
    shutil.copyfile(path, copy)
    _opened[str(copy)] = digest
    return str(copy)


def _aligned(x: np.ndarray, alignment: int = 64) -> np.ndarray:
    """TVM kernels assume 64-byte aligned buffers (vector loads); numpy only promises 16.
    An unaligned input segfaults inside the library, so copy it into an aligned buffer."""
    if x.flags.c_contiguous and x.ctypes.data % alignment == 0:
        return x
    raw = np.empty(x.nbytes + alignment, dtype=np.uint8)
    off = (-raw.ctypes.data) % alignment
    out = raw[off:off + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


class Model:
    def __init__(self, artifact_dir: str | os.PathLike, device_id: int = 0, verify_checksum: bool = True):
        self.dir = Path(artifact_dir)
        self.manifest = m = read_manifest(self.dir)
        check_machine(m)
        lib = self.dir / m["library"]["file"]
        if not lib.is_file():
            raise ArtifactError(f"{lib} is missing from the artifact; rebuild it")
        if verify_checksum and sha256(lib) != m["library"]["sha256"]:
            raise ArtifactError(f"{lib} does not match the sha256 in {MANIFEST}: the file was changed "
                                "or truncated in transfer; copy the artifact again")
        self.device = m["device"]
        self._ffi = _load_runtime(self.device)
        inp = m["input"]
        self.input_name, self.input_shape = inp["name"], tuple(inp["shape"])
        self.input_dtype = np.dtype(inp["dtype"])
        self.labels = self._read_labels()
        self._dev = self._ffi.device(self.device, device_id)
        mod = self._ffi.load_module(_unique_path(lib, m["library"]["sha256"]))
        self._vm = mod["vm_load_executable"]()
        init = [_DEVICE_TYPE[self.device], device_id, _POOLED_ALLOCATOR]
        if self.device != "cpu":
            init += [_DEVICE_TYPE["cpu"], 0, _POOLED_ALLOCATOR]
        self._vm["vm_initialization"](*init)
        self._main = self._vm["main"]

    def _read_labels(self) -> list[str] | None:
        f = self.manifest.get("labels_file")
        return (self.dir / f).read_text().splitlines() if f else None

    def check_input(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InputDtypeError(f"input must be a numpy array, got {type(x).__name__}")
        if x.dtype != self.input_dtype:
            raise InputDtypeError(f"input {self.input_name!r} has dtype {x.dtype}, the model takes "
                                  f"{self.input_dtype}: convert with x.astype(np.{self.input_dtype})")
        if tuple(x.shape) != self.input_shape:
            hint = ""
            if x.ndim == 3 and tuple(x.shape) == self.input_shape[1:]:
                hint = ": add the batch dimension with x[None]"
            elif x.ndim == 4 and x.shape[-1] == 3 and x.shape[1] != 3:
                hint = ": the model takes NCHW; transpose NHWC with x.transpose(0, 3, 1, 2)"
            elif x.ndim == 4:
                hint = (f": this artifact was built for resolution {self.input_shape[-1]}; resize the "
                        "image or build another resolution")
            raise InputShapeError(f"input {self.input_name!r} has shape {tuple(x.shape)}, the model takes "
                                  f"{self.input_shape}{hint}")
        return _aligned(x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)

    def run(self, x: np.ndarray) -> np.ndarray:
        x = self.check_input(x)
        t = self._ffi.from_dlpack(x)
        if self.device != "cpu":
            alloc = self._ffi.get_global_func("runtime.TVMTensorAllocWithScope")
            copy = self._ffi.get_global_func("runtime.TVMTensorCopyFromTo")
            dev_t = alloc(self._ffi.Shape(x.shape), self._ffi.dtype(str(x.dtype)), self._dev, "global")
            copy(t, dev_t)
            out = self._main(dev_t)
            host = np.empty(tuple(out.shape), dtype=str(out.dtype))
            copy(out, self._ffi.from_dlpack(host))
            return host
        return np.from_dlpack(self._main(t)).copy()

    def predict(self, x: np.ndarray, k: int = 5) -> list[tuple[int, str, float]]:
        """Top-k (class index, label, probability) for a single image."""
        logits = self.run(x)[0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p)[:k]
        return [(int(i), self.labels[i] if self.labels else str(i), float(p[i])) for i in top]

    def selfcheck(self, rtol: float | None = None, atol: float | None = None) -> dict:
        """Replay the reference pair shipped with the artifact (computed by ONNX Runtime at build)."""
        ref = self.manifest["reference"]
        x = np.load(self.dir / ref["input"])
        want = np.load(self.dir / ref["output"])
        got = self.run(x)
        rtol = ref["rtol"] if rtol is None else rtol
        atol = ref["atol"] if atol is None else atol
        err = float(np.max(np.abs(got - want)))
        ok = bool(np.allclose(got, want, rtol=rtol, atol=atol))
        same_top1 = bool(np.argmax(got) == np.argmax(want))
        result = {"ok": ok and same_top1, "max_abs_err": err, "rtol": rtol, "atol": atol,
                  "top1": int(np.argmax(got)), "reference_top1": int(np.argmax(want)),
                  "arch": machine_arch(), "device": self.device}
        if not result["ok"]:
            raise SelfCheckError(f"self-check failed on {machine_arch()}: max |error| {err:.3g} "
                                 f"(rtol {rtol}, atol {atol}), top-1 {result['top1']} vs reference "
                                 f"{result['reference_top1']}. The library computes wrong numbers here")
        return result


def load(artifact_dir: str | os.PathLike, device_id: int = 0) -> Model:
    return Model(artifact_dir, device_id=device_id)
