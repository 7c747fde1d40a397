"""What our schedules share: recognising conv blocks, the target's vector width, and helpers that
either sample a knob (under tuning) or take a given decision (our untuned defaults)."""
from __future__ import annotations

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
    Subclasses give `name`, `matches(info)`, `spaces(info, target)` -> [(name, fn(sch, block,
    knobs))] and `default_knobs(info, target)` -> (index of the space, knobs)."""
    name = "rule"

    def matches(self, info: dict) -> bool:
        raise NotImplementedError

    def spaces(self, info: dict, target) -> list:
        raise NotImplementedError

    def default_knobs(self, info: dict, target) -> tuple[int, dict]:
        raise NotImplementedError

    def vector_width(self, info: dict, target) -> int:
        """The fp32 lanes this kernel's vectors actually get: the target's width, narrowed to a
        power of two that divides the vectorised axis (9 channels: 1, i.e. scalar code; the
        pad-channels phase pads such layers first). Named in the design space."""
        extent = info.get(self.vector_axis) if self.vector_axis else None
        lanes = simd(target)[0]
        return lanes_for(extent, lanes) if extent else lanes

    vector_axis = "f"          # the role (of analysis.analyze) that our CPU schedules vectorise

    def analyze(self, func) -> dict | None:
        info = analyze(func)
        return info if info is not None and self.matches(info) else None

    def apply(self, func, target, tunable: bool):
        info = self.analyze(func)
        if info is None:
            return None
        if not tunable:
            return self.default(func, info, target)[0]
        out = []
        for _, fn in self.spaces(info, target):
            sch = Schedule(func)
            fn(sch, sch.get_sblock(info["block"]), None)
            out.append(sch)
        return out

    def default(self, func, info: dict, target) -> tuple:
        """`func` at our default knobs, and the name of the design space they are a point of."""
        sch = Schedule(func)
        return sch, self.apply_default(sch, info, target)

    def apply_default(self, sch, info: dict, target) -> str:
        """Our default knobs applied to `sch`; returns the name of their design space."""
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
    """A rule with one design space per device, from the subclass's staticmethods
    schedule_cpu(sch, block, lanes, knobs), schedule_cuda(sch, block, knobs), cpu_knobs(info,
    lanes, registers) and cuda_knobs(info)."""

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


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


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


def choose(sch, candidates: list[int], decision: int | None):
    """A categorical knob (index `decision` into candidates when fixed)."""
    return sch.sample_categorical(candidates, [1.0 / len(candidates)] * len(candidates), decision=decision)


def inline_producers(sch, block) -> None:
    for p in sch.get_producers(block):
        sch.compute_inline(p)


def fuse_epilogue(sch, block):
    """conv -> add -> relu(/min/max): inline all but the last elementwise consumer into the last,
    which is returned (it writes the function's output)."""
    chain = []
    cur = block
    while True:
        cs = sch.get_consumers(cur)
        if len(cs) != 1:
            break
        chain.append(cs[0])
        cur = cs[0]
    for b in chain[:-1]:
        sch.compute_inline(b)
    return chain[-1] if chain else None


def cpu_conv_prologue(sch, block, rule: str, lanes: int, k: dict):
    """The shared start of our NHWC CPU conv schedules: mark the block (the marker survives into
    the built IR, proof of use), inline the padding, fuse the epilogue, and tile the row of
    pixels (x) and the output channels into vectors (f). Returns the epilogue block, the vector
    width and the loops (n, y, x0, x1, f0, f1, fv, ry, rx, rc)."""
    sch.annotate(block, "mbn_schedule", rule)
    inline_producers(sch, block)
    out = fuse_epilogue(sch, block)
    n, y, x, f, ry, rx, rc = sch.get_loops(block)
    v = lanes_for(int(sch.get(f).extent), lanes)
    x0, x1 = tile(sch, x, 2, 8, k.get("x"))
    fo, fv = sch.split(f, [None, v])
    f0, f1 = tile(sch, fo, 2, 4, k.get("f"))
    return out, v, (n, y, x0, x1, f0, f1, fv, ry, rx, rc)


def cuda_prologue(sch, block, rule: str):
    """The shared start of our CUDA schedules: mark the block (the marker survives into the built
    IR, proof of use), inline the padding, fuse the epilogue. Returns the epilogue block."""
    sch.annotate(block, "mbn_schedule", rule)
    inline_producers(sch, block)
    return fuse_epilogue(sch, block)


def cuda_accumulate(sch, block, out, thread_loop, reduce_loop) -> None:
    """The shared end: accumulators in registers, the epilogue computed by the thread that owns
    the output before its single store, and the init hoisted above the reduction."""
    sch.set_scope(block, 0, "local")
    if out is not None:
        sch.reverse_compute_at(out, thread_loop, preserve_unit_loops=True)
    sch.decompose_reduction(block, reduce_loop)


def cpu_epilogue(sch, out, v: int) -> None:
    """The fused bias/ReLU epilogue, vectorised along the output channels."""
    if out is not None:
        sch.vectorize(sch.split(sch.get_loops(out)[-1], [None, v])[-1])
