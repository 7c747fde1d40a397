"""A bench on a board over TVM's RPC tracker: each TVM variant's library is uploaded and timed there
end to end with the remote VM's time_evaluator, interleaved. No per-kernel timing: the VM's instrument
hook takes no callback over RPC. Peers run on the board through board_peers, whose JSON is merged."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import MbnError

PEERS = {"onnxruntime": "ONNX Runtime (on the board)", "litert": "LiteRT / XNNPACK (on the board)"}
EMULATED_NOTE = ("Timings come from qemu-aarch64 emulating the board on an x86 host: they say nothing about any "
                 "board's speed, and this report draws no comparison from them (plumbing check only).")
BOARD_METHOD = ("<h2>Method</h2><p>On the board, through TVM's RPC tracker: each TVM variant's library uploaded "
                "into one RPC session, output checked against ONNX Runtime's (run on the host); per thread count "
                "(runtime.config_threadpool), warm-up, then interleaved rounds in random order, each block one "
                "remote time_evaluator call of `reps` repeats of main. No per-kernel timing: the VM's instrument "
                "hook takes no callback over RPC. Peers were timed by board_peers on the board in their own "
                "process, not interleaved with TVM's variants.</p>")


class BoardBenchError(MbnError):
    """A board bench that cannot run as asked; the message says what to change."""


def connect(cfg, spec) -> tuple:
    """(RPC session, provenance machine, board facts) of the board cfg names, options checked first."""
    from .. import rpc

    if spec.device != "cpu":
        raise BoardBenchError(f"target {spec.name!r} is a {spec.device} target: a board bench times CPU libraries")
    if not cfg.rpc_key:
        raise BoardBenchError("--rpc-tracker needs --rpc-key (the key the board's rpc_server registered with)")
    if cfg.artifacts:
        raise BoardBenchError("--artifact is host-only; run the board bench without it")
    host, port = rpc.parse_address(cfg.rpc_tracker)
    rpc.check_tracker(host, port, cfg.rpc_key)
    remote = rpc.request_session(host, port, cfg.rpc_key)
    return (remote, *identity(remote))


def identity(remote) -> tuple[dict, dict]:
    """(provenance machine, board facts) from our server's board_info global (full /proc/cpuinfo)."""
    from .. import rpc

    try:
        info = json.loads(remote.get_function(rpc.BOARD_INFO)())
    except Exception as e:
        raise BoardBenchError(f"the board's RPC server has no {rpc.BOARD_INFO} ({type(e).__name__}): start it "
                              "with `python -m mbn_codegen.rpc serve --tracker HOST:PORT --key KEY`") from e
    c = {}
    for k, _, v in (line.partition(":") for line in (info.get("cpuinfo") or "").splitlines() if ":" in line):
        c.setdefault(k.strip(), v.strip())
    x86_host = "vendor_id" in c and info.get("machine") == "aarch64"          # qemu-user shows the host's
    emulated = info.get("emulated") or ("qemu-user (host /proc/cpuinfo)" if x86_host else None)
    model = (info.get("model") or c.get("model name") or c.get("Hardware")
             or (f"implementer {c['CPU implementer']} part {c['CPU part']}" if "CPU part" in c else "unknown"))
    features = (c.get("Features") or c.get("flags") or "").split()
    mem = re.search(r"MemTotal:\s+(\d+) kB", info.get("meminfo") or "")
    machine = {"cpu_model": model + (" [EMULATED: qemu-aarch64]" if emulated else ""),
               "arch": info.get("machine") or "aarch64", "usable_cores": info.get("usable_cores") or info["cores"] or 1,
               "mhz": int(info["max_khz"]) / 1e3 if (info.get("max_khz") or "").isdigit() else None,
               "simd_flags": sorted(f for f in features if f.startswith(("asimd", "sve", "fp", "neon"))),
               "memory_bytes": int(mem.group(1)) * 1024 if mem else None, "os": None, "load_average_start": None}
    board = {"governor": info.get("governor"), "cores": info.get("cores"), "features": features,
             "emulated": emulated, "identity_source": info.get("source")}
    return machine, board


def peers(cfg, model: dict, board: dict, threads: list[int], say) -> dict:
    """board_peers' JSON: --board-peers FILE, or run under the local emulator when the board is it."""
    if cfg.board_peers:
        return json.loads(Path(cfg.board_peers).read_text())
    cmd = ["-m", "mbn_codegen.bench.board_peers", model["onnx"], "--input", model["input"], "--reference",
           model["reference"], "--threads", ",".join(map(str, threads)), "--rounds", str(cfg.rounds),
           "--reps", str(cfg.reps), "--warmup", str(cfg.warmup)]
    if board["emulated"]:
        from ..emulation import run_python_arm64

        say("peers: board_peers under the local arm64 emulator ...")
        r = run_python_arm64(cmd, timeout=1800)
        if r.returncode == 0:
            return json.loads(r.stdout.strip().splitlines()[-1])
        note = f"board_peers failed under emulation: {r.stderr.strip()[-300:]}"
    else:
        note = (f"not measured: on the board run `python3 {' '.join(cmd[:3])} model.onnx --input input.npy "
                f"--reference reference.npy > peers.json` (files in {Path(model['onnx']).parent}), then pass "
                "--board-peers peers.json")
    return {"peers": {n: {"status": "unavailable", "note": note} for n in PEERS}}


def measure(run) -> None:
    """run.Run's TVM variants uploaded, checked and timed in blocks of time_evaluator repeats; peers merged."""
    import numpy as np

    from .._tvm import relax, tvm
    from ..runtime import read_manifest
    from .results import add_block, check_output, new_series

    cfg, remote, say = run.cfg, run.remote, run.say
    run.doc["isolation"]["spin_settings"] = {"board": "one RPC server process; TVM's pool set per thread count by "
                                                      "runtime.config_threadpool"}
    say(f"on the board ({run.doc['provenance']['machine']['cpu_model']}): {', '.join(v.name for v in run.ok('tvm'))}")
    dev, ref = remote.cpu(), np.load(run.model["reference"])
    xt, vms = tvm.runtime.tensor(np.load(run.model["input"]), dev), {}
    for v in run.ok("tvm"):
        try:
            remote.upload(str(Path(v.artifact) / read_manifest(v.artifact)["library"]["file"]), target=f"{v.name}.so")
            vms[v.name] = relax.VirtualMachine(remote.load_module(f"{v.name}.so"), dev)
            check = check_output(vms[v.name]["main"](xt).numpy(), ref, "onnxruntime (host)")
        except Exception as e:
            run.fail(v, f"failed on the board: {type(e).__name__}: {str(e)[:300]}")
            continue
        v.checks += [{"threads": t, **check} for t in run.threads]
    pool = remote.get_function("runtime.config_threadpool")
    for t in run.threads:
        pool(1, t)                                     # big cores first, t threads
        timers = {}
        for n, vm in vms.items():
            vm.time_evaluator("main", dev, number=1, repeat=max(1, cfg.warmup))(xt)
            f = vm.time_evaluator("main", dev, number=1, repeat=cfg.reps)
            timers[n] = lambda f=f: [s * 1e3 for s in f(xt).results]
        run.interleave(t, timers)
    result = peers(cfg, run.model, run.doc["provenance"]["board"], run.threads, say)
    for v in (v for v in run.vs if v.kind == "peer"):
        p = result.get("peers", {}).get(v.name, {"status": "unavailable", "note": "not in the board_peers JSON"})
        if v.unless(p["status"] != "ok" and p["note"]).ok:
            for s in p["series"]:
                e = new_series(v.name, s["threads"])
                for r, block in enumerate(s["blocks_ms"]):
                    add_block(e, r, block)
                run.doc["e2e"].append(e)
                v.checks.append({"threads": s["threads"], **(s["check"] or {"ok": True})})
            v.note = "measured by board_peers on the board, not interleaved with TVM's variants"
    say("per layer and machine peak: not measured on boards (end to end only)")
