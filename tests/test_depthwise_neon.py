"""Depthwise register tiles that count the inputs a stride keeps live: the stride-2 tile shapes
compute the right numbers (x86, against numpy), every chosen tile fits the register file by that
count, and on an arm64 build the stride-2 depthwise kernels' hot loops spill no register."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from mbn_codegen import schedules, targets
from mbn_codegen._tvm import Schedule, tirx
from mbn_codegen.asm_report import report
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.lower import PHASES, LowerContext, import_onnx
from mbn_codegen.runtime import read_manifest
from mbn_codegen.schedules.analysis import analyze, conv_stride
from mbn_codegen.schedules.depthwise import (CHAINS, Depthwise, cpu_knobs, live_inputs,
                                             register_tile, schedule_cpu)

from test_schedules import conv_module, fused, reference, run_cpu

# (input H=W, channels): MobileNet v1's stride-2 depthwise layers at 1.0-224 and 0.25-96, and an
# odd input (15 -> 8: the bottom/right padding row is read too)
STRIDE2 = [(112, 64), (56, 128), (14, 512), (48, 16), (24, 32), (6, 128), (15, 24)]


def stride2_kernel(h, c):
    mod, w, b = conv_module("dw", h, c, c, 2)
    base, gv, ctx, target = fused(mod, targets.load("x86_64"))
    return base, gv, ctx, w, b


@pytest.mark.parametrize("registers", [16, 32])
@pytest.mark.parametrize("h,c", STRIDE2, ids=[f"{h}-{c}" for h, c in STRIDE2])
def test_stride2_tiles_match_numpy(h, c, registers):
    """The tile the rule picks for 16 registers (AVX2: two rows, few accumulators) and for 32
    (NEON, AVX-512: one long row), built with x86's 8 lanes and run here."""
    base, gv, ctx, w, b = stride2_kernel(h, c)
    info = analyze(base[gv])
    sch = Schedule(base[gv])
    block = sch.get_sblock(info["block"])
    assert conv_stride(sch.get(block)) == (2, 2)
    knobs = cpu_knobs({**info, "stride": 2}, 8, registers)
    y_in, x_in, f_in = knobs["y"][1], knobs["x"][1], knobs["f"][1]
    if registers == 32:
        assert y_in == 1
    assert y_in * x_in * f_in + live_inputs(y_in, x_in, f_in, 2) + 1 <= registers
    schedule_cpu(sch, block, 8, knobs)
    base[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
    x = np.random.default_rng(h + c).standard_normal((1, h, h, c)).astype("float32")
    np.testing.assert_allclose(run_cpu(base, ctx, x), reference(x, w, b, "dw", 2), rtol=1e-4, atol=1e-4,
                               err_msg=f"tile {y_in} x {x_in} x {f_in}")


def test_default_schedule_gets_the_stride(monkeypatch):
    seen = []

    def spy(info, lanes, registers):
        seen.append(info.get("stride"))
        return cpu_knobs(info, lanes, registers)

    monkeypatch.setattr(Depthwise, "cpu_knobs", staticmethod(spy))
    target = targets.load("x86_64").tvm_target()
    for s in (1, 2):
        mod, _, _ = conv_module("dw", 16, 16, 16, s)
        base, gv, _, _ = fused(mod, targets.load("x86_64"))
        assert schedules.default_schedule(base[gv], target) is not None
    assert seen == [1, 2]


def test_live_input_arithmetic():
    """Per f-vector and tile row, x_in inputs at stride 1, 2 x_in - 1 at stride 2 (the shared
    columns wait a tap); at stride 2 every tile row's share at once."""
    assert live_inputs(2, 2, 4, 1) == 8            # NEON's stride-1 tile: 16 + 8 + 1 = 25 of 32
    assert live_inputs(2, 2, 4, 2) == 24           # the old stride-2 tile: 16 + 24 + 1 = 41 > 32
    assert live_inputs(1, CHAINS, 1, 2) == 15      # 8 + 15 + 1 = 24: fits 32, not 16
    assert live_inputs(1, 4, 1, 3) == 4            # stride 3 shares no input


@pytest.mark.parametrize("registers,lanes", [(32, 4), (16, 8), (32, 16)])
def test_every_stride2_tile_fits(registers, lanes):
    for out in (56, 28, 14, 7, 24, 12, 6, 3, 8):
        for f_vecs in (1, 2, 3, 4, 8, 16, 32, 64, 128):
            y_in, x_in, f_in = t = register_tile(out, out, f_vecs, registers, lanes, 2)
            assert out % y_in == 0 and out % x_in == 0 and f_vecs % f_in == 0, t
            acc = y_in * x_in * f_in
            assert acc <= registers // 2 and acc + live_inputs(*t, 2) + 1 <= registers, (out, f_vecs, t)
            if registers == 32:
                assert y_in == 1, (out, f_vecs, t)


def stride2_depthwise_kernels(artifact: Path) -> set[str]:
    """Names of the artifact's depthwise kernels that read their input at stride 2, from its
    model.onnx lowered again up to fusion."""
    m = read_manifest(artifact)
    spec = targets.load(m["target"]["name"])
    ctx = LowerContext(spec.tvm_target(), spec.device, m["input"]["name"], tuple(m["input"]["shape"]))
    mod = import_onnx(onnx.load(str(artifact / "model.onnx")), ctx)
    for name, fn in PHASES:
        if name == "schedule":
            break
        mod = fn(mod, ctx)
    out = set()
    for gv, f in mod.functions.items():
        info = analyze(f) if isinstance(f, tirx.PrimFunc) else None
        if info and info["kind"] == "depthwise":
            sch = Schedule(f)
            if conv_stride(sch.get(sch.get_sblock(info["block"]))) == (2, 2):
                out.add(gv.name_hint)
    return out


@pytest.mark.skipif(shutil.which("llvm-mca") is None or shutil.which("aarch64-linux-gnu-objdump") is None,
                    reason="needs llvm-mca (apt-get install llvm) and binutils-aarch64-linux-gnu")
@pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None, reason="needs g++-aarch64-linux-gnu")
def test_arm64_stride2_depthwise_hot_loops_do_not_spill(tmp_path):
    out = build(BuildConfig(alpha=0.25, resolution=96, target="arm64", out=str(tmp_path / "pi")), log=lambda s: None)
    names = stride2_depthwise_kernels(Path(out))
    assert len(names) == 4                              # 48->24, 24->12, 12->6, 6->3
    r = report(out)
    rows = {k["name"]: k for k in r["kernels"] if k["name"] in names}
    assert set(rows) == names
    for k in rows.values():
        assert k["vector_fmas"] > 0 and k["spills"] == 0, k
        assert k["est_pct_of_peak"] >= 70, k          # the old tile: 63-65% here, 46-49% at 1.0-224
