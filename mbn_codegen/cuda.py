"""Deployable CUDA artifacts: GPU code compiled to a fatbin/cubin at build time, never CUDA source.

Why this module exists (TVM 0.27; the second point was run here, the first is read from the
upstream source, whose strings match the installed libraries, and needs a driver to run):

* `target.build.cuda` (codegen) emits CUDA C++ and hands it to `ffi.Module.create.cuda`. That
  factory lives in `libtvm_runtime_cuda.so`, which only loads where `libcuda.so.1` (the NVIDIA
  driver) exists. There it JIT-compiles the source at once through the global
  `tvm_callback_cuda_compile(code: str) -> bytes` and tags the result "ptx" (first byte '/') or
  else "cubin" (a fatbin is tagged "cubin" too).
* On a build machine without the driver the factory is missing, codegen builds a
  `CUDAFallbackModuleNode` that keeps the *source* (format tag "cuda") and never calls the
  callback (a registered callback saw 0 calls). The exported library then needs `tvm_callback_cuda_compile` (the full `tvm`
  package plus NVRTC or nvcc) on the board, when it is loaded.

`compile_with_nvcc(arch)` covers both cases: it registers the callback (used where the driver is
present) and, for the scope, makes `export_library` pack the CUDA modules through
`NvccCompiler.pack_imports`, which compiles any module still holding source with nvcc for exactly
`arch` and rewrites its serialized entry to format "fatbin". Outside the scope nothing changes.

`module_binary_format` / `cuda_payloads` inspect what an executable, a module tree (also one
loaded back) or an exported .so / .tar really carries, by parsing the serialized import blob
(`__tvm_ffi__library_bin`), so they work on a machine with no GPU and without importing tvm for
files.

Layouts relied on (tvm-ffi library_module.cc and cuda_module.cc, checked against real output):
  blob   = <u64 nbytes> <vec<u64> indptr> <vec<u64> child_indices> {<str kind> [<bytes payload>]}*
           (kind "_lib" has no payload: the host shared library itself)
  "cuda" payload = <str fmt> <fmap: Map<str, FunctionInfo>> <bytes code>
  str / bytes / vec = <u64 count> <items>, little endian.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError, CrossCompilerMissingError, MbnError

CALLBACK_NAME = "tvm_callback_cuda_compile"
LIBRARY_BIN_SYMBOL = "__tvm_ffi__library_bin"
FATBIN_MAGIC = 0xBA55ED50
EM_CUDA = 190
_ELF_MACHINES = {3: "x86", 40: "arm", 62: "x86_64", 183: "aarch64", 190: "cuda"}
# worst first: what module_binary_format reports when a tree mixes formats
_FORMAT_RANK = {"cu": 0, "unknown": 1, "ptx": 2, "cubin": 3, "fatbin": 4}
_NVCC_FIX = ("install the CUDA toolkit (NVIDIA's installer, or the Debian/Ubuntu package "
             "nvidia-cuda-toolkit) or set CUDA_PATH to a toolkit root that has bin/nvcc")


class CudaCompileError(MbnError):
    """nvcc rejected the generated CUDA source."""


# --------------------------------------------------------------------------------------------
# nvcc discovery


def find_nvcc() -> str | None:
    """Path of the nvcc to use, or None.

    CUDA_PATH, when set, is an explicit choice and the only place looked at ($CUDA_PATH/bin/nvcc);
    otherwise `nvcc` on PATH, then /usr/local/cuda/bin/nvcc.
    """
    cuda_path = os.environ.get("CUDA_PATH")
    if cuda_path:
        cand = Path(cuda_path) / "bin" / "nvcc"
        return str(cand) if cand.is_file() and os.access(cand, os.X_OK) else None
    found = shutil.which("nvcc")
    if found:
        return found
    cand = Path("/usr/local/cuda/bin/nvcc")
    return str(cand) if cand.is_file() and os.access(cand, os.X_OK) else None


def require_nvcc() -> str:
    """find_nvcc(), or CrossCompilerMissingError saying how to get one."""
    nvcc = find_nvcc()
    if nvcc is None:
        where = (f"CUDA_PATH={os.environ['CUDA_PATH']} has no executable bin/nvcc"
                 if os.environ.get("CUDA_PATH") else
                 "nvcc is not on PATH and /usr/local/cuda/bin/nvcc does not exist")
        raise CrossCompilerMissingError(
            f"CUDA targets need nvcc to compile GPU kernels at build time, but {where}; "
            f"{_NVCC_FIX}")
    return nvcc


def nvcc_version(nvcc: str | None = None) -> str:
    """'13.0.88' from `nvcc --version` ('13.0' when only the release is printed)."""
    return _nvcc_version(nvcc or require_nvcc())


def nvcc_gpu_codes(nvcc: str | None = None) -> tuple[str, ...]:
    """Real architectures nvcc can emit SASS for (`nvcc --list-gpu-code`), e.g. ('sm_75', ...);
    empty if this nvcc cannot list them (then the arch is checked by compiling)."""
    return _nvcc_gpu_codes(nvcc or require_nvcc())


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    out = _run([nvcc, "--version"]).stdout
    m = re.search(r"\bV(\d+\.\d+(?:\.\d+)?)", out) or re.search(r"release (\d+\.\d+)", out)
    if not m:
        raise CrossCompilerMissingError(f"cannot read the version of {nvcc}: {out.strip()!r}")
    return m.group(1)


@functools.lru_cache(maxsize=None)
def _nvcc_gpu_codes(nvcc: str) -> tuple[str, ...]:
    proc = _run([nvcc, "--list-gpu-code"], check=False)
    return tuple(w for w in proc.stdout.split() if re.fullmatch(r"sm_\d+[a-z]?", w))


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
            f"{', '.join(codes)}.{dropped} Build {arch} with a CUDA toolkit that supports it "
            "(for a Jetson, the CUDA version of the board's JetPack) and point CUDA_PATH at it")
    return nvcc


# --------------------------------------------------------------------------------------------
# compiling


class NvccCompiler:
    """nvcc for one arch: compile(source) -> fatbin/cubin bytes, plus the TVM hooks that use it."""

    def __init__(self, arch: str, nvcc: str | None = None, fmt: str = "fatbin",
                 options: tuple[str, ...] | list[str] = ()):
        if fmt not in ("fatbin", "cubin"):
            raise ValueError(f"fmt must be 'fatbin' or 'cubin', not {fmt!r}")
        self.arch = str(arch).strip()
        self.nvcc = check_arch(self.arch, nvcc)
        self.version = nvcc_version(self.nvcc)
        self.fmt = fmt
        self.options = list(options)
        self.compiled = 0            # nvcc runs (cache misses)
        self.seconds = 0.0           # total nvcc wall time
        self._cache: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def command(self, src: str, out: str) -> list[str]:
        number, suffix = _parse_arch(self.arch)
        # The same flags tvm.support.nvcc._compile_cuda_nvcc uses (minus ptxas -v chatter), but an
        # explicit -gencode for exactly this arch: SASS only, no PTX for other GPUs.
        cmd = [self.nvcc, f"--{self.fmt}", "-O3",
               "-gencode", f"arch=compute_{number}{suffix},code=sm_{number}{suffix}",
               "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
               "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
               "--expt-relaxed-constexpr", "--expt-extended-lambda"]
        if not os.environ.get("TVM_CUDA_NVCC_NO_FAST_MATH"):
            cmd.append("--use_fast_math")
        return cmd + self.options + ["-o", out, src]

    def compile(self, source: str | bytes) -> bytes:
        """CUDA C++ source -> fatbin (or cubin) bytes for self.arch; cached by source hash."""
        if isinstance(source, str):
            source = source.encode()
        key = hashlib.sha256(source).hexdigest()
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        with tempfile.TemporaryDirectory(prefix="mbn-nvcc-") as tmp:
            src, out = os.path.join(tmp, "kernels.cu"), os.path.join(tmp, f"kernels.{self.fmt}")
            Path(src).write_bytes(source)
            t0 = time.perf_counter()
            proc = _run(self.command(src, out), check=False)
            dt = time.perf_counter() - t0
            if proc.returncode != 0 or not os.path.isfile(out) or os.path.getsize(out) == 0:
                raise CudaCompileError(
                    f"nvcc {self.version} failed to compile the generated CUDA source for "
                    f"{self.arch} (exit {proc.returncode}); command: {' '.join(proc.args)}\n"
                    f"{proc.stdout.strip()[-4000:]}")
            data = Path(out).read_bytes()
        with self._lock:
            self._cache[key] = data
            self.compiled += 1
            self.seconds += dt
        return data

    # -- hook 1: the compile callback (used by codegen/loading where libcuda.so.1 exists) --------
    def callback(self, code, *_unused) -> bytearray:
        """Body for `tvm_callback_cuda_compile`; TVM 0.27 calls it with the source only."""
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
        """`fpack_imports` for Module.export_library: the default LLVM blob packing, after
        compiling CUDA source modules with nvcc."""
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


_scope_lock = threading.RLock()


@contextlib.contextmanager
def compile_with_nvcc(arch: str, *, nvcc: str | None = None, fmt: str = "fatbin",
                      options: tuple[str, ...] | list[str] = ()):
    """Scope in which TVM's CUDA kernels are compiled with nvcc for exactly `arch`.

        with compile_with_nvcc("sm_87") as nv:
            ex = tvm.compile(mod, target=orin)
            ex.export_library("m.so", cc="aarch64-linux-gnu-g++")   # holds an sm_87 fatbin

    Raises CrossCompilerMissingError up front when nvcc is missing or cannot target `arch`.
    Registers `tvm_callback_cuda_compile` (override) and makes `export_library` default to
    `fpack_imports=nv.pack_imports`; on exit both are restored to what was there before (the
    callback that `tvm.support.nvcc` registers at import, or whatever else was registered).
    """
    compiler = NvccCompiler(arch, nvcc=nvcc, fmt=fmt, options=options)
    from ._tvm import tvm, tvm_ffi   # checks the tvm / tvm-ffi pair

    Module = tvm.runtime.module.Module

    with _scope_lock:
        prev_cb = tvm_ffi.get_global_func(CALLBACK_NAME, allow_missing=True)
        prev_export = Module.__dict__["export_library"]

        @functools.wraps(prev_export)
        def export_library(self, file_name, *args, **kwargs):
            if kwargs.get("fpack_imports") is None:
                kwargs["fpack_imports"] = compiler.pack_imports
            return prev_export(self, file_name, *args, **kwargs)

        tvm_ffi.register_global_func(CALLBACK_NAME, compiler.callback, override=True)
        Module.export_library = export_library
    try:
        yield compiler
    finally:
        with _scope_lock:
            Module.export_library = prev_export
            if prev_cb is not None:
                tvm_ffi.register_global_func(CALLBACK_NAME, prev_cb, override=True)
            else:
                tvm_ffi.remove_global_func(CALLBACK_NAME)


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
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        raise ArtifactError(f"{path} is not an ELF file")
    fmt = "<H" if head[5] == 1 else ">H"
    (machine,) = struct.unpack_from(fmt, head, 18)
    return _ELF_MACHINES.get(machine, str(machine))


def payload_format(code: bytes, tag: str = "") -> str:
    if len(code) >= 4 and struct.unpack_from("<I", code)[0] == FATBIN_MAGIC:
        return "fatbin"
    if code[:4] == b"\x7fELF" and len(code) >= 20 \
            and struct.unpack_from("<H", code, 18)[0] == EM_CUDA:
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
    (flags,) = struct.unpack_from("<I", code, 0x30)
    sm = (flags >> 8) & 0xFF if code[8] >= 8 or code[7] == 0x41 else flags & 0xFF
    return f"sm_{sm}"


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
    """Bytes from symbol `name` to the end of its section, in a 64-bit little-endian ELF (.so or
    .o); None if there is no such symbol."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ArtifactError("only 64-bit little-endian ELF files are supported")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize)
                for i in range(shnum)]
    target = name.encode()
    for sh in sections:
        if sh[1] not in (2, 11):                            # SHT_SYMTAB, SHT_DYNSYM
            continue
        strtab = sections[sh[6]]
        str_off = strtab[4]
        for off in range(sh[4], sh[4] + sh[5], 24):
            st_name, _info, _other, shndx, value, _size = struct.unpack_from("<IBBHQQ", data, off)
            if shndx == 0 or shndx >= len(sections):
                continue
            s = str_off + st_name
            if data[s: s + len(target) + 1] != target + b"\0":
                continue
            sec = sections[shndx]
            if sec[1] == 8:                                 # SHT_NOBITS
                raise ArtifactError(f"symbol {name} lives in a NOBITS section")
            start = sec[4] + (value - sec[3])       # file offset = sh_offset + (value - sh_addr)
            return data[start: sec[4] + sec[5]]
    return None
