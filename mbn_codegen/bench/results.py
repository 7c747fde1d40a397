"""The results document (results.json): every raw sample, written atomically after each step so an
interrupted bench keeps what it measured; statistics; schema validation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FORMAT = "mbn-codegen-bench/1"
SCHEMA_FILE = Path(__file__).with_name("schema.json")
RESULTS = "results.json"


def stats(samples: list[float], seed: int = 0, boot: int = 1000) -> dict:
    """Median with p10/p90 and a bootstrap 95% interval of the median."""
    a = np.asarray(samples, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(a, size=(boot, a.size), replace=True), axis=1) if a.size > 1 else a
    return {"n": int(a.size), "median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "mean": float(a.mean()), "std": float(a.std()),
            "min": float(a.min()), "max": float(a.max()),
            "ci95": [float(np.percentile(meds, 2.5)), float(np.percentile(meds, 97.5))]}


class Results:
    """A dict with a save() that never leaves a half-written file."""

    def __init__(self, path: str | os.PathLike, doc: dict):
        self.path = Path(path)
        self.doc = doc

    def __getitem__(self, k):
        return self.doc[k]

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, allow_nan=False, default=_default) + "\n")
        os.replace(tmp, self.path)


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load(path_or_dir: str | os.PathLike) -> dict:
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / RESULTS
    doc = json.loads(p.read_text())
    if doc.get("format") != FORMAT:
        raise ValueError(f"{p} is not an mbn-codegen bench results file (format {doc.get('format')!r})")
    return doc


def schema() -> dict:
    return json.loads(SCHEMA_FILE.read_text())


def validate(doc: dict) -> list[str]:
    """Errors against schema.json (empty = valid). jsonschema when installed, else a small
    validator for the subset the schema uses (type, required, properties, additionalProperties,
    items, enum, minimum, minItems, anyOf, local $ref)."""
    sch = schema()
    try:
        import jsonschema
    except ImportError:
        return _validate(doc, sch, "$", sch)
    v = jsonschema.Draft202012Validator(sch)
    return [f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in v.iter_errors(doc)]


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(x, t: str) -> bool:
    if t == "integer":
        return isinstance(x, int) and not isinstance(x, bool)
    if t == "number":
        return isinstance(x, (int, float)) and not isinstance(x, bool)
    return isinstance(x, _TYPES[t])


def _validate(x, s: dict, where: str, root: dict) -> list[str]:
    errs: list[str] = []
    if "$ref" in s:
        node = root
        for part in s["$ref"].lstrip("#/").split("/"):
            node = node[part]
        return _validate(x, node, where, root)
    if "anyOf" in s:
        if all(_validate(x, sub, where, root) for sub in s["anyOf"]):
            return [f"{where}: matches none of anyOf"]
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_is(x, t) for t in types):
            return [f"{where}: expected {'/'.join(types)}, got {type(x).__name__}"]
    if "enum" in s and x not in s["enum"]:
        errs.append(f"{where}: {x!r} not in {s['enum']}")
    if "minimum" in s and _is(x, "number") and x < s["minimum"]:
        errs.append(f"{where}: {x} < minimum {s['minimum']}")
    if isinstance(x, dict):
        for k in s.get("required", []):
            if k not in x:
                errs.append(f"{where}: missing required {k!r}")
        props = s.get("properties", {})
        for k, v in x.items():
            if k in props:
                errs += _validate(v, props[k], f"{where}/{k}", root)
            elif s.get("additionalProperties") is False:
                errs.append(f"{where}: unexpected property {k!r}")
            elif isinstance(s.get("additionalProperties"), dict):
                errs += _validate(v, s["additionalProperties"], f"{where}/{k}", root)
    if isinstance(x, list):
        if len(x) < s.get("minItems", 0):
            errs.append(f"{where}: fewer than {s['minItems']} items")
        if "items" in s:
            for i, v in enumerate(x):
                errs += _validate(v, s["items"], f"{where}/{i}", root)
    return errs
