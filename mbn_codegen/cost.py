"""MobileNet v1 cost model (Howard et al., 2017): mult-adds and parameters per layer.

`cost_model` derives everything from `V1_LAYERS` with the paper's formulas; `onnx_mult_adds`
recounts an exported graph independently, so the two can check each other.

Parameter conventions (`CostReport.params(convention)`):
- "paper": conv and FC weights only. This is what the paper counts: Table 2's parameter shares
  (74.59 / 1.06 / 0.02 / 24.33 %) come out exactly only without any bias or BatchNorm term.
- "biases": weights + biases (our convs have no bias; only the FC has one). `Layer.params`.
- "torch": also BatchNorm gamma and beta, i.e. `sum(p.numel() for p in model.parameters())`
  (running mean/var are buffers, not parameters).

Where the paper's printed numbers disagree with the exact count, the paper is at fault:
- Table 2 prints 1.19% of mult-adds for the Conv 3x3 stem; it is 1.91% (digits swapped: the
  printed column sums to 99.29%, and 1.19% would need a non-integer feature map).
- Table 7 prints 290M for 1.0-160 and Table 9 76M for 0.5-160, the 224 totals times
  (160/224)^2, which wrongly scales the FC too; the exact counts are 290.68M and 76.52M (TF's
  released checkpoints list 291M and 77M).
- Table 6's 0.47M for alpha 0.25 is reached only with the BatchNorm terms ("torch": 0.470M;
  weights only give 0.464M), while Table 9's 1.32M for alpha 0.5 holds only without them.
"""
from __future__ import annotations

import os
from math import prod
from dataclasses import asdict, dataclass
from typing import NamedTuple

from .models.mobilenet_v1 import V1_LAYERS, scaled, validate

KINDS = ("pw", "dw", "conv", "fc")  # Table 2's order: Conv 1x1, Conv DW 3x3, Conv 3x3, FC
KIND_LABELS = {"pw": "Conv 1x1", "dw": "Conv DW 3x3", "conv": "Conv 3x3", "fc": "Fully Connected",
               "pool": "Avg Pool"}
CONVENTIONS = ("paper", "biases", "torch")


@dataclass
class Layer:
    index: int
    name: str
    kind: str           # conv, dw, pw, pool, fc
    stride: int
    in_ch: int
    out_ch: int
    in_size: int        # spatial side of the input feature map
    out_size: int
    kernel: int
    mult_adds: int
    params: int         # weights + biases
    bn_params: int = 0  # BatchNorm gamma + beta
    biases: int = 0

    def count(self, convention: str = "paper") -> int:
        if convention not in CONVENTIONS:
            raise ValueError(f"unknown parameter convention {convention!r}: use one of {CONVENTIONS}")
        return {"paper": self.params - self.biases, "biases": self.params, "torch": self.params + self.bn_params}[convention]


class KindCost(NamedTuple):
    mult_adds: int
    params: int
    mult_adds_share: float  # fraction of the model total, 0..1
    params_share: float


@dataclass
class CostReport:
    alpha: float
    resolution: int
    num_classes: int
    layers: list[Layer]

    @property
    def total_mult_adds(self) -> int:
        return sum(l.mult_adds for l in self.layers)

    @property
    def total_params(self) -> int:
        """Weights + biases (the "biases" convention)."""
        return self.params("biases")

    @property
    def total_bn_params(self) -> int:
        return sum(l.bn_params for l in self.layers)

    def params(self, convention: str = "paper") -> int:
        return sum(l.count(convention) for l in self.layers)

    def by_kind(self, convention: str = "paper") -> dict[str, KindCost]:
        """Table 2: mult-adds and parameters per layer type, with their shares of the total."""
        total_ma, total_p = self.total_mult_adds, self.params(convention)
        out = {}
        for kind in KINDS:
            ma = sum(l.mult_adds for l in self.layers if l.kind == kind)
            p = sum(l.count(convention) for l in self.layers if l.kind == kind)
            out[kind] = KindCost(ma, p, ma / total_ma, p / total_p)
        return out

    def to_dict(self) -> dict:
        return {
            "model": "mobilenet_v1", "alpha": self.alpha, "resolution": self.resolution,
            "num_classes": self.num_classes, "total_mult_adds": self.total_mult_adds,
            "params": {c: self.params(c) for c in CONVENTIONS},
            "by_kind": {k: v._asdict() for k, v in self.by_kind().items()},
            "layers": [asdict(l) for l in self.layers],
        }

    def format_table(self) -> str:
        head = ("#", "layer", "type", "s", "channels", "size", "mult-adds", "params")
        rows = [(str(l.index), l.name, KIND_LABELS[l.kind],
                 str(l.stride) if l.kind not in ("pool", "fc") else "",
                 f"{l.in_ch}->{l.out_ch}", f"{l.in_size}->{l.out_size}",
                 f"{l.mult_adds / 1e6:.2f}M", f"{l.params:,}") for l in self.layers]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        right = {0, 3, 6, 7}

        def line(r):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip()

        sep = "-" * len(line(head))
        out = [f"MobileNet v1  alpha={self.alpha:g}  resolution={self.resolution}  "
               f"classes={self.num_classes}", line(head), sep, *map(line, rows), sep,
               f"Total: {self.total_mult_adds / 1e6:.2f}M mult-adds; params {self.params('paper') / 1e6:.3f}M "
               f"(weights only, as the paper counts), {self.total_params / 1e6:.3f}M with biases, "
               f"{self.params('torch') / 1e6:.3f}M with BatchNorm (PyTorch's count)",
               "The global average pool is counted as 0 mult-adds, as in the paper.", "",
               f"{'type':<16}{'mult-adds':>12}{'share':>9}{'params':>12}{'share':>9}"]
        for kind, c in self.by_kind().items():
            out.append(f"{KIND_LABELS[kind]:<16}{c.mult_adds / 1e6:>11.2f}M{c.mult_adds_share:>9.2%}"
                       f"{c.params / 1e6:>11.3f}M{c.params_share:>9.2%}")
        return "\n".join(out)


def cost_model(alpha: float = 1.0, resolution: int = 224, num_classes: int = 1000) -> CostReport:
    validate(alpha, resolution, num_classes)
    layers, cin, size = [], 3, resolution
    counts = {}
    for i, (kind, stride, cout) in enumerate(V1_LAYERS):
        cout = cin if kind == "dw" else scaled(cout, alpha)
        k = 1 if kind == "pw" else 3
        out_size = size // stride  # padding k//2: ceil(size/stride), and size is a multiple of 32
        per_position = {"conv": k * k * cin * cout, "dw": k * k * cin, "pw": cin * cout}[kind]
        counts[kind] = counts.get(kind, 0) + 1
        name = "conv1" if kind == "conv" else f"{kind}{counts[kind] + 1}"
        layers.append(Layer(i, name, kind, stride, cin, cout, size, out_size, k,
                            mult_adds=per_position * out_size * out_size, params=per_position,
                            bn_params=2 * cout))
        cin, size = cout, out_size
    n = len(layers)
    layers.append(Layer(n, "pool", "pool", 1, cin, cin, size, 1, size, mult_adds=0, params=0))
    layers.append(Layer(n + 1, "fc", "fc", 1, cin, num_classes, 1, 1, 1, mult_adds=cin * num_classes,
                        params=cin * num_classes + num_classes, biases=num_classes))
    return CostReport(float(alpha), resolution, num_classes, layers)


def separable_ratio(out_channels: int, kernel: int = 3) -> float:
    """Cost of depthwise + pointwise relative to a standard conv: 1/N + 1/D_K^2."""
    return 1 / out_channels + 1 / kernel ** 2


def onnx_mult_adds(onnx_model) -> dict[str, int]:
    """MACs of Conv and Gemm/MatMul nodes of an ONNX model (or file), by conv/dw/pw/fc and "total".

    Counted from the graph alone (shapes by onnx.shape_inference), independent of `cost_model`;
    bias adds, BatchNorm, ReLU and pooling are not counted, as in the paper.
    """
    import onnx

    if isinstance(onnx_model, (str, os.PathLike)):
        onnx_model = onnx.load(str(onnx_model))
    graph = onnx.shape_inference.infer_shapes(onnx_model).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        shapes.setdefault(vi.name, [d.dim_value for d in vi.type.tensor_type.shape.dim])

    totals = dict.fromkeys(("conv", "dw", "pw", "fc"), 0)
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            w, out = shapes[node.input[1]], shapes[node.output[0]]
            group, cin = attrs.get("group", 1), shapes[node.input[0]][1]
            kind = "dw" if group == cin and w[1] == 1 and prod(w[2:]) > 1 else \
                "pw" if group == 1 and prod(w[2:]) == 1 else "conv"
            totals[kind] += prod(out) * w[1] * prod(w[2:])
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            k = a[-2] if node.op_type == "Gemm" and attrs.get("transA", 0) else a[-1]
            totals["fc"] += prod(out) * k
    totals["total"] = sum(totals.values())
    return totals
