"""One correctness check used by every end-to-end test."""
from __future__ import annotations

import numpy as np

RTOL = 1e-3


def distinct_inputs(shape, n: int = 3, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype("float32") for _ in range(n)]


def check_correctness(run, onnx_path, inputs, torch_model=None, rtol: float = RTOL,
                      atol_frac: float = 1e-3) -> float:
    """`run(x) -> logits` (our compiled library, in any process) must match ONNX Runtime, and
    PyTorch if given, on every input; the outputs must also depend on the input, or the
    comparison proves nothing (a dead network outputs its FC bias for every image).
    Returns the largest absolute error seen."""
    from mbn_codegen.export import onnxruntime_run

    worst, refs = 0.0, []
    for x in inputs:
        ref = onnxruntime_run(onnx_path, x)
        got = run(x)
        assert got.shape == ref.shape, (got.shape, ref.shape)
        scale = max(1e-6, float(np.abs(ref).max()))
        atol = atol_frac * scale
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol)
        if torch_model is not None:
            import torch
            with torch.no_grad():
                t = torch_model(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(got, t, rtol=rtol, atol=atol)
        worst = max(worst, float(np.abs(got - ref).max()))
        refs.append(ref)
    for a, b in zip(refs, refs[1:]):
        spread = float(np.abs(a - b).max())
        scale = max(float(np.abs(a).max()), 1e-12)
        assert spread > 1e-2 * scale, (
            f"outputs for different inputs differ by only {spread:.3g} (scale {scale:.3g}): "
            "the network's activations are dead, so agreement would prove nothing")
    return worst


def cannot_run_here(target_name: str) -> str | None:
    """Why code compiled for this target would crash on this CPU (SIGILL kills pytest with no
    report), or None when it runs here. Building for such a target stays tested; running does not."""
    from mbn_codegen import targets
    from mbn_codegen.runtime import cpu_flags, machine_arch

    spec = targets.load(target_name)
    if spec.arch != machine_arch():
        return f"target {target_name} is {spec.arch}, this machine is {machine_arch()}"
    missing = set(spec.required_cpu_flags) - cpu_flags()
    if cpu_flags() and missing:
        return f"this CPU lacks {', '.join(sorted(missing))}, which target {target_name} compiles in"
    return None


def copy_artifact(artifact, tmp_path):
    """A copy of an artifact folder to tamper with."""
    import shutil

    d = tmp_path / "artifact"
    shutil.copytree(artifact, d)
    return d


def edit_manifest(d, fn) -> None:
    import json

    from mbn_codegen.runtime import MANIFEST

    m = json.loads((d / MANIFEST).read_text())
    fn(m)
    (d / MANIFEST).write_text(json.dumps(m))


def pypi_reachable() -> bool:
    """Whether pip could download (bundle tests skip, with the reason, when it cannot)."""
    import socket

    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False
