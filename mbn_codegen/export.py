"""PyTorch -> ONNX, and validation of ONNX files (ours or a user's)."""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .errors import OnnxModelError

OPSET = 17          # the TorchScript exporter's mature opset; TVM's ONNX frontend covers it fully
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def export_onnx(model, path: str | os.PathLike, resolution: int | None = None,
                do_constant_folding: bool = True) -> Path:
    """Export an eval-mode model with input (1, 3, R, R) float32 NCHW, then check it.

    do_constant_folding is torch.onnx.export's: False leaves BatchNormalization nodes in the graph
    (as many users' ONNX files have them), which exercises our own Relax BN-folding phase.
    """
    import torch

    res = resolution or getattr(model, "resolution", 224)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.zeros(1, 3, res, res)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], opset_version=OPSET, dynamo=False,
                          do_constant_folding=do_constant_folding)
    load_onnx(path)
    return path


def load_onnx(path: str | os.PathLike):
    """Load and check an ONNX file; a clear OnnxModelError for anything unusable."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"ONNX file {path} does not exist")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf DecodeError, truncated file, wrong format
        raise OnnxModelError(
            f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); the file is malformed "
            "or truncated: re-export it (torch.onnx.export) or check the download") from None
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise OnnxModelError(f"{path} fails onnx.checker: {str(e).splitlines()[0]}; "
                             "re-export it with a current exporter") from None
    inputs = graph_inputs(model)
    if len(inputs) != 1:
        raise OnnxModelError(f"{path} has {len(inputs)} inputs {[i[0] for i in inputs]}; "
                             "an image classifier with exactly one image input is expected")
    name, shape, dtype = inputs[0]
    if len(shape) != 4 or shape[1] != 3:
        raise OnnxModelError(f"{path}: input {name!r} has shape {shape}; expected NCHW (1, 3, H, W). "
                             "Export with a fixed NCHW image input")
    if dtype != "float32":
        raise OnnxModelError(f"{path}: input {name!r} is {dtype}; only float32 models are supported")
    return model


def graph_inputs(model) -> list[tuple[str, list, str]]:
    """(name, shape, dtype) of the real inputs (initializers excluded); unknown dims as None."""
    import onnx

    inits = {i.name for i in model.graph.initializer}
    out = []
    for i in model.graph.input:
        if i.name in inits:
            continue
        t = i.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        out.append((i.name, dims, str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))))
    return out


def fix_input_shape(model, batch: int = 1, resolution: int | None = None,
                    source: str | os.PathLike | None = None) -> tuple[str, tuple[int, ...]]:
    """The single input's name and a concrete shape: a symbolic batch becomes `batch`, symbolic
    H and W become `resolution`. A fixed H/W that disagrees with `resolution` is an error (the
    weights of some layers, and the reference pair, depend on it)."""
    name, shape, _ = graph_inputs(model)[0]
    where = f"{source}: " if source else ""
    if shape[0] is None:
        shape[0] = batch
    dynamic = [i for i in (2, 3) if shape[i] is None]
    if dynamic and resolution is None:
        raise OnnxModelError(f"{where}input {name!r} has dynamic height/width {shape}; pass "
                             "--resolution N (e.g. 224) to build for N x N, or export with a fixed size")
    if resolution is not None:
        if any(shape[i] not in (None, resolution) for i in (2, 3)):
            raise OnnxModelError(
                f"{where}input {name!r} has the fixed shape {shape}, which --resolution {resolution} "
                "cannot change: leave --resolution out, or re-export with dynamic height/width "
                "(torch.onnx.export(..., dynamic_axes={'input': {2: 'H', 3: 'W'}}))")
        for i in dynamic:
            shape[i] = resolution
    if None in shape[1:]:
        raise OnnxModelError(f"{where}input {name!r} has symbolic dims {shape}; export with a fixed "
                             "NCHW input shape")
    return name, tuple(int(d) for d in shape)


def onnxruntime_run(path: str | os.PathLike, x: np.ndarray, threads: int | None = None) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ops whose outputs fold to constants once their inputs are: the shape arithmetic an exporter
# writes for x.size(), view and chunk (Shape -> Gather -> Unsqueeze -> Concat -> Reshape/Slice)
_FOLDABLE = frozenset({"Shape", "Size", "Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Reshape", "Cast",
                       "Add", "Sub", "Mul", "Div", "Floor", "Ceil", "Range", "Equal", "Where", "Identity",
                       "ConstantOfShape", "Expand", "ReduceProd", "Max", "Min", "Neg", "Abs", "Constant"})
_FOLD_MAX_ELEMENTS = 4096      # shape arithmetic is tiny; never fold a weight computation


def fold_shapes(model, input_shape: tuple[int, ...]):
    """A copy of `model` whose shape arithmetic is folded into constants, given the concrete
    input shape: TVM's frontend imports Shape -> Gather -> Slice as dynamic ops (shape_of,
    take, dynamic_strided_slice) that its legalisation cannot lower, although with a fixed input
    every value is known. onnxscript's constant folder does it, on _FOLDABLE nodes only. A graph
    without Shape/Size nodes is returned as it is."""
    from onnxscript import ir, optimizer

    if not any(n.op_type in ("Shape", "Size") for n in model.graph.node):
        return model
    m = ir.serde.deserialize_model(model)
    next(v for v in m.graph.inputs if v.name not in m.graph.initializers).shape = ir.Shape(input_shape)
    optimizer.fold_constants_ir(
        m, onnx_shape_inference=True, input_size_limit=_FOLD_MAX_ELEMENTS, output_size_limit=_FOLD_MAX_ELEMENTS,
        should_fold=lambda n: None if n.domain in ("", "ai.onnx") and n.op_type in _FOLDABLE else False)
    optimizer.remove_unused_nodes(m)
    return ir.serde.serialize_model(m)
