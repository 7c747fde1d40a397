"""Per-kernel timing of a built artifact, and the mapping of kernel calls to the model's layers.

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

# kernel kind (kernels.conv_kind / manifest) -> cost-model layer kind
_KIND_TO_LAYER = {"conv": "conv", "depthwise": "dw", "pointwise": "pw", "dense": "fc", "pool": "pool"}


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


def macs_from_shapes(kind: str, shapes: list[list[int]]) -> int | None:
    """Mult-adds of one kernel call from its argument shapes, independent of the cost model (so
    the two check each other) and of the weight layout (OIHW, HWIO, packed): with arguments
    (data, weight, bias, out), mult-adds = |out| x |weight| / |bias|, since |weight| / |bias| is
    what each output element reduces over (I/groups x kh x kw, or K for a dense layer). None where
    the arguments are not of that form."""
    if kind == "pool":
        return 0
    if kind not in ("conv", "depthwise", "pointwise", "dense") or len(shapes) != 4:
        return None
    out, w, b = prod(shapes[3]), prod(shapes[1]), prod(shapes[2])
    if b <= 0 or w % b or sum(d > 1 for d in shapes[2]) != 1:
        return None
    return out * (w // b)


def manifest_lookup(symbol: str, table: dict):
    """table[symbol], else the entry of the longest name that prefixes symbol + "_", else None."""
    if symbol in table:
        return table[symbol]
    stems = [n for n in table if symbol.startswith(n + "_")]
    return table[max(stems, key=len)] if stems else None


def kernel_kind(symbol: str, manifest_kinds: dict[str, str]) -> str:
    """The manifest's kind for a library symbol. A build may rename a kernel after recording it
    (e.g. `fused_conv2d_add_relu` -> `fused_conv2d_add_relu_prepacked`): then the longest manifest
    name that prefixes the symbol decides."""
    k = manifest_lookup(symbol, manifest_kinds) or "other"
    if k == "other" and ("mean" in symbol or "pool" in symbol):
        return "pool"
    if k == "other" and ("matmul" in symbol or "dense" in symbol):
        return "dense"
    return k


def map_to_layers(calls: list[dict], manifest_kinds: dict[str, str], cost_layers: list[dict] | None
                  ) -> tuple[list[dict], str | None]:
    """Assign each kernel call a cost-model layer, in program order, by kind. Calls of other kinds
    (reshape, layout transforms) get layer None. Returns (rows, problem): problem says why the
    mapping failed (then rows carry only shape-derived mult-adds)."""
    rows = []
    for c in calls:
        kind = kernel_kind(c["symbol"], manifest_kinds)
        rows.append({**c, "kind": kind, "layer": None, "mult_adds": macs_from_shapes(kind, c["shapes"]),
                     "mult_adds_from_shapes": macs_from_shapes(kind, c["shapes"])})
    if not cost_layers:
        return rows, "no cost model for this model (MobileNet v1 only): mult-adds from kernel shapes"
    j, mapped = 0, []
    for r in rows:
        lk = _KIND_TO_LAYER.get(r["kind"])
        if lk is None:
            continue
        if j < len(cost_layers) and cost_layers[j]["kind"] == lk:
            mapped.append((r, cost_layers[j]))
            j += 1
        else:
            return rows, (f"kernel call #{r['index']} ({r['symbol']}, {r['kind']}) does not match the "
                          f"next layer of the cost model ({cost_layers[j]['name'] if j < len(cost_layers) else 'none'})")
    if j != len(cost_layers):
        return rows, f"only {j} of {len(cost_layers)} layers found among the kernel calls"
    for r, layer in mapped:
        r["layer"] = layer["name"]
        r["mult_adds"] = layer["mult_adds"]
        r["shape"] = (f"{layer['in_ch']}x{layer['in_size']}² → {layer['out_ch']}x{layer['out_size']}²"
                      if layer["kind"] not in ("fc",) else f"{layer['in_ch']} → {layer['out_ch']}")
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
