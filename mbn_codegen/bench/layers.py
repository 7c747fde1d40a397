"""Per-kernel timing of a built artifact, and the mapping of kernel calls to the model's layers.

TVM >= 0.24 has no VM profiler. Two tools do the job (TVM_NOTES section 3):
1. one inference with the VM's instrument hook records the call sequence: every kernel call in
   program order with its real argument tensors (a kernel shared by several identical layers is
   called once per layer, so calls, not symbols, map to layers);
2. each recorded call is then timed on its own arguments with the library's `time_evaluator`
   (C++ timer, no Python in the loop), round-robin with the whole model (`vm.time_evaluator`), so
   drift hits both equally. Per-layer time = median over rounds.

Isolated kernels run with warm caches and without the VM's allocations and shape checks, so their
sum is a little below the end-to-end time; `consistency` states by how much.
"""
from __future__ import annotations

from math import prod

import numpy as np

CONSISTENCY_TOLERANCE = 0.15      # |sum of kernel medians / end-to-end median - 1| must stay below

# kernel kind (kernels.conv_kind / manifest) -> cost-model layer kind
_KIND_TO_LAYER = {"conv": "conv", "depthwise": "dw", "pointwise": "pw", "dense": "fc", "pool": "pool"}


class LayerProfiler:
    def __init__(self, artifact: str, x: np.ndarray):
        import json
        from pathlib import Path

        from .._tvm import relax, tvm

        man = json.loads((Path(artifact) / "manifest.json").read_text())
        self.dev = tvm.cuda(0) if man.get("device") == "cuda" else tvm.cpu(0)
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
        e2e_f = self.vm.time_evaluator("main", self.dev, number=1, repeat=1, min_repeat_ms=min_repeat_ms)
        fs = [self.kernels.time_evaluator(sym, self.dev, number=1, repeat=1, min_repeat_ms=min_repeat_ms)
              for sym, _ in self.calls]
        e2e, per_call = [], [[] for _ in self.calls]
        for _ in range(rounds):
            e2e.append(e2e_f(self.xt).mean * 1e3)
            for i, (f, (_, args)) in enumerate(zip(fs, self.calls)):
                per_call[i].append(f(*args).mean * 1e3)
        out = []
        for i, ((sym, args), samples) in enumerate(zip(self.calls, per_call)):
            shapes = [[int(d) for d in a.shape] for a in args if hasattr(a, "shape")]
            nbytes = sum(prod(s) * np.dtype(str(a.dtype)).itemsize
                         for s, a in zip(shapes, [a for a in args if hasattr(a, "shape")]))
            out.append({"index": i, "symbol": sym, "shapes": shapes, "bytes": int(nbytes),
                        "samples_ms": samples})
        return {"e2e_samples_ms": e2e, "calls": out, "other_calls": self.other_calls,
                "method": "instrument hook (call sequence) + time_evaluator per call, "
                          f"min_repeat_ms={min_repeat_ms}, {rounds} rounds interleaved with the whole model"}


def macs_from_shapes(kind: str, shapes: list[list[int]]) -> int | None:
    """Mult-adds of one kernel call from its argument shapes (weights OIHW or OHWI, output last).
    Independent of the cost model, so the two check each other; None where it cannot tell."""
    try:
        if kind in ("conv", "depthwise", "pointwise") and len(shapes[1]) == 4 and len(shapes[-1]) == 4:
            return prod(shapes[-1]) * prod(shapes[1][1:])
        if kind == "dense" and len(shapes) >= 2:
            return prod(shapes[-1]) * shapes[0][-1]
        if kind == "pool":
            return 0
    except (IndexError, TypeError):
        pass
    return None


def kernel_kind(symbol: str, manifest_kinds: dict[str, str]) -> str:
    k = manifest_kinds.get(symbol, "other")
    if k == "other" and ("mean" in symbol or "pool" in symbol):
        return "pool"
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


def consistency(sum_ms: float, e2e_ms: float, tol: float = CONSISTENCY_TOLERANCE) -> dict:
    ratio = sum_ms / e2e_ms if e2e_ms > 0 else float("nan")
    return {"kernel_sum_ms": sum_ms, "e2e_ms": e2e_ms, "ratio": ratio, "tolerance": tol,
            "ok": bool(abs(ratio - 1.0) <= tol),
            "unattributed_ms": e2e_ms - sum_ms}
