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
import dataclasses
import functools
import io
import json
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from unittest import mock

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
# PATH changes (nvcc) and the callback registration are process-wide
_lock = threading.RLock()


# --------------------------------------------------------------------------------------------
# toolkits


@dataclass(frozen=True)
class Toolkit:
    major: str
    version: str             # "13.0.88" (nvcc --version) or "12.9" (NVRTC)
    compiler: str            # "nvcc" or "nvrtc"
    path: str                # the nvcc binary, or the folder holding the PyPI packages

    @property
    def fmt(self) -> str:
        return "fatbin" if self.compiler == "nvcc" else "cubin"

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "format": self.fmt}


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

    roots = [] if os.environ.get("CUDA_PATH") else ["/usr/local/cuda"]
    with contextlib.suppress(RuntimeError):
        roots.insert(0, tvm_nvcc.find_cuda_path())
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


def _per_nvcc(fn):
    """fn(nvcc=None), cached per nvcc binary; None means the system nvcc (require_nvcc)."""
    cached = functools.lru_cache(maxsize=None)(fn)
    return functools.wraps(fn)(lambda nvcc=None: cached(nvcc or require_nvcc()))


@_per_nvcc
def nvcc_version(nvcc: str | None = None) -> str:
    """'13.0.88' for the system nvcc (or `nvcc`)."""
    from ._tvm import tvm_nvcc
    # get_cuda_version reads <root>/version.txt first, which toolkits since 11.1 no longer ship
    try:
        return ".".join(map(str, tvm_nvcc.get_cuda_version(str(Path(nvcc).parent.parent))))
    except (RuntimeError, StopIteration, ValueError) as e:
        raise CrossCompilerMissingError(f"cannot read the version of {nvcc}: {e}") from None


@_per_nvcc
def nvcc_gpu_codes(nvcc: str | None = None) -> tuple[str, ...]:
    """Real architectures nvcc can emit SASS for (`nvcc --list-gpu-code`); TVM has no such query."""
    out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, errors="replace").stdout
    return tuple(w for w in out.split() if re.fullmatch(r"sm_\d+[a-z]?", w))


def _sm_number(arch: str) -> str:
    m = re.fullmatch(r"sm_(\d{2,3})[af]?", str(arch).strip())
    if not m:
        raise CrossCompilerMissingError(
            f"CUDA arch {arch!r} is not of the form sm_XY (e.g. sm_87 for Jetson Orin, sm_90 for "
            "H100, sm_72 Xavier, sm_53 Nano)")
    return m.group(1)


def check_arch(arch: str, nvcc: str | None = None) -> str:
    """The nvcc path if it can compile for `arch`, else CrossCompilerMissingError naming both."""
    number = _sm_number(arch)
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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    log(f"installing CUDA {major} NVRTC from PyPI into {dest}")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--disable-pip-version-check",
                           "--target", str(tmp), *PYPI_TOOLKITS[major]],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CudaToolkitMissingError(
            f"could not install CUDA {major} NVRTC from PyPI (pip exit {proc.returncode}): "
            f"{proc.stdout.strip()[-1500:]}\nRetry with network access: {install_command(major)}")
    shutil.rmtree(dest, ignore_errors=True)
    os.rename(tmp, dest)
    return dest


def _nvrtc_version(site: Path, major: str) -> str | None:
    """'12.9' (what nvrtcVersion() reports) from the NVRTC wheel in `site`; None if none is there."""
    for dist in metadata.distributions(name=f"nvidia-cuda-nvrtc-cu{major}", path=[str(site)]):
        return ".".join(dist.version.split(".")[:2])
    return None


def find_toolkit(major: str | None = None, *, install: bool | None = None, log=print) -> Toolkit:
    """The CUDA compiler for a target that must run on CUDA `major` (None: the system nvcc's).

    The system nvcc if its major version matches; else NVRTC from cache_dir(major), pip-installed
    there first when `install` (default: unless MBN_CUDA_NO_INSTALL is set)."""
    nvcc = find_nvcc()
    if major is None or (nvcc is not None and nvcc_version(nvcc).split(".")[0] == str(major)):
        version = nvcc_version(nvcc := require_nvcc())
        return Toolkit(version.split(".")[0], version, "nvcc", nvcc)
    major = str(major)
    site = cache_dir(major)
    version = _nvrtc_version(site, major)
    if version is None:
        if install is None:
            install = not os.environ.get("MBN_CUDA_NO_INSTALL")
        if not install or major not in PYPI_TOOLKITS:
            have = f"the system nvcc is {nvcc_version(nvcc)}" if nvcc else "there is no system nvcc"
            raise CudaToolkitMissingError(
                f"this target must run on CUDA {major}, but {have} and {site} holds no CUDA {major} "
                f"NVRTC; install it with `{install_command(major)}` (or point CUDA_PATH at a CUDA "
                f"{major}.x toolkit)")
        version = _nvrtc_version(install_toolkit(major, log=log), major)
    return Toolkit(major, version, "nvrtc", str(site))


# Runs in a child with the PyPI packages first on sys.path: TVM's compile_cuda, through NVRTC.
# Source on stdin, cubin on the original stdout; anything else printed goes to stderr.
_NVRTC_CHILD = """
import os, sys
out = os.dup(1)
os.dup2(2, 1)
from mbn_codegen._tvm import Target, tvm_nvcc
arch = sys.argv[1]
with Target({"kind": "cuda", "arch": arch}):
    data = tvm_nvcc.compile_cuda(sys.stdin.buffer.read().decode(), target_format="cubin", arch=arch, compiler="nvrtc")
with os.fdopen(out, "wb") as f:
    f.write(data)
"""


# --------------------------------------------------------------------------------------------
# compiling


class DeviceCompiler:
    """Compiles CUDA source for one arch with one toolkit; plus the TVM hooks that use it."""

    def __init__(self, arch: str, toolkit: Toolkit | None = None):
        self.arch = str(arch).strip()
        _sm_number(self.arch)
        self.toolkit = toolkit or find_toolkit(None)
        if self.toolkit.compiler == "nvcc":
            check_arch(self.arch, self.toolkit.path)
        self.compiled = 0            # compiler runs (cache misses)
        self.seconds = 0.0
        self._cache: dict[str, bytes] = {}

    def compile(self, source: str | bytes) -> bytes:
        """CUDA C++ source -> fatbin (nvcc) or cubin (NVRTC) for self.arch; cached by source."""
        source = source.decode() if isinstance(source, bytes) else str(source)
        with _lock:
            if source not in self._cache:
                t0 = time.perf_counter()
                self._cache[source] = self._nvcc(source) if self.toolkit.compiler == "nvcc" else self._nvrtc(source)
                self.compiled += 1
                self.seconds += time.perf_counter() - t0
            return self._cache[source]

    def _nvcc(self, source: str) -> bytes:
        from ._tvm import Target, tvm_nvcc

        # compile_cuda runs "nvcc" from PATH (the chosen toolkit's goes first) and, without `arch`,
        # passes -gencode arch=compute_XY,code=sm_XY for the current target: SASS only
        path = os.pathsep.join([str(Path(self.toolkit.path).parent), os.environ.get("PATH", "")])
        with mock.patch.dict(os.environ, PATH=path), Target({"kind": "cuda", "arch": self.arch}):
            try:
                return bytes(tvm_nvcc.compile_cuda(source, target_format="fatbin", compiler="nvcc"))
            except RuntimeError as e:
                tail = str(e).split("Compilation error:")[-1].strip()[-4000:]
                raise CudaCompileError(
                    f"nvcc {self.toolkit.version} failed to compile the generated CUDA source for "
                    f"{self.arch}:\n{tail}") from None

    def _nvrtc(self, source: str) -> bytes:
        wheels = Path(self.toolkit.path) / "nvidia"
        # compile_cuda drops -std and -I from `options` but appends this variable's flags as they are:
        # NVRTC 11.8 does not default to C++17 for libcu++ 1.9 (its __config fails without it)
        extra = f"-std=c++17 -I{shlex.quote(str(wheels / 'cuda_cccl' / 'include'))}"
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join([self.toolkit.path, *filter(None, sys.path)]),
               "CUDA_PATH": str(wheels / "cuda_runtime"),          # compile_cuda adds <CUDA_PATH>/include
               "LD_LIBRARY_PATH": os.pathsep.join([str(wheels / "cuda_nvrtc" / "lib"),
                                                   os.environ.get("LD_LIBRARY_PATH", "")]),
               "TVM_CUDA_NVRTC_EXTRA_OPTS": f"{os.environ.get('TVM_CUDA_NVRTC_EXTRA_OPTS', '')} {extra}".strip()}
        proc = subprocess.run([sys.executable, "-c", _NVRTC_CHILD, self.arch], input=source.encode(),
                              capture_output=True, env=env)
        if proc.returncode != 0 or not proc.stdout:
            log = proc.stderr.decode(errors="replace").strip()[-4000:]
            raise CudaCompileError(
                f"NVRTC {self.toolkit.version} ({self.toolkit.path}) failed to compile the generated CUDA "
                f"source for {self.arch} (exit {proc.returncode}):\n{log}")
        return proc.stdout

    def pack_imports(self, mod, is_system_lib: bool, symbol_prefix: str, workspace_dir: str) -> str:
        """`fpack_imports` for Module.export_library: TVM's default LLVM blob packing, after
        compiling CUDA source modules."""
        from ._tvm import tvm_ffi

        llvm = [m for m in module_tree(mod) if m.kind == "llvm"]
        if not llvm:
            raise CudaCompileError(
                "packing compiled CUDA code needs an LLVM host module (target host kind 'llvm'); "
                "this module tree has none")
        head, entries = _parse_blob(_pack(mod))
        for i, (kind, payload) in enumerate(entries):
            if kind == "cuda" and payload is not None:
                fmt, fmap, code = _split_cuda_payload(payload)
                if fmt == "cuda":
                    entries[i] = (kind, _pbytes(self.toolkit.fmt) + fmap + _pbytes(self.compile(code)))
        blob = _pbytes(head + b"".join(_pbytes(k) + (b"" if p is None else _pbytes(p)) for k, p in entries))
        blob_mod = tvm_ffi.get_global_func("codegen.codegen_blob")(
            blob, bool(is_system_lib), llvm[0].get_function("_get_target_string")(), symbol_prefix or "")
        path = os.path.join(workspace_dir, f"{symbol_prefix or ''}devc.o")
        blob_mod.write_to_file(path)
        return path

    def export_library(self, executable, file_name, **kwargs):
        """executable.export_library(file_name, **kwargs) with GPU code compiled for self.arch."""
        mod = getattr(executable, "mod", executable)
        kwargs.setdefault("fpack_imports", self.pack_imports)
        return mod.export_library(str(file_name), **kwargs)


@contextlib.contextmanager
def compile_with_nvcc(arch: str, *, toolkit: str | None = None, log=print):
    """Scope in which TVM's CUDA kernels are compiled for exactly `arch` by the toolkit of CUDA
    major version `toolkit` (None: the system nvcc; see find_toolkit); yields the DeviceCompiler,
    whose export_library packs them. Raises CrossCompilerMissingError / CudaToolkitMissingError
    up front; restores the callback before (tvm.support.nvcc's) on exit."""
    from ._tvm import tvm_ffi   # checks the tvm / tvm-ffi pair

    compiler = DeviceCompiler(arch, find_toolkit(toolkit, log=log))
    with _lock:
        prev_cb = tvm_ffi.get_global_func(CALLBACK_NAME, allow_missing=True)
        # codegen calls it where libcuda.so.1 exists
        tvm_ffi.register_global_func(CALLBACK_NAME, lambda code, *_: bytearray(compiler.compile(str(code))),
                                     override=True)
    try:
        yield compiler
    finally:
        with _lock:
            if prev_cb is not None:
                tvm_ffi.register_global_func(CALLBACK_NAME, prev_cb, override=True)
            else:
                tvm_ffi.remove_global_func(CALLBACK_NAME)


# --------------------------------------------------------------------------------------------
# per-kernel choice between our CUDA schedules and dlight (TVM has no such choice)


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

    def pick(self, kind: str | None = None, macs: int | None = None) -> tuple[str, str]:
        """("ours" | "dlight", why); why is "" when nothing measured applies."""
        if self.forced:
            return self.forced, "forced"
        same = [t for t in self.timings.values() if kind is not None and isinstance(t, dict)
                and t.get("kind") == kind
                and all(isinstance(t.get(k), (int, float)) for k in ("ours_ms", "dlight_ms"))]
        exact = [t for t in same if macs is not None and t.get("macs") == macs]
        for ts, why in ((exact, "measured"), (same, f"measured-{kind}")):
            if ts:
                ours, dl = sum(t["ours_ms"] for t in ts), sum(t["dlight_ms"] for t in ts)
                return ("dlight" if dl < ours else "ours"), why
        return "ours", ""


def use_cuda_graph(log=print) -> bool:
    """CUDA builds replay their kernels as one CUDA graph (captured on the first call) unless
    MBN_CUDA_GRAPH=0. On an H200, v1's kernels take 0.22 ms; the graph took a call from 0.441 to
    0.416 ms (host array in and out), 0.31 ms on input already on the GPU."""
    v = os.environ.get("MBN_CUDA_GRAPH", "1").strip()
    if v not in ("0", "1"):
        raise CudaCompileError(f"MBN_CUDA_GRAPH={v!r}: expected 1 (the default: CUDA graph) or 0 (launch each kernel)")
    if v == "0":
        log("CUDA graph: off (MBN_CUDA_GRAPH=0), each kernel launched by the VM")
    return v == "1"


def timings_path(target: str) -> Path:
    """Where scripts/gpu_check.py writes, and builds for `target` read, the per-kernel GPU times."""
    from mbn_codegen import targets

    return targets.HERE / "databases" / target / "kernel_timings.json"


def kernel_timings(spec, log=print) -> KernelChoice:
    """The KernelChoice for a CUDA build of `spec`: MBN_CUDA_KERNELS=ours|dlight forces one
    side; otherwise GPU timings (written by scripts/gpu_check.py) when measured on its arch."""
    forced = os.environ.get("MBN_CUDA_KERNELS", "").strip()
    if forced:
        if forced not in ("ours", "dlight"):
            raise CudaCompileError(f"MBN_CUDA_KERNELS={forced!r}: expected 'ours' or 'dlight' "
                                   "(or unset, to pick per kernel from GPU timings)")
        log(f"CUDA kernels: {forced} for every kernel (MBN_CUDA_KERNELS)")
        return KernelChoice({}, forced)
    path = Path(os.environ.get("MBN_CUDA_KERNEL_TIMINGS") or timings_path(spec.name))
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
    return KernelChoice(doc["kernels"])


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
    if not hasattr(mod, "imports"):
        raise TypeError(f"expected an Executable, a runtime Module or a path, got {type(obj)!r}")
    cuda_mods = [m for m in module_tree(mod) if m.kind == "cuda"]
    return [_describe(p) for m in cuda_mods for p in _blob_cuda(_pack(m))]


def module_tree(mod) -> list:
    """`mod` and every module it imports, depth first (public `imports` only: the walk TVM's
    export_library does is a private method). Needs no TVM compiler: a loaded artifact's tree
    works with the runtime alone."""
    out, todo = [], [mod]
    while todo:
        m = todo.pop()
        if m not in out:            # a module imported twice is one module (objects compare by handle)
            out.append(m)
            todo += list(m.imports)
    return out


def module_binary_format(obj) -> str:
    """'fatbin', 'cubin', 'ptx' or 'cu' (CUDA source) for the GPU code in `obj` (see
    cuda_payloads). With several CUDA modules the least deployable one is reported
    (cu < ptx < cubin < fatbin). ArtifactError if there is no CUDA module."""
    payloads = cuda_payloads(obj)
    if not payloads:
        name = str(obj) if isinstance(obj, (str, os.PathLike)) else type(obj).__name__
        raise ArtifactError(f"{name} holds no CUDA device module")
    return min((p.format for p in payloads), key=_FORMAT_RANK.__getitem__)


def elf_machine(path: str | os.PathLike) -> str:
    """'aarch64', 'x86_64', ... from an ELF file's e_machine."""
    m = _elf(Path(path).read_bytes(), str(path)).header["e_machine"]
    return _ELF_MACHINES.get(m, str(m))


def _elf(data: bytes, what: str = "data"):
    from elftools.common.exceptions import ELFError
    from elftools.elf.elffile import ELFFile

    if data[:4] != b"\x7fELF":
        raise ArtifactError(f"{what} is not an ELF file")
    try:
        return ELFFile(io.BytesIO(data))
    except (ELFError, struct.error) as e:
        raise ArtifactError(f"{what} is a malformed ELF file ({e})") from None


def payload_format(code: bytes, tag: str = "") -> str:
    if len(code) >= 4 and struct.unpack_from("<I", code)[0] == FATBIN_MAGIC:
        return "fatbin"
    if code[:4] == b"\x7fELF":
        with contextlib.suppress(ArtifactError):
            if _ELF_MACHINES.get(_elf(code).header["e_machine"]) == "cuda":
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
        # CUDA 13 cubins (EI_ABIVERSION >= 8) keep the SM in e_flags bits 8..15, older ones in 0..7
        flags, abi = _elf(code, "cubin").header["e_flags"], cubin_abi_version(code)
        return (f"sm_{(flags >> 8) & 0xFF if abi >= 8 else flags & 0xFF}",)
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


def cubin_abi_version(code: bytes) -> int:
    """A cubin's EI_ABIVERSION: 7 from CUDA 11/12 compilers, 8 from CUDA 13 (which drivers
    older than CUDA 13 cannot load)."""
    return int(_elf(code, "cubin").header["e_ident"]["EI_ABIVERSION"])


# --------------------------------------------------------------------------------------------
# the import blob (format in the module docstring)


def _describe(payload: bytes) -> CudaPayload:
    tag, _, code = _split_cuda_payload(payload)
    return CudaPayload(tag=tag, format=payload_format(code, tag), archs=payload_archs(code), size=len(code))


def _pack(mod) -> bytes:
    from ._tvm import tvm_ffi

    return tvm_ffi.get_global_func("runtime.ModulePackImportsToTensor")(mod).numpy().tobytes()


def _u64(buf, off):
    return struct.unpack_from("<Q", buf, off)[0]


def _pbytes(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else bytes(b)
    return struct.pack("<Q", len(b)) + b


def _read_bytes(buf: bytes, off: int) -> tuple[bytes, int]:
    """The length-prefixed bytes at `off`, and the offset after them."""
    n = _u64(buf, off)
    if off + 8 + n > len(buf):
        raise ValueError("truncated")
    return bytes(buf[off + 8: off + 8 + n]), off + 8 + n


def _parse_blob(blob: bytes) -> tuple[bytes, list]:
    """(indptr and child_indices as raw bytes, [(kind, payload or None for '_lib'), ...])."""
    try:
        if _u64(blob, 0) + 8 > len(blob):
            raise ValueError("truncated")
        n_entries = _u64(blob, 8) - 1
        end = 16 + 8 * (n_entries + 1)
        end += 8 + 8 * _u64(blob, end)
        off, entries = end, []
        for _ in range(n_entries):
            kind, off = _read_bytes(blob, off)
            payload = None
            if kind != b"_lib":
                payload, off = _read_bytes(blob, off)
            entries.append((kind.decode(), payload))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ArtifactError(f"malformed TVM import blob ({e})") from None
    return bytes(blob[8:end]), entries


def _split_cuda_payload(payload: bytes) -> tuple[str, bytes, bytes]:
    """(fmt, raw fmap bytes, code) of a serialized CUDA module: code is the trailing length-
    prefixed bytes; the first offset whose u64 equals the rest's length is where it starts."""
    start = 8 + _u64(payload, 0)
    for p in range(start, len(payload) - 7):
        if _u64(payload, p) == len(payload) - p - 8:
            return payload[8:start].decode(), payload[start:p], payload[p + 8:]
    raise ArtifactError("malformed CUDA module payload (no trailing code bytes)")


def _file_cuda_payloads(path: Path) -> list[bytes]:
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    if tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            objs = [tar.extractfile(m).read() for m in tar.getmembers() if m.isfile() and m.name.endswith(".o")]
    else:
        objs = [path.read_bytes()]
        if objs[0][:4] != b"\x7fELF":
            raise ArtifactError(f"{path} is neither an ELF shared library nor a .tar export")
    blobs = [_elf_symbol_bytes(data, LIBRARY_BIN_SYMBOL) for data in objs]
    return [p for blob in blobs if blob is not None for p in _blob_cuda(blob)]


def _blob_cuda(blob: bytes) -> list[bytes]:
    return [p for k, p in _parse_blob(blob)[1] if k == "cuda" and p is not None]


def _elf_symbol_bytes(data: bytes, name: str) -> bytes | None:
    """Bytes from symbol `name` to the end of its section (.so or .o); None if there is none."""
    from elftools.elf.sections import SymbolTableSection

    elf = _elf(data)
    for sec in elf.iter_sections():
        for sym in (sec.get_symbol_by_name(name) if isinstance(sec, SymbolTableSection) else None) or ():
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

    ap = argparse.ArgumentParser(prog="python -m mbn_codegen.cuda", description=main.__doc__)
    ap.add_argument("cmd", choices=["install"])
    ap.add_argument("major", choices=sorted(PYPI_TOOLKITS))
    args = ap.parse_args(argv)
    try:
        site = install_toolkit(args.major)
    except CudaToolkitMissingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"CUDA {args.major} NVRTC {_nvrtc_version(site, args.major)} in {site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
