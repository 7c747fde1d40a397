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

SCHEMA = json.loads(Path(__file__).with_name("schema.json").read_text())
FORMAT = SCHEMA["properties"]["format"]["const"]
RESULTS = "results.json"
PACKAGES = ("apache-tvm", "apache-tvm-ffi", "torch", "onnxruntime", "openvino", "onnx", "numpy")


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

    v = jsonschema.Draft202012Validator(SCHEMA)
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
    """Median with p10/p90 and a bootstrap 95% interval of it; noise = (p90 - p10) / median of the block
    medians: how far two runs of the variant drift."""
    e["samples_ms"] += samples
    e["rounds"].append(r)
    e["block_medians_ms"].append(float(np.median(samples)))
    a, b = np.asarray(e["samples_ms"]), np.asarray(e["block_medians_ms"])
    boot = np.median(np.random.default_rng(0).choice(a, size=(1000, a.size)), axis=1)
    p10, p90 = np.percentile(a, [10, 90]).tolist()
    e["stats"] = {"n": a.size, "median": float(np.median(a)), "p10": p10, "p90": p90, "min": float(a.min()),
                  "max": float(a.max()), "ci95": np.percentile(boot, [2.5, 97.5]).tolist()}
    e["noise"] = float(np.ptp(np.percentile(b, [10, 90])) / np.median(b)) if b.size >= 3 else None
