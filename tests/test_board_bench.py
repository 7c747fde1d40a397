"""`mbn-codegen bench --rpc-tracker --rpc-key`: what it refuses, and the board-side peers command.
The bench itself on an emulated board (tuned, default and stock uploaded and timed there, a report
that says the timings are emulated and compares nothing) is part of test_board_workflow.py."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mbn_codegen import rpc
from mbn_codegen.bench import BenchConfig, run_bench
from mbn_codegen.bench.board import BoardBenchError

TINY = dict(alpha=0.25, resolution=32, target="arm64")


def test_board_bench_refuses_host_only_options(tmp_path):
    for kw, msg in ((dict(artifacts={"a": str(tmp_path)}), "--artifact"), (dict(rpc_key=None), "--rpc-key")):
        cfg = BenchConfig(**TINY, rpc_tracker="127.0.0.1:1", **{"rpc_key": "k", **kw}, out=str(tmp_path))
        with pytest.raises(BoardBenchError, match=msg):
            run_bench(cfg, log=lambda s: None)
    with pytest.raises(rpc.RPCError, match="cannot reach the RPC tracker"):
        run_bench(BenchConfig(**TINY, rpc_tracker=f"127.0.0.1:{rpc.free_port()}", rpc_key="k", out=str(tmp_path)),
                  log=lambda s: None)


def test_board_peers_command_prints_blocks_and_names_missing_peers(tmp_path):
    """The board-side command, run here (x86 onnxruntime): JSON with interleavable blocks and a
    checked output; LiteRT without a .tflite says why."""
    import numpy as np

    from mbn_codegen.export import export_onnx, onnxruntime_run
    from mbn_codegen.models import create
    from mbn_codegen.models.calibrate import make_live

    onnx = tmp_path / "m.onnx"
    export_onnx(make_live(create("mobilenet_v1", 0.25, 32, 1000, None), seed=0), onnx, 32)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", onnxruntime_run(onnx, x))
    r = subprocess.run([sys.executable, "-m", "mbn_codegen.bench.board_peers", str(onnx), "--input",
                        str(tmp_path / "x.npy"), "--reference", str(tmp_path / "y.npy"), "--threads", "1",
                        "--rounds", "2", "--reps", "3", "--warmup", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    ort = doc["peers"]["onnxruntime"]
    assert ort["status"] == "ok" and ort["series"][0]["threads"] == 1 and ort["series"][0]["check"]["ok"]
    assert [len(b) for b in ort["series"][0]["blocks_ms"]] == [3, 3]
    lite = doc["peers"]["litert"]
    assert lite["status"] == "unavailable" and "ai-edge-litert" in lite["note"], lite     # no package or no .tflite
