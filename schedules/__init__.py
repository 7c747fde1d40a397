"""Our schedules, as rules on dlight's interface (`apply(func, target, tunable)`): an ordered,
first-match list. A kernel no rule matches is left to TVM (its generic MetaSchedule space when
tuning, dlight on GPUs, its stock lowering on CPUs).

Each rule's design spaces are written once: at our default knobs they are the untuned schedule,
with the knobs sampled they are MetaSchedule's design space (a ScheduleFn: only our primitives,
no generic rule stacked on top, which would try to re-parallelise loops we already parallelised).
A new rule is one class in this folder, added to RULES.
"""
from __future__ import annotations

from mbn_codegen._tvm import Schedule

from .analysis import analyze
from .common import Rule, conv_info, simd
from .dense import Dense
from .depthwise import Depthwise
from .global_pool import GlobalPool
from .pointwise import Pointwise

RULES: list[Rule] = [Depthwise(), Pointwise(), Dense(), GlobalPool()]

__all__ = ["RULES", "Rule", "analyze", "conv_info", "simd", "match", "default_schedule",
           "apply_default", "space_fn"]


def match(func) -> Rule | None:
    info = analyze(func)
    return next((r for r in RULES if info is not None and r.matches(info)), None)


def default_schedule(func, target) -> tuple[object, str] | None:
    """`func` at our default knobs: (scheduled PrimFunc, design space name), or None."""
    rule = match(func)
    if rule is None:
        return None
    sch = Schedule(func)
    name = rule.apply_default(sch, target)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True), name


def apply_default(sch, target) -> bool:
    """Our default knobs applied to `sch` (a Schedule of one kernel's module): the same trace as
    the design space's with every decision fixed, so tuning can measure it as a candidate and
    evolve from it. False when no rule matches."""
    rule = match(sch.mod["main"])
    if rule is not None:
        rule.apply_default(sch, target)
    return rule is not None


def space_fn(func, target):
    """MetaSchedule design space (for a ScheduleFn) of `func`, or None when no rule matches: one
    schedule per design space of the rule (pointwise on CPU: two loop orders), knobs sampled."""
    rule = match(func)
    return None if rule is None else (lambda sch: rule.design_space(sch, target))
