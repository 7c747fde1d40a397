"""Our depthwise and pointwise schedules, at default and at sampled knobs, compute the same numbers
as the unscheduled operator, on MobileNet's real shapes: x86 natively, arm64 under qemu, and
CUDA (sm_87) compiles."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from mbn_codegen import schedules, targets
from mbn_codegen._tvm import Schedule, Target, relax, tirx, tvm
from mbn_codegen.lower import LowerContext, PHASES, build_module
from mbn_codegen.schedules.common import conv_info, simd
from mbn_codegen.schedules.pointwise import register_tile

from helpers import cannot_run_here

# (kind, H=W of the input, channels in, channels out, stride): MobileNet v1's layers at each
# resolution and at the paper's widths (depthwise stride 1 and 2; pointwise at each width).
SHAPES = [("dw", r, c, c, s) for r, c, s in [(112, 32, 1), (112, 64, 2), (56, 128, 1), (56, 128, 2),
                                             (28, 256, 2), (14, 512, 1), (14, 512, 2), (7, 1024, 1),
                                             (96, 24, 1), (80, 48, 2), (64, 16, 1), (8, 768, 1)]] + \
         [("pw", r, ci, co, 1) for r, ci, co in [(112, 32, 64), (56, 64, 128), (28, 256, 256),
                                                 (14, 512, 512), (7, 512, 1024), (7, 1024, 1024),
                                                 (96, 24, 48), (20, 192, 384), (4, 192, 256), (7, 8, 16)]] + \
         [("conv", 224, 3, 32, 2), ("conv", 128, 3, 8, 2)]
IDS = [f"{k}-{h}-{ci}-{co}-s{s}" for k, h, ci, co, s in SHAPES]


def conv_module(kind, h, cin, cout, stride, seed=0):
    """A one-layer Relax module in our layout (NHWC/HWIO), conv + bias + ReLU, and its numpy twin."""
    rng = np.random.default_rng(seed)
    k = 1 if kind == "pw" else 3
    groups = cin if kind == "dw" else 1
    w = rng.standard_normal((k, k, cin // groups, cout)).astype("float32")
    b = rng.standard_normal((1, 1, 1, cout)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, h, h, cin), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, relax.const(w), strides=stride, padding=k // 2, groups=groups,
                                           data_layout="NHWC", kernel_layout="HWIO"))
            y = bb.emit(relax.op.nn.relu(relax.op.add(y, relax.const(b))))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get(), w, b


def reference(x, w, b, kind, stride):
    k = w.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h = (x.shape[1] + 2 * p - k) // stride + 1
    out = np.zeros((1, h, h, w.shape[-1]), dtype="float64")
    for i in range(k):
        for j in range(k):
            win = xp[:, i:i + stride * h:stride, j:j + stride * h:stride, :]
            out += win * w[i, j, 0] if kind == "dw" else win @ w[i, j]
    return np.maximum(out + b, 0).astype("float32")


def fused(mod, spec):
    target = spec.tvm_target()
    ctx = LowerContext(target, spec.device, "x", (), layout="NHWC")
    mod = dict(PHASES)["legalize-fuse"](mod, ctx)
    names = [gv for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and conv_info(f)]
    assert len(names) == 1
    return mod, names[0], ctx, target


def scheduled_variants(func, target, n_sampled=2):
    """Our default knobs, then sampled knob settings (as MetaSchedule draws them)."""
    sched, _ = schedules.default_schedule(func, target)
    out = [("default", sched)]
    fn = schedules.space_fn(func, target)
    for seed in range(n_sampled):
        sch = Schedule(func, seed=seed + 1)
        spaces = fn(sch)
        s = spaces[seed % len(spaces)]
        out.append((f"sampled{seed}", s.mod["main"].with_attr("tirx.is_scheduled", True)))
    return out


def run_cpu(mod, ctx, x):
    vm = relax.VirtualMachine(build_module(mod, ctx), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_x86_schedules_match_unscheduled(shape):
    kind, h, cin, cout, stride = shape
    spec = targets.load("x86_64")
    mod, w, b = conv_module(kind, h, cin, cout, stride)
    x = np.random.default_rng(1).standard_normal((1, h, h, cin)).astype("float32")
    base, gv, ctx, target = fused(mod, spec)
    func = base[gv]
    assert schedules.match(func) is not None
    want = run_cpu(base, ctx, x)                          # TVM's unscheduled operator
    np.testing.assert_allclose(want, reference(x, w, b, kind, stride), rtol=1e-4, atol=1e-4)
    for name, f in scheduled_variants(func, target):
        m = base
        m[gv] = f
        np.testing.assert_allclose(run_cpu(m, ctx, x), want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_simd_asked_of_the_target():
    """Lanes and register count come from LLVM's features for the target's mcpu/mattr."""
    assert simd(targets.load("x86_64-avx512").tvm_target()) == (16, 32)
    assert simd(targets.load("x86_64").tvm_target()) == (8, 16)
    assert simd(targets.load("arm64").tvm_target()) == (4, 32)
    znver4 = Target({"kind": "llvm", "mcpu": "znver4"})      # AVX-512 without a name list
    assert simd(znver4) == (16, 32)
    assert simd(Target({"kind": "llvm", "mcpu": "x86-64"})) == (4, 16)


@pytest.mark.parametrize("y,x,f_vecs,regs,lanes,want", [(56, 56, 16, 16, 8, (2, 2, 2)), (112, 112, 4, 16, 8, (2, 2, 2)),
                                                          (7, 7, 128, 16, 8, (1, 7, 1)), (56, 56, 32, 32, 4, (2, 2, 4)),
                                                          (7, 7, 256, 32, 4, (1, 7, 2)), (14, 14, 1, 16, 8, (1, 7, 1))])
def test_depthwise_register_tile(y, x, f_vecs, regs, lanes, want):
    """At most half the registers hold accumulators (the rest: inputs in flight and a weight);
    within that, the most accumulators, then a pixel's vectors filling a 64-byte line."""
    from mbn_codegen.schedules.depthwise import register_tile

    got = register_tile(y, x, f_vecs, regs, lanes)
    assert got == want
    y_in, x_in, f_in = got
    assert y % y_in == 0 and x % x_in == 0 and f_vecs % f_in == 0 and y_in * x_in * f_in <= regs // 2


@pytest.mark.parametrize("y,x,f_vecs,regs,lanes", [(7, 7, 128, 16, 8), (14, 14, 64, 16, 8), (28, 28, 32, 16, 8),
                                                     (112, 112, 8, 16, 8), (14, 14, 32, 32, 16), (7, 7, 64, 32, 16),
                                                     (56, 56, 8, 32, 4), (7, 7, 2, 16, 8), (20, 20, 48, 16, 8)])
def test_pointwise_register_tile_fits(y, x, f_vecs, regs, lanes):
    y_in, x_in, f_in = register_tile(y, x, f_vecs, regs, lanes)
    assert y % y_in == 0 and x % x_in == 0 and f_vecs % f_in == 0
    acc = y_in * x_in * f_in
    assert acc + f_in + 1 <= regs                           # accumulators + weights + broadcast
    # no fitting tile has more accumulators AND fewer loads per FMA
    for yi in (d for d in range(1, 5) if y % d == 0):
        for xi in (d for d in range(1, min(x, 8) + 1) if x % d == 0):
            for fi in (d for d in range(1, 5) if f_vecs % d == 0):
                a = yi * xi * fi
                if a + fi + 1 > regs - (yi > 1) or yi * xi > 8:
                    continue
                assert not (a > acc and (yi * xi + fi) / a < (y_in * x_in + f_in) / acc), (yi, xi, fi)


@pytest.mark.parametrize("cin", [512, 1024])
def test_pointwise_7x7_splits_the_channel_loop(cin):
    """7x7 on AVX2 has no >= 8-accumulator tile (7 x 1 x 1): its default is the two-chain space,
    every space of it, sampled, matches numpy, and the weights still get prepacked for its loops."""
    from mbn_codegen._tvm import ms
    from mbn_codegen.kernels import mark_layout_free

    spec = targets.load("x86_64")
    mod, w, b = conv_module("pw", 7, cin, 1024, 1)
    x = np.random.default_rng(2).standard_normal((1, 7, 7, cin)).astype("float32")
    base, gv, ctx, target = fused(mod, spec)
    func = base[gv]
    sched, name = schedules.default_schedule(func, target)
    assert name.endswith("_c2"), name
    sch = Schedule(schedules.default_schedule(mark_layout_free(base, ctx)[gv], target)[0])
    ms.postproc.RewriteLayout().apply(sch)
    packed = sch.mod["main"].script()
    dims = ", ".join(f"T.int64({d})" for d in (128, cin // 64, 32, 2, 8))      # f0, rc0, rc1, chain, lane
    assert "_rf" in packed and f"sblock_alloc_buffer(({dims}))" in packed, packed[:1500]
    spaces = schedules.space_fn(func, target)(Schedule(func, seed=3))
    assert [s.mod["main"].script().count("_rf_update") > 0 for s in spaces] == [False, False, True, True]
    want = reference(x, w, b, "pw", 1)
    for i, s in [("default", sched)] + [(f"space{i}", spaces[i].mod["main"]) for i in (2, 3)]:
        base[gv] = s.with_attr("tirx.is_scheduled", True)
        np.testing.assert_allclose(run_cpu(base, ctx, x), want, rtol=1e-4, atol=1e-4, err_msg=i)


ARM_SCRIPT = r"""
import ctypes, importlib.util, json, os, sys, numpy as np, tvm_ffi
lib = os.path.join(os.path.dirname(importlib.util.find_spec("tvm").origin), "lib", "libtvm_runtime.so")
ctypes.CDLL(lib, ctypes.RTLD_GLOBAL)
res = {}
for so, xin in json.load(open(sys.argv[1])):
    vm = tvm_ffi.load_module(so)["vm_load_executable"]()
    vm["vm_initialization"](1, 0, 2)
    res[so] = np.from_dlpack(vm["main"](tvm_ffi.from_dlpack(np.load(xin)))).tolist()
json.dump(res, open(sys.argv[2], "w"))
"""


@pytest.mark.qemu
def test_arm64_schedules_match_under_qemu(tmp_path):
    from mbn_codegen.emulation import run_python_arm64

    spec = targets.load("arm64")
    jobs, want = [], {}
    for i, (kind, h, cin, cout, stride) in enumerate([SHAPES[0], SHAPES[3], SHAPES[5], SHAPES[12],
                                                        SHAPES[15], SHAPES[20]]):
        h = min(h, 28)
        mod, w, b = conv_module(kind, h, cin, cout, stride)
        x = np.random.default_rng(i).standard_normal((1, h, h, cin)).astype("float32")
        np.save(tmp_path / f"x{i}.npy", x)
        base, gv, ctx, target = fused(mod, spec)
        for name, f in scheduled_variants(base[gv], target, n_sampled=1):
            base[gv] = f
            so = str(tmp_path / f"k{i}-{name}.so")
            build_module(base, ctx).export_library(so, cc=spec.compiler())
            jobs.append((so, str(tmp_path / f"x{i}.npy")))
            want[so] = reference(x, w, b, kind, stride)
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "run.py").write_text(ARM_SCRIPT)
    r = run_python_arm64([str(tmp_path / "run.py"), str(tmp_path / "jobs.json"), str(tmp_path / "out.json")])
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "out.json").read_text())
    for so, ref in want.items():
        np.testing.assert_allclose(np.asarray(got[so], dtype="float32"), ref, rtol=1e-4, atol=1e-4, err_msg=so)


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], SHAPES[13], SHAPES[17], SHAPES[-2]],
                         ids=[IDS[0], IDS[3], IDS[13], IDS[17], IDS[-2]])
def test_cuda_schedules_compile_for_sm87(tmp_path, shape):
    from mbn_codegen.cuda import compile_with_nvcc, find_nvcc, module_binary_format

    if find_nvcc() is None or shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("needs nvcc and aarch64-linux-gnu-g++")
    spec = targets.load("jetson-orin")
    mod, _, _ = conv_module(*shape)
    base, gv, ctx, target = fused(mod, spec)
    for name, f in scheduled_variants(base[gv], target, n_sampled=2):
        base[gv] = f
        with compile_with_nvcc("sm_87", toolkit=None) as nv:      # the system nvcc: this checks schedules
            so = tmp_path / f"{name}.so"
            nv.export_library(build_module(base, ctx), so, cc=spec.compiler())
        assert module_binary_format(so) == "fatbin"


@pytest.mark.parametrize("target", ["x86_64", "x86_64-avx512"])
@pytest.mark.parametrize("k,n", [(1024, 1000), (256, 10), (768, 1000)])
def test_dense_schedule_matches(target, k, n):
    spec = targets.load(target)
    rng = np.random.default_rng(0)
    w = rng.standard_normal((k, n)).astype("float32")
    b = rng.standard_normal((n,)).astype("float32")
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.add(relax.op.matmul(x, relax.const(w)), relax.const(b)))
        bb.emit_func_output(out)
    ctx = LowerContext(spec.tvm_target(), "cpu", "x", ())
    mod = dict(PHASES)["legalize-fuse"](bb.get(), ctx)
    gv = [g for g, f in mod.functions.items() if isinstance(f, tirx.PrimFunc) and schedules.match(f)]
    assert len(gv) == 1
    xin = rng.standard_normal((1, k)).astype("float32")
    skip = cannot_run_here(target)
    for name, f in scheduled_variants(mod[gv[0]], ctx.target):
        mod[gv[0]] = f
        if skip:      # still compiled to machine code for that CPU
            llvm = build_module(mod, ctx).mod.imports[0]
            assert f'"target-cpu"="{spec.tvm_target().attrs["mcpu"]}"' in llvm.inspect_source("ll")
            assert "vfmadd" in llvm.inspect_source("asm"), name
            continue
        np.testing.assert_allclose(run_cpu(mod, ctx, xin), xin @ w + b, rtol=1e-4, atol=1e-3, err_msg=name)
    if skip:
        pytest.skip(f"compiled, not run: {skip}")


def test_rules_on_dlights_interface():
    """Our rules are dlight ScheduleRules: dlight's own ApplyDefaultSchedule applies them, first
    match wins, and tunable=True gives one schedule per design space."""
    from mbn_codegen._tvm import dlight

    spec = targets.load("x86_64")
    mod, w, b = conv_module("pw", 14, 64, 64, 1)
    base, gv, ctx, target = fused(mod, spec)
    rule = schedules.match(base[gv])
    assert rule is schedules.RULES[1] and isinstance(rule, dlight.ScheduleRule)
    assert rule.apply(base[gv], target, tunable=False) is not None
    assert len(rule.apply(base[gv], target, tunable=True)) == 2            # two loop orders
    assert schedules.RULES[0].apply(base[gv], target, tunable=False) is None  # depthwise: no match
    with target:
        applied = dlight.ApplyDefaultSchedule(*schedules.RULES)(base)
    assert "mbn_pointwise" in applied[gv].script()
    x = np.random.default_rng(0).standard_normal((1, 14, 14, 64)).astype("float32")
    np.testing.assert_allclose(run_cpu(applied, ctx, x), reference(x, w, b, "pw", 1), rtol=1e-4, atol=1e-4)
