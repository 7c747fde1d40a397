"""Per-kernel timing of a built artifact and the mapping of its kernel calls to the ONNX graph's layers.
The VM's instrument hook records every kernel call with its real arguments (TVM >= 0.24 has no VM
profiler); each call is timed on them warm (back to back) and cold (weights and output flushed),
in rounds interleaved with the whole model: in the graph a kernel takes between the two."""
from __future__ import annotations

from math import prod
from pathlib import Path

import numpy as np

CONSISTENCY_TOLERANCE = 0.15      # slack of the bracket check in `layer_entry`
VM_CALL_ALLOWANCE_US = 1.0        # VM overhead allowed per VM instruction (kernel calls and builtins)


def measure_layers(artifact: str, x: np.ndarray, rounds: int, min_repeat_ms: int = 5) -> dict:
    from .._tvm import relax, tvm
    from ..runtime import read_manifest

    dev = tvm.cpu(0)
    lib = tvm.runtime.load_module(str(Path(artifact) / read_manifest(artifact)["library"]["file"]))
    kernels, xt, vm = lib.imports[0], tvm.runtime.tensor(x, dev), relax.VirtualMachine(lib, dev)
    vm["main"](xt)                                # the first call allocates the pooled storage
    calls, other = [], {}

    def hook(_func, sym, before, _ret, *args):
        if before and kernels.implements_function(sym):
            calls.append((sym, list(args)))
        elif before:
            other[sym] = other.get(sym, 0) + 1
        return 0                                  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(hook)
    vm["main"](xt)
    e2e_f = relax.VirtualMachine(lib, dev).time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=min_repeat_ms)
    warm = [kernels.time_evaluator(s, dev, number=1, repeat=1, min_repeat_ms=min_repeat_ms) for s, _ in calls]
    cold = [kernels.time_evaluator(s, dev, number=1, repeat=1, f_preproc="cache_flush_cpu_non_first_arg")
            for s, _ in calls]
    e2e, tw, tc = [], [], []
    for _ in range(rounds + 1):                   # round 0 warms up and is dropped below
        e2e.append(e2e_f(xt).mean * 1e3)
        tw.append([f(*args).mean * 1e3 for f, (_, args) in zip(warm, calls)])      # all warm, then all cold
        tc.append([f(*args).mean * 1e3 for f, (_, args) in zip(cold, calls)])
    out = []
    for i, (sym, args) in enumerate(calls):
        ts = [a for a in args if hasattr(a, "shape")]
        out.append({"index": i, "symbol": sym, "shapes": [[int(d) for d in a.shape] for a in ts],
                    "bytes": sum(int(prod(a.shape)) * np.dtype(str(a.dtype)).itemsize for a in ts),
                    "samples_ms": [w[i] for w in tw[1:]], "cold_samples_ms": [c[i] for c in tc[1:]]})
    return {"e2e_samples_ms": e2e[1:], "calls": out, "other_calls": other,
            "method": f"instrument hook + time_evaluator per call, warm (min_repeat_ms={min_repeat_ms}) and cold "
                      f"(arguments but the first flushed), {rounds} rounds interleaved with the whole model"}


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
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
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


def map_to_layers(calls: list[dict], kernels: list[dict], layers: list[dict]) -> tuple[list[dict], str | None]:
    """Give the compute calls (conv, depthwise, pointwise, dense), in program order, the ONNX graph's
    layers in graph order, kinds checked. Returns (rows, problem); problem says why they differ."""
    kinds = {**{k["name"]: k["kind"] for k in kernels}, **{k.get("symbol"): k["kind"] for k in kernels}}
    rows = [{**c, "kind": kinds.get(c["symbol"], "other"), "layer": None, "mult_adds": None} for c in calls]
    compute = [r for r in rows if r["kind"] in _ONNX_KIND.values()]
    if len(compute) != len(layers):
        return rows, f"{len(compute)} compute kernel calls for {len(layers)} ONNX layers"
    for r, l in zip(compute, layers):
        if r["kind"] != _ONNX_KIND[l["kind"]]:
            return rows, (f"kernel call #{r['index']} ({r['symbol']}, {r['kind']}) is not layer "
                          f"{l['name']} ({l['kind']})")
    for r, l in zip(compute, layers):
        r.update(layer=l["name"], mult_adds=l["mult_adds"], shape=l["shape"])
    return rows, None


def layer_entry(m: dict, kernels: list[dict], layers: list[dict]) -> dict:
    """measure_layers' samples as results.json's per-layer entry: calls mapped to the ONNX layers,
    medians, and the bracket check: warm sum x (1 - tol) <= end to end <= (cold sum + per-call
    allowance x VM instructions) x (1 + tol); the VM's own instructions (allocations, shape checks,
    dispatch) cost 0.7-1 us each on x86."""
    rows, problem = map_to_layers(m["calls"], kernels, layers)
    src = {k.get("symbol", k["name"]): k.get("source") for k in kernels}
    for r in rows:
        r.update(median_ms=float(np.median(r["samples_ms"])), cold_median_ms=float(np.median(r["cold_samples_ms"])),
                 source=src.get(r["symbol"]))
    warm, cold = sum(r["median_ms"] for r in rows), sum(r["cold_median_ms"] for r in rows)
    e2e, tol = float(np.median(m["e2e_samples_ms"])), CONSISTENCY_TOLERANCE
    vm_calls = len(rows) + sum(m["other_calls"].values())
    lower, upper = warm * (1 - tol), (cold + VM_CALL_ALLOWANCE_US * 1e-3 * vm_calls) * (1 + tol)
    cons = {"kernel_sum_ms": warm, "cold_kernel_sum_ms": cold, "e2e_ms": e2e, "tolerance": tol, "vm_calls": vm_calls,
            "per_call_allowance_us": VM_CALL_ALLOWANCE_US, "lower_ms": lower, "upper_ms": upper,
            "ok": bool(lower <= e2e <= upper), "unattributed_ms": e2e - warm}
    return {"calls": rows, "e2e_samples_ms": m["e2e_samples_ms"], "other_calls": m["other_calls"],
            "mapping_problem": problem, "consistency": cons, "method": m["method"]}
