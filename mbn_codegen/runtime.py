"""Run a built artifact. Needs only the TVM runtime: numpy, apache-tvm-ffi and the apache-tvm wheel's
libtvm_runtime.so, loaded directly (no `import tvm`, so no compiler, and no torch or onnx).

    from mbn_codegen.runtime import load
    m = load("artifacts/mobilenet_v2-1.0-224-x86_64")
    m.selfcheck(); logits = m(x); m.predict(x, k=5)
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np

from .errors import (ArchitectureMismatchError, ArtifactError, InputDtypeError, InputShapeError,
                     InputValueError, NonFiniteInputError, NonFiniteInputWarning, SelfCheckError)

MANIFEST = "manifest.json"
_DEVICE_TYPE = {"cpu": 1, "cuda": 2}
_POOLED_ALLOCATOR = 2
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


@functools.cache
def _load_runtime_lib(name: str) -> None:
    spec = importlib.util.find_spec("tvm")      # locates the wheel without importing it
    if spec is None or spec.origin is None:
        raise ArtifactError("the TVM runtime is not installed: pip install apache-tvm==0.27.0.post1 "
                            "apache-tvm-ffi==0.1.14.post0")
    path = Path(spec.origin).parent / "lib" / name
    try:
        ctypes.CDLL(str(path), ctypes.RTLD_GLOBAL)   # same file as `import tvm` loads: no-op then
    except OSError as e:
        hint = " (CUDA artifacts need the NVIDIA driver's libcuda.so.1)" if "cuda" in name else ""
        raise ArtifactError(f"cannot load the TVM runtime {path}: {e}{hint}") from None


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


_REBUILD = "rebuild the artifact with `mbn-codegen build` or copy the whole directory again"
_NAN_SEMANTICS = ("ieee-maxnum", "propagate")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_shape(v) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(_is_int(d) and d > 0 for d in v)


def _is_dtype(v) -> bool:
    try:
        return isinstance(v, str) and np.dtype(v).kind in "biuf"
    except TypeError:
        return False


_CHECKS: tuple[tuple[str, object, str], ...] = (
    ("format", _is_int, "an integer"),
    ("arch", str, "a string such as 'x86_64'"),
    ("device", lambda v: isinstance(v, str) and v in _DEVICE_TYPE, f"one of {sorted(_DEVICE_TYPE)}"),
    ("target.name", str, "a string"),
    ("target.required_cpu_flags", lambda v: isinstance(v, list) and all(isinstance(f, str) for f in v),
     "a list of CPU flag names"),
    ("library.file", lambda v: isinstance(v, str) and v != "", "a file name"),
    ("library.sha256", lambda v: isinstance(v, str) and len(v) == 64, "a 64-digit hex string"),
    ("input.name", str, "a string"),
    ("input.shape", _is_shape, "a list of positive integers"),
    ("input.dtype", _is_dtype, "a numpy dtype name such as 'float32'"),
    ("output.shape", _is_shape, "a list of positive integers"),
    ("reference.input", str, "a .npy file name"),
    ("reference.output", str, "a .npy file name"),
    ("labels_file", lambda v: v is None or (isinstance(v, str) and v != ""), "a file name or null"),
    ("nan_semantics", lambda v: v is None or v in _NAN_SEMANTICS, f"one of {list(_NAN_SEMANTICS)}"),
)
_OPTIONAL = {"labels_file", "nan_semantics"}    # absent reads as null


def read_manifest(artifact_dir: str | os.PathLike) -> dict:
    """The artifact's manifest, its keys and types checked: a damaged one is an ArtifactError
    naming the key instead of a KeyError or TypeError somewhere later."""
    p = Path(artifact_dir) / MANIFEST
    if not p.is_file():
        raise ArtifactError(f"{artifact_dir} is not an artifact directory (no {MANIFEST}); "
                            "build one with `mbn-codegen build`")
    try:
        manifest = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p} is not valid JSON ({e}); {_REBUILD}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{p} holds a JSON {type(manifest).__name__}, not an object with the "
                            f"artifact's description: {_REBUILD}")
    for key, check, want in _CHECKS:
        node, parts = manifest, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict):
                raise ArtifactError(f"{p}: {'.'.join(parts[:i])!r} should be an object, got "
                                    f"{json.dumps(node)[:60]}: {_REBUILD}")
            if part not in node and key not in _OPTIONAL:
                missing = ".".join(parts[:i + 1])
                what = want if missing == key else f"an object with {key!r}"
                raise ArtifactError(f"{p} lacks the key {missing!r} ({what}): the manifest is "
                                    f"incomplete or from another mbn-codegen version; {_REBUILD}")
            node = node.get(part)
        if not (isinstance(node, check) if isinstance(check, type) else check(node)):
            raise ArtifactError(f"{p}: {key!r} is {json.dumps(node)[:60]}, expected {want}: {_REBUILD}")
    return manifest


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


class _Library:
    """One dlopen'ed artifact library with its deserialized executable (weights included),
    shared by every Model loaded from the same file while any of them is alive."""
    __slots__ = ("module", "__weakref__")

    def __init__(self, module):
        self.module = module


_libraries: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_libraries_lock = threading.Lock()


def _mapped_inodes(path: str) -> set[int] | None:
    """Inodes under which `path` is mapped in this process ('(deleted)' once the file was
    replaced); None where /proc is unreadable."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return None
    fields = (line.split(maxsplit=5) for line in maps)
    return {int(f[4]) for f in fields if len(f) == 6 and f[5].removesuffix(" (deleted)") == path}


def _open_library(ffi, lib: Path, digest: str) -> _Library:
    """dlopen returns the already-loaded library for a path it has seen, even if the file was
    rebuilt since. A stale path is loaded from a private copy, deleted right after dlopen
    (the mapping keeps the data), so reloads leave no files behind."""
    # keep_module_alive=False: tvm_ffi's default pins every loaded module (its weights too) for
    # the life of the process, 1.8 MiB per load() of the smallest artifact.
    path = str(lib.resolve())
    st = os.stat(path)
    key = (path, digest, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    with _libraries_lock:
        entry = _libraries.get(key)
        if entry is None:
            mapped = _mapped_inodes(path)
            stale = any(k[0] == path for k in _libraries.keys()) or not (mapped is None or mapped <= {st.st_ino})
            try:
                if not stale:
                    module = ffi.load_module(path, keep_module_alive=False)
                else:
                    with tempfile.TemporaryDirectory(prefix="mbn-", ignore_cleanup_errors=True) as tmp:
                        module = ffi.load_module(shutil.copy(path, tmp), keep_module_alive=False)
            except Exception as e:      # tvm_ffi raises RuntimeError/OSError subclasses
                raise ArtifactError(f"cannot load {lib}: {e}. If the temp folder is mounted noexec, "
                                    "point TMPDIR at one that is not; otherwise rebuild the artifact") from None
            entry = _libraries[key] = _Library(module)
        return entry


def _aligned(x: np.ndarray, alignment: int = 64) -> np.ndarray:
    """TVM kernels assume 64-byte aligned buffers (vector loads); numpy only promises 16.
    An unaligned input segfaults inside the library, so copy it into an aligned buffer. DLPack
    refuses read-only arrays (np.load(mmap_mode="r"), broadcasts): those are copied too."""
    if x.flags.c_contiguous and x.flags.writeable and x.ctypes.data % alignment == 0:
        return x
    raw = np.empty(x.nbytes + alignment, dtype=np.uint8)
    off = (-raw.ctypes.data) % alignment
    out = raw[off:off + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def _nonfinite_report(x: np.ndarray) -> str | None:
    """None when every value is finite, else how many are not and where the first ones are."""
    bad = ~np.isfinite(x) if x.dtype.kind in "fc" else None
    if bad is None or not bad.any():
        return None
    n, nan, pinf = int(bad.sum()), int(np.isnan(x).sum()), int(np.isposinf(x).sum())
    first = [tuple(int(i) for i in idx) for idx in np.argwhere(bad)[:3]]
    where = ", ".join(str(f) for f in first) + (", ..." if n > len(first) else "")
    return (f"{n} of its {x.size} values are not finite ({nan} NaN, {pinf} +inf, {n - nan - pinf} -inf), "
            f"at index {where}")


class Model:
    """A loaded artifact. Safe to share between threads: calls into one Model are serialized by
    a lock (one VM per Model), since the Relax VM keeps per-call state and segfaults in
    StorageObj::AllocTensor when two threads run it at once. A lock rather than one VM per
    thread because TVM's thread pool already spreads each call over every core. On a 2-core
    AMD EPYC (Zen 3, AVX2), mobilenet_v1 alpha 0.5 resolution 128, median inferences/s with 1,
    2, 4 calling threads: lock 287, 273, 270; a VM per thread 300, 275, 279 (runs varied by
    +-20 % on that shared machine), so more threads do not add throughput either way, and a VM
    per thread would add a thread pool and a workspace per thread.

    Models loaded from the same library file share its loaded code and weights; the library is
    unloaded when the last of them is garbage-collected.

    Non-finite input: the compiled ReLU/ReLU6 are max/min, which return the other operand for
    NaN, so NaN or Inf pixels come out as ordinary, confident logits (ONNX Runtime returns
    NaN). run(), __call__() and predict() therefore raise NonFiniteInputError by default.
    check_finite=False (here, in load(), or per call) runs such input anyway; NaN propagation as
    ONNX defines it needs an artifact built with NaN-preserving activations (its manifest says
    "nan_semantics": "propagate", and the check is off by default for it). With the check off on
    any other artifact, non-finite input warns once (NonFiniteInputWarning).
    """

    def __init__(self, artifact_dir: str | os.PathLike, device_id: int = 0, verify_checksum: bool = True,
                 check_finite: bool | None = None):
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
        inp = m["input"]
        self.input_name, self.input_shape = inp["name"], tuple(inp["shape"])
        self.input_dtype = np.dtype(inp["dtype"])
        self.output_shape = tuple(m["output"]["shape"])
        self.num_classes = self.output_shape[-1]
        self.nan_semantics = m.get("nan_semantics") or "ieee-maxnum"
        self.check_finite = (self.nan_semantics != "propagate") if check_finite is None else bool(check_finite)
        self._warned_nonfinite = False
        self.labels = self._read_labels()
        import tvm_ffi

        for name in ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if self.device == "cuda" else []):
            _load_runtime_lib(name)
        self._ffi = tvm_ffi
        self._dev = self._ffi.device(self.device, device_id)
        self._lib = _open_library(self._ffi, lib, m["library"]["sha256"])
        self._vm = self._lib.module["vm_load_executable"]()
        init = [_DEVICE_TYPE[self.device], device_id, _POOLED_ALLOCATOR]
        if self.device != "cpu":
            init += [_DEVICE_TYPE["cpu"], 0, _POOLED_ALLOCATOR]
        self._vm["vm_initialization"](*init)
        self._main = self._vm["main"]
        self._dev_input = None
        self._lock = threading.Lock()

    def _read_labels(self) -> list[str] | None:
        f = self.manifest.get("labels_file")
        if not f:
            return None
        p = self.dir / f
        labels = self._read_file(p, "labels_file", lambda q: q.read_text(encoding="utf-8").splitlines(),
                                 UnicodeDecodeError)
        if len(labels) != self.num_classes:
            raise ArtifactError(f"{p} has {len(labels)} lines but the model has {self.num_classes} classes "
                                f"(output shape {list(self.output_shape)}): the labels file is truncated or "
                                "belongs to another model; copy the artifact again, or rebuild it")
        return labels

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
        if self.device != "cpu" and x.flags.c_contiguous and x.flags.writeable:
            return x            # copied to the GPU first: the kernels' alignment is the copy's
        return _aligned(x)

    def _check_finite(self, x: np.ndarray, check_finite: bool | None) -> None:
        check = self.check_finite if check_finite is None else check_finite
        if not check and (self.nan_semantics == "propagate" or self._warned_nonfinite):
            return
        report = _nonfinite_report(x)
        if report is None:
            return
        if check:
            raise NonFiniteInputError(
                f"input {self.input_name!r}: {report}. This artifact's activations drop NaN, so the "
                "logits would look valid but mean nothing. Clean the input (fix the preprocessing, or "
                "np.nan_to_num(x)), or pass check_finite=False to run it anyway")
        self._warned_nonfinite = True
        warnings.warn(f"input {self.input_name!r}: {report}, run with check_finite=False on an artifact "
                      f"with nan_semantics {self.nan_semantics!r}: the logits stay finite instead of NaN. "
                      "Build with NaN-preserving activations for ONNX's NaN propagation (warned once "
                      "per Model)", NonFiniteInputWarning, stacklevel=3)

    def run(self, x: np.ndarray, check_finite: bool | None = None) -> np.ndarray:
        """Logits for input x. check_finite: None follows the Model's setting (see the class)."""
        x = self.check_input(x)
        self._check_finite(x, check_finite)
        t = self._ffi.from_dlpack(x)
        if self.device != "cpu":
            copy = self._ffi.get_global_func("runtime.TVMTensorCopyFromTo")
            with self._lock:
                if self._dev_input is None:
                    # one device buffer for every call: allocating it per call took a v1 1.0-224
                    # call on an H200 from 0.48 to 0.59 ms (host array in and out)
                    alloc = self._ffi.get_global_func("runtime.TVMTensorAllocWithScope")
                    self._dev_input = alloc(self._ffi.Shape(x.shape), self._ffi.dtype(str(x.dtype)),
                                            self._dev, "global")
                copy(t, self._dev_input)
                out = self._main(self._dev_input)
                host = np.empty(tuple(out.shape), dtype=str(out.dtype))
                copy(out, self._ffi.from_dlpack(host))
            return host
        with self._lock:
            return np.from_dlpack(self._main(t)).copy()

    __call__ = run

    def _check_k(self, k) -> int:
        if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_classes:
            raise InputValueError(f"k must be an integer from 1 to {self.num_classes} (the model's number of "
                                  f"classes), got {k!r}: pass e.g. k=5")
        return int(k)

    def predict(self, x: np.ndarray, k: int = 5, check_finite: bool | None = None) -> list[tuple[int, str, float]]:
        """Top-k (class index, label, probability) for a single image."""
        k = self._check_k(k)
        logits = self.run(x, check_finite=check_finite)[0].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = np.argsort(-p, kind="stable")[:k]
        return [(int(i), self.labels[i] if self.labels else str(i), float(p[i])) for i in top]

    def _reference_array(self, key: str) -> np.ndarray:
        return self._read_file(self.dir / self.manifest["reference"][key], f"reference.{key}",
                               lambda q: np.load(q, allow_pickle=False), ValueError,
                               ", so there is nothing to check against")

    @staticmethod
    def _read_file(p: Path, key: str, read, unreadable: type, missing_note: str = ""):
        """read(p) for a file the manifest names under `key`, with ArtifactErrors that say so."""
        try:
            return read(p)
        except FileNotFoundError:
            raise ArtifactError(f"{p} ({key} in {MANIFEST}) is missing from the artifact{missing_note}: copy "
                                "the whole artifact directory again, or rebuild it") from None
        except (OSError, unreadable) as e:
            raise ArtifactError(f"cannot read {p} ({key} in {MANIFEST}): {e}; copy the artifact again, or "
                                "rebuild it") from None

    def selfcheck(self, rtol: float | None = None, atol: float | None = None,
                  std_tol: float | None = None) -> dict:
        """Replay the reference pair shipped with the artifact (computed by ONNX Runtime at build).

        Passes when every |got - ref| <= atol + rtol * |ref| and max |got - ref| <= std_tol * std(ref),
        and the top-1 class agrees. Defaults scale with the reference output: rtol 1e-3,
        atol 1e-3 * max|ref|, std_tol 1e-2 (a fixed atol lets small-logit models through with
        errors of 10 % of their spread). Explicit arguments win; the manifest's rtol/atol are
        not used. `margin` is the worst error / tolerance of the two bounds: below 1 passes.
        """
        x, want = self._reference_array("input"), self._reference_array("output")
        for key, a, dtype, shape in (("input", x, self.input_dtype, self.input_shape),
                                     ("output", want, want.dtype, self.output_shape)):    # any float output
            finite = bool(np.isfinite(a).all())
            if a.shape != shape or a.dtype != dtype or not finite:
                raise ArtifactError(f"{self.dir / self.manifest['reference'][key]} holds a {a.dtype} {a.shape} "
                                    f"array{'' if finite else ' with NaN/Inf'}, the model's {key} is finite "
                                    f"{dtype} {shape}: copy the artifact again, or rebuild it")
        got = self.run(x, check_finite=False).astype(np.float64)
        want = want.astype(np.float64)
        rtol = 1e-3 if rtol is None else float(rtol)
        atol = 1e-3 * float(np.abs(want).max()) if atol is None else float(atol)
        std_tol = 1e-2 if std_tol is None else float(std_tol)
        std = float(want.std())
        err = np.abs(got - want)
        max_err = float(err.max())
        tiny = np.finfo(np.float64).tiny
        margin_elem = float(np.max(err / np.maximum(atol + rtol * np.abs(want), tiny)))
        margin_std = max_err / max(std_tol * std, tiny) if std > 0 else 0.0
        margin = max(margin_elem, margin_std)
        same_top1 = bool(np.argmax(got) == np.argmax(want))
        ok = bool(margin <= 1.0) and same_top1       # NaN margin fails
        result = {"ok": ok, "max_abs_err": max_err, "margin": margin, "margin_elementwise": margin_elem,
                  "margin_std": margin_std, "rtol": rtol, "atol": atol, "std_tol": std_tol,
                  "reference_std": std, "top1": int(np.argmax(got)),
                  "reference_top1": int(np.argmax(want)), "arch": machine_arch(), "device": self.device}
        if not ok:
            raise SelfCheckError(
                f"self-check failed on {machine_arch()}: max |error| {max_err:.3g} is {margin:.3g}x the "
                f"tolerance (elementwise atol {atol:.3g} + rtol {rtol:g} * |ref|: {margin_elem:.3g}x; "
                f"{std_tol:g} * std(ref) = {std_tol * std:.3g}: {margin_std:.3g}x), top-1 {result['top1']} "
                f"vs reference {result['reference_top1']}. The library computes wrong numbers on this "
                "machine: rebuild for this target, or report it with this message")
        return result


def load(artifact_dir: str | os.PathLike, device_id: int = 0, check_finite: bool | None = None,
         verify_checksum: bool = True) -> Model:
    """Load an artifact directory. check_finite: None refuses NaN/Inf input unless the artifact
    was built to propagate NaN (see Model)."""
    return Model(artifact_dir, device_id=device_id, verify_checksum=verify_checksum,
                 check_finite=check_finite)
