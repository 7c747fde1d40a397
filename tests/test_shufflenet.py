"""ShuffleNet v2 (an ONNX file from outside the zoo): its channel split and shuffle export as
Shape -> Gather -> Slice/Reshape arithmetic, which is folded once the input shape is fixed, so
`build --onnx` compiles it and it matches ONNX Runtime."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers import check_correctness, distinct_inputs
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.export import export_onnx
from mbn_codegen.models.calibrate import make_live
from mbn_codegen.runtime import load


def _channel_shuffle(x, groups: int):
    b, c, h, w = x.size()
    return torch.transpose(x.view(b, groups, c // groups, h, w), 1, 2).contiguous().view(b, c, h, w)


def _dw(c: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(c, c, 3, stride, 1, bias=False, groups=c)


class _Unit(nn.Module):
    """torchvision's ShuffleNet v2 InvertedResidual, with its parameter names."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.stride, f = stride, oup // 2
        self.branch1 = nn.Sequential(_dw(inp, stride), nn.BatchNorm2d(inp), nn.Conv2d(inp, f, 1, bias=False),
                                     nn.BatchNorm2d(f), nn.ReLU(inplace=True)) if stride > 1 else nn.Sequential()
        self.branch2 = nn.Sequential(nn.Conv2d(inp if stride > 1 else f, f, 1, bias=False), nn.BatchNorm2d(f),
                                     nn.ReLU(inplace=True), _dw(f, stride), nn.BatchNorm2d(f),
                                     nn.Conv2d(f, f, 1, bias=False), nn.BatchNorm2d(f), nn.ReLU(inplace=True))

    def forward(self, x):
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out, 2)


class ShuffleNetV2x05(nn.Module):
    """torchvision.models.shufflenet_v2_x0_5's structure and parameter names (checked against
    torchvision below where it is installed), so this test runs without it."""

    def __init__(self, repeats=(4, 8, 4), channels=(24, 48, 96, 192, 1024), num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1, bias=False), nn.BatchNorm2d(channels[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = channels[0]
        for name, n, cout in zip(("stage2", "stage3", "stage4"), repeats, channels[1:]):
            setattr(self, name, nn.Sequential(_Unit(cin, cout, 2), *[_Unit(cout, cout, 1) for _ in range(n - 1)]))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, channels[-1], 1, 1, 0, bias=False), nn.BatchNorm2d(channels[-1]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x):
        x = self.maxpool(self.conv1(x))
        x = self.conv5(self.stage4(self.stage3(self.stage2(x))))
        return self.fc(x.mean([2, 3]))


def _torchvision():
    try:
        import torchvision
    except Exception as e:      # absent, or a build whose C extension does not fit this torch
        pytest.skip(f"torchvision unavailable: {type(e).__name__}: {str(e)[:100]}")
    return torchvision


def _build_and_check(tmp_path, model, res: int = 224):
    torch.manual_seed(0)
    model.resolution = res          # make_live calibrates at this size
    make_live(model)
    path = export_onnx(model, tmp_path / "shufflenet.onnx", res)
    out = build(BuildConfig(onnx=str(path), out=str(tmp_path / "art")), log=lambda s: None)
    m = load(out)
    check_correctness(m.run, path, distinct_inputs((1, 3, res, res), 2), model)
    assert m.selfcheck()["ok"]
    return m


@pytest.mark.parametrize("res", [128, pytest.param(224, marks=pytest.mark.slow)])
def test_shufflenet_v2_x0_5_onnx_builds_and_matches_onnxruntime(tmp_path, res):
    import onnx

    m = _build_and_check(tmp_path, ShuffleNetV2x05().eval(), res)
    ops = {n.op_type for n in onnx.load(str(tmp_path / "shufflenet.onnx")).graph.node}
    assert {"Shape", "Gather", "Slice"} <= ops          # the export really has the shape arithmetic
    kinds = {k["kind"]: k["source"] for k in m.manifest["kernels"]}
    assert kinds["depthwise"].startswith("ours-default:mbn_depthwise")
    assert kinds["pointwise"].startswith("ours-default:mbn_pointwise")


@pytest.mark.slow
def test_torchvision_shufflenet_v2_x0_5(tmp_path):
    tv = _torchvision()
    ref = tv.models.shufflenet_v2_x0_5(weights=None).eval()
    ours = ShuffleNetV2x05()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref(x))
    _build_and_check(tmp_path, ref)
