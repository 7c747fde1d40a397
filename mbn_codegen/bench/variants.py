"""What a bench measures. A TVM variant is just a BuildConfig (plus where its database lives); a
peer is a runtime that loads the same ONNX (or the same PyTorch module).

A variant that cannot run here is kept in the report with the reason ("unavailable: ..."), so a
missing database or a missing package is visible instead of silently shrinking the table.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

# Where `make tune` writes (mbn_codegen.tuning.database_dir: targets/databases/<target> for our
# space, <target>-generic for TVM's generic space); these are the fallbacks, relative to the working
# directory, if that function is missing. {target} is the target's name.
DEFAULT_DATABASE = "targets/databases/{target}"
DEFAULT_MS_DATABASE = "targets/databases/{target}-generic"
# BuildConfig fields that make the generic-space build see the kernels tuning.py tuned (its
# prepare_module lowers the "generic" space with stock schedules in NHWC).
MS_BUILD = {"schedules": "stock", "layout": "NHWC"}

TVM_VARIANTS = ("stock", "metaschedule", "ours", "ours-tuned")
PEER_VARIANTS = ("pytorch", "onnxruntime", "openvino")
ALL_VARIANTS = TVM_VARIANTS + PEER_VARIANTS + ("openvino-bf16",)
DEFAULT_VARIANTS = TVM_VARIANTS + PEER_VARIANTS
STOCK = "stock"

LABELS = {
    "stock": "TVM stock (untuned)",
    "metaschedule": "TVM MetaSchedule (generic space)",
    "ours": "ours (default knobs)",
    "ours-tuned": "ours (tuned)",
    "pytorch": "PyTorch eager",
    "onnxruntime": "ONNX Runtime",
    "openvino": "OpenVINO (f32)",
    "openvino-bf16": "OpenVINO (bf16, its default on AMX CPUs)",
}


@dataclass
class Variant:
    name: str
    kind: str                      # "tvm" | "peer"
    label: str
    status: str = "ok"             # ok | unavailable | failed
    note: str = ""
    build_kwargs: dict = field(default_factory=dict)    # BuildConfig fields (TVM variants)
    database: str | None = None
    artifact: str | None = None    # the built (or given) artifact directory
    runtime: str = ""              # worker kind: tvm | torch | onnxruntime | openvino

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "label": self.label, "status": self.status,
                "note": self.note, "build": self.build_kwargs or None, "database": self.database,
                "artifact": self.artifact, "runtime": self.runtime}


def build_config_fields() -> set[str]:
    from ..build import BuildConfig
    return {f.name for f in dataclasses.fields(BuildConfig)}


def database_info(path: str | None) -> dict | None:
    """Records in a MetaSchedule JSON database (one line per measured trial) and any provenance
    file next to them: the 'budget' a report states."""
    if not path:
        return None
    p = Path(path)
    info: dict = {"path": str(p), "exists": p.is_dir()}
    if not p.is_dir():
        return info
    records = list(p.rglob("*tuning_record*.json"))
    n = 0
    for f in records:
        with open(f, "rb") as fh:
            n += sum(1 for line in fh if line.strip())
    info["tuning_records"] = n
    info["workloads"] = sum(sum(1 for line in open(f, "rb") if line.strip())
                            for f in p.rglob("*workload*.json"))
    for name in ("provenance.json", "budget.json", "meta.json", "database.json"):
        f = p / name
        if f.is_file():
            try:
                info["provenance"] = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                info["provenance_error"] = f"{f}: {e}"
            break
    return info


def _peer_available(name: str) -> str | None:
    mod = {"pytorch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino",
           "openvino-bf16": "openvino"}[name]
    if importlib.util.find_spec(mod) is None:
        extra = " (pip install openvino; optional)" if mod == "openvino" else ""
        return f"not installed: Python package {mod!r}{extra}"
    return None


def resolve(names: list[str], base: dict, target: str, database: str | None = None,
            ms_database: str | None = None, onnx_only: bool = False,
            artifacts: dict[str, str] | None = None) -> list[Variant]:
    """Variants in the requested order, each marked ok or unavailable with the reason.

    base: BuildConfig fields common to all TVM variants (model, alpha, resolution, ...).
    artifacts: extra variants from already-built artifact directories, label -> dir."""
    fields = build_config_fields()
    has_schedules = "schedules" in fields
    has_tuning = importlib.util.find_spec("mbn_codegen.tuning") is not None
    db, msdb = database, ms_database
    if has_tuning and (db is None or msdb is None):
        try:
            from .. import tuning
            db = db or str(tuning.database_dir(target, "ours"))
            msdb = msdb or str(tuning.database_dir(target, "generic"))
        except (ImportError, AttributeError, TypeError):
            pass
    db = db or DEFAULT_DATABASE.format(target=Path(target).stem)
    msdb = msdb or DEFAULT_MS_DATABASE.format(target=Path(target).stem)
    out: list[Variant] = []
    for name in names:
        if name not in ALL_VARIANTS:
            raise ValueError(f"unknown variant {name!r}: choose from {', '.join(ALL_VARIANTS)}")
        v = Variant(name, "tvm" if name in TVM_VARIANTS else "peer", LABELS[name])
        if v.kind == "tvm":
            v.runtime = "tvm"
            kw = dict(base)
            if name == "stock":
                if has_schedules:
                    kw["schedules"] = "stock"
            elif not has_schedules and name != "metaschedule":
                v.status, v.note = "unavailable", ("BuildConfig has no `schedules` field yet "
                                                   "(our schedules are issue 3)")
            elif name == "ours":
                kw["schedules"] = "ours"
                if "use_shipped_database" in fields:
                    kw["use_shipped_database"] = False      # default knobs, not the tuned records
            if name in ("metaschedule", "ours-tuned") and v.status == "ok":
                path = msdb if name == "metaschedule" else db
                v.database = path
                if has_schedules:
                    kw.update(MS_BUILD if name == "metaschedule" else {"schedules": "ours"})
                kw["database"] = path
                if not has_tuning:
                    v.status, v.note = "unavailable", ("mbn_codegen.tuning (issue 3) is not present, "
                                                       "so no database can be applied")
                elif not Path(path).is_dir():
                    v.status, v.note = "unavailable", f"not available: no database at {path}"
            v.build_kwargs = kw
        else:
            v.runtime = {"pytorch": "torch"}.get(name, name.replace("-bf16", ""))
            why = _peer_available(name)
            if name == "pytorch" and onnx_only:
                why = "an --onnx model has no PyTorch definition"
            if why:
                v.status, v.note = "unavailable", why
            if name == "openvino-bf16":
                v.note = v.note or ("OpenVINO's default inference precision on CPUs with AMX/bf16 "
                                    "units: faster, but not fp32 numerics")
        out.append(v)
    for label, path in (artifacts or {}).items():
        v = Variant(label, "tvm", f"artifact {path}", artifact=str(path), runtime="tvm")
        if not (Path(path) / "manifest.json").is_file():
            v.status, v.note = "unavailable", f"not an artifact directory: {path}"
        out.append(v)
    return out
