"""Tiny real tuning runs: our schedules inside MetaSchedule end to end, the console, resume,
time limit, lock, Ctrl-C, SIGKILL and a corrupt database line. (Remote boards over RPC:
tests/test_rpc.py; the database folder on its own: tests/test_database.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from mbn_codegen.build import BuildConfig, build
from mbn_codegen.database import LOCK, RECORDS, open_database, sanitize_database, summary
from mbn_codegen.errors import CorruptDatabaseError, UnknownKernelError
from mbn_codegen.runtime import load
from mbn_codegen.tuning import TuneConfig, tune

pytestmark = pytest.mark.tuning

ONLY = ["fused_conv2d1_add_relu", "fused_conv2d2_add1_relu1"]     # the first depthwise and pointwise
TINY = ["--alpha", "0.25", "--resolution", "32", "--target", "x86_64", "--only", *ONLY]


def _cfg(db, **kw):
    base = dict(alpha=0.25, resolution=32, target="x86_64", work_dir=str(db), max_trials=8,
                trials_per_task=4, trials_per_iter=4, only=ONLY)
    base.update(kw)
    return TuneConfig(**base)


def _records(db):
    lines = (db / RECORDS).read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def _last_run(db):
    return json.loads((db / "provenance.json").read_text())["runs"][-1]


def _env(tmp_path):
    # never the real per-user database
    return {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg"), "PYTHONUNBUFFERED": "1"}


def _cli(tmp_path, db, *args):
    return [sys.executable, "-m", "mbn_codegen.cli.main", "tune", *TINY, "--database", str(db), *args]


class Tune:
    """A CLI tune in its own process group (as a terminal runs it), its console lines collected."""

    def __init__(self, tmp_path, db, *args):
        self.lines: list[str] = []
        self.p = subprocess.Popen(_cli(tmp_path, db, *args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, env=_env(tmp_path), start_new_session=True)
        self.t = threading.Thread(target=lambda: self.lines.extend(iter(self.p.stdout.readline, "")), daemon=True)
        self.t.start()

    def wait_for(self, pred, timeout=900):
        deadline = time.time() + timeout
        while time.time() < deadline:
            hit = [x for x in list(self.lines) if pred(x)]
            if hit:
                return hit[0]
            assert self.p.poll() is None, "".join(self.lines)
            time.sleep(0.3)
        raise AssertionError("timed out:\n" + "".join(self.lines))

    def finish(self, timeout=900):
        rc = self.p.wait(timeout)
        self.t.join(10)
        return rc, "".join(self.lines)


def _progress(line):
    return "trials (" in line and " best " in line


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    """Through the CLI, as a person runs it: exit 0 and a short console."""
    tmp = tmp_path_factory.mktemp("cli")
    db = tmp / "db"
    t = Tune(tmp, db, "--trials", "8", "--trials-per-task", "4", "--trials-per-iter", "4")
    rc, out = t.finish()
    return db, rc, out


def test_cli_tune_prints_a_short_console(tuned_db):
    db, rc, out = tuned_db
    assert rc == 0, out
    lines = out.splitlines()
    assert len(lines) < 40, out
    progress = [x for x in lines if _progress(x)]
    assert len(progress) == 2, out                              # one line per measured batch of 4
    assert all(k in "".join(progress) for k in ONLY) and "ETA" in progress[-1]
    assert "[INFO]" not in out and "Logging directory" not in out and "@I.ir_module" not in out
    logs = list((db / "logs").glob("*.log"))
    assert logs and any("Initializing Task" in p.read_text() for p in logs)     # TVM's logs went here


def test_tiny_tune_uses_our_schedules(tuned_db, tmp_path):
    db, rc, out = tuned_db
    recs = _records(db)
    assert len(recs) >= 8
    ok = [r for r in recs if min(r[1][1]) < 1e9]            # run_secs of a successful measurement
    assert ok, "no candidate measured successfully"
    assert all("mbn_schedule" in json.dumps(r[1][0]) for r in recs)   # every trace is ours
    prov = _last_run(db)
    assert prov["budget"]["trials_per_task"] == 4 and prov["space"] == "ours"
    assert prov["status"] == "completed" and prov["target"] == "x86_64"
    assert prov["cpu_model"] and "avx2" in prov["simd_flags"]
    assert prov["records_total"] == len(recs) and not (db / LOCK).exists()

    msgs = []
    out = build(BuildConfig(alpha=0.25, resolution=32, target="x86_64", database=str(db),
                            out=str(tmp_path / "art"), dump_ir=str(tmp_path / "ir")), log=msgs.append)
    assert any(m.startswith("tuning database (explicit): " + str(db)) for m in msgs)
    man = json.loads((out / "manifest.json").read_text())
    assert man["tuning_database"]["kind"] == "explicit" and man["tuning_database"]["records"] == len(recs)
    src = {k["name"]: k["source"] for k in man["kernels"]}
    assert src["fused_conv2d1_add_relu"] == "tuned" and src["fused_conv2d2_add1_relu1"] == "tuned"
    assert any(s.startswith("ours-default") for s in src.values())      # the untuned rest
    ir = next((tmp_path / "ir").glob("*-schedule.py")).read_text()
    assert ir.count('"mbn_schedule"') >= len(src) - 4     # the marker survives into the built module
    assert load(out).selfcheck()["ok"]


def test_rerun_skips_tasks_tuned_to_budget(tuned_db):
    db = tuned_db[0]
    before = len(_records(db))
    msgs = []
    tune(_cfg(db), log=msgs.append)
    assert any("already tuned" in m for m in msgs)
    assert len(_records(db)) == before


def test_misspelt_only_is_a_named_error_with_the_names(tmp_path):
    with pytest.raises(UnknownKernelError, match=r"did you mean fused_conv2d1_add_relu") as e:
        tune(_cfg(tmp_path / "db", only=["fused_conv2d1_add_rellu"]), log=lambda s: None)
    assert "fused_conv2d2_add1_relu1" in str(e.value)          # the list of kernels
    assert not (tmp_path / "db" / LOCK).exists() and not (tmp_path / "db" / "provenance.json").exists()


def test_time_limit_stops_cleanly_with_provenance(tmp_path):
    db = tmp_path / "db"
    t = Tune(tmp_path, db, "--trials", "64", "--trials-per-task", "32", "--trials-per-iter", "4",
             "--time-limit", "0.01")
    rc, out = t.finish()
    assert rc == 0, out
    assert "time limit" in out and "Check failed" not in out
    run = _last_run(db)
    assert run["status"] == "time limit" and run["trials_done"] < 64
    assert run["budget"]["time_limit_s"] == pytest.approx(0.6)
    assert not (db / LOCK).exists()


def test_second_tune_is_refused_then_ctrl_c_keeps_everything(tmp_path):
    db = tmp_path / "db"
    a = Tune(tmp_path, db, "--trials", "64", "--trials-per-task", "32", "--trials-per-iter", "4")
    a.wait_for(lambda x: x.startswith("tuning 2 of 2"))
    assert json.loads((db / LOCK).read_text())["pid"] == a.p.pid
    b = subprocess.run(_cli(tmp_path, db, "--trials", "8"), capture_output=True, text=True,
                       env=_env(tmp_path), timeout=600)
    assert b.returncode == 2, b.stdout + b.stderr
    assert "DatabaseLockedError" in b.stderr and f"pid {a.p.pid}" in b.stderr and "--wait" in b.stderr
    assert "Traceback" not in b.stderr

    first = a.wait_for(_progress)
    os.killpg(a.p.pid, signal.SIGINT)                    # Ctrl-C in a terminal: the whole group
    rc, out = a.finish(timeout=300)
    assert rc == 130, out
    assert "interrupted" in out and "Traceback" not in out, out
    assert len(_records(db)) >= 4                       # the batch reported by `first` is on disk
    run = _last_run(db)
    assert run["status"] == "interrupted" and run["records_total"] == len(_records(db)), first
    assert not (db / LOCK).exists()


def test_sigkill_loses_at_most_the_running_batch_and_resumes(tmp_path):
    db = tmp_path / "db"
    a = Tune(tmp_path, db, "--trials", "64", "--trials-per-task", "32", "--trials-per-iter", "4")
    first = a.wait_for(_progress)
    os.killpg(a.p.pid, signal.SIGKILL)
    a.finish()
    sanitize_database(db, log=lambda s: None)
    kept = len(_records(db))
    assert kept >= 4, first                              # the batch whose line was printed
    assert json.loads((db / LOCK).read_text())["pid"] == a.p.pid    # left behind by the kill

    msgs = []
    tune(_cfg(db, max_trials=8, trials_per_task=kept // 2 + 4), log=msgs.append)
    assert any("stale lock" in m and str(a.p.pid) in m for m in msgs), msgs
    assert any("tuning" in m and "kernels" in m for m in msgs)
    assert len(_records(db)) > kept                      # appended, nothing lost
    assert not (db / LOCK).exists()


def test_corrupt_line_is_reported_and_skipped(tuned_db, tmp_path):
    import shutil
    db = tmp_path / "db"
    shutil.copytree(tuned_db[0], db)
    n = len(_records(db))
    with open(db / RECORDS, "a") as f:
        f.write('[0, [[["this is not', )                  # a run killed mid-write
    assert summary(db).records == n + 1
    msgs = []
    open_database(db, log=msgs.append, writable=False)  # a build: skipped, the file untouched
    assert "corrupt" in msgs[0] and summary(db).records == n + 1
    msgs = []
    assert sanitize_database(db, msgs.append) == 1
    assert "corrupt" in msgs[0] and len(_records(db)) == n
    assert list(db.glob(RECORDS + ".corrupt-*"))
    open_database(db, log=lambda s: None)


def test_corrupt_workload_file_is_a_named_error(tmp_path):
    (tmp_path / "database_workload.json").write_text("garbage\n")
    with pytest.raises(CorruptDatabaseError, match="git checkout"):
        open_database(tmp_path)


def test_skipping_tensor_intrinsics_leaves_no_trace():
    """Tuning our space skips importing TVM's tensor intrinsics (minutes); the stand-in must not
    outlive the block, or a later generic-space tune in the same process would find no intrinsics."""
    import importlib
    import sys

    from mbn_codegen._tvm import tensor_intrinsics_skipped

    name = "tvm.s_tir.tensor_intrin"
    before = sys.modules.get(name)
    with tensor_intrinsics_skipped():
        mod = importlib.import_module(name)
        assert mod is sys.modules[name]
        assert before is not None or not hasattr(mod, "cuda")      # the empty stand-in, unless already real
    assert sys.modules.get(name) is before


def test_tune_measures_our_default_schedule(tuned_db):
    """Each task's first batch holds our default knobs, so the database's best is never a random
    sample worse than the build would get without it."""
    from mbn_codegen import schedules, targets
    from mbn_codegen._tvm import Schedule, ms, tvm

    def decisions(trace):
        return [[int(x) for x in d] if isinstance(d, (list, tvm.ir.Array)) or hasattr(d, "__len__") else int(d)
                for d in trace.decisions.values()]

    db, rc, _ = tuned_db
    database = ms.database.JSONDatabase(work_dir=str(db), allow_missing=False)
    target = targets.load("x86_64").tvm_target()
    by_workload: dict = {}
    for rec in database.get_all_tuning_records():
        by_workload.setdefault(rec.workload, []).append(rec)
    assert len(by_workload) == len(ONLY)
    for wl, recs in by_workload.items():
        sch = Schedule(wl.mod)
        assert schedules.apply_default(sch, target)
        assert decisions(sch.trace) in [decisions(r.trace) for r in recs]
