"""Every import from TVM's moving parts lives here (0.27 renamed tir->tirx, moved MetaSchedule
and dlight under s_tir, and dropped string targets). When TVM moves again, only this file changes.

Importing this module checks the tvm / tvm-ffi pair first.
"""
from __future__ import annotations

import contextlib
from importlib import metadata

from .errors import VersionMismatchError

TVM_VERSION = "0.27.0.post1"
TVM_FFI_VERSION = "0.1.14.post0"


def _installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_versions() -> None:
    """apache-tvm-ffi 0.1.15.post2 (pip's default pick) segfaults in MetaSchedule's
    tvm::ffi::ToJSONGraph; refuse anything but the verified pair before TVM loads."""
    got = {"apache-tvm": _installed("apache-tvm"), "apache-tvm-ffi": _installed("apache-tvm-ffi")}
    want = {"apache-tvm": TVM_VERSION, "apache-tvm-ffi": TVM_FFI_VERSION}
    bad = [f"{k}=={got[k]} (need {want[k]})" for k in want if got[k] != want[k]]
    if bad:
        raise VersionMismatchError(
            "mismatched TVM installation: " + ", ".join(bad) + ". Other pairs crash in tuning; fix with "
            f"`pip install apache-tvm=={TVM_VERSION} apache-tvm-ffi=={TVM_FFI_VERSION}` (or `make setup`)")


check_versions()

import tvm  # noqa: E402
import tvm_ffi  # noqa: E402
from tvm import relax, tirx  # noqa: E402
from tvm.relax.frontend import detach_params  # noqa: E402
from tvm.relax.frontend.onnx import from_onnx  # noqa: E402
from tvm.relax.frontend.onnx import onnx_frontend  # noqa: E402
from tvm.s_tir import meta_schedule as ms  # noqa: E402
from tvm.s_tir import dlight  # noqa: E402
from tvm.s_tir.analysis import find_anchor_sblock  # noqa: E402
from tvm.target import Target  # noqa: E402
from tvm.target.codegen import target_has_features  # noqa: E402
from tvm.driver import build as tir_build  # noqa: E402
from tvm.ir.utils import derived_object  # noqa: E402
from tvm.relax import dpl  # noqa: E402
from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # noqa: E402
from tvm.support.popen_pool import PopenPoolExecutor  # noqa: E402
from tvm.support import nvcc as tvm_nvcc  # noqa: E402
from tvm import rpc as tvm_rpc  # noqa: E402
from tvm.rpc import base as rpc_base  # noqa: E402
from tvm.rpc.tracker import Tracker as RPCTracker  # noqa: E402

IRModule = tvm.IRModule


@contextlib.contextmanager
def tensor_intrinsics_skipped():
    """MetaSchedule's TuneContext imports tvm.s_tir.tensor_intrin on creation (1.5-4 minutes here,
    see preload_tensor_intrinsics); design spaces without tensorization (our rules; TVM's generic
    rules on targets without VNNI/dot-product instructions) never look a tensor intrinsic up. Inside
    this block that import finds an empty module; afterwards the real one imports as usual."""
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        sys.modules.pop(name, None)


def preload_tensor_intrinsics() -> None:
    """Import tvm.s_tir.tensor_intrin (MetaSchedule's TuneContext does, on its first use) with a
    cheap inspect.stack(). The import parses ~250 TVMScript functions, and TVMScript's parser calls
    inspect.stack(), which reads the source of every outer frame (~80 deep inside an import), each
    read scanning sys.modules: 4 minutes of a tiny tune on a loaded 2-core machine. The parser looks
    at the source of the 3 innermost frames only, so those keep it."""
    import inspect
    import sys

    if "tvm.s_tir.tensor_intrin" in sys.modules:
        return
    full = inspect.stack

    def stack(context: int = 1):
        frames, frame = [], sys._getframe(1)
        while frame is not None:
            info = inspect.getframeinfo(frame, context if len(frames) < 3 else 0)
            frames.append(inspect.FrameInfo(frame, *info, positions=info.positions))
            frame = frame.f_back
        return frames

    inspect.stack = stack
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = full
Constant = tvm.ir.expr.Constant
Schedule = tvm.s_tir.Schedule

__all__ = ["tvm", "tvm_ffi", "relax", "tirx", "from_onnx", "onnx_frontend", "detach_params", "ms",
           "dlight", "find_anchor_sblock", "Target", "target_has_features", "IRModule", "Constant", "Schedule", "tir_build",
           "derived_object", "dpl", "RemoveWeightLayoutRewriteBlock", "PopenPoolExecutor", "tvm_nvcc", "tvm_rpc", "rpc_base", "RPCTracker",
           "check_versions", "TVM_VERSION", "TVM_FFI_VERSION", "preload_tensor_intrinsics",
           "tensor_intrinsics_skipped"]
