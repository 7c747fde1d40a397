"""Tuning on boards through TVM's RPC tracker, on loopback: the "boards" are RPC servers running
under qemu-aarch64 (arm64 Python + TVM's aarch64 wheels), the tracker and the tuner run here.
Timings measured under emulation mean nothing; these tests check the plumbing: a board dying
mid-tune costs failed records, not the tune; a missing tracker, key or board is a named error.
A tune on an emulated board followed by a build that applies its records is part of
test_board_workflow.py."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from mbn_codegen import rpc
from mbn_codegen.tuning import RECORDS, TuneConfig, TuningError, tune

# two small kernels of v1 0.25-32: the first depthwise (stride 1) and the first pointwise
ONLY = ["fused_conv2d1_add_relu", "fused_conv2d2_add1_relu1"]
FAILED = 1e9          # MetaSchedule stores failed measurements as run_secs [1e10]

def _cfg(tracker, key, work_dir, **kw) -> TuneConfig:
    return TuneConfig(target="arm64", alpha=0.25, resolution=32, only=ONLY, max_trials=8, trials_per_task=4,
                      trials_per_iter=4, rpc_tracker=tracker.address, rpc_key=key, work_dir=str(work_dir), **kw)


def _records(work_dir) -> list[tuple[int, list[float]]]:
    out = []
    for line in (Path(work_dir) / RECORDS).read_text().splitlines():
        if line.strip():
            wl, rec = json.loads(line)
            out.append((wl, [float(s) for s in (rec[1] or [1e10])]))
    return out


@pytest.fixture(scope="module")
def tracker():
    tr = rpc.start_tracker()
    tr.address = f"{tr.host}:{tr.port}"
    yield tr
    tr.terminate()


@pytest.mark.qemu
@pytest.mark.tuning
def test_board_killed_mid_tune_records_failures_and_the_tune_finishes(tracker, tmp_path):
    """The server dies (process group SIGTERM/SIGKILL) once the first batch's records are written;
    the second task's candidates then fail (no board under the key) instead of waiting forever."""
    key = "qemu-a72-dies"
    server = rpc.start_server(tracker, key, log_path=tmp_path / "server.log")
    work = tmp_path / "db"
    killed = {}
    done = threading.Event()

    def kill_after_first_records():
        rec = work / RECORDS
        while not done.is_set():
            if rec.exists() and rec.read_text().strip():
                killed["n_records"] = len(rec.read_text().splitlines())
                server.stop()
                killed["at"] = time.time()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=kill_after_first_records, daemon=True)
    watcher.start()
    try:
        t0 = time.time()
        tune(_cfg(tracker, key, work), log=lambda s: None)          # must not raise, must not hang
        elapsed = time.time() - t0
    finally:
        done.set()
        watcher.join(5)
        server.stop()
    assert "at" in killed, "the tune finished before the server could be killed"
    assert not server.alive()
    recs = _records(work)
    print(f"tune {elapsed:.0f} s, server killed {killed['at'] - t0:.0f} s in; records {recs}")
    ok = [r for _, r in recs if max(r) < FAILED]
    failed = [r for _, r in recs if max(r) >= FAILED]
    assert len(ok) >= killed["n_records"] >= 1, recs       # measured before the kill: kept
    assert len(failed) >= 1, recs                          # after the kill: recorded as failed
    assert len(recs) == 8, recs
    assert elapsed < 300, elapsed
    # the tracker forgot the dead board
    assert rpc.server_ports(rpc.query_tracker(tracker.host, tracker.port), key) == []


@pytest.mark.tuning
def test_cross_target_without_tracker_refuses(tmp_path):
    with pytest.raises(TuningError, match="RPC_TRACKER"):
        tune(TuneConfig(target="arm64", alpha=0.25, resolution=32, only=ONLY, max_trials=4,
                        work_dir=str(tmp_path / "db")), log=lambda s: None)
    assert not (tmp_path / "db").exists()


@pytest.mark.tuning
def test_unreachable_tracker_or_missing_key_refuses_fast(tracker, tmp_path):
    dead = rpc.free_port()
    with pytest.raises(TuningError, match="cannot reach the RPC tracker"):
        tune(TuneConfig(target="arm64", rpc_tracker=f"127.0.0.1:{dead}", rpc_key="rpi4",
                        work_dir=str(tmp_path / "db")), log=lambda s: None)
    with pytest.raises(TuningError, match="no server under key 'rpi4'"):
        tune(TuneConfig(target="arm64", rpc_tracker=tracker.address, rpc_key="rpi4",
                        work_dir=str(tmp_path / "db")), log=lambda s: None)
    with pytest.raises(TuningError, match="host:port"):
        tune(TuneConfig(target="arm64", rpc_tracker="9190", rpc_key="rpi4"), log=lambda s: None)


def test_query_host_server_and_make_rpc_query(tracker):
    """TVM's Server on this host registers; the tracker's summary and `make rpc-query` (TVM's
    query_rpc_tracker) list it; terminate() takes its popen_worker and the registration with it."""
    import subprocess

    server = rpc.start_host_server(tracker, "host-cpu")
    summary = rpc.query_tracker(tracker.address)
    assert rpc.server_ports(summary, "host-cpu") == [server.port]
    assert "server:host-cpu" in rpc.text_summary(tracker.address)
    out = subprocess.run(["make", "-s", "rpc-query", f"RPC_TRACKER={tracker.address}"], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and f":{server.port}" in out.stdout and "host-cpu" in out.stdout, out
    child = server.proc._proc.pid
    server.terminate()
    deadline = time.time() + 10
    while rpc.server_ports(rpc.query_tracker(tracker.host, tracker.port), "host-cpu") and time.time() < deadline:
        time.sleep(0.2)
    assert rpc.server_ports(rpc.query_tracker(tracker.host, tracker.port), "host-cpu") == []
    assert subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip()[:1] in ("", "Z")
    t0 = time.time()
    with pytest.raises(rpc.RPCError, match="cannot reach"):
        rpc.query_tracker("127.0.0.1", rpc.free_port())
    assert time.time() - t0 < 5                                   # not TVM's 60 s connect retry


def test_kill_process_group_takes_the_servers_children_with_it():
    """An emulated server forks session children; stopping it must not leave them running."""
    import subprocess

    p = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 60 & echo $!; wait"], stdout=subprocess.PIPE,
                         text=True, start_new_session=True)
    child = int(p.stdout.readline())
    t0 = time.time()
    rpc.kill_process_group(p, timeout=1.0)                  # sh ignores SIGTERM: SIGKILL ends it
    assert p.returncode == -9 and time.time() - t0 < 10
    stat = subprocess.run(["ps", "-o", "stat=", "-p", str(child)], capture_output=True, text=True).stdout.strip()
    assert stat[:1] in ("", "Z"), stat                     # gone, or a zombie (ZN under nice)
