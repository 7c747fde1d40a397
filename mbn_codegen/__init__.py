"""mbn-codegen: PyTorch MobileNet -> ONNX -> TVM Relax -> tuned native library.

Kept import-light on purpose: `mbn_codegen.runtime` must load on a board that has only the TVM
runtime (no torch, onnx or TVM compiler), so nothing heavy is imported here.
"""

__version__ = "0.1.0"
