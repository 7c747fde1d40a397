"""results.json: every raw sample, written atomically after each step (an interrupted bench keeps
what it measured), validated against schema.json; statistics; where it was measured."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np

FORMAT = "mbn-codegen-bench/2"
SCHEMA_FILE = Path(__file__).with_name("schema.json")
RESULTS = "results.json"
PACKAGES = ("apache-tvm", "apache-tvm-ffi", "torch", "onnxruntime", "openvino", "onnx", "numpy")


def stats(samples: list[float], seed: int = 0, boot: int = 1000) -> dict:
    """Median with p10/p90 and a bootstrap 95% interval of the median."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    meds = np.median(np.random.default_rng(seed).choice(a, size=(boot, a.size)), axis=1)
    p10, p90 = np.percentile(a, [10, 90]).tolist()
    return {"n": int(a.size), "median": float(np.median(a)), "p10": p10, "p90": p90, "min": float(a.min()),
            "max": float(a.max()), "ci95": np.percentile(meds, [2.5, 97.5]).tolist()}


def noise(block_medians: list[float]) -> float | None:
    """(p90 - p10) / median of one variant's per-block medians: how far two runs of it drift."""
    a = np.asarray(block_medians)
    return float(np.ptp(np.percentile(a, [10, 90])) / np.median(a)) if a.size >= 3 else None


def check_output(out, ref: np.ndarray, oracle: str = "onnxruntime") -> dict:
    out = np.asarray(out, dtype=np.float64)
    ok = bool(np.allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())) and out.argmax() == ref.argmax()
    return {"ok": bool(ok), "max_abs_err": float(np.abs(out - ref).max()), "oracle": oracle}


def save(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)


def load(path_or_dir: str | os.PathLike) -> dict:
    p = Path(path_or_dir)
    doc = json.loads((p / RESULTS if p.is_dir() else p).read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{p} is not an mbn-codegen bench results file of format {FORMAT} ({doc.get('format')!r})")
    return doc


def validate(doc: dict) -> list[str]:
    import jsonschema

    v = jsonschema.Draft202012Validator(json.loads(SCHEMA_FILE.read_text()))
    return [f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in v.iter_errors(doc)]


def provenance(spec) -> dict:
    from ..runtime import cpu_flags, cpuinfo

    import psutil            # imported here: the CLI loads this module on boards without it

    c, freq = cpuinfo(), psutil.cpu_freq()
    try:
        git = subprocess.run(["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        git = None
    versions = {p: metadata.version(p) if list(metadata.distributions(name=p)) else None for p in PACKAGES}
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
            "machine": {"cpu_model": (c.get("model name") or platform.processor() or "unknown")
                        + (f" (family {c['cpu family']}, model {c['model']})" if "cpu family" in c else ""),
                        "arch": platform.machine(), "usable_cores": len(psutil.Process().cpu_affinity()),
                        "mhz": freq.max or freq.current if freq else None,
                        "simd_flags": sorted(f for f in cpu_flags()
                                             if f.startswith(("avx", "fma", "amx", "asimd", "sve"))),
                        "memory_bytes": psutil.virtual_memory().total, "os": platform.platform(),
                        "load_average_start": [round(x, 2) for x in psutil.getloadavg()]},
            "versions": {**versions, "python": platform.python_version()}, "git": git,
            "target": spec.to_dict(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def new_series(variant: str, threads: int) -> dict:
    return {"variant": variant, "threads": threads, "samples_ms": [], "rounds": [], "block_medians_ms": [],
            "stats": {"n": 0}, "noise": None}


def add_block(e: dict, r: int, samples: list[float]) -> None:
    e["samples_ms"] += samples
    e["rounds"].append(r)
    e["block_medians_ms"].append(float(np.median(samples)))
    e.update(stats=stats(e["samples_ms"]), noise=noise(e["block_medians_ms"]))


def peak(doc: dict, t: int) -> dict | None:
    """The machine's measured peak at `t` threads, if the bench measured one."""
    return next((p for p in doc["peak"] if p["threads"] == t), None)


def gflops(call: dict) -> float:
    return 2 * call["mult_adds"] / call["median_ms"] / 1e6
