"""MobileNet v1 (Howard et al., 2017, arXiv 1704.04861), exactly the paper's Table 1.

The architecture lives in `V1_LAYERS` as data; the PyTorch module and the cost model are both built
from it, so the two cannot drift apart.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ModelConfigError

# (kind, stride, out_channels before the width multiplier). "conv" is the full 3x3 stem.
# The paper prints stride 2 for the last depthwise layer but keeps the map 7x7: it is stride 1.
V1_LAYERS: list[tuple[str, int, int]] = [
    ("conv", 2, 32),
    ("dw", 1, 32), ("pw", 1, 64),
    ("dw", 2, 64), ("pw", 1, 128),
    ("dw", 1, 128), ("pw", 1, 128),
    ("dw", 2, 128), ("pw", 1, 256),
    ("dw", 1, 256), ("pw", 1, 256),
    ("dw", 2, 256), ("pw", 1, 512),
    *[("dw", 1, 512), ("pw", 1, 512)] * 5,
    ("dw", 2, 512), ("pw", 1, 1024),
    ("dw", 1, 1024), ("pw", 1, 1024),
]

PAPER_ALPHAS = (1.0, 0.75, 0.5, 0.25)
PAPER_RESOLUTIONS = (224, 192, 160, 128)


def scaled(channels: int, alpha: float) -> int:
    """Channels after the width multiplier: the paper's alpha*M (exact on the paper's grid)."""
    return max(1, int(round(channels * alpha)))


def validate(alpha: float, resolution: int, num_classes: int = 1000) -> None:
    if not isinstance(alpha, (int, float)) or math.isnan(alpha) or not 0.0 < alpha <= 1.0:
        raise ModelConfigError(
            f"width multiplier alpha={alpha!r} is out of range: use a number in (0, 1]; "
            f"the paper's grid is {', '.join(map(str, PAPER_ALPHAS))}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0 or resolution % 32:
        raise ModelConfigError(
            f"resolution={resolution!r} cannot work: MobileNet downsamples by 32 (five stride-2 layers), "
            f"so use a positive multiple of 32; the paper's grid is {', '.join(map(str, PAPER_RESOLUTIONS))}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
        raise ModelConfigError(f"num_classes={num_classes!r} must be a positive integer")


def _conv_bn_relu(cin: int, cout: int, k: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    """`features` holds 27 conv-BN-ReLU units in V1_LAYERS order; then global average pool and FC.

    The softmax of the paper's last row is left to the caller (logits out), as torchvision does.
    """

    def __init__(self, alpha: float = 1.0, num_classes: int = 1000, resolution: int = 224):
        super().__init__()
        validate(alpha, resolution, num_classes)
        self.alpha, self.resolution, self.num_classes = float(alpha), resolution, num_classes
        layers, cin = [], 3
        for kind, stride, cout in V1_LAYERS:
            cout = scaled(cout, alpha)
            if kind == "conv":
                layers.append(_conv_bn_relu(cin, cout, 3, stride))
            elif kind == "dw":
                layers.append(_conv_bn_relu(cin, cin, 3, stride, groups=cin))
                cout = cin
            else:
                layers.append(_conv_bn_relu(cin, cout, 1, 1))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))
