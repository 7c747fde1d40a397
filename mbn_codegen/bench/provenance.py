"""Where and with what a report was measured: machine, versions, target, databases, date."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import shutil
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from ..runtime import cpu_flags, cpuinfo as _cpuinfo  # noqa: F401  (cpu_flags: re-exported)

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "asimd", "asimddp", "fphp", "sve")
PACKAGES = ("apache-tvm", "apache-tvm-ffi", "torch", "onnxruntime", "openvino", "onnx", "numpy",
            "matplotlib", "mbn-codegen")


def cpu_mhz() -> float | None:
    for p in ("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq",
              "/sys/devices/system/cpu/cpu0/cpufreq/scaling_max_freq"):
        try:
            return int(Path(p).read_text()) / 1e3
        except (OSError, ValueError):
            pass
    try:
        return float(_cpuinfo()["cpu MHz"])
    except (KeyError, ValueError):
        return None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _gpu() -> str:
    if shutil.which("nvidia-smi"):
        try:
            return subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return "none"


def _git() -> dict | None:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    out["python"] = platform.python_version()
    return out


def collect(target_spec=None, databases: dict | None = None) -> dict:
    c = _cpuinfo()
    flags = cpu_flags()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "machine": {
            "cpu_model": c.get("model name") or c.get("Model") or platform.processor() or "unknown",
            "vendor": c.get("vendor_id", ""),
            "arch": platform.machine(),
            "logical_cpus": os.cpu_count(),
            "usable_cores": usable_cores(),
            "mhz": cpu_mhz(),
            "simd_flags": sorted(f for f in SIMD_FLAGS if f in flags),
            "hypervisor": "hypervisor" in flags,
            "memory_bytes": mem,
            "gpu": _gpu(),
            "os": platform.platform(),
            "load_average_start": load_average(),
        },
        "versions": versions(),
        "git": _git(),
        "target": target_spec.to_dict() if target_spec is not None else None,
        "target_file": getattr(target_spec, "path", None),
        "databases": databases or {},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "board": "this machine (local run)",
    }
