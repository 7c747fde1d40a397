"""Deployable CUDA artifacts: GPU code compiled to SASS at build time, never CUDA source.

TVM 0.27 (read in support/nvcc.py and the codegen; the second point was run here):
* Where the NVIDIA driver is loaded, codegen JIT-compiles the kernels at once through the global
  `tvm_callback_cuda_compile(code) -> bytes` (tag "ptx" if the result starts with '/', else "cubin").
* On a build machine without the driver, codegen keeps the CUDA *source* (tag "cuda") and never
  calls the callback; the library would then need nvcc/NVRTC and the full tvm package on the board.

`compile_with_nvcc(arch, toolkit=...)` registers the callback for its scope (first case) and yields
a `DeviceCompiler` whose `export_library(ex, path)` packs the import blob through `pack_imports`,
which compiles any module still holding source (second case). Both compile with TVM's own
`tvm.support.nvcc.compile_cuda`:
* the system nvcc (fatbin, SASS for exactly `arch`) when its major version is the one asked for;
* else NVRTC of that major version from PyPI (cubin = SASS only), installed into
  ~/.cache/mbn-codegen/cuda-<major> and run in a child process, since one process can load only
  one cuda-bindings. PyPI's nvidia-cuda-nvcc-cu11/-cu12 ship ptxas but no nvcc, cudafe++ or
  fatbinary, so NVRTC is the only older CUDA compiler it has.

Readers of what an artifact carries (`cuda_payloads`, `module_binary_format`) parse the import blob
`__tvm_ffi__library_bin` themselves: TVM has no reader for a serialized blob in a file.
  blob   = <u64 nbytes> <vec<u64> indptr> <vec<u64> child_indices> {<str kind> [<bytes payload>]}*
           (kind "_lib" has no payload: the host shared library itself)
  "cuda" payload = <str fmt> <fmap: Map<str, FunctionInfo>> <bytes code>
  str / bytes / vec = <u64 count> <items>, little endian.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError, CrossCompilerMissingError, CudaCompileError, CudaToolkitMissingError

CALLBACK_NAME = "tvm_callback_cuda_compile"
LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"
FATBIN_MAGIC = 0xBA55ED50
_ELF_MACHINES = {"EM_386": "x86", "EM_ARM": "arm", "EM_X86_64": "x86_64", "EM_AARCH64": "aarch64",
                 "EM_CUDA": "cuda", 190: "cuda"}
# worst first: what module_binary_format reports when a tree mixes formats
_FORMAT_RANK = {"cu": 0, "unknown": 1, "ptx": 2, "cubin": 3, "fatbin": 4}
_NVCC_FIX = ("install the CUDA toolkit (NVIDIA's installer, or the Debian/Ubuntu package "
             "nvidia-cuda-toolkit) or set CUDA_PATH to a toolkit root that has bin/nvcc")
# NVRTC from PyPI per CUDA major: the compiler, the headers the generated code includes
# (libcu++ from cccl, cuda_runtime.h that TVM checks for) and the bindings TVM calls it through.
PYPI_TOOLKITS = {
    "12": ("nvidia-cuda-nvrtc-cu12==12.9.86", "nvidia-cuda-cccl-cu12==12.9.27",
           "nvidia-cuda-runtime-cu12==12.9.79", "cuda-bindings==12.9.6", "cuda-pathfinder==1.9.1"),
    "11": ("nvidia-cuda-nvrtc-cu11==11.8.89", "nvidia-cuda-cccl-cu11==11.8.89.post1",
           "nvidia-cuda-runtime-cu11==11.8.89", "cuda-bindings==11.8.7"),
}


# --------------------------------------------------------------------------------------------
# toolkits


@dataclass(frozen=True)
class Toolkit:
    major: str
    version: str             # "13.0.88" (nvcc --version) or "12.9" (nvrtcVersion)
    compiler: str            # "nvcc" or "nvrtc"
    root: str                # CUDA_PATH for TVM's compile_cuda
    path: str                # the nvcc binary, or the folder holding the PyPI packages

    @property
    def fmt(self) -> str:
        return "fatbin" if self.compiler == "nvcc" else "cubin"

    def to_dict(self) -> dict:
        return {"major": self.major, "version": self.version, "compiler": self.compiler,
                "path": self.path, "format": self.fmt}


def cache_dir(major: str) -> Path:
    base = os.environ.get("MBN_CUDA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mbn-codegen")
    return Path(base) / f"cuda-{major}"


def install_command(major: str) -> str:
    return f"{sys.executable} -m mbn_codegen.cuda install {major}"


def find_nvcc() -> str | None:
    """The system nvcc: $CUDA_PATH/bin/nvcc when CUDA_PATH is set (an explicit choice), else the one
    under TVM's find_cuda_path() (which follows `nvcc` on PATH), else /usr/local/cuda's."""
    from ._tvm import tvm_nvcc

    if os.environ.get("CUDA_PATH"):
        roots = [os.environ["CUDA_PATH"]]
    else:
        roots = []
        with contextlib.suppress(RuntimeError):
            roots.append(tvm_nvcc.find_cuda_path())
        roots.append("/usr/local/cuda")
    for root in roots:
        cand = Path(root) / "bin" / "nvcc"
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


def require_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        where = (f"CUDA_PATH={os.environ['CUDA_PATH']} has no executable bin/nvcc"
                 if os.environ.get("CUDA_PATH") else
                 "nvcc is not on PATH and /usr/local/cuda/bin/nvcc does not exist")
        raise CrossCompilerMissingError(
            f"CUDA targets need nvcc to compile GPU kernels at build time, but {where}; {_NVCC_FIX}")
    return nvcc


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    from ._tvm import tvm_nvcc
    # get_cuda_version reads <root>/version.txt first, which toolkits since 11.1 no longer ship
    try:
        return ".".join(map(str, tvm_nvcc.get_cuda_version(str(Path(nvcc).parent.parent))))
    except (RuntimeError, StopIteration, ValueError) as e:
        raise CrossCompilerMissingError(f"cannot read the version of {nvcc}: {e}") from None


def nvcc_version(nvcc: str | None = None) -> str:
    """'13.0.88' for the system nvcc (or `nvcc`)."""
    return _nvcc_version(nvcc or require_nvcc())


@functools.lru_cache(maxsize=None)
def _nvcc_gpu_codes(nvcc: str) -> tuple[str, ...]:
    proc = _run([nvcc, "--list-gpu-code"], check=False)
    return tuple(w for w in proc.stdout.split() if re.fullmatch(r"sm_\d+[a-z]?", w))


def nvcc_gpu_codes(nvcc: str | None = None) -> tuple[str, ...]:
    """Real architectures nvcc can emit SASS for (`nvcc --list-gpu-code`); TVM has no such query."""
    return _nvcc_gpu_codes(nvcc or require_nvcc())


def _parse_arch(arch: str) -> tuple[str, str]:
    m = re.fullmatch(r"sm_(\d{2,3})([af]?)", str(arch).strip())
    if not m:
        raise CrossCompilerMissingError(
            f"CUDA arch {arch!r} is not of the form sm_XY (e.g. sm_87 for Jetson Orin, sm_90 for "
            "H100, sm_72 Xavier, sm_53 Nano)")
    return m.group(1), m.group(2)


def check_arch(arch: str, nvcc: str | None = None) -> str:
    """The nvcc path if it can compile for `arch`, else CrossCompilerMissingError naming both."""
    number, _suffix = _parse_arch(arch)
    nvcc = nvcc or require_nvcc()
    codes = nvcc_gpu_codes(nvcc)
    if codes and f"sm_{number}" not in codes:
        version = nvcc_version(nvcc)
        dropped = (" CUDA 13 dropped sm_50..sm_72 (sm_53 Jetson Nano, sm_62 TX2, sm_72 Jetson "
                   "Xavier)." if int(version.split(".")[0]) >= 13 else "")
        raise CrossCompilerMissingError(
            f"nvcc {version} ({nvcc}) cannot compile for {arch}: it targets only "
            f"{', '.join(codes)}.{dropped} Set the target's cuda_toolkit to the CUDA major version "
            "of the board (\"12\" for JetPack 6, \"11\" for JetPack 5): that builds with NVRTC from "
            "PyPI")
    return nvcc


def install_toolkit(major: str, log=print) -> Path:
    """pip-installs NVRTC of CUDA `major` (PYPI_TOOLKITS) into cache_dir(major)."""
    if major not in PYPI_TOOLKITS:
        raise CudaToolkitMissingError(
            f"no PyPI CUDA compiler is known for CUDA {major}: cuda_toolkit may be "
            f"{', '.join(sorted(PYPI_TOOLKITS))} or the system nvcc's major version")
    dest = cache_dir(major)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=_mkdir(dest.parent)))
    log(f"installing CUDA {major} NVRTC from PyPI into {dest}")
    proc = _run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                 "--disable-pip-version-check", "--target", str(tmp), *PYPI_TOOLKITS[major]], check=False)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CudaToolkitMissingError(
            f"could not install CUDA {major} NVRTC from PyPI (pip exit {proc.returncode}): "
            f"{proc.stdout.strip()[-1500:]}\nRetry with network access: {install_command(major)}")
    _include_root(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    _include_root(dest)                # symlinks are absolute: remake them at the final place
    return dest


def _include_root(site: Path) -> Path:
    """A CUDA_PATH-shaped folder (<root>/include) from the wheels' separate include folders."""
    inc = site / "root" / "include"
    shutil.rmtree(inc, ignore_errors=True)
    inc.mkdir(parents=True)
    for pkg in ("cuda_runtime", "cuda_cccl", "cuda_nvrtc"):
        for f in (site / "nvidia" / pkg / "include").glob("*"):
            if f.name not in ("__init__.py", "__pycache__") and not (inc / f.name).exists():
                (inc / f.name).symlink_to(f)
    return inc.parent


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def find_toolkit(major: str | None = None, *, install: bool | None = None, log=print) -> Toolkit:
    """The CUDA compiler for a target that must run on CUDA `major` (None: the system nvcc's).

    The system nvcc if its major version matches; else NVRTC from cache_dir(major), pip-installed
    there first when `install` (default: unless MBN_CUDA_NO_INSTALL is set)."""
    nvcc = find_nvcc()
    if major is None or (nvcc is not None and nvcc_version(nvcc).split(".")[0] == str(major)):
        return _nvcc_toolkit(require_nvcc())
    major = str(major)
    site = cache_dir(major)
    if not (site / "root" / "include").is_dir():
        if install is None:
            install = not os.environ.get("MBN_CUDA_NO_INSTALL")
        if not install or major not in PYPI_TOOLKITS:
            have = f"the system nvcc is {nvcc_version(nvcc)}" if nvcc else "there is no system nvcc"
            raise CudaToolkitMissingError(
                f"this target must run on CUDA {major}, but {have} and {site} holds no CUDA {major} "
                f"NVRTC; install it with `{install_command(major)}` (or point CUDA_PATH at a CUDA "
                f"{major}.x toolkit)")
        install_toolkit(major, log=log)
    return Toolkit(major, _nvrtc_version(str(site)), "nvrtc", str(site / "root"), str(site))


def _nvcc_toolkit(nvcc: str) -> Toolkit:
    v = nvcc_version(nvcc)
    return Toolkit(v.split(".")[0], v, "nvcc", str(Path(nvcc).parent.parent), nvcc)


@functools.lru_cache(maxsize=None)
def _nvrtc_version(site: str) -> str:
    out = _nvrtc_child(site, ["version"]).stdout.strip().splitlines()
    return out[-1] if out else "?"


# Runs in a child with the PyPI packages first on sys.path: TVM's compile_cuda, through NVRTC.
_NVRTC_CHILD = """
import sys
if sys.argv[1] == "version":
    from cuda.bindings import nvrtc
    _, major, minor = nvrtc.nvrtcVersion()
    print(f"{major}.{minor}")
else:
    from mbn_codegen._tvm import Target, tvm_nvcc
    src, arch, out = sys.argv[1:4]
    with Target({"kind": "cuda", "arch": arch}):
        data = tvm_nvcc.compile_cuda(open(src).read(), target_format="cubin", arch=arch, compiler="nvrtc")
    open(out, "wb").write(data)
"""


def _nvrtc_child(site: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([site] + [p for p in sys.path if p])
    env["CUDA_PATH"] = str(Path(site) / "root")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        [str(Path(site) / "nvidia" / "cuda_nvrtc" / "lib"), env.get("LD_LIBRARY_PATH", "")])
    # NVRTC 11.8 does not default to C++17 for libcu++ 1.9 (its __config fails without it);
    # compile_cuda drops -std from `options`, but appends this variable's flags as they are
    env["TVM_CUDA_NVRTC_EXTRA_OPTS"] = (env.get("TVM_CUDA_NVRTC_EXTRA_OPTS", "") + " -std=c++17").strip()
    return subprocess.run([sys.executable, "-c", _NVRTC_CHILD, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace", env=env)


# --------------------------------------------------------------------------------------------
# compiling

_path_lock = threading.Lock()


class DeviceCompiler:
    """Compiles CUDA source for one arch with one toolkit; plus the TVM hooks that use it."""

    def __init__(self, arch: str, toolkit: Toolkit | None = None):
        self.arch = str(arch).strip()
        _parse_arch(self.arch)
        self.toolkit = toolkit or find_toolkit(None)
        if self.toolkit.compiler == "nvcc":
            check_arch(self.arch, self.toolkit.path)
        self.fmt = self.toolkit.fmt
        self.version = self.toolkit.version
        self.compiled = 0            # compiler runs (cache misses)
        self.seconds = 0.0
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def compile(self, source: str | bytes) -> bytes:
        """CUDA C++ source -> fatbin (nvcc) or cubin (NVRTC) for self.arch; cached by source hash."""
        if isinstance(source, bytes):
            source = source.decode()
        key = hashlib.sha256(source.encode()).hexdigest()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        t0 = time.perf_counter()
        data = self._nvcc(source) if self.toolkit.compiler == "nvcc" else self._nvrtc(source)
        with self._lock:
            self._cache[key] = data
            self.compiled += 1
            self.seconds += time.perf_counter() - t0
        return data

    def _nvcc(self, source: str) -> bytes:
        from ._tvm import Target, tvm_nvcc

        number, suffix = _parse_arch(self.arch)
        gencode = ["-gencode", f"arch=compute_{number}{suffix},code=sm_{number}{suffix}"]   # SASS only
        # compile_cuda runs "nvcc" from PATH: put the chosen toolkit's first while it runs
        with _path_lock, _env(PATH=os.pathsep.join([str(Path(self.toolkit.path).parent),
                                                    os.environ.get("PATH", "")])), \
                Target({"kind": "cuda", "arch": self.arch}):
            try:
                return bytes(tvm_nvcc.compile_cuda(source, target_format="fatbin", arch=gencode,
                                                   compiler="nvcc"))
            except RuntimeError as e:
                tail = str(e).split("Compilation error:")[-1].strip()[-4000:]
                raise CudaCompileError(
                    f"nvcc {self.version} failed to compile the generated CUDA source for "
                    f"{self.arch}:\n{tail}") from None

    def _nvrtc(self, source: str) -> bytes:
        with tempfile.TemporaryDirectory(prefix="mbn-nvrtc-") as tmp:
            src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, "kernels.cubin")
            Path(src).write_text(source)
            proc = _nvrtc_child(self.toolkit.path, [src, self.arch, out])
            if proc.returncode != 0 or not os.path.isfile(out):
                raise CudaCompileError(
                    f"NVRTC {self.version} ({self.toolkit.path}) failed to compile the generated CUDA "
                    f"source for {self.arch} (exit {proc.returncode}):\n{proc.stdout.strip()[-4000:]}")
            return Path(out).read_bytes()

    # -- hook 1: the compile callback (called by codegen where libcuda.so.1 exists) --------------
    def callback(self, code, *_unused) -> bytearray:
        return bytearray(self.compile(str(code)))

    # -- hook 2: export_library(fpack_imports=...) ------------------------------------------------
    def rewrite_blob(self, blob: bytes) -> bytes:
        """Packed import blob with every CUDA-source entry replaced by compiled code."""
        indptr, children, entries = _parse_blob(blob)
        out = []
        for kind, payload in entries:
            if kind == "cuda" and payload is not None:
                fmt, fmap, code = _split_cuda_payload(payload)
                if fmt == "cuda":
                    payload = _pstr(self.fmt) + fmap + _pbytes(self.compile(code))
            out.append((kind, payload))
        return _build_blob(indptr, children, out)

    def pack_imports(self, mod, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        """`fpack_imports` for Module.export_library: TVM's default LLVM blob packing, after
        compiling CUDA source modules."""
        import tvm_ffi

        pack = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")
        blob = self.rewrite_blob(pack(mod).numpy().tobytes())
        llvm_target = None
        for m in mod._collect_dso_modules():
            if m.kind == "llvm":
                llvm_target = m.get_function("_get_target_string")()
                break
        if llvm_target is None:
            raise CudaCompileError(
                "packing compiled CUDA code needs an LLVM host module (target host kind 'llvm'); "
                "this module tree has none")
        blob_mod = tvm_ffi.get_global_func("codegen.codegen_blob")(
            bytes(blob), bool(is_system_lib), llvm_target, symbol_prefix or "")
        path = os.path.join(workspace_dir, f"{symbol_prefix or ''}devc.o")
        blob_mod.write_to_file(path)
        return path

    def export_library(self, executable, file_name, **kwargs):
        """executable.export_library(file_name, **kwargs) with GPU code compiled for self.arch."""
        mod = getattr(executable, "mod", executable)
        kwargs.setdefault("fpack_imports", self.pack_imports)
        return mod.export_library(str(file_name), **kwargs)


NvccCompiler = DeviceCompiler


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_scope_lock = threading.RLock()


@contextlib.contextmanager
def compile_with_nvcc(arch: str, *, toolkit: str | None = None, nvcc: str | None = None, log=print):
    """Scope in which TVM's CUDA kernels are compiled for exactly `arch` by the toolkit of CUDA
    major version `toolkit` (None: the system nvcc; see find_toolkit).

        with compile_with_nvcc("sm_87", toolkit="12") as nv:
            ex = tvm.compile(mod, target=orin)
            nv.export_library(ex, "m.so", cc="aarch64-linux-gnu-g++")   # holds sm_87 SASS

    Raises CrossCompilerMissingError / CudaToolkitMissingError up front. Registers
    `tvm_callback_cuda_compile` (codegen calls it where the driver is loaded) and restores the one
    before (tvm.support.nvcc's) on exit."""
    from ._tvm import tvm_ffi   # checks the tvm / tvm-ffi pair

    compiler = DeviceCompiler(arch, _nvcc_toolkit(nvcc) if nvcc else find_toolkit(toolkit, log=log))
    with _scope_lock:
        prev_cb = tvm_ffi.get_global_func(CALLBACK_NAME, allow_missing=True)
        tvm_ffi.register_global_func(CALLBACK_NAME, compiler.callback, override=True)
    try:
        yield compiler
    finally:
        with _scope_lock:
            if prev_cb is not None:
                tvm_ffi.register_global_func(CALLBACK_NAME, prev_cb, override=True)
            else:
                tvm_ffi.remove_global_func(CALLBACK_NAME)


# --------------------------------------------------------------------------------------------
# per-kernel choice between our CUDA schedules and dlight

TIMINGS_FILE = "kernel_timings.json"      # written by scripts/gpu_check.py


@dataclass(frozen=True)
class KernelChoice:
    """Which schedule each CUDA kernel gets: `forced` ("ours"/"dlight") for every kernel, else the
    faster one as measured on a GPU. `timings` maps a kernel name to {"kind", "macs", "ours_ms",
    "dlight_ms"}; names differ between models, so a kernel is matched by its kind and MAC count
    (the same shape in another model), else by the total time of its kind's measured kernels
    (H200: our depthwise kernels 20-75x faster than dlight's, our pointwise ones 2-3x slower),
    else it gets ours."""
    timings: dict
    forced: str = ""
    path: str = ""

    def _measured(self):
        for t in self.timings.values():
            if isinstance(t, dict) and all(isinstance(t.get(k), (int, float)) for k in ("ours_ms", "dlight_ms")):
                yield t

    def pick(self, kind: str | None = None, macs: int | None = None) -> tuple[str, str]:
        """("ours" | "dlight", why); why is "" when nothing measured applies."""
        if self.forced:
            return self.forced, "forced"
        same = [t for t in self._measured() if kind is not None and t.get("kind") == kind]
        exact = [t for t in same if macs is not None and t.get("macs") == macs]
        for ts, why in ((exact, "measured"), (same, f"measured-{kind}")):
            if ts:
                ours, dl = sum(t["ours_ms"] for t in ts), sum(t["dlight_ms"] for t in ts)
                return ("dlight" if dl < ours else "ours"), why
        return "ours", ""


def use_cuda_graph(log=print) -> bool:
    """CUDA builds replay their kernels as one CUDA graph (captured on the first call) unless
    MBN_CUDA_GRAPH=0. On an H200, v1's 24 kernels take 0.22 ms and the VM launching them one by
    one added 0.125 ms."""
    v = os.environ.get("MBN_CUDA_GRAPH", "1").strip()
    if v not in ("0", "1"):
        raise CudaCompileError(f"MBN_CUDA_GRAPH={v!r}: expected 1 (the default: CUDA graph) or 0 (launch each kernel)")
    if v == "0":
        log("CUDA graph: off (MBN_CUDA_GRAPH=0), each kernel launched by the VM")
    return v == "1"


def timings_path(spec) -> Path:
    from mbn_codegen import targets
    return Path(os.environ.get("MBN_CUDA_KERNEL_TIMINGS") or
                targets.HERE / "databases" / spec.name / TIMINGS_FILE)


def kernel_timings(spec, log=print) -> KernelChoice:
    """The KernelChoice for a CUDA build of `spec`: MBN_CUDA_KERNELS=ours|dlight forces one
    side; otherwise GPU timings from timings_path(spec) when they were measured on its arch."""
    forced = os.environ.get("MBN_CUDA_KERNELS", "").strip()
    if forced:
        if forced not in ("ours", "dlight"):
            raise CudaCompileError(f"MBN_CUDA_KERNELS={forced!r}: expected 'ours' or 'dlight' "
                                   "(or unset, to pick per kernel from GPU timings)")
        log(f"CUDA kernels: {forced} for every kernel (MBN_CUDA_KERNELS)")
        return KernelChoice({}, forced)
    path = timings_path(spec)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        log(f"CUDA kernels: no GPU timings at {path}; our schedules where they apply, dlight elsewhere")
        return KernelChoice({})
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not a kernel timings JSON ({e}); delete it or rerun "
                            "`make gpu-check`") from None
    if doc.get("arch") != spec.cuda_arch or not isinstance(doc.get("kernels"), dict):
        log(f"CUDA kernels: timings at {path} are for {doc.get('arch')!r}, not {spec.cuda_arch}: "
            "not used; our schedules where they apply, dlight elsewhere")
        return KernelChoice({})
    log(f"CUDA kernels: the faster of ours / dlight per kernel, from {path} "
        f"({len(doc['kernels'])} kernels measured on {doc.get('device', '?')})")
    return KernelChoice(doc["kernels"], path=str(path))


# --------------------------------------------------------------------------------------------
# inspecting


@dataclass(frozen=True)
class CudaPayload:
    tag: str                 # TVM's format string in the module ("cuda", "fatbin", "cubin", "ptx")
    format: str              # what the bytes are: "fatbin", "cubin", "ptx", "cu" or "unknown"
    archs: tuple[str, ...]   # e.g. ("sm_87",); PTX entries of a fatbin appear as "compute_87"
    size: int


def cuda_payloads(obj) -> list[CudaPayload]:
    """Every CUDA device module in `obj`: a tvm.compile result (Executable), a runtime Module tree
    (also one from tvm.runtime.load_module), or the path of an exported .so/.tar (parsed
    directly, no tvm import and no GPU needed; the only form usable on a runtime-only board, since
    Module objects are serialized with runtime.ModulePackImportsToTensor from libtvm_compiler)."""
    if isinstance(obj, (str, os.PathLike)):
        return [_describe(p) for p in _file_cuda_payloads(Path(obj))]
    mod = getattr(obj, "mod", obj)
    if not hasattr(mod, "imports") or not hasattr(mod, "kind"):
        raise TypeError(f"expected an Executable, a runtime Module or a path, got {type(obj)!r}")
    import tvm_ffi

    pack = tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")
    seen, stack, found = set(), [mod], []
    while stack:
        m = stack.pop()
        if m in seen:
            continue
        seen.add(m)
        stack.extend(m.imports)
        if m.kind == "cuda":
            _, _, entries = _parse_blob(pack(m).numpy().tobytes())
            found.extend(_describe(p) for k, p in entries if k == "cuda" and p is not None)
    return found


def module_binary_format(obj) -> str:
    """'fatbin', 'cubin', 'ptx' or 'cu' (CUDA source) for the GPU code in `obj` (see
    cuda_payloads). With several CUDA modules the least deployable one is reported
    (cu < ptx < cubin < fatbin). ArtifactError if there is no CUDA module."""
    payloads = cuda_payloads(obj)
    if not payloads:
        raise ArtifactError(f"{_name(obj)} holds no CUDA device module")
    return min((p.format for p in payloads), key=_FORMAT_RANK.__getitem__)


def elf_machine(path: str | os.PathLike) -> str:
    """'aarch64', 'x86_64', ... from an ELF file's e_machine."""
    with open(path, "rb") as f:
        return _elf_machine(_elf(f.read(), str(path)))


def _elf(data: bytes, what: str = "data"):
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    if data[:4] != b"\x7fELF":
        raise ArtifactError(f"{what} is not an ELF file")
    try:
        return ELFFile(io.BytesIO(data))
    except (ELFError, struct.error) as e:
        raise ArtifactError(f"{what} is a malformed ELF file ({e})") from None


def _elf_machine(elf) -> str:
    m = elf.header["e_machine"]
    return _ELF_MACHINES.get(m, str(m))


def payload_format(code: bytes, tag: str = "") -> str:
    if len(code) >= 4 and struct.unpack_from("<I", code)[0] == FATBIN_MAGIC:
        return "fatbin"
    if code[:4] == b"\x7fELF":
        with contextlib.suppress(ArtifactError):
            if _elf_machine(_elf(code)) == "cuda":
                return "cubin"
    head = code[:4096]
    if b".target sm_" in head or (head.lstrip().startswith(b"//") and b".version" in head):
        return "ptx"
    if tag == "cuda" or b"__global__" in code:
        return "cu"
    return "unknown"


def payload_archs(code: bytes) -> tuple[str, ...]:
    fmt = payload_format(code)
    if fmt == "cubin":
        return (_cubin_arch(code),)
    if fmt != "fatbin":
        return ()
    archs = []
    # no library reads fatbin containers (cuobjdump is not on PyPI for CUDA 11/12), so by hand:
    # fatbin: <u32 magic> <u16 version> <u16 header_size> <u64 size>, then entries of
    # <u16 kind (1 PTX, 2 ELF)> <u16 ver> <u32 header_size> <u64 padded_payload> ... <u32 sm @0x1c>
    _, _, hsize, total = struct.unpack_from("<IHHQ", code, 0)
    off, end = hsize, min(len(code), hsize + total)
    while off + 0x20 <= end:
        kind, _, ehsize, padded = struct.unpack_from("<HHIQ", code, off)
        sm = struct.unpack_from("<I", code, off + 0x1C)[0]
        archs.append(f"compute_{sm}" if kind == 1 else f"sm_{sm}")
        if ehsize == 0:
            break
        off += ehsize + padded
    return tuple(dict.fromkeys(archs))


# --------------------------------------------------------------------------------------------
# helpers


def _run(cmd, check=True):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace")
    if check and proc.returncode != 0:
        raise CrossCompilerMissingError(f"{' '.join(cmd)} failed: {proc.stdout.strip()}")
    return proc


def _name(obj) -> str:
    return str(obj) if isinstance(obj, (str, os.PathLike)) else type(obj).__name__


def _cubin_arch(code: bytes) -> str:
    # CUDA 13 cubins (EI_OSABI 0x41, EI_ABIVERSION >= 8) keep the SM in e_flags bits 8..15;
    # older ones (OSABI 0x33, ABI version 7) in bits 0..7.
    h = _elf(code, "cubin").header
    flags, abi = h["e_flags"], h["e_ident"]["EI_ABIVERSION"]
    sm = (flags >> 8) & 0xFF if abi >= 8 else flags & 0xFF
    return f"sm_{sm}"


def cubin_abi_version(code: bytes) -> int:
    """A cubin's EI_ABIVERSION: 7 from CUDA 11/12 compilers, 8 from CUDA 13 (which drivers
    older than CUDA 13 cannot load)."""
    return int(_elf(code, "cubin").header["e_ident"]["EI_ABIVERSION"])


def _describe(payload: bytes) -> CudaPayload:
    tag, _, code = _split_cuda_payload(payload)
    return CudaPayload(tag=tag, format=payload_format(code, tag), archs=payload_archs(code),
                       size=len(code))


def _u64(buf, off):
    return struct.unpack_from("<Q", buf, off)[0]


def _pstr(s: str) -> bytes:
    return _pbytes(s.encode())


def _pbytes(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + bytes(b)


def _parse_blob(blob: bytes):
    """(indptr, children, [(kind, payload or None for '_lib'), ...]) of a packed import blob."""
    try:
        nbytes = _u64(blob, 0)
        if nbytes + 8 > len(blob):
            raise ValueError("truncated")
        off, vecs = 8, []
        for _ in range(2):
            n = _u64(blob, off)
            vecs.append(list(struct.unpack_from(f"<{n}Q", blob, off + 8)))
            off += 8 + 8 * n
        entries = []
        for _ in range(len(vecs[0]) - 1):
            n = _u64(blob, off)
            kind = blob[off + 8: off + 8 + n].decode()
            off += 8 + n
            payload = None
            if kind != "_lib":
                n = _u64(blob, off)
                payload = bytes(blob[off + 8: off + 8 + n])
                if len(payload) != n:
                    raise ValueError("truncated payload")
                off += 8 + n
            entries.append((kind, payload))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"malformed TVM import blob ({e})") from None
    return vecs[0], vecs[1], entries


def _build_blob(indptr, children, entries) -> bytes:
    body = [struct.pack(f"<Q{len(indptr)}Q", len(indptr), *indptr),
            struct.pack(f"<Q{len(children)}Q", len(children), *children)]
    for kind, payload in entries:
        body.append(_pstr(kind))
        if payload is not None:
            body.append(_pbytes(payload))
    body = b"".join(body)
    return struct.pack("<Q", len(body)) + body


def _split_cuda_payload(payload: bytes) -> tuple[str, bytes, bytes]:
    """(fmt, raw fmap bytes, code) of a serialized CUDA module: code is the trailing length-
    prefixed bytes; the first offset whose u64 equals the rest's length is where it starts."""
    n = _u64(payload, 0)
    fmt = payload[8: 8 + n].decode()
    start = 8 + n
    for p in range(start, len(payload) - 7):
        if _u64(payload, p) == len(payload) - p - 8:
            return fmt, payload[start:p], payload[p + 8:]
    raise ArtifactError("malformed CUDA module payload (no trailing code bytes)")


def _file_cuda_payloads(path: Path) -> list[bytes]:
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    if tarfile.is_tarfile(path):
        out = []
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".o"):
                    data = tar.extractfile(member).read()
                    blob = _elf_symbol_bytes(data, LIBRARY_BIN_SYMBOL)
                    if blob is not None:
                        out += _blob_cuda(blob)
        return out
    data = path.read_bytes()
    if data[:4] != b"\x7fELF":
        raise ArtifactError(f"{path} is neither an ELF shared library nor a .tar export")
    blob = _elf_symbol_bytes(data, LIBRARY_BIN_SYMBOL)
    return [] if blob is None else _blob_cuda(blob)


def _blob_cuda(blob: bytes) -> list[bytes]:
    _, _, entries = _parse_blob(blob[: 8 + _u64(blob, 0)])
    return [p for k, p in entries if k == "cuda" and p is not None]


def _elf_symbol_bytes(data: bytes, name: str) -> bytes | None:
    """Bytes from symbol `name` to the end of its section (.so or .o); None if there is none."""
    from elftools.elf.sections import SymbolTableSection

    elf = _elf(data)
    for sec in elf.iter_sections():
        if not isinstance(sec, SymbolTableSection):
            continue
        for sym in sec.get_symbol_by_name(name) or ():
            shndx = sym["st_shndx"]
            if not isinstance(shndx, int) or shndx == 0:
                continue
            home = elf.get_section(shndx)
            if home["sh_type"] == "SHT_NOBITS":
                raise ArtifactError(f"symbol {name} lives in a NOBITS section")
            start = home["sh_offset"] + (sym["st_value"] - home["sh_addr"])
            return data[start: home["sh_offset"] + home["sh_size"]]
    return None


def main(argv: list[str] | None = None) -> int:
    """python -m mbn_codegen.cuda install <major>: NVRTC of that CUDA into the cache."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mbn_codegen.cuda")
    sub = ap.add_subparsers(dest="cmd", required=True)
    inst = sub.add_parser("install", help="pip-install CUDA <major>'s NVRTC into " + str(cache_dir("<major>")))
    inst.add_argument("major", choices=sorted(PYPI_TOOLKITS))
    args = ap.parse_args(argv)
    try:
        site = install_toolkit(args.major)
        print(f"CUDA {args.major} NVRTC {_nvrtc_version(str(site))} in {site}")
    except CudaToolkitMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
