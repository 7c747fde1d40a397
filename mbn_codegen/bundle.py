"""What a board installs, and one archive that installs it there without network.

The package has two sides. The base install (`pip install mbn-codegen`) is the board runtime:
`mbn_codegen.runtime`, `mbn-codegen run` and TVM's RPC server. The `compile` extra
(`pip install 'mbn-codegen[compile]'`, `make setup`) adds what builds, tunes and benchmarks.

:func:`bundle` packs an artifact, the runtime's wheels for the artifact's CPU and the board's Python,
pip's own wheel and an install.sh into one .tar.gz: a board with no internet needs only that file.

Standard library only at import time (the CLI imports this module in runtime-only installs).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from importlib import metadata
from pathlib import Path

import mbn_codegen

from .errors import MbnError


class BundleError(MbnError):
    """A bundle that cannot be made: unknown architecture or Python, no wheel, no download."""


class CompilerNotInstalledError(MbnError):
    """A compiler-side command in an install without the `compile` extra."""


# top-level import name -> distribution, for every package of the `compile` extra
COMPILE_MODULES = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
                   "jsonschema": "jsonschema", "tornado": "tornado", "xgboost": "xgboost-cpu",
                   "matplotlib": "matplotlib", "skimage": "scikit-image", "elftools": "pyelftools"}

PYTHONS = ("3.10", "3.11", "3.12")    # pyproject.toml's requires-python
# `pip download --platform` values per artifact arch (manifest.json "arch")
PLATFORMS = {
    "aarch64": ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"),
    "x86_64": ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"),
}
_ARCH_NAMES = {"arm64": "aarch64", "amd64": "x86_64"}


def compiler_missing(exc: BaseException) -> CompilerNotInstalledError | None:
    """The named error when `exc` comes from importing a compile-extra package that is not installed
    (directly, or as the cause of another ImportError, as TVM's ONNX frontend raises), else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        root = (getattr(exc, "name", None) or "").split(".")[0] if isinstance(exc, ImportError) else ""
        if root in COMPILE_MODULES or root == "tomllib":
            break
        exc = exc.__cause__ or exc.__context__
    else:
        return None
    if root == "tomllib":       # the standard library's since 3.11; the target files need it
        fix = (f"the compiler side needs Python 3.11 or newer (this is {sys.version_info[0]}.{sys.version_info[1]}): "
               "make a 3.11 venv and pip install 'mbn-codegen[compile]' there (make setup)")
    else:
        fix = (f"the compiler side is not installed ({COMPILE_MODULES[root]} is missing): "
               "pip install 'mbn-codegen[compile]' (in a source checkout: make setup)")
    return CompilerNotInstalledError(fix + ". This install can run artifacts: mbn-codegen run ARTIFACT [photo]")


def wheel_cache() -> Path:
    """Downloaded wheels, per architecture and Python: `$MBN_WHEEL_CACHE` or ~/.cache/mbn-codegen/wheels."""
    env = os.environ.get("MBN_WHEEL_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mbn-codegen" / "wheels"


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    # The host's pip config may name a constraints file meant for the host venv; it has no say
    # over wheels for another machine. Indexes, find-links and certificates are kept.
    env = dict(os.environ, PIP_CONSTRAINT="", PIP_DISABLE_PIP_VERSION_CHECK="1")
    cmd = [sys.executable, "-m", "pip", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _tail(s: str, n: int = 12) -> str:
    lines = [line for line in s.strip().splitlines() if "is ignored: it is neither a file nor" not in line]
    return "\n".join(lines[-n:])


def build_wheel(dest: str | os.PathLike) -> Path:
    """Build mbn-codegen's wheel from this source checkout into `dest`; returns its path.

    The sources are copied first: setuptools reuses an in-tree build/ folder, which can carry
    deleted modules into the wheel.
    """
    try:
        import tomllib
    except ImportError:
        raise BundleError("building the wheel reads pyproject.toml with tomllib (Python 3.11+): run on the "
                          "host's Python 3.11 venv, or pass --wheel FILE") from None
    root = Path(mbn_codegen.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    conf = tomllib.loads(pyproject.read_text()) if pyproject.is_file() else {}
    if conf.get("project", {}).get("name") != "mbn-codegen":
        raise BundleError(f"mbn_codegen at {Path(mbn_codegen.__file__).parent} is not in a source checkout, "
                          "so there is no wheel to build: pass --wheel FILE (e.g. from `pip wheel --no-deps "
                          "<checkout>` or `pip download --no-deps mbn-codegen`)")
    dirs = set(conf.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values()) or {"mbn_codegen"}
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mbn-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ["pyproject.toml", conf["project"].get("readme", "README.md"), *sorted(dirs)]:
            p = root / name
            if p.is_dir():
                shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "logs"))
            elif p.is_file():
                shutil.copy2(p, src / name)
        args = ["wheel", "--no-deps", "-q", "-w", str(dest), str(src)]
        if importlib.util.find_spec("setuptools"):
            args.insert(1, "--no-build-isolation")    # no network needed for the build backend
        r = _pip(args)
        if r.returncode != 0:
            raise BundleError(f"pip wheel failed for {root}:\n{_tail(r.stderr or r.stdout)}")
    wheels = sorted(dest.glob("mbn_codegen-*.whl"), key=lambda p: p.stat().st_mtime)
    if not wheels:
        raise BundleError(f"pip wheel reported success but wrote no mbn_codegen wheel into {dest}")
    return wheels[-1]


def download_wheels(requirements: list[str], arch: str, python: str, dest: str | os.PathLike,
                    log=print) -> list[Path]:
    """`pip download` the wheels (with dependencies) of `requirements` for `arch` and CPython `python`
    into `dest`. A local cache serves reruns without network; PyPI is asked only for what it lacks.
    `arch` is a PLATFORMS key and `python` one of PYTHONS (bundle checks both)."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    cache = wheel_cache() / f"{arch}-cp{python.replace('.', '')}"
    cache.mkdir(parents=True, exist_ok=True)
    base = ["download", "--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            *[a for p in PLATFORMS[arch] for a in ("--platform", p)], "--progress-bar", "off"]
    offline = [*base, "--no-index", "--find-links", str(cache), "-d", str(dest), *requirements]
    if _pip(offline).returncode != 0:
        log(f"downloading {arch} wheels for Python {python} into {cache}")
        r = _pip([*base, "-d", str(cache), *requirements])
        for stale in cache.glob("mbn_codegen-*.whl"):      # same version number, other contents
            stale.unlink()
        if r.returncode != 0:
            raise BundleError(f"pip download of the {arch} wheels for Python {python} failed (PyPI is needed "
                              f"once; later bundles use {cache}):\n{_tail(r.stderr or r.stdout)}")
        r = _pip(offline)
        if r.returncode != 0:
            raise BundleError(f"the wheels downloaded into {cache} do not resolve offline:\n{_tail(r.stderr)}")
    return sorted(dest.glob("*.whl"))


def bundle(artifact: str | os.PathLike, python: str = "3.11", out: str | os.PathLike | None = None,
           wheel: str | os.PathLike | None = None, log=print) -> Path:
    """Write `out` (default: next to the artifact, <name>-bundle-py<python>.tar.gz) holding

        <name>-bundle-py<python>/install.sh      installs offline, self-checks, says how to start the RPC server
        <name>-bundle-py<python>/artifact/<name>/
        <name>-bundle-py<python>/wheels/         mbn-codegen, its runtime dependencies and pip, for the
                                                 artifact's arch and CPython <python>
        <name>-bundle-py<python>/bundle.json     what is inside

    `wheel` is mbn-codegen's wheel to ship; default: built from this source checkout.
    """
    from .runtime import read_manifest

    artifact = Path(artifact).resolve()
    manifest = read_manifest(artifact)
    python = str(python).removeprefix("python")
    if python not in PYTHONS:
        raise BundleError(f"board Python {python!r}: mbn-codegen's runtime supports {', '.join(PYTHONS)}; "
                          "pass the board's `python3 --version`, e.g. --python 3.11")
    arch = _ARCH_NAMES.get(manifest["arch"], manifest["arch"])
    if arch not in PLATFORMS:
        raise BundleError(f"{artifact} is built for {arch!r}; bundles carry wheels for {', '.join(PLATFORMS)}")
    stem = f"{artifact.name}-bundle-py{python}"
    out = Path(out) if out else artifact.parent / f"{stem}.tar.gz"
    if out.resolve().is_relative_to(artifact):
        raise BundleError(f"--out {out} lies inside the artifact it packs: choose a path outside {artifact}")
    if out.is_dir():
        raise BundleError(f"--out {out} is a directory: give a file name ending in .tar.gz")
    with tempfile.TemporaryDirectory(prefix="mbn-bundle-") as tmp:
        root = Path(tmp) / stem
        wheels = root / "wheels"
        if wheel is None:
            log("building mbn-codegen's wheel from the source checkout")
            own = build_wheel(Path(tmp) / "own")
        else:
            own = Path(wheel)
            if not (own.is_file() and own.name.startswith("mbn_codegen-") and own.suffix == ".whl"):
                raise BundleError(f"--wheel {own}: expected an mbn_codegen-*.whl file")
        files = download_wheels([str(own.resolve()), f"pip=={metadata.version('pip')}"], arch, python,
                                wheels, log)
        shutil.copytree(artifact, root / "artifact" / artifact.name,
                        ignore=shutil.ignore_patterns("__pycache__"))
        install = root / "install.sh"
        install.write_text(INSTALL_SH.replace("@PYTHON@", python).replace("@ARCH@", arch)
                           .replace("@ARTIFACT@", artifact.name))
        install.chmod(0o755)
        (root / "bundle.json").write_text(json.dumps({
            "format": 1, "python": python, "arch": arch, "artifact": artifact.name,
            "target": manifest["target"]["name"], "device": manifest["device"],
            "wheels": [f.name for f in files]}, indent=2) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        part = out.with_name(out.name + ".part")
        with tarfile.open(part, "w:gz", compresslevel=1) as tar:   # wheels are compressed already
            tar.add(root, arcname=stem)
        os.replace(part, out)
    log(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB: {len(files)} wheels for {arch}, Python {python}). "
        f"On the board: tar xzf {out.name} && sh {stem}/install.sh")
    return out


# POSIX sh: a board may have no bash. pip runs from its own wheel, so the board needs no pip.
INSTALL_SH = r"""#!/bin/sh
# Installs the mbn-codegen runtime from the wheels next to this script (no network needed), then
# self-checks the artifact. Written by `mbn-codegen bundle` for @ARCH@ and Python @PYTHON@.
#   sh install.sh               into a venv in ./venv (the default)
#   sh install.sh --venv DIR    into a venv in DIR
#   sh install.sh --user        pip install --user into this Python's user site
#   sh install.sh --site DIR    pip install --target DIR (no venv module needed; use PYTHONPATH=DIR)
# PYTHON=/path/to/python@PYTHON@ picks the interpreter (default: python@PYTHON@, else python3).
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
WANT=@PYTHON@
ARCH=@ARCH@
ARTIFACT="$HERE/artifact/@ARTIFACT@"
die() { echo "install.sh: error: $*" >&2; exit 1; }

mode=venv
dest="$HERE/venv"
case "${1:-}" in
    "") ;;
    --venv) [ $# -ge 2 ] || die "--venv needs a folder"; dest=$2 ;;
    --site) [ $# -ge 2 ] || die "--site needs a folder"; mode=site; dest=$2 ;;
    --user) mode=user ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) die "unknown option '$1' (sh install.sh --help lists them)" ;;
esac

if [ -z "${PYTHON:-}" ]; then
    for c in "python$WANT" python3; do
        if command -v "$c" >/dev/null 2>&1; then PYTHON=$c; break; fi
    done
fi
[ -n "${PYTHON:-}" ] || die "neither python$WANT nor python3 is on PATH: install Python $WANT, or set PYTHON=/path/to/python$WANT"
got=$("$PYTHON" -c 'import platform, sys; print("%d.%d %s" % (sys.version_info[:2] + (platform.machine(),)))') \
    || die "$PYTHON does not run"
have=${got% *}
machine=${got#* }
case "$machine" in arm64) machine=aarch64 ;; amd64) machine=x86_64 ;; esac
[ "$machine" = "$ARCH" ] || die "this bundle is for $ARCH boards, but $PYTHON runs on $machine"
[ "$have" = "$WANT" ] || die "this bundle holds wheels for Python $WANT, but $PYTHON is Python $have: set PYTHON=/path/to/python$WANT, or make a bundle for Python $have on the host (mbn-codegen bundle ARTIFACT --python $have)"

PIP="$(ls "$HERE"/wheels/pip-*.whl | head -n 1)/pip"
pip_install() {  # $1 = python; then pip's options
    py=$1; shift
    "$py" "$PIP" install --no-index --find-links "$HERE/wheels" --disable-pip-version-check "$@"
}
run=$PYTHON
case $mode in
    venv)
        "$PYTHON" -m venv --without-pip "$dest" \
            || die "cannot create a venv in $dest (on Debian: apt install python3-venv), or use --site DIR or --user"
        dest=$(cd "$dest" && pwd)
        pip_install "$dest/bin/python" mbn-codegen pip
        run="$dest/bin/python"
        ;;
    user)
        pip_install "$PYTHON" --user mbn-codegen
        ;;
    site)
        pip_install "$PYTHON" --target "$dest" mbn-codegen
        dest=$(cd "$dest" && pwd)
        PYTHONPATH="$dest${PYTHONPATH:+:$PYTHONPATH}"
        export PYTHONPATH
        ;;
esac
show=$run
[ "$mode" != site ] || show="PYTHONPATH=$dest $PYTHON"

echo "== self-check of $ARTIFACT"
"$run" -m mbn_codegen.cli.main run "$ARTIFACT"
echo
echo "installed. Classify a photo:"
echo "    $show -m mbn_codegen.cli.main run $ARTIFACT photo.jpg"
echo "Measure for 'make tune' on the host (start 'make rpc-tracker' there first):"
echo "    $show -m tvm.exec.rpc_server --tracker HOST_IP:9190 --key KEY"
"""
