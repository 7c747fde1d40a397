"""Targets as data: one TOML file per board in this folder (installed as mbn_codegen.targets).

A file holds the TVM target dict (`[target]`, and `[host]` for GPUs), the CPU architecture that
runs the library, the cross compiler that links it, and how to run it from an x86 workstation.
`--target` takes a file's name (`arm64`) or a path to your own file of the same shape.
"""
from __future__ import annotations

import os
import shutil
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from mbn_codegen.errors import CrossCompilerMissingError, TargetFileError, UnknownTargetError

HERE = Path(__file__).parent
_ALLOWED = {"arch": ("x86_64", "aarch64"), "device": ("cpu", "cuda"), "run": ("native", "qemu", "gpu")}
KINDS = {"cpu": ("llvm",), "cuda": ("cuda",)}     # the TVM target kind each device compiles with
_STR_FIELDS = ("description", "cross_compiler", "cross_compiler_package", "cuda_arch", "cuda_toolkit")


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    arch: str
    device: str
    run: str
    target: dict
    host: dict | None = None
    cross_compiler: str = ""
    cross_compiler_package: str = ""
    cuda_arch: str = ""
    required_cpu_flags: tuple[str, ...] = ()
    path: str = ""
    raw: dict = field(default_factory=dict, repr=False)

    def tvm_dict(self) -> dict:
        """The dict that tvm.target.Target accepts; native CPU targets get this machine's cores."""
        t, cores = dict(self.target), os.cpu_count() or 1
        if self.device == "cpu" and self.run == "native":
            t.setdefault("num-cores", cores)
        if self.host is not None:
            t["host"] = dict(self.host)
            if self.arch == "x86_64":
                t["host"].setdefault("num-cores", cores)
        return t

    def tvm_target(self):
        from mbn_codegen._tvm import Target
        try:
            return Target(self.tvm_dict())
        except Exception as e:
            lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
            msg = lines[-1] if lines else type(e).__name__
            raise TargetFileError(
                f"target file {self.path or self.name}: TVM rejects its [target]/[host] tables: "
                f"{msg[:300] + '...' if len(msg) > 300 else msg}. Fix that field (see the TVM target "
                f"docs, or copy a working file from {HERE})") from None

    def compiler(self) -> str | None:
        """The C++ compiler that links the library (None = TVM's default, the host's)."""
        if not self.cross_compiler:
            return None
        if shutil.which(self.cross_compiler) is None:
            raise CrossCompilerMissingError(
                f"target {self.name!r} links with {self.cross_compiler}, which is not on PATH: "
                f"install it with `sudo apt-get install {self.cross_compiler_package or self.cross_compiler}`")
        return self.cross_compiler

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "arch": self.arch,
                "device": self.device, "run": self.run, "tvm_target": self.tvm_dict(),
                "cross_compiler": self.cross_compiler, "cuda_arch": self.cuda_arch,
                "required_cpu_flags": list(self.required_cpu_flags),
                **({"clock_ghz": self.raw["clock_ghz"]} if "clock_ghz" in self.raw else {})}


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.toml"))


def load(name_or_path: str | os.PathLike) -> TargetSpec:
    s = str(name_or_path)
    path = Path(s) if (s.endswith(".toml") or os.sep in s) else HERE / f"{s}.toml"
    if not path.is_file():
        raise UnknownTargetError(f"unknown target {s!r}: known targets are {', '.join(names())} "
                                 "(or pass the path of your own .toml target file)")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TargetFileError(f"target file {path} is not valid TOML: {e}") from None
    missing = [k for k in ("description", "arch", "device", "run", "target") if k not in raw]
    if missing:
        raise TargetFileError(f"target file {path} lacks {', '.join(missing)}; copy a file from "
                                 f"{HERE} and edit it")
    for key, allowed in _ALLOWED.items():
        if raw[key] not in allowed:
            raise TargetFileError(f"target file {path}: {key}={raw[key]!r}, expected one of {allowed}")
    _check_fields(path, raw)
    given = {f.name: raw[f.name] for f in fields(TargetSpec) if f.name in raw}
    return TargetSpec(**{**given, "required_cpu_flags": tuple(raw.get("required_cpu_flags", ())),
                         "name": path.stem, "path": str(path), "raw": raw})


def _check_fields(path: Path, raw: dict) -> None:
    """The fields whose mistakes would otherwise surface as a bare ValueError/TypeError from TVM
    or at link time, named with the file and what is accepted."""
    def bad(field: str, got, want: str):
        raise TargetFileError(f"target file {path}: {field}={got!r}, expected {want}")

    for key in _STR_FIELDS:
        if key in raw and not isinstance(raw[key], str):
            bad(key, raw[key], "a string")
    flags = raw.get("required_cpu_flags", [])
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        bad("required_cpu_flags", flags, 'a list of /proc/cpuinfo flag names, e.g. ["avx2", "fma"]')
    if raw["device"] == "cuda" and not raw.get("cuda_arch"):
        raise TargetFileError(f"target file {path}: a CUDA target needs cuda_arch (e.g. \"sm_87\")")
    if raw.get("cuda_arch") and not str(raw["cuda_arch"]).startswith("sm_"):
        bad("cuda_arch", raw["cuda_arch"], 'an sm_XY name, e.g. "sm_87"')
    tables = [("target", raw["target"], KINDS[raw["device"]])]
    if "host" in raw:
        tables.append(("host", raw["host"], ("llvm",)))
    for table, t, kinds in tables:
        if not isinstance(t, dict):
            bad(table, t, f"a table ([{table}]) with kind = {kinds[0]!r} and TVM target attributes")
        if "kind" not in t:
            raise TargetFileError(f"target file {path}: [{table}] lacks kind; for device="
                                  f"{raw['device']!r} it is one of {kinds}")
        if t["kind"] not in kinds:
            bad(f"[{table}] kind", t["kind"], f"one of {kinds} for device={raw['device']!r}"
                + ("" if table == "host" else f" (devices and kinds: {KINDS})"))
        mattr = t.get("mattr")
        if mattr is not None and (not isinstance(mattr, list) or not all(isinstance(m, str) for m in mattr)):
            bad(f"[{table}] mattr", mattr, 'a list of strings, e.g. ["+neon"]')
        cores = t.get("num-cores")
        if cores is not None and (not isinstance(cores, int) or isinstance(cores, bool) or cores < 1):
            bad(f"[{table}] num-cores", cores, "a positive integer")


def all_targets() -> list[TargetSpec]:
    return [load(n) for n in names()]
