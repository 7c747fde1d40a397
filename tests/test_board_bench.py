"""`mbn-codegen bench --rpc-tracker --rpc-key`: the bench on a board, here an emulated arm64 board
(qemu-aarch64) on loopback. Plumbing only: timings under emulation mean nothing, and the report
must say so and compare nothing."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mbn_codegen import rpc
from mbn_codegen.bench import BenchConfig, run_bench
from mbn_codegen.bench.board import EMULATED_NOTE, BoardBenchError
from mbn_codegen.bench.results import load, validate

TINY = dict(alpha=0.25, resolution=32, target="arm64")


@pytest.mark.qemu
def test_bench_on_an_emulated_board(tmp_path):
    tr = rpc.start_tracker()
    server = None
    try:
        server = rpc.start_server(tr, "qemu-bench", log_path=tmp_path / "server.log")
        cfg = BenchConfig(**TINY, variants=["stock", "ours", "ours-tuned"], database=str(tmp_path / "no-db"),
                          threads=[1], rounds=3, reps=2, warmup=1, rpc_tracker=f"{tr.host}:{tr.port}",
                          rpc_key="qemu-bench", out=str(tmp_path / "report"))
        out = run_bench(cfg, log=lambda s: None)
        log = server.log_tail(10 ** 7)
    finally:
        if server:
            server.stop()
        tr.terminate()
    doc = load(out)
    assert doc["status"] == "complete" and validate(doc) == []
    prov = doc["provenance"]
    assert prov["board"]["emulated"] and prov["board"]["key"] == "qemu-bench"
    assert prov["board"]["identity_source"] == rpc.BOARD_INFO                  # read on the board
    assert prov["machine"]["arch"] == "aarch64" and "EMULATED" in prov["machine"]["cpu_model"]
    assert prov["host_machine"]["arch"] == "x86_64"
    st = {v["name"]: v for v in doc["variants"]}
    assert [st[n]["status"] for n in ("stock", "ours", "ours-tuned")] == ["ok", "ok", "unavailable"]
    for n in ("stock", "ours"):                                               # uploaded and run there
        assert f"{n}.so" in log and st[n]["checks"] and all(c["ok"] for c in st[n]["checks"]), st[n]
    for n in ("onnxruntime", "litert"):    # not installed in the emulated Python: listed, with why
        assert st[n]["status"] == "unavailable" and "No module named" in st[n]["note"], st[n]
    e2e = {e["variant"]: e for e in doc["e2e"]}
    assert set(e2e) == {"stock", "ours"}
    for e in e2e.values():
        assert len(e["samples_ms"]) == 3 * 2 and e["rounds"] == [0, 1, 2] and e["noise"] is not None
        assert 0 < e["stats"]["median"]
    assert doc["layers"] == [] and doc["peak"] == []
    assert all(r.get("vs_stock") is None and r.get("vs_fastest_peer") is None for r in doc["summary"]["headline"])
    for page in ("report.html", "report.md"):
        text = (out / page).read_text()
        assert EMULATED_NOTE in text and "faster" not in text.lower(), page
        assert "×" not in text, page                       # no ratio is printed


def test_board_bench_refuses_host_only_options(tmp_path):
    for kw, msg in ((dict(grid=True), "--grid"), (dict(rpc_key=None), "--rpc-key")):
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
