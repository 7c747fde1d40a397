"""What our schedules share: recognising conv blocks, the target's vector width, and helpers that
either sample a knob (under tuning) or take a given decision (our untuned defaults)."""
from __future__ import annotations

import sys

from mbn_codegen._tvm import Schedule, dlight, target_has_features

from .analysis import analyze


def simd(target) -> tuple[int, int]:
    """(fp32 lanes of one vector register, number of vector registers), asked of LLVM's view of
    the target (its -mcpu/-mattr), not looked up by CPU name: AVX-512 16 x 32, AVX/AVX2 8 x 16,
    NEON 4 x 32, SSE 4 x 16."""
    if target.kind.name != "llvm":
        return 1, 0
    if target_has_features("avx512f", target):
        return 16, 32
    if target_has_features("avx", target):
        return 8, 16
    if target_has_features("neon", target):
        return 4, 32
    return 4, 16


def conv_info(func) -> dict | None:
    """The analysis of an NHWC conv kernel that our CPU/CUDA schedules take; None otherwise."""
    info = analyze(func)
    if info is None or info.get("layout") != "NHWC" or info["kind"] not in ("depthwise", "pointwise", "conv"):
        return None
    return info


class Rule(dlight.ScheduleRule):
    """A schedule rule on dlight's interface, `apply(func, target, tunable)`: untunable, one
    schedule at our default knobs; tunable, one schedule per design space with the knobs left to
    sample. `design_space` does the same on a schedule MetaSchedule hands in (a ScheduleFn), so
    a default is always a point of the tuned space.
    Subclasses give `name`, `kinds` (of analysis.analyze, NHWC where it has a layout),
    `spaces(info, target)` -> [(name, fn(sch, block, knobs))] and `default_knobs(info, target)`
    -> (index of the space, knobs)."""
    name = "rule"
    kinds: tuple[str, ...] = ()
    vector_axis = "f"          # the role (of analysis.analyze) that our CPU schedules vectorise

    def matches(self, info: dict) -> bool:
        return info["kind"] in self.kinds and info.get("layout", "NHWC") == "NHWC"

    def vector_width(self, info: dict, target) -> int:
        """The fp32 lanes this kernel's vectors actually get (9 channels: 1, i.e. scalar code;
        the pad-channels phase pads such layers first). Named in the design space."""
        extent = info.get(self.vector_axis)
        lanes = simd(target)[0]
        return lanes_for(extent, lanes) if extent else lanes

    def analyze(self, func) -> dict | None:
        info = analyze(func)
        return info if info is not None and self.matches(info) else None

    def apply(self, func, target, tunable: bool):
        if self.analyze(func) is None:
            return None
        sch = Schedule(func)
        if tunable:
            return self.design_space(sch, target)
        self.apply_default(sch, target)
        return sch

    def apply_default(self, sch, target) -> str:
        """Our default knobs applied to `sch`; returns the name of their design space."""
        info = self.analyze(sch.mod["main"])
        i, knobs = self.default_knobs(info, target)
        name, fn = self.spaces(info, target)[i]
        fn(sch, sch.get_sblock(info["block"]), knobs)
        return name

    def design_space(self, sch, target) -> list:
        info = self.analyze(sch.mod["main"])
        out = []
        for _, fn in self.spaces(info, target):
            s = sch.copy()
            s.seed(sch.fork_seed())
            fn(s, s.get_sblock(info["block"]), None)
            out.append(s)
        return out


class OneSpaceRule(Rule):
    """A rule with one design space per device, from its module's functions schedule_cpu(sch,
    block, lanes, knobs), schedule_cuda(sch, block, knobs), cpu_knobs(info, lanes, registers)
    and cuda_knobs(info)."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        module = sys.modules[cls.__module__]
        for fn in ("schedule_cpu", "schedule_cuda", "cpu_knobs", "cuda_knobs"):
            setattr(cls, fn, staticmethod(getattr(module, fn)))

    def spaces(self, info: dict, target) -> list:
        if is_cuda(target):
            return [(f"{self.name}_cuda", self.schedule_cuda)]
        lanes = simd(target)[0]
        return [(f"{self.name}_v{self.vector_width(info, target)}",
                 lambda sch, b, k: self.schedule_cpu(sch, b, lanes, k))]

    def default_knobs(self, info: dict, target) -> tuple[int, dict]:
        return 0, self.cuda_knobs(info) if is_cuda(target) else self.cpu_knobs(info, *simd(target))


def is_cuda(target) -> bool:
    return target.kind.name == "cuda"


def divisors(n: int, at_most: int) -> list[int]:
    return [d for d in range(1, min(n, at_most) + 1) if n % d == 0]


def split_by(n: int, *at_most: int) -> list[int]:
    """A split decision of `n`: what is left first, then per limit the largest divisor <= it of
    what was left (split_by(196, 16, 2): [7, 14, 2])."""
    factors = []
    for limit in at_most:
        factors.append(max(divisors(n, limit)))
        n //= factors[-1]
    return [n, *factors]


def lanes_for(channels: int, lanes: int) -> int:
    """The widest power-of-two vector <= lanes that divides the channel count."""
    v = lanes
    while v > 1 and channels % v:
        v //= 2
    return v


def tile(sch, loop, n: int, max_inner: int, decision: list[int] | None):
    """Split `loop` in n perfect factors: sampled under tuning, fixed to `decision` otherwise.
    Either way the trace holds a SamplePerfectTile, so a default is a point of the tuned space."""
    factors = sch.sample_perfect_tile(loop, n=n, max_innermost_factor=max_inner, decision=decision)
    return sch.split(loop, factors)


def fuse_epilogue(sch, block):
    """conv -> add -> relu(/min/max): inline all but the last elementwise consumer into the last,
    which is returned (it writes the function's output)."""
    chain = []
    cur = block
    while len(cs := sch.get_consumers(cur)) == 1:
        chain.append(cs[0])
        cur = cs[0]
    for b in chain[:-1]:
        sch.compute_inline(b)
    return chain[-1] if chain else None


def prologue(sch, block, rule: str, inline_padding: bool = True):
    """The shared start of our schedules: mark the block (the marker survives into the built IR,
    proof of use), inline the padding, fuse the epilogue. Returns the epilogue block."""
    sch.annotate(block, "mbn_schedule", rule)
    if inline_padding:
        for p in sch.get_producers(block):
            sch.compute_inline(p)
    return fuse_epilogue(sch, block)


def cpu_conv_prologue(sch, block, rule: str, lanes: int, k: dict):
    """`prologue`, then the row of pixels (x) and the output channels tiled into vectors (f) for
    our NHWC CPU conv schedules. Returns the epilogue block, the vector width and the loops (n,
    y, x0, x1, f0, f1, fv, ry, rx, rc)."""
    out = prologue(sch, block, rule)
    n, y, x, f, ry, rx, rc = sch.get_loops(block)
    v = lanes_for(int(sch.get(f).extent), lanes)
    x0, x1 = tile(sch, x, 2, 8, k.get("x"))
    fo, fv = sch.split(f, [None, v])
    f0, f1 = tile(sch, fo, 2, 4, k.get("f"))
    return out, v, (n, y, x0, x1, f0, f1, fv, ry, rx, rc)


def attach(sch, out, loop) -> None:
    """The epilogue block `out` (if any) computed under `loop`."""
    if out is not None:
        sch.reverse_compute_at(out, loop, preserve_unit_loops=True)


def cpu_finish(sch, block, out, at, fv, unrolled, init_at, v: int, partial_sums=None) -> None:
    """The shared end of our CPU schedules. The register tile is unrolled so its accumulators
    become registers; the init, hoisted above `init_at`, copies the vectorize/unroll."""
    attach(sch, out, at)
    sch.vectorize(fv)
    for loop in unrolled:
        sch.unroll(loop)
    sch.decompose_reduction(block, init_at)
    for b in (partial_sums, out):
        if b is not None:
            sch.vectorize(sch.split(sch.get_loops(b)[-1], [None, v])[-1])


def cuda_threads(sch, loop, decision: list[int] | None):
    """`loop` split over thread blocks of (a sampled number of) threads; returns the thread loop."""
    b, t = tile(sch, loop, 2, 512, decision)
    sch.bind(b, "blockIdx.x")
    sch.bind(t, "threadIdx.x")
    return t


def cuda_accumulate(sch, block, out, thread_loop, reduce_loop) -> None:
    """The shared end of our CUDA schedules: accumulators in registers, the epilogue computed by
    the thread that owns the output before its single store, and the init hoisted above the
    reduction."""
    sch.set_scope(block, 0, "local")
    attach(sch, out, thread_loop)
    sch.decompose_reduction(block, reduce_loop)


def tile_knobs(info: dict, v: int, t: tuple[int, int, int]) -> dict:
    """The y, x and f (vectors of v channels) split decisions of a register tile (y_in, x_in, f_in)."""
    return {a: [n // i, i] for a, n, i in zip("yxf", (info["y"], info["x"], info["f"] // v), t)}
