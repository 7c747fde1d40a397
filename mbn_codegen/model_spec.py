"""What gets compiled: a zoo model (name, width, resolution, classes, weights, seed) or a user's ONNX
file. Build and tune each hold one ModelSpec; it validates, names the artifact, writes the ONNX file
the compiler reads and makes the reference input/output pair."""
from __future__ import annotations

import dataclasses
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from . import models
from .errors import NonFiniteModelError
from .export import export_onnx, fix_input_shape, graph_inputs, load_onnx, onnxruntime_run


@dataclass(frozen=True)
class ModelSpec:
    name: str = models.DEFAULT_MODEL
    alpha: float = 1.0
    resolution: int | None = None     # zoo: None = the model's default; ONNX: fixes a dynamic H, W
    num_classes: int = 1000
    weights: str | None = None        # state_dict path, "pretrained", or None: live random
    onnx: str | None = None           # a user's ONNX file instead of a zoo model
    seed: int = 0                     # of the random weights and of the reference input's noise

    @property
    def entry(self) -> models.ModelEntry:
        return models.get(self.name)

    @property
    def zoo_resolution(self) -> int:
        return self.entry.default_resolution if self.resolution is None else self.resolution

    def validate(self) -> None:
        """A ModelConfigError (zoo) or OnnxModelError naming the user's file, before any work."""
        if self.onnx:
            fix_input_shape(load_onnx(self.onnx), resolution=self.resolution, source=self.onnx)
        else:
            self.entry.validate(self.alpha, self.zoo_resolution, self.num_classes)

    def stem(self) -> str:
        """The artifact's name, without the target."""
        if self.onnx:
            return Path(self.onnx).stem
        return f"{self.name}-{self.alpha:g}-{self.zoo_resolution}"

    def describe(self) -> str:
        return self.onnx or f"{self.name} with weights {self.weights or '(random)'}"

    def write_onnx(self, path: Path, log: Callable[[str], None] = print) -> PreparedModel:
        """The ONNX file the compiler reads, at `path` (the user's copied, or a zoo model exported),
        loaded, checked for NaN/Inf weights and with a concrete input shape."""
        if self.onnx:
            shutil.copyfile(self.onnx, path)
            info = {"name": "onnx:" + Path(self.onnx).name, "source_onnx": str(self.onnx)}
        else:
            from .models.calibrate import make_live

            res = self.zoo_resolution
            log(f"export {self.name} alpha={self.alpha:g} resolution={res} -> ONNX")
            model = models.create(self.name, self.alpha, res, self.num_classes, self.weights)
            if self.weights is None:
                make_live(model, seed=self.seed)
            _check_finite_state_dict(model, self.weights)
            export_onnx(model, path, res)
            info = {"name": self.name, "alpha": self.alpha, "resolution": res, "num_classes": self.num_classes,
                    "weights": self.weights or f"random (live, seed={self.seed}): not trained, for testing only"}
        onnx_model = load_onnx(path)
        _check_finite_onnx(onnx_model, self.onnx or f"the exported {self.name}")
        # a zoo export has a fixed input of its resolution
        input_name, shape = fix_input_shape(onnx_model, resolution=self.resolution, source=self.onnx)
        if graph_inputs(onnx_model)[0][1][2:] != list(shape[2:]):
            log(f"input {input_name!r} has dynamic height/width: building for {shape[2]}x{shape[3]}")
            info["resolution"] = shape[2]
        return PreparedModel(Path(path), onnx_model, input_name, shape, info)

    def reference_input(self, shape: tuple[int, ...]) -> np.ndarray:
        """A real photo for pretrained ImageNet models (selfcheck then also checks the class);
        otherwise noise seeded by `seed`."""
        if self.weights == "pretrained" and shape[2] == shape[3]:
            from .images import preprocess, sample_images
            return preprocess(sample_images()["chelsea"], shape[2])
        return np.random.default_rng(self.seed + 12345).standard_normal(shape).astype("float32")

    def reference(self, prepared: PreparedModel) -> tuple[np.ndarray, np.ndarray]:
        """The reference input and ONNX Runtime's output on it (the oracle every artifact is held to)."""
        x = self.reference_input(prepared.shape)
        y = onnxruntime_run(prepared.path, x)
        _check_finite_output(y, self.describe())
        return x, y

    def labels_file(self, outputs: int) -> Path | None:
        """Class names for a model with `outputs` logits: the zoo entry's (an ONNX file with 1000
        outputs is taken for ImageNet)."""
        labels = models.LABELS_FILE if self.onnx else self.entry.labels
        if labels is None or (not self.onnx and outputs != self.num_classes):
            return None
        return labels if len(labels.read_text().splitlines()) == outputs else None


@dataclass
class PreparedModel:
    path: Path
    onnx_model: object
    input_name: str
    shape: tuple[int, ...]
    info: dict                        # the manifest's "model" facts


MODEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ModelSpec)) - {"name"}


def with_model_fields(cls):
    """Let a config that holds `model: ModelSpec` also be built flat, as before it held one:
    cls(model="mobilenet_v2", alpha=0.5, target=...) == cls(model=ModelSpec("mobilenet_v2", alpha=0.5),
    target=...). Next to a ModelSpec the flat fields override it (so dataclasses.replace works).
    A field of cls's own (TuneConfig.seed: the search's) is not a model field."""
    init = cls.__init__
    flat_names = MODEL_FIELDS - {f.name for f in dataclasses.fields(cls)}

    @functools.wraps(init)
    def __init__(self, *args, **kw):
        flat = {k: kw.pop(k) for k in list(kw) if k in flat_names}
        model = kw.get("model")
        if isinstance(model, ModelSpec):
            kw["model"] = dataclasses.replace(model, **flat) if flat else model
        elif model is not None or flat:
            kw["model"] = ModelSpec(**({"name": model} if model is not None else {}), **flat)
        init(self, *args, **kw)

    cls.__init__ = __init__
    return cls


def _nonfinite(named, what: str) -> str | None:
    """'k of n <what> hold NaN/Inf: name (1 NaN of 9), ...', or None when all are finite."""
    bad, total = [], 0
    for total, (name, a) in enumerate(named, 1):
        a = np.asarray(a)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            counts = {"NaN": int(np.isnan(a).sum()), "Inf": int(np.isinf(a).sum())}
            bad.append(f"{name} ({' and '.join(f'{n} {kind}' for kind, n in counts.items() if n)} of {a.size})")
    return f"{len(bad)} of {total} {what} hold NaN/Inf: {models.short_list(bad, 5)}" if bad else None


def _check_finite_state_dict(model, weights: str | None) -> None:
    sd = model.state_dict()
    what = _nonfinite(((k, v.detach().cpu().numpy()) for k, v in sd.items() if v.is_floating_point()), "tensors")
    neg_var = [k for k, v in sd.items() if k.endswith("running_var") and bool((v < 0).any())]
    if neg_var and not what:
        what = f"BatchNorm running_var < 0 in {', '.join(neg_var[:5])} (its sqrt is NaN)"
    if what:
        raise NonFiniteModelError(
            f"weights {weights or '(random)'}: {what}. The compiled model would output NaN for "
            "every image and fail its self-check on the board: use a checkpoint from before "
            "training diverged, or re-save the weights")


def _check_finite_onnx(onnx_model, source: str) -> None:
    from onnx import numpy_helper

    g = onnx_model.graph
    named = [(t.name, numpy_helper.to_array(t)) for t in g.initializer]
    named += [(node.output[0], numpy_helper.to_array(att.t)) for node in g.node if node.op_type == "Constant"
              for att in node.attribute if att.HasField("t")]
    what = _nonfinite(named, "weight tensors")
    if what:
        raise NonFiniteModelError(f"{source}: {what}. The compiled model would output NaN for every "
                                  "image: re-export it from finite weights")


def _check_finite_output(y: np.ndarray, source: str) -> None:
    if not np.isfinite(y).all():
        raise NonFiniteModelError(
            f"{source}: ONNX Runtime's output for the reference input holds "
            f"{int(np.isnan(y).sum())} NaN and {int(np.isinf(y).sum())} Inf of {y.size} values, although "
            "the weights are finite: the model overflows float32 (weights or BatchNorm statistics "
            "far too large, or a variance of 0 with eps=0). Check how the weights were produced")
