"""Our schedules, as rules: an ordered, first-match list (dlight style). Each rule module has
`applies(primfunc)`, `schedule_cpu(sch, block, lanes, ...)`, `schedule_cuda(sch, block, ...)`
and `default_knobs*`: the same function is our untuned default (knobs given) and MetaSchedule's
design space (knobs sampled), so a default is always a point of the tuned space.

MetaSchedule reaches them through ApplyCustomRule: `annotate()` marks the anchor block with
`schedule_rule=<name>` and `register()` installs `s_tir.meta_schedule.<key>.<name>`.
"""
from __future__ import annotations

from mbn_codegen._tvm import Schedule, tirx, tvm

from . import depthwise, pointwise
from .common import conv_info, vector_lanes

RULES = [depthwise, pointwise]          # first match wins; everything else is TVM's


def match(func):
    if not isinstance(func, tirx.PrimFunc):
        return None
    for rule in RULES:
        if rule.applies(func):
            return rule
    return None


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
    info = conv_info(func)
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    lanes = vector_lanes(target)
    if device == "cuda":
        knobs = rule.default_knobs_cuda(info)
        name, fn = _space(rule, device, lanes)[0]
    else:
        knobs = rule.default_knobs(info, lanes)
        spaces = _space(rule, device, lanes)
        name, fn = spaces[knobs.get("order", 0)] if rule is pointwise else spaces[0]
    sch = Schedule(func)
    fn(sch, sch.get_sblock(info["block"]), knobs)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), name


def annotate(func, target):
    """Mark the anchor block for ApplyCustomRule; other rules then leave the block alone."""
    rule = match(func)
    if rule is None:
        return func
    info = conv_info(func)
    device = "cuda" if target.kind.name == "cuda" else "cpu"
    sch = Schedule(func)
    sch.annotate(sch.get_sblock(info["block"]), "schedule_rule",
                 f"{rule.RULE}_{'cuda' if device == 'cuda' else f'v{vector_lanes(target)}'}")
    return sch.mod["main"]


_registered = False


def register() -> None:
    """Install the rules MetaSchedule's ApplyCustomRule looks up, for every target key we use.
    A rule returns one schedule per design space (pointwise CPU: two loop orders)."""
    global _registered
    if _registered:
        return
    for rule in RULES:
        for lanes in (4, 8, 16):
            spaces = _space(rule, "cpu", lanes)
            _register(f"{rule.RULE}_v{lanes}", spaces, ("cpu", "arm_cpu"))
        _register(f"{rule.RULE}_cuda", _space(rule, "cuda", 1), ("cuda", "gpu"))
    _registered = True


def _register(name: str, spaces, keys) -> None:
    def apply(sch, block):
        out = []
        for _, fn in spaces:
            s = sch.copy()
            s.seed(sch.fork_seed())
            fn(s, block)
            out.append(s)
        return out
    for key in keys:
        tvm.register_global_func(f"s_tir.meta_schedule.{key}.{name}", apply, override=True)
