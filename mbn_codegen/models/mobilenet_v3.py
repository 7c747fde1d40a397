"""MobileNet v3 small and large (Howard et al., 2019) with torchvision's parameter names, so that a
state_dict of torchvision.models.mobilenet_v3_small/large (same width) loads with strict=True."""
from __future__ import annotations

from functools import partial

import torch
from torch import nn

from .mobilenet_v1 import validate
from .mobilenet_v2 import init_like_torchvision, make_divisible

# (input, kernel, expanded, output channels, squeeze-excite, activation, stride): the paper's
# Tables 1 and 2, as torchvision configures them.
LARGE = [(16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2), (24, 3, 72, 24, False, "RE", 1),
         (24, 5, 72, 40, True, "RE", 2), (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
         (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
         (80, 3, 184, 80, False, "HS", 1), (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
         (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1), (160, 5, 960, 160, True, "HS", 1)]
SMALL = [(16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
         (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
         (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
         (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1)]
LAST_CHANNEL = {"large": 1280, "small": 1024}

_BN = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: children 0 (conv), 1 (BN), 2 (activation, if any)."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.Hardswish):
        layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), _BN(cout)]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return s * x


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, k: int, expanded: int, cout: int, se: bool, act: str, stride: int):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        activation = nn.Hardswish if act == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=activation))
        layers.append(ConvBNAct(expanded, expanded, k, stride, groups=expanded, act=activation))
        if se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4)))
        layers.append(ConvBNAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return x + y if self.use_res_connect else y


class MobileNetV3(nn.Module):
    def __init__(self, variant: str = "small", alpha: float = 1.0, num_classes: int = 1000,
                 resolution: int = 224):
        super().__init__()
        validate(alpha, resolution, num_classes)
        self.variant = variant
        self.alpha, self.resolution, self.num_classes = float(alpha), resolution, num_classes

        def ch(c: int) -> int:
            return make_divisible(c * alpha)

        settings = {"small": SMALL, "large": LARGE}[variant]
        features: list[nn.Module] = [ConvBNAct(3, ch(settings[0][0]), 3, 2)]
        for cin, k, exp, cout, se, act, s in settings:
            features.append(InvertedResidual(ch(cin), k, ch(exp), ch(cout), se, act, s))
        last_in = ch(settings[-1][3])
        features.append(ConvBNAct(last_in, 6 * last_in, 1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = ch(LAST_CHANNEL[variant])
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last), nn.Hardswish(inplace=True),
                                        nn.Dropout(0.2, inplace=True), nn.Linear(last, num_classes))
        init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class MobileNetV3Small(MobileNetV3):
    def __init__(self, alpha: float = 1.0, num_classes: int = 1000, resolution: int = 224):
        super().__init__("small", alpha, num_classes, resolution)


class MobileNetV3Large(MobileNetV3):
    def __init__(self, alpha: float = 1.0, num_classes: int = 1000, resolution: int = 224):
        super().__init__("large", alpha, num_classes, resolution)
