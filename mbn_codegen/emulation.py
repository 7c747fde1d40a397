"""Run Python code as aarch64 under qemu user-mode emulation (no board needed).

The emulated interpreter is Debian bookworm's arm64 ``python3.11`` in an arm64 sysroot, with aarch64
wheels of tvm, tvm_ffi and numpy on its path, all built once by ``scripts/arm64_sysroot.sh`` into
:func:`arm64_root` (``$MBN_ARM64_ROOT`` or ``~/.cache/mbn-codegen/arm64``)::

    <root>/sysroot/   arm64 python3.11 + shared libraries    (qemu-aarch64 -L <root>/sysroot)
    <root>/site/      aarch64 tvm, tvm_ffi, numpy, ...        (first on PYTHONPATH)
    <root>/.complete  written last by the script

The directory holding the ``mbn_codegen`` package is also put on ``PYTHONPATH``, so
``mbn_codegen.runtime`` (which is kept free of torch/onnx/compiler imports) can be imported under
emulation. Timings measured under emulation say nothing about a real board.

Import-light on purpose: only the standard library and ``mbn_codegen.errors``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import mbn_codegen
from mbn_codegen.errors import MbnError

_SETUP_HINT = "run scripts/arm64_sysroot.sh (make arm64-sysroot)"

# PYTHON* variables that only change interpreter behaviour and are safe to pass through; every
# other PYTHON* variable (PYTHONHOME, PYTHONPATH, PYTHONSTARTUP, PYTHONUSERBASE, PYTHONPLATLIBDIR,
# PYTHONEXECUTABLE, ...) points at the host's x86-64 installation and is dropped.
_PYTHON_VARS_KEPT = frozenset({
    "PYTHONUNBUFFERED", "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONWARNINGS",
    "PYTHONFAULTHANDLER", "PYTHONDEVMODE", "PYTHONTRACEMALLOC", "PYTHONDONTWRITEBYTECODE",
    "PYTHONOPTIMIZE", "PYTHONVERBOSE", "PYTHONINSPECT",
})
# Other host variables that break (or silently redirect) the emulated process.
_HOST_VARS_DROPPED = frozenset({
    "VIRTUAL_ENV", "VIRTUAL_ENV_PROMPT", "__PYVENV_LAUNCHER__", "CONDA_PREFIX", "CONDA_DEFAULT_ENV",
    "TVM_LIBRARY_PATH", "TVM_HOME",  # would point tvm's libinfo at the host's x86-64 libtvm*.so
})
# LD_PRELOAD / LD_LIBRARY_PATH with x86-64 libraries break the emulated dynamic loader; QEMU_*
# settings (QEMU_LD_PREFIX, QEMU_CPU, ...) would override the command line.
_HOST_PREFIXES_DROPPED = ("LD_", "QEMU_")


class EmulationUnavailableError(MbnError):
    """qemu-aarch64 or the arm64 sysroot is missing; the message says how to get it."""


def arm64_root() -> Path:
    """Where scripts/arm64_sysroot.sh puts the emulation environment."""
    env = os.environ.get("MBN_ARM64_ROOT")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mbn-codegen" / "arm64"


def _python(root: Path) -> Path:
    return root / "sysroot" / "usr" / "bin" / "python3.11"


def qemu_binary() -> str | None:
    """Path of qemu-aarch64 (Debian qemu-user), or of qemu-aarch64-static; None if neither."""
    return shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")


def qemu_available() -> str | None:
    """None when Python can run under emulation, otherwise the reason it cannot (with the fix)."""
    if qemu_binary() is None:
        return "qemu-aarch64 not found on PATH: install Debian package qemu-user"
    root = arm64_root()
    if not (root / ".complete").is_file():
        return f"arm64 sysroot missing or incomplete at {root}: {_SETUP_HINT}"
    for need in (_python(root), root / "site" / "tvm_ffi", root / "site" / "numpy"):
        if not need.exists():
            return f"arm64 sysroot at {root} lacks {need.relative_to(root)}: {_SETUP_HINT}"
    return None


def _package_root() -> Path:
    """Directory to put on the emulated PYTHONPATH so that ``import mbn_codegen`` works.

    In a source checkout (editable install) that is the repository root. When mbn_codegen was
    installed into a site-packages directory, that directory also holds the host's x86-64 torch,
    numpy, ... (tvm_ffi imports torch whenever it can find it), so a private directory holding
    only a symlink to the package is used instead.
    """
    pkg = Path(mbn_codegen.__file__).resolve().parent
    parent = pkg.parent
    if parent.name not in ("site-packages", "dist-packages"):
        return parent
    tag = hashlib.sha1(str(pkg).encode()).hexdigest()[:12]
    shim = Path(tempfile.gettempdir()) / f"mbn-codegen-pkgroot-{os.getuid()}-{tag}"
    link = shim / "mbn_codegen"
    if not (link.is_symlink() and link.resolve() == pkg):
        shim.mkdir(parents=True, exist_ok=True)
        tmp = shim / f".mbn_codegen.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(pkg, target_is_directory=True)
        os.replace(tmp, link)
    return shim


def arm64_python_command(args: Sequence[str]) -> list[str]:
    """argv that runs the emulated ``python3.11 <args>``; use with :func:`arm64_env`.
    EmulationUnavailableError when emulation is not available."""
    reason = qemu_available()
    if reason is not None:
        raise EmulationUnavailableError(f"cannot run aarch64 code under emulation: {reason}")
    root = arm64_root()
    return [qemu_binary(), "-L", str(root / "sysroot"), str(_python(root)), *map(str, args)]


def arm64_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the emulated python: the host's, minus what breaks it, plus ``env``.

    PYTHONPATH is ``<root>/site``, the package root of mbn_codegen, then any PYTHONPATH given in
    ``env`` (never the host's). Variables in ``env`` are applied last and win otherwise.
    """
    root = arm64_root()
    out = {key: value for key, value in os.environ.items()
           if not (key.startswith("PYTHON") and key not in _PYTHON_VARS_KEPT)
           and key not in _HOST_VARS_DROPPED and not key.startswith(_HOST_PREFIXES_DROPPED)}
    venv = os.environ.get("VIRTUAL_ENV")
    if venv and "PATH" in out:  # keep `python` in child processes from meaning the host venv
        venv_bin = str(Path(venv) / "bin")
        out["PATH"] = os.pathsep.join(p for p in out["PATH"].split(os.pathsep) if p != venv_bin)
    extra = dict(env or {})
    paths = [str(root / "site"), str(_package_root())]
    if extra.get("PYTHONPATH"):
        paths.append(extra.pop("PYTHONPATH"))
    out["PYTHONPATH"] = os.pathsep.join(paths)
    out["PYTHONNOUSERSITE"] = "1"  # ~/.local/lib/python3.11/site-packages holds host packages
    out.update(extra)
    return out


def run_python_arm64(args: list[str], env: dict | None = None, timeout: float | None = 600, cwd=None, *,
                     capture_output: bool = True) -> subprocess.CompletedProcess:
    """Run ``qemu-aarch64 -L <sysroot> <sysroot>/usr/bin/python3.11 <args>`` with :func:`arm64_env`
    (``env`` added), stdout/stderr captured as text unless ``capture_output=False``.

    ``args`` are the python arguments, e.g. ``["-c", code]`` or ``["script.py", "m.so"]``.
    Raises EmulationUnavailableError when qemu-aarch64 or the sysroot is missing, and
    subprocess.TimeoutExpired after ``timeout`` seconds.
    """
    return subprocess.run(arm64_python_command(args), env=arm64_env(env), cwd=cwd, timeout=timeout,
                          capture_output=capture_output, text=True)
