"""What a bench measures. A TVM variant is a BuildConfig (plus where its database lives); a peer is a
runtime that loads the same ONNX (or the same PyTorch module). A variant that cannot run here stays
in the report with the reason."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

TVM_VARIANTS = ("stock", "metaschedule", "ours", "ours-tuned")
PEER_VARIANTS = ("pytorch", "onnxruntime", "openvino")
ALL_VARIANTS = TVM_VARIANTS + PEER_VARIANTS + ("openvino-bf16",)
DEFAULT_VARIANTS = TVM_VARIANTS + PEER_VARIANTS
LABELS = {"stock": "TVM stock (untuned)", "metaschedule": "TVM MetaSchedule (generic space)",
          "ours": "ours (default knobs)", "ours-tuned": "ours (tuned)", "pytorch": "PyTorch eager",
          "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO (f32)",
          "openvino-bf16": "OpenVINO (bf16, its default on AMX CPUs)"}
RUNTIME = {"pytorch": "torch", "onnxruntime": "onnxruntime", "openvino": "openvino", "openvino-bf16": "openvino"}
# BuildConfig fields per TVM variant; the generic space is tuned on stock NHWC (tuning.prepare_module).
BUILD = {"stock": {"schedules": "stock"}, "ours": {"schedules": "ours", "use_shipped_database": False},
         "ours-tuned": {"schedules": "ours"}, "metaschedule": {"schedules": "stock", "layout": "NHWC"}}


@dataclass
class Variant:
    """Also its record in results.json (asdict), with the output checks and build facts."""
    name: str
    kind: str                      # "tvm" | "peer"
    label: str
    status: str = "ok"             # ok | unavailable | failed
    note: str = ""
    build_kwargs: dict = field(default_factory=dict)
    database: str | None = None
    artifact: str | None = None
    runtime: str = "tvm"
    checks: list = field(default_factory=list)
    build_facts: dict | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def database_records(path: str) -> int:
    """Measured trials in a MetaSchedule JSON database (one line each): the budget a label states."""
    return sum(sum(1 for line in open(f, "rb") if line.strip()) for f in Path(path).rglob("*tuning_record*.json"))


def resolve(cfg, names: list[str], base: dict, artifacts: dict[str, str] | None = None) -> list[Variant]:
    from ..tuning import database_dir

    dbs = {"ours-tuned": cfg.database or str(database_dir(cfg.target, "ours")),
           "metaschedule": cfg.ms_database or str(database_dir(cfg.target, "generic"))}
    out = []
    for name in names:
        if name not in ALL_VARIANTS:
            raise ValueError(f"unknown variant {name!r}: choose from {', '.join(ALL_VARIANTS)}")
        if name in TVM_VARIANTS:
            v = Variant(name, "tvm", LABELS[name], build_kwargs={**base, **BUILD[name]}, database=dbs.get(name))
            if v.database and not Path(v.database).is_dir():
                v.status, v.note = "unavailable", f"no database at {v.database}"
        else:
            v = Variant(name, "peer", LABELS[name], runtime=RUNTIME[name])
            if importlib.util.find_spec(v.runtime) is None:
                v.status, v.note = "unavailable", f"not installed: Python package {v.runtime!r}"
            elif name == "pytorch" and cfg.model.onnx:
                v.status, v.note = "unavailable", "an --onnx model has no PyTorch definition"
        out.append(v)
    for label, path in (artifacts or {}).items():
        v = Variant(label, "tvm", f"{label} ({Path(path).name})", artifact=str(path))
        if not (Path(path) / "manifest.json").is_file():
            v.status, v.note = "unavailable", f"not an artifact directory: {path}"
        out.append(v)
    return out
