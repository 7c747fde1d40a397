"""A tiny real tuning run: our schedules inside MetaSchedule end to end, resume, kill-and-resume,
and a corrupt database line. (Remote boards over RPC: tests/test_rpc.py.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mbn_codegen.build import BuildConfig, build
from mbn_codegen.runtime import load
from mbn_codegen.tuning import RECORDS, TuneConfig, open_database, sanitize_database, tune

pytestmark = pytest.mark.tuning

ONLY = ["fused_conv2d1_add_relu", "fused_conv2d2_add1_relu1"]     # the first depthwise and pointwise


def _cfg(db, **kw):
    base = dict(alpha=0.25, resolution=32, target="x86_64", work_dir=str(db), max_trials=8,
                trials_per_task=4, trials_per_iter=4, only=ONLY)
    base.update(kw)
    return TuneConfig(**base)


def _records(db):
    lines = (db / RECORDS).read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


@pytest.fixture(scope="module")
def tuned_db(tmp_path_factory):
    db = tmp_path_factory.mktemp("db")
    tune(_cfg(db), log=lambda s: None)
    return db


def test_tiny_tune_uses_our_schedules(tuned_db, tmp_path):
    recs = _records(tuned_db)
    assert len(recs) >= 8
    ok = [r for r in recs if min(r[1][1]) < 1e9]            # run_secs of a successful measurement
    assert ok, "no candidate measured successfully"
    assert all("mbn_schedule" in json.dumps(r[1][0]) for r in recs)   # every trace is ours
    prov = json.loads((tuned_db / "provenance.json").read_text())["runs"][-1]
    assert prov["budget"]["trials_per_task"] == 4 and prov["space"] == "ours"

    out = build(BuildConfig(alpha=0.25, resolution=32, target="x86_64", database=str(tuned_db),
                            out=str(tmp_path / "art"), dump_ir=str(tmp_path / "ir")), log=lambda s: None)
    man = json.loads((out / "manifest.json").read_text())
    src = {k["name"]: k["source"] for k in man["kernels"]}
    assert src["fused_conv2d1_add_relu"] == "tuned" and src["fused_conv2d2_add1_relu1"] == "tuned"
    assert any(s.startswith("ours-default") for s in src.values())      # the untuned rest
    ir = (tmp_path / "ir" / "05-schedule.py").read_text()
    assert ir.count('"mbn_schedule"') >= len(src) - 4     # the marker survives into the built module
    assert load(out).selfcheck()["ok"]


def test_rerun_skips_tasks_tuned_to_budget(tuned_db):
    before = len(_records(tuned_db))
    msgs = []
    tune(_cfg(tuned_db), log=msgs.append)
    assert any("already tuned" in m for m in msgs)
    assert len(_records(tuned_db)) == before


def test_corrupt_line_is_reported_and_skipped(tuned_db, tmp_path):
    import shutil
    db = tmp_path / "db"
    shutil.copytree(tuned_db, db)
    n = len(_records(db))
    with open(db / RECORDS, "a") as f:
        f.write('[0, [[["this is not', )                  # a run killed mid-write
    msgs = []
    assert sanitize_database(db, msgs.append) == 1
    assert "corrupt" in msgs[0] and len(_records(db)) == n
    assert list(db.glob(RECORDS + ".corrupt-*"))
    open_database(db, log=lambda s: None)


def test_corrupt_workload_file_is_a_named_error(tmp_path):
    from mbn_codegen.tuning import CorruptDatabaseError

    (tmp_path / "database_workload.json").write_text("garbage\n")
    with pytest.raises(CorruptDatabaseError, match="git checkout"):
        open_database(tmp_path)


KILL_SCRIPT = """
import sys
from mbn_codegen.tuning import TuneConfig, tune
tune(TuneConfig(alpha=0.25, resolution=32, target="x86_64", work_dir=sys.argv[1], max_trials=64,
                trials_per_task=32, trials_per_iter=4, only=%r))
""" % (ONLY,)


def test_sigkill_mid_tune_loses_nothing_and_resumes(tmp_path):
    db = tmp_path / "db"
    p = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(db)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (db / RECORDS).exists() and len((db / RECORDS).read_text().splitlines()) >= 4:
            break
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    sanitize_database(db, log=lambda s: None)
    kept = len(_records(db))
    assert kept >= 4
    tune(_cfg(db, max_trials=8, trials_per_task=kept // 2 + 4), log=lambda s: None)
    assert len(_records(db)) > kept                      # appended, nothing lost
