"""The tuning database folder: where it lives, which one a build applies, what it holds, its lock.
No tuning here: records are copied from the shipped database or written by hand."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mbn_codegen import database as D
from mbn_codegen import targets
from mbn_codegen.errors import CorruptDatabaseError, DatabaseLockedError, ForeignDatabaseError, MbnError

SHIPPED = D.shipped_dir("x86_64-avx512")


@pytest.fixture(autouse=True)
def xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg"


def _db(path: Path, target: str, cpu_model: str | None = None, n: int = 3) -> Path:
    """A database of n records (from the shipped one) whose provenance names `target`."""
    path.mkdir(parents=True)
    shutil.copyfile(SHIPPED / D.WORKLOADS, path / D.WORKLOADS)
    lines = (SHIPPED / D.RECORDS).read_text().splitlines()[:n]
    (path / D.RECORDS).write_text("".join(x + "\n" for x in lines))
    run = {"target": target, "status": "completed"}
    if cpu_model:
        run["cpu_model"] = cpu_model
    (path / D.PROVENANCE).write_text(json.dumps({"runs": [run]}))
    return path


def test_errors_are_named_mbn_errors():
    for cls in (CorruptDatabaseError, DatabaseLockedError, ForeignDatabaseError):
        assert issubclass(cls, MbnError)


def test_locations(xdg, monkeypatch):
    assert D.user_dir("x86_64") == xdg / "mbn-codegen" / "databases" / "x86_64"
    assert D.user_dir("x86_64", "generic").name == "x86_64-generic"
    assert D.shipped_dir("x86_64-avx512") == Path(targets.HERE) / "databases" / "x86_64-avx512"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert D.user_dir("arm64") == Path.home() / ".local" / "share" / "mbn-codegen" / "databases" / "arm64"


def test_summary_counts_records_once():
    s = D.summary(SHIPPED)
    n = sum(1 for x in (SHIPPED / D.RECORDS).read_text().splitlines() if x.strip())
    assert s.records == n and 0 < s.measured <= n and s.workloads > 0
    assert s.provenance["target"] == "x86_64-avx512"
    assert D.summary("/nonexistent").records == 0


def test_build_order_explicit_then_user_then_shipped(xdg, tmp_path):
    spec = targets.load("x86_64-avx512")
    msgs = []
    sel = D.select(spec, None, automatic=True, log=msgs.append)
    assert sel.kind == "shipped" and sel.path == SHIPPED
    assert msgs[0].startswith(f"tuning database (shipped): {SHIPPED}")
    assert D.select(spec, None, automatic=False) is None

    user = _db(D.user_dir("x86_64-avx512"), "x86_64-avx512")
    sel = D.select(spec, None, automatic=True, log=lambda s: None)
    assert sel.kind == "user" and sel.path == user and sel.manifest()["records"] == 3
    assert D.database_dir("x86_64-avx512") == user

    other = _db(tmp_path / "mine", "x86_64-avx512")
    sel = D.select(spec, str(other), automatic=True, log=lambda s: None)
    assert sel.kind == "explicit" and sel.manifest()["path"] == str(other)


def test_user_database_without_records_falls_back_to_shipped(xdg):
    D.user_dir("x86_64-avx512").mkdir(parents=True)
    (D.user_dir("x86_64-avx512") / D.RECORDS).write_text("")
    assert D.select(targets.load("x86_64-avx512"), None, True, log=lambda s: None).kind == "shipped"


def test_avx512_records_into_an_avx2_build_are_refused_unless_explicit(xdg):
    spec = targets.load("x86_64")
    foreign = _db(D.user_dir("x86_64"), "x86_64-avx512")
    with pytest.raises(ForeignDatabaseError) as e:
        D.select(spec, None, automatic=True, log=lambda s: None)
    assert "avx512f" in str(e.value) and f"--database {foreign}" in str(e.value)
    msgs = []
    sel = D.select(spec, str(foreign), automatic=True, log=msgs.append)
    assert sel.kind == "explicit"
    assert any(m.startswith("warning:") and "x86_64-avx512" in m and "avx512f" in m for m in msgs)
    assert sel.manifest()["warnings"]


def test_records_of_another_target_or_cpu_warn(xdg, tmp_path):
    spec = targets.load("x86_64-avx512")
    msgs = []
    D.select(spec, str(_db(tmp_path / "a", "x86_64")), True, log=msgs.append)   # no flags missing
    assert sum(m.startswith("warning:") for m in msgs) == 1 and "tuned for target x86_64" in msgs[1]
    msgs = []
    D.select(spec, str(_db(tmp_path / "b", "x86_64-avx512", cpu_model="Some Other CPU 9000")), True,
             log=msgs.append)
    assert len(msgs) == 2 and "Some Other CPU 9000" in msgs[1] and D.this_cpu()["cpu_model"] in msgs[1]
    msgs = []
    D.select(spec, str(_db(tmp_path / "c", "x86_64-avx512", cpu_model=D.this_cpu()["cpu_model"])), True,
             log=msgs.append)
    assert len(msgs) == 1                                  # same target, same CPU: nothing to say


def _snapshot(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("how", ["deleted", "emptied"])
def test_missing_workload_file_is_a_named_error_that_changes_nothing(tmp_path, how):
    db = _db(tmp_path / "db", "x86_64-avx512")
    if how == "deleted":
        (db / D.WORKLOADS).unlink()
    else:
        (db / D.WORKLOADS).write_text("")
    before = _snapshot(db)
    for attempt in range(2):
        for call in (lambda: D.open_database(db, log=lambda s: None, writable=False),
                     lambda: D.open_database(db, log=lambda s: None),
                     lambda: D.sanitize_database(db, log=lambda s: None)):
            with pytest.raises(CorruptDatabaseError) as e:
                call()
            msg = str(e.value)
            assert D.WORKLOADS in msg and "git checkout" in msg and f"delete {db}" in msg
            assert _snapshot(db) == before                  # nothing moved aside, nothing created


def test_missing_workload_file_stops_a_build(tmp_path):
    from mbn_codegen.build import BuildConfig, build

    db = _db(tmp_path / "db", "x86_64-avx512")
    (db / D.WORKLOADS).unlink()
    before = _snapshot(db)
    for _ in range(2):
        with pytest.raises(CorruptDatabaseError, match="Restore"):
            build(BuildConfig(alpha=0.25, resolution=32, target="x86_64-avx512", database=str(db),
                              out=str(tmp_path / "art")), log=lambda s: None)
        assert _snapshot(db) == before and not (tmp_path / "art").exists()


def test_provenance_is_appended_with_this_cpu(tmp_path):
    db = _db(tmp_path / "db", "x86_64-avx512")
    e = D.write_provenance(db, {"target": "x86_64-avx512", "status": "interrupted"})
    runs = json.loads((db / D.PROVENANCE).read_text())["runs"]
    assert len(runs) == 2 and runs[-1] == e
    assert e["records_total"] == 3 and e["cpu_model"] == D.this_cpu()["cpu_model"] and "date" in e
    assert not list(db.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------
# the lock, with real processes

def _holder(path: Path) -> subprocess.Popen:
    """Another process holding the lock of `path` until killed."""
    code = ("import sys, time; from mbn_codegen.database import DatabaseLock; "
            "l = DatabaseLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_refuses_a_second_writer_naming_the_owner(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(DatabaseLockedError) as e:
            D.DatabaseLock(tmp_path, log=lambda s: None).acquire()
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and socket.gethostname() in msg and "--wait" in msg
        assert str(tmp_path / D.LOCK) in msg
    finally:
        p.kill()
        p.wait()


def test_stale_lock_is_reported_and_taken_over(tmp_path):
    p = _holder(tmp_path)
    p.kill()
    p.wait()
    msgs = []
    with D.DatabaseLock(tmp_path, log=msgs.append):
        assert json.loads((tmp_path / D.LOCK).read_text())["pid"] == os.getpid()
    assert any("stale lock" in m and str(p.pid) in m for m in msgs)
    assert not (tmp_path / D.LOCK).exists()


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    (tmp_path / D.LOCK).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                               "started": time.time() - 3e8}))   # long before that pid
    msgs = []
    with D.DatabaseLock(tmp_path, log=msgs.append):
        pass
    assert any("stale lock" in m for m in msgs)


def test_wait_queues_behind_the_owner(tmp_path):
    p = _holder(tmp_path)
    msgs, got = [], []
    lock = D.DatabaseLock(tmp_path, wait=True, log=msgs.append, poll_s=0.1)
    t = threading.Thread(target=lambda: got.append(lock.acquire()))
    t.start()
    time.sleep(1.0)
    assert not got and any(f"waiting for pid {p.pid}" in m for m in msgs)
    p.kill()
    p.wait()
    t.join(20)
    assert got and json.loads((tmp_path / D.LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / D.LOCK).exists()


def test_two_processes_racing_for_one_lock_get_one_winner(tmp_path):
    code = ("import sys, time; from mbn_codegen.database import DatabaseLock\n"
            "from mbn_codegen.errors import DatabaseLockedError\n"
            "try:\n    DatabaseLock(sys.argv[1], log=lambda s: None).acquire(); print('won', flush=True); "
            "time.sleep(5)\nexcept DatabaseLockedError:\n    print('refused', flush=True)")
    ps = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
          for _ in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in ps)
    assert outs == ["refused", "won"]


def test_lock_churn_never_has_two_holders(tmp_path):
    """Releasing unlinks tune.lock; a process that opened the old file meanwhile must not hold it
    beside one that locked the new file."""
    code = ("import os, sys; from mbn_codegen.database import DatabaseLock\n"
            "for _ in range(100):\n"
            "    lock = DatabaseLock(sys.argv[1], wait=True, log=lambda s: None, poll_s=0.001).acquire()\n"
            "    mark = os.path.join(sys.argv[1], 'holder')\n"
            "    fd = os.open(mark, os.O_CREAT | os.O_EXCL)\n"
            "    os.close(fd)\n"
            "    os.unlink(mark)\n"
            "    lock.release()\n"
            "print('ok')")
    ps = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in ps]
    assert all(o.strip() == "ok" for o in outs), outs
