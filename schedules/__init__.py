"""Our schedules, as rules: an ordered, first-match list (dlight style). Each rule module has
`applies(primfunc)`, `schedule_cpu(sch, block, lanes, ...)`, `schedule_cuda(sch, block, ...)`
and `default_knobs*`: the same function is our untuned default (knobs given) and MetaSchedule's
design space (knobs sampled), so a default is always a point of the tuned space.

MetaSchedule gets them as a whole-function design space (`space_fn`, a ScheduleFn): only our
primitives, no generic rule stacked on top (the root ParallelizeVectorizeUnroll rule would try
to re-parallelise loops we already parallelised).
"""
from __future__ import annotations

from mbn_codegen._tvm import Schedule, tirx

from . import dense, depthwise, pointwise
from .common import conv_info, simd, vector_lanes

RULES = [depthwise, pointwise, dense]   # first match wins; everything else is TVM's


def match(func):
    if not isinstance(func, tirx.PrimFunc):
        return None
    for rule in RULES:
        if rule.applies(func):
            return rule
    return None


def _info(rule, func) -> dict:
    return rule.info_of(func) if rule is dense else conv_info(func)


def _space(rule, device: str, lanes: int) -> list[tuple[str, object]]:
    """(name, fn(sch, block, knobs)) design spaces of a rule on a device."""
    if device == "cuda":
        return [(f"{rule.RULE}_cuda", lambda sch, b, k=None: rule.schedule_cuda(sch, b, k))]
    if rule is pointwise:
        return [(f"{rule.RULE}_v{lanes}_o{o}",
                 (lambda o: lambda sch, b, k=None: rule.schedule_cpu(sch, b, lanes, o, k))(o))
                for o in pointwise.ORDERS]
    return [(f"{rule.RULE}_v{lanes}", lambda sch, b, k=None: rule.schedule_cpu(sch, b, lanes, k))]


def default_schedule(func, target) -> tuple[object, str] | None:
    """Schedule `func` with our default knobs: (scheduled PrimFunc, rule name), or None."""
    rule = match(func)
    if rule is None:
        return None
    info = _info(rule, func)
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    lanes, registers = simd(target)
    if device == "cuda":
        knobs = rule.default_knobs_cuda(info)
        name, fn = _space(rule, device, lanes)[0]
    else:
        knobs = rule.default_knobs(info, lanes, registers)
        spaces = _space(rule, device, lanes)
        name, fn = spaces[knobs.get("order", 0)] if rule is pointwise else spaces[0]
    sch = Schedule(func)
    fn(sch, sch.get_sblock(info["block"]), knobs)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), name


def space_fn(func, target):
    """MetaSchedule design space (a ScheduleFn) for `func`, or None when no rule applies. Returns
    one schedule per design space of the rule (pointwise on CPU: two loop orders); the knobs are
    sampled, so the search explores them."""
    rule = match(func)
    if rule is None:
        return None
    info = _info(rule, func)
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    spaces = _space(rule, device, vector_lanes(target))

    def fn(sch):
        out = []
        for _, f in spaces:
            s = sch.copy()
            s.seed(sch.fork_seed())
            f(s, s.get_sblock(info["block"]))
            out.append(s)
        return out
    return fn
