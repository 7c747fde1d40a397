"""Random weights that keep activations alive.

A freshly initialised MobileNet in eval mode (BN running stats 0/1) gives the same logits for
every input: activations vanish through the stack and only the FC bias is left. Tests and
benchmarks that compare two compilers on such a model compare nothing. This draws He-normal convs,
BN affine parameters around 1 and 0, and sets the BN running statistics from a few batches of
random images, so that eval-mode outputs depend on the input.
"""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def make_live(model: nn.Module, seed: int = 0, batches: int = 3, batch_size: int = 4) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    momentum = {m: m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_out) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=g))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            m.momentum = None          # cumulative average over the calibration batches
            m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (1.0 / m.in_features) ** 0.5)
            m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=g))
    res = getattr(model, "resolution", 224)
    model.train()
    for _ in range(batches):
        model(torch.randn(batch_size, 3, res, res, generator=g))
    for m, mom in momentum.items():
        m.momentum = mom          # the model's own (torchvision's v3 uses 0.01)
    return model.eval()
