"""Markers by hardware and cost. Anything that cannot run here is skipped with the reason."""
from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(scope="session", autouse=True)
def _private_user_databases(tmp_path_factory):
    """Builds apply the per-user tuning database automatically: a real one on this machine must
    not change what the tests build (subprocesses inherit this too)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(tmp_path_factory.mktemp("xdg-data-home")))
        yield


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run tests marked slow (full variant grid; tens of minutes)")


def _gpu_reason() -> str | None:
    if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
        return "no NVIDIA GPU on this machine (run on a GPU host, e.g. through the device tool)"
    try:
        from mbn_codegen._tvm import tvm
        if not tvm.cuda(0).exist:
            return "CUDA driver present but TVM sees no GPU"
    except Exception as e:  # pragma: no cover
        return f"TVM cannot open CUDA: {e}"
    return None


def pytest_collection_modifyitems(config, items):
    slow_ok = config.getoption("--run-slow") or os.environ.get("MBN_RUN_SLOW") == "1"
    gpu_reason = None
    checked_gpu = False
    for item in items:
        if "slow" in item.keywords and not slow_ok:
            item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow or MBN_RUN_SLOW=1"))
        if "gpu" in item.keywords:
            if not checked_gpu:
                gpu_reason, checked_gpu = _gpu_reason(), True
            if gpu_reason:
                item.add_marker(pytest.mark.skip(reason=gpu_reason))
        if "qemu" in item.keywords:
            from mbn_codegen.emulation import qemu_available
            reason = qemu_available()
            if reason:
                item.add_marker(pytest.mark.skip(reason=f"arm64 emulation unavailable: {reason}"))
