"""Per-kernel timing of a built artifact, and the mapping of kernel calls to the ONNX graph's layers.

TVM >= 0.24 has no VM profiler. Two tools do the job (TVM_NOTES section 3):
1. one inference with the VM's instrument hook records the call sequence: every kernel call in
   program order with its real argument tensors (a kernel shared by several identical layers is
   called once per layer, so calls, not symbols, map to layers);
2. each recorded call is then timed on its own arguments with the library's `time_evaluator`
   (C++ timer, no Python in the loop), round-robin with the whole model (`vm.time_evaluator`), so
   drift hits both equally. Per-layer time = median over rounds.

Each call is timed warm (back to back: hot caches) and cold (its weights and output flushed from
the caches first); its time inside the graph lies between the two, plus the VM's own instructions.
`consistency` checks that the end-to-end time is bracketed so.
"""
from __future__ import annotations

from math import prod

import numpy as np

CONSISTENCY_TOLERANCE = 0.15      # slack of the bracket check in `consistency`
VM_CALL_ALLOWANCE_US = 1.0        # VM overhead allowed per VM instruction (kernel calls and builtins)


class LayerProfiler:
    def __init__(self, artifact: str, x: np.ndarray):
        import json
        from pathlib import Path

        from .._tvm import relax, tvm

        man = json.loads((Path(artifact) / "manifest.json").read_text())
        self.is_cpu = man.get("device", "cpu") == "cpu"
        self.dev = tvm.cpu(0) if self.is_cpu else tvm.cuda(0)
        lib = tvm.runtime.load_module(str(Path(artifact) / man["library"]["file"]))
        self.kernels = lib.imports[0]
        self.xt = tvm.runtime.tensor(x, self.dev)
        vm = relax.VirtualMachine(lib, self.dev)
        vm["main"](self.xt)                       # first call allocates the pooled storage
        calls, other = [], {}

        def hook(_func, sym, before, _ret, *args):
            if before:
                if self.kernels.implements_function(sym):
                    calls.append((sym, list(args)))
                else:
                    other[sym] = other.get(sym, 0) + 1
            return 0                              # VMInstrumentReturnKind.NO_OP

        vm.set_instrument(hook)
        vm["main"](self.xt)
        self.calls, self.other_calls = calls, other
        self.vm = relax.VirtualMachine(lib, self.dev)       # un-instrumented, for end to end

    def measure(self, rounds: int = 5, min_repeat_ms: int = 5) -> dict:
        """Per round: the whole model, then every call warm (repeated back to back, caches hot),
        then every call cold (one run after flushing all its arguments but the first from the CPU
        caches, as MetaSchedule's runner does: the input comes from the previous layer, weights
        and output do not). In the graph a kernel sits between the two."""
        e2e_f = self.vm.time_evaluator("main", self.dev, number=1, repeat=1, min_repeat_ms=min_repeat_ms)
        warm = [self.kernels.time_evaluator(sym, self.dev, number=1, repeat=1, min_repeat_ms=min_repeat_ms)
                for sym, _ in self.calls]
        cold = ([self.kernels.time_evaluator(sym, self.dev, number=1, repeat=1,
                                             f_preproc="cache_flush_cpu_non_first_arg")
                 for sym, _ in self.calls] if self.is_cpu else None)
        e2e, per_warm, per_cold = [], [[] for _ in self.calls], [[] for _ in self.calls]
        for r in range(rounds + 1):               # round 0 warms up (allocations, caches) and is dropped
            t = e2e_f(self.xt).mean * 1e3
            tw = [f(*args).mean * 1e3 for f, (_, args) in zip(warm, self.calls)]
            tc = [f(*args).mean * 1e3 for f, (_, args) in zip(cold, self.calls)] if cold else []
            if r:
                e2e.append(t)
                for i, x in enumerate(tw):
                    per_warm[i].append(x)
                for i, x in enumerate(tc):
                    per_cold[i].append(x)
        out = []
        for i, (sym, args) in enumerate(self.calls):
            tensors = [a for a in args if hasattr(a, "shape")]
            shapes = [[int(d) for d in a.shape] for a in tensors]
            nbytes = sum(prod(s) * np.dtype(str(a.dtype)).itemsize for s, a in zip(shapes, tensors))
            out.append({"index": i, "symbol": sym, "shapes": shapes, "bytes": int(nbytes),
                        "samples_ms": per_warm[i], "cold_samples_ms": per_cold[i] if cold else None})
        return {"e2e_samples_ms": e2e, "calls": out, "other_calls": self.other_calls,
                "method": "instrument hook (call sequence) + time_evaluator per call: warm (back to back, "
                          f"min_repeat_ms={min_repeat_ms}) and cold (arguments but the first flushed from the "
                          f"caches); {rounds} rounds after one warm-up round, interleaved with the whole model"}


_ONNX_KIND = {"dw": "depthwise", "pw": "pointwise", "conv": "conv", "fc": "dense"}


def onnx_layers(path) -> list[dict]:
    """Every Conv and Gemm/MatMul of an ONNX graph in graph order, with its mult-adds counted from
    its own shapes (output elements x reduction size: Cin/group x kh x kw, or K). Names follow the
    paper's table (conv1, dw2, pw2, ..., fc) for any model, so v1's line up with cost.py's."""
    import onnx

    g = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    shape = {i.name: list(i.dims) for i in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        shape.setdefault(vi.name, [d.dim_value for d in vi.type.tensor_type.shape.dim])
    out, n, prev = [], 0, None
    for node in g.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        x, y = shape[node.input[0]], shape[node.output[0]]
        if node.op_type == "Conv":
            w = shape[node.input[1]]
            kind = ("dw" if attrs.get("group", 1) == x[1] > 1 and w[1] == 1 else
                    "pw" if attrs.get("group", 1) == 1 and prod(w[2:]) == 1 else "conv")
            red, desc = w[1] * prod(w[2:]), f"{x[1]}x{x[2]}x{x[3]} → {y[1]}x{y[2]}x{y[3]}"
        else:
            kind, red = "fc", x[-2] if node.op_type == "Gemm" and attrs.get("transA", 0) else x[-1]
            desc = f"{red} → {y[-1]}"
        n += not (kind == "pw" and prev == "dw")
        prev = kind
        out.append({"name": "fc" if kind == "fc" else f"{kind}{n}", "kind": kind, "node": node.name,
                    "shape": desc, "mult_adds": int(prod(y) * red)})
    if sum(l["kind"] == "fc" for l in out) > 1:
        for i, l in enumerate(x for x in out if x["kind"] == "fc"):
            l["name"] = f"fc{i + 1}"
    return out


def kernel_kind(symbol: str, kernels: list[dict]) -> str:
    """The manifest's kind of a library symbol (a build may add a suffix such as `_prepacked`)."""
    k = next((k["kind"] for k in kernels if symbol in (k.get("symbol"), k["name"])), None)
    k = k or max(((k["name"], k["kind"]) for k in kernels if symbol.startswith(k["name"] + "_")),
                 default=(None, "other"), key=lambda p: len(p[0]))[1]
    if k == "other" and ("matmul" in symbol or "dense" in symbol):
        return "dense"
    return k


def map_to_layers(calls: list[dict], kernels: list[dict], layers: list[dict]) -> tuple[list[dict], str | None]:
    """Give the compute calls (conv, depthwise, pointwise, dense), in program order, the ONNX graph's
    layers in graph order, kinds checked. Returns (rows, problem); problem says why they differ."""
    rows = [{**c, "kind": kernel_kind(c["symbol"], kernels), "layer": None, "mult_adds": None} for c in calls]
    compute = [r for r in rows if r["kind"] in _ONNX_KIND.values()]
    if len(compute) != len(layers):
        return rows, f"{len(compute)} compute kernel calls for {len(layers)} ONNX layers"
    for r, l in zip(compute, layers):
        if r["kind"] != _ONNX_KIND[l["kind"]]:
            return rows, f"kernel call #{r['index']} ({r['symbol']}, {r['kind']}) is not layer {l['name']} ({l['kind']})"
    for r, l in zip(compute, layers):
        r.update(layer=l["name"], mult_adds=l["mult_adds"], shape=l["shape"])
    return rows, None


def consistency(warm_ms: float, cold_ms: float | None, e2e_ms: float, vm_calls: int = 0,
                tol: float = CONSISTENCY_TOLERANCE, per_call_us: float = VM_CALL_ALLOWANCE_US) -> dict:
    """Do the per-kernel times add up to the end-to-end time of the same process?

    Warm kernels (hot caches) bound a kernel's in-graph time from below, cold ones (weights and
    output flushed) from above, and the VM adds its own instructions (allocations, shape checks,
    dispatch: 0.7-1 us each on x86, which dominates sub-millisecond models). So the check is
        warm sum x (1 - tol)  <=  end to end  <=  (cold sum + per_call_us x VM calls) x (1 + tol)
    (without cold timings, e.g. on a GPU: warm sum + allowance within tol of end to end)."""
    allow = per_call_us * 1e-3 * vm_calls
    upper = (cold_ms if cold_ms is not None else warm_ms) + allow
    ok = warm_ms * (1 - tol) <= e2e_ms <= upper * (1 + tol)
    return {"kernel_sum_ms": warm_ms, "cold_kernel_sum_ms": cold_ms, "e2e_ms": e2e_ms,
            "ratio": warm_ms / e2e_ms if e2e_ms > 0 else 0.0,
            "cold_ratio": (cold_ms / e2e_ms) if cold_ms is not None and e2e_ms > 0 else None,
            "tolerance": tol, "vm_calls": vm_calls, "per_call_allowance_us": per_call_us,
            "lower_ms": warm_ms * (1 - tol), "upper_ms": upper * (1 + tol), "ok": bool(ok),
            "unattributed_ms": e2e_ms - warm_ms}
