"""The static (disassembly + llvm-mca) report: it finds each kernel's hot loop in lib.so, counts the
model's work exactly, and tells vectorised kernels from scalar ones."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mbn_codegen.asm_report import hot_loop, report
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.cost import cost_model

pytestmark = pytest.mark.skipif(shutil.which("llvm-mca") is None or shutil.which("objdump") is None,
                                reason="needs llvm-mca (apt-get install llvm) and objdump (binutils)")


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    return build(BuildConfig(alpha=0.25, resolution=64, target="x86_64",
                             out=str(tmp_path_factory.mktemp("a") / "ours")), log=lambda s: None)


def test_counts_the_models_work_and_finds_vector_loops(ours):
    r = report(ours, mcpu="znver3", clock_ghz=2.45)
    assert r["total_macs"] == cost_model(0.25, 64).to_dict()["total_mult_adds"]      # the paper's count
    kinds = {k["kind"] for k in r["kernels"]}
    assert {"conv", "depthwise", "pointwise", "dense"} <= kinds
    for k in r["kernels"]:
        assert k["vector_fmas"] > 0 and k["scalar_fp"] == 0, k            # our schedules vectorise
        assert 0 < k["est_pct_of_peak"] <= 100.5, k
        assert k["cycles_per_iter"] * r["peak_vector_fmas_per_cycle"] >= k["vector_fmas"] * 0.99
    assert r["est_compute_ms_one_core"] == pytest.approx(sum(k["est_ms"] for k in r["kernels"]), abs=0.02)


def test_stock_kernels_show_as_scalar(tmp_path):
    out = build(BuildConfig(alpha=0.25, resolution=32, target="x86_64", schedules="stock",
                            out=str(tmp_path / "stock")), log=lambda s: None)
    r = report(out, mcpu="znver3", clock_ghz=2.45)
    scalar = [k for k in r["kernels"] if k["vector_fmas"] == 0]
    assert scalar and all(k["scalar_fp"] > 0 for k in scalar)             # LLVM left these scalar
    assert {k["name"] for k in scalar} == set(r["kernels_without_vector_fma"])


def test_hot_loop_is_the_innermost_with_most_fmas():
    insns = [(0x10, "vxorps %ymm0,%ymm0,%ymm0"), (0x14, "vfmadd231ps %ymm1,%ymm2,%ymm0"),
             (0x18, "vfmadd231ps %ymm1,%ymm2,%ymm3"), (0x1c, "jne    14 <f+0x4>"),
             (0x20, "addq $1,%rax"), (0x24, "jne    10 <f>"), (0x28, "vaddss %xmm0,%xmm0,%xmm0"),
             (0x2c, "jne    28 <f+0x18>")]
    assert hot_loop(insns, "x86_64") == ["vfmadd231ps %ymm1,%ymm2,%ymm0", "vfmadd231ps %ymm1,%ymm2,%ymm3"]


@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-objdump") is None, reason="needs binutils-aarch64-linux-gnu")
def test_cli_on_a_pi_artifact(tmp_path):
    out = build(BuildConfig(alpha=0.25, resolution=32, target="arm64", out=str(tmp_path / "pi")), log=lambda s: None)
    r = subprocess.run([sys.executable, "-m", "mbn_codegen.cli.main", "inspect", str(out), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "cortex-a72 @ 1.5 GHz" in r.stdout and "an estimate, not a measurement" in r.stdout
    data = json.loads((tmp_path / "r" / "static_report.json").read_text())
    assert data["mcpu"] == "cortex-a72" and data["lanes"] == 4
    assert all(k["vector_fmas"] > 0 for k in data["kernels"])
