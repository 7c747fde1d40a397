"""Per-kernel timing of a built artifact and of ONNX Runtime, mapped to the ONNX graph's layers: ours by
the VM's instrument hook (TVM >= 0.24 has no VM profiler), ONNX Runtime by its own profiler, both inside
whole runs of the model."""
from __future__ import annotations

import time
from math import prod
from pathlib import Path

import numpy as np

KINDS = {"dw": "depthwise", "pw": "pointwise", "conv": "conv", "fc": "dense"}


def measure_layers(artifact: str, x: np.ndarray, rounds: int) -> dict:
    """Each kernel call timed inside whole runs of the model (clock read in the VM's instrument hook before
    and after it), the way ONNX Runtime's profiler times its nodes; end to end by a VM without the hook."""
    from .._tvm import relax, tvm
    from ..runtime import read_manifest

    dev = tvm.cpu(0)
    lib = tvm.runtime.load_module(str(Path(artifact) / read_manifest(artifact)["library"]["file"]))
    kernels, xt, vm = lib.imports[0], tvm.runtime.tensor(x, dev), relax.VirtualMachine(lib, dev)
    vm["main"](xt)                                # the first call allocates the pooled storage
    calls, clock = [], []

    def record(_func, sym, before, _ret, *args):    # one run names the kernel calls and their arguments
        if before and kernels.implements_function(sym):
            calls.append((sym, list(args)))
        return 0                                  # VMInstrumentReturnKind.NO_OP

    def stamp(_func, sym, _before, _ret, *_args):
        if kernels.implements_function(sym):
            clock.append(time.perf_counter())
        return 0

    vm.set_instrument(record)
    vm["main"](xt)
    vm.set_instrument(stamp)
    e2e_f = relax.VirtualMachine(lib, dev).time_evaluator("main", dev, number=1, repeat=1, min_repeat_ms=5)
    e2e, per_call = [], []
    for _ in range(rounds + 1):                   # round 0 warms up and is dropped below
        e2e.append(e2e_f(xt).mean * 1e3)
        clock.clear()
        vm["main"](xt)
        per_call.append(np.diff(clock)[::2] * 1e3)
    ms = np.array(per_call[1:])
    return {"e2e_samples_ms": e2e[1:], "calls": [
        {"index": i, "symbol": sym, "shapes": [[int(d) for d in a.shape] for a in ts],
         "bytes": sum(int(prod(a.shape)) * np.dtype(str(a.dtype)).itemsize for a in ts),
         "samples_ms": ms[:, i].tolist()}
        for i, (sym, a) in enumerate(calls) for ts in [[t for t in a if hasattr(t, "shape")]]],
        "method": f"instrument hook: clock before and after each kernel call inside whole runs, {rounds} runs"}


def ort_session(spec, profile_prefix: str | None = None):
    """ONNX Runtime on the CPU with the spec's threads; with a prefix it also writes its profile
    (the per-layer column). The worker's timing session is built here too."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.intra_op_num_threads, o.inter_op_num_threads = spec["threads"], 1
    if profile_prefix:
        o.enable_profiling, o.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(spec["onnx"], o, providers=["CPUExecutionProvider"])


def measure_peer_layers(spec: dict, x: np.ndarray, rounds: int) -> dict:
    """ONNX Runtime's own profiler, the peer's per-layer times: each node's kernel time in execution order
    (its layout reorders are nodes of their own), over `rounds` runs after one warm-up run."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        sess = ort_session(spec, profile_prefix=f"{tmp}/ort")
        for _ in range(rounds + 1):
            sess.run(None, {sess.get_inputs()[0].name: x})
        events = json.loads(Path(sess.end_profiling()).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = [e["dur"] / 1e3 for e in events if e.get("name") == "model_run"]
    n = len(nodes) // (rounds + 1)
    return {"e2e_samples_ms": runs[1:], "calls": [
        {"index": i, "symbol": nodes[i]["name"][:-len("_kernel_time")], "op": nodes[i]["args"].get("op_name", ""),
         "shapes": [], "bytes": 0, "samples_ms": [nodes[r * n + i]["dur"] / 1e3 for r in range(1, rounds + 1)]}
        for i in range(n)], "method": f"ONNX Runtime's profiler (node kernel_time), {rounds} runs"}


def onnx_layers(path) -> list[dict]:
    """Every Conv and Gemm/MatMul of an ONNX graph in graph order, with its mult-adds counted from its
    own shapes. Names follow the paper's table (conv1, dw2, pw2, ..., fc) for any model, as cost.py's."""
    import onnx

    g = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    shape = {i.name: list(i.dims) for i in g.initializer}
    for vi in [*g.input, *g.value_info, *g.output]:
        shape.setdefault(vi.name, [d.dim_value for d in vi.type.tensor_type.shape.dim])
    out, n, prev = [], 0, None
    for node in (nd for nd in g.node if nd.op_type in ("Conv", "Gemm", "MatMul")):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        x, y = shape[node.input[0]], shape[node.output[0]]
        if node.op_type == "Conv":
            w, group = shape[node.input[1]], attrs.get("group", 1)
            kind = "dw" if group == x[1] > 1 and w[1] == 1 else "pw" if group == 1 and prod(w[2:]) == 1 else "conv"
            red, desc = w[1] * prod(w[2:]), f"{x[1]}x{x[2]}x{x[3]} → {y[1]}x{y[2]}x{y[3]}"
        else:
            kind, red = "fc", x[-2] if node.op_type == "Gemm" and attrs.get("transA", 0) else x[-1]
            desc = f"{red} → {y[-1]}"
        n += not (kind == "pw" and prev == "dw")
        prev = kind
        out.append({"name": "fc" if kind == "fc" else f"{kind}{n}", "kind": kind, "node": node.name,
                    "shape": desc, "mult_adds": int(prod(y) * red)})
    fcs = [l for l in out if l["kind"] == "fc"]
    for i, l in enumerate(fcs if len(fcs) > 1 else []):
        l["name"] = f"fc{i + 1}"
    return out


def map_to_layers(calls: list[dict], kernels: list[dict], layers: list[dict]) -> tuple[list[dict], str | None]:
    """Give the compute calls, in program order, the ONNX graph's layers in graph order, kinds checked.
    Returns (rows, problem); problem says why they differ."""
    kinds = {**{k["name"]: k["kind"] for k in kernels}, **{k.get("symbol"): k["kind"] for k in kernels}}
    rows = [{**c, "kind": kinds.get(c["symbol"], "other"), "layer": None, "mult_adds": None} for c in calls]
    compute = [r for r in rows if r["kind"] in KINDS.values()]
    if len(compute) != len(layers):
        return rows, f"{len(compute)} compute kernel calls for {len(layers)} ONNX layers"
    for r, l in zip(compute, layers):
        if r["kind"] != KINDS[l["kind"]]:
            return rows, (f"kernel call #{r['index']} ({r['symbol']}, {r['kind']}) is not layer {l['name']} "
                          f"({l['kind']})")
    for r, l in zip(compute, layers):
        r.update(layer=l["name"], mult_adds=l["mult_adds"], shape=l["shape"])
    return rows, None


PEER_COMPUTE_OPS = {"Conv": "conv", "FusedConv": "conv", "Gemm": "dense", "FusedGemm": "dense", "MatMul": "dense",
                    "FusedMatMul": "dense"}


def layer_entry(m: dict, kernels: list[dict] | None, layers: list[dict]) -> dict:
    """measure_layers' (or, without kernels, measure_peer_layers') samples as results.json's per-layer
    entry: calls mapped to the layers, medians, and what end to end costs beyond the kernels (VM
    dispatch, allocations, copies)."""
    if kernels is None:                # a peer: its compute nodes, in order, are the layers
        compute = [c for c in m["calls"] if c["op"] in PEER_COMPUTE_OPS]
        kinds = ([KINDS[l["kind"]] for l in layers] if len(compute) == len(layers) else
                 [PEER_COMPUTE_OPS[c["op"]] for c in compute])     # a count mismatch is reported below
        kernels = [{"name": c["symbol"], "kind": k} for c, k in zip(compute, kinds)]
    rows, problem = map_to_layers(m["calls"], kernels, layers)
    src = {k.get("symbol", k["name"]): k.get("source") for k in kernels}
    for r in rows:
        r.update(median_ms=float(np.median(r["samples_ms"])), source=src.get(r["symbol"]))
    total, e2e = sum(r["median_ms"] for r in rows), float(np.median(m["e2e_samples_ms"]))
    return {**m, "calls": rows, "mapping_problem": problem,
            "consistency": {"kernel_sum_ms": total, "e2e_ms": e2e, "unattributed_ms": e2e - total}}
