"""The board workflow as a user runs it, through one TVM RPC tracker on loopback with one emulated
arm64 board (an RPC server under qemu-aarch64): `mbn-codegen tune` on the board -> `mbn-codegen
build` with that database -> `mbn-codegen bench` on the board (tuned vs default vs stock, peers run
there) -> `mbn-codegen bundle` -> install.sh into a fresh folder with the emulated arm64 Python and
no network -> the installed runtime passes its self-check and matches ONNX Runtime on the host.

Each step goes through the public API a user's script would call (the CLI subcommands are thin
wrappers over it). Timings under emulation mean nothing: each step checks what can break between
the pieces. The cheapest settings the pieces allow (v1 0.25-32, one kernel, two trials). Errors
and a board dying mid-tune are tested in test_rpc.py and test_board_bench.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import check_correctness, distinct_inputs, pypi_reachable
from mbn_codegen import rpc
from mbn_codegen.bench import BenchConfig, run_bench
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.bundle import BundleError, bundle
from mbn_codegen.model_spec import ModelSpec
from mbn_codegen.tuning import TuneConfig, tune

REPO = Path(__file__).resolve().parents[1]
MODEL = dict(model=ModelSpec(name="mobilenet_v1", alpha=0.25, resolution=32))
ONLY = ["fused_conv2d2_add1_relu1"]          # the first pointwise kernel
TRIALS = 2
FAILED = 1e9                # MetaSchedule stores a failed measurement as run_secs [1e10]
KEY = "qemu-workflow"

# run by the installed runtime under emulation, with nothing but the install folder on its path
BOARD_RUN = textwrap.dedent("""
    import json, sys
    import numpy as np
    import mbn_codegen
    from mbn_codegen.runtime import load, machine_arch
    m = load(sys.argv[1])
    xs = np.load(sys.argv[2])
    np.save(sys.argv[3], np.stack([m(x[None]) for x in xs]))
    print(json.dumps({"pkg": mbn_codegen.__file__, "arch": machine_arch(), "selfcheck": m.selfcheck()}))
""")


def _records(db: Path) -> list[tuple[int, list[float]]]:
    from mbn_codegen.tuning import RECORDS

    out = []
    for line in (db / RECORDS).read_text().splitlines():
        if line.strip():
            wl, rec = json.loads(line)
            out.append((wl, [float(s) for s in (rec[1] or [1e10])]))
    return out


def _board_env(**extra) -> dict:
    """A board's environment: none of this host's venv, Python or pip settings, and a dead proxy,
    so the install can only use the bundle's wheels."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "PIP_", "VIRTUAL_ENV", "LD_", "QEMU_"))
           and k.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    dead = f"http://127.0.0.1:{rpc.free_port()}"
    env.update(PIP_CONFIG_FILE=os.devnull, PYTHONNOUSERSITE="1", http_proxy=dead, https_proxy=dead,
               HTTP_PROXY=dead, HTTPS_PROXY=dead, **extra)
    return env


def _emulated_python(tmp_path: Path) -> Path:
    """A `python3.11` command running Debian's arm64 interpreter from the sysroot under qemu, with
    nothing on its path but the standard library (no site folder of the emulation setup)."""
    from mbn_codegen.emulation import arm64_root, qemu_binary

    root = arm64_root()
    wrapper = tmp_path / "python3.11"
    wrapper.write_text(f'#!/bin/sh\nexec "{qemu_binary()}" -L "{root}/sysroot" "{root}/sysroot/usr/bin/python3.11" '
                       '"$@"\n')
    wrapper.chmod(0o755)
    return wrapper


@pytest.mark.qemu
@pytest.mark.tuning
def test_tune_build_bench_bundle_install_on_an_emulated_board(tmp_path):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("aarch64-linux-gnu-g++ not found: install Debian package g++-aarch64-linux-gnu (make apt-deps)")
    quiet = lambda s: None  # noqa: E731
    seconds: dict[str, float] = {}
    t = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal t
        seconds[step] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()

    tracker = rpc.start_tracker()
    address = f"{tracker.host}:{tracker.port}"
    server = None
    try:
        server = rpc.start_server(tracker, KEY, log_path=tmp_path / "server.log")
        lap("tracker and board")

        # 1. tune on the board
        db = tmp_path / "db"
        tune(TuneConfig(**MODEL, target="arm64", rpc_tracker=address, rpc_key=KEY, work_dir=str(db),
                        max_trials=TRIALS, trials_per_task=TRIALS, trials_per_iter=TRIALS, only=ONLY), log=quiet)
        recs = _records(db)
        assert len(recs) == TRIALS and {wl for wl, _ in recs} == {0}, recs
        good = [r for _, r in recs if max(r) < FAILED]
        assert good, f"no successful measurement on the board: {recs}"
        assert server.log_tail(10 ** 7).count("load_module") >= len(good)   # measured there, not here
        prov = json.loads((db / "provenance.json").read_text())["runs"][-1]
        assert prov["measured_on"] == f"rpc {address} key {KEY}", prov
        lap("tune")

        # 2. build with that database
        art = tmp_path / "v1-arm64"
        build(BuildConfig(**MODEL, target="arm64", database=str(db), out=str(art)), log=quiet)
        manifest = json.loads((art / "manifest.json").read_text())
        sources = {k["name"]: k["source"] for k in manifest["kernels"]}
        assert [sources[n] for n in ONLY] == ["tuned"], sources
        assert sum(s == "tuned" for s in sources.values()) == len(ONLY), sources
        served = manifest["tuning_database"]
        assert Path(served["path"]).resolve() == db.resolve() and served["records"] == TRIALS, served
        lap("build")

        # 3. bench on the board: stock, ours, ours-tuned uploaded and timed there; peers run there
        report = tmp_path / "report"
        run_bench(BenchConfig(**MODEL, target="arm64", rpc_tracker=address, rpc_key=KEY,
                              variants=["stock", "ours", "ours-tuned"], database=str(db), threads=[1], rounds=2,
                              reps=2, warmup=1, out=str(report)), log=quiet)
        server_log = server.log_tail(10 ** 7)
        lap("bench")
    finally:
        if server:
            server.stop()
        tracker.terminate()

    from mbn_codegen.bench.board import EMULATED_NOTE
    from mbn_codegen.bench.results import load, validate

    doc = load(report)
    assert doc["status"] == "complete" and validate(doc) == []
    prov = doc["provenance"]
    assert prov["board"]["key"] == KEY and prov["board"]["tracker"] == address
    assert prov["board"]["emulated"] and prov["board"]["identity_source"] == rpc.BOARD_INFO   # read on the board
    assert prov["machine"]["arch"] == "aarch64" and "EMULATED" in prov["machine"]["cpu_model"]
    assert prov["host_machine"]["arch"] == "x86_64"
    st = {v["name"]: v for v in doc["variants"]}
    for n in ("stock", "ours", "ours-tuned"):
        assert st[n]["status"] == "ok", st[n]
        assert f"{n}.so" in server_log and st[n]["checks"] and all(c["ok"] for c in st[n]["checks"]), st[n]
    assert f"({TRIALS} trials)" in st["ours-tuned"]["label"], st["ours-tuned"]
    tuned_kernels = {k["name"]: k["source"] for k in st["ours-tuned"]["build_facts"]["kernels"]}
    assert [tuned_kernels[n] for n in ONLY] == ["tuned"], tuned_kernels
    # the peers ran in the emulated board's Python: each one either measured there (its output
    # checked against ONNX Runtime on the host) or listed with why not
    for n in ("onnxruntime", "litert"):
        assert st[n]["status"] in ("ok", "unavailable"), st[n]
        if st[n]["status"] == "ok":
            assert st[n]["checks"] and all(c["ok"] for c in st[n]["checks"]), st[n]
        else:
            assert "No module named" in st[n]["note"] or "tflite" in st[n]["note"], st[n]
    e2e = {e["variant"]: e for e in doc["e2e"]}
    assert {"stock", "ours", "ours-tuned"} <= set(e2e)
    for n in ("stock", "ours", "ours-tuned"):
        assert len(e2e[n]["samples_ms"]) == 2 * 2 and e2e[n]["rounds"] == [0, 1], e2e[n]
        assert e2e[n]["stats"]["median"] > 0
    assert doc["layers"] == [] and doc["peak"] == []
    assert all(r.get("vs_stock") is None and r.get("vs_fastest_peer") is None for r in doc["summary"]["headline"])
    for page in [report / "report.html", *report.glob("report.md")]:
        text = page.read_text()
        assert EMULATED_NOTE in text and "faster" not in text.lower() and "×" not in text, page

    # 4. bundle the built artifact
    archive = tmp_path / "v1-arm64-bundle.tar.gz"
    try:
        bundle(art, python="3.11", out=archive, log=quiet)
    except BundleError as e:
        if "pip download" in str(e) and not pypi_reachable():
            pytest.skip(f"aarch64 wheels for Python 3.11 are not cached and PyPI is unreachable: {e}")
        raise
    lap("bundle")

    # 5. install offline into a fresh folder with the emulated arm64 Python (which has no pip)
    board_dir = tmp_path / "board"
    with tarfile.open(archive) as tar:
        tar.extractall(board_dir, filter="tar")
    (top,) = board_dir.iterdir()
    wheels = {p.name.split("-")[0] for p in (top / "wheels").glob("*.whl")}
    assert wheels >= {"apache_tvm", "apache_tvm_ffi", "numpy", "mbn_codegen", "pip", "cloudpickle", "psutil"}, wheels
    assert all("x86_64" not in p.name for p in (top / "wheels").iterdir())
    py = _emulated_python(tmp_path)
    env = _board_env(PYTHON=str(py), PIP_NO_COMPILE="1")    # byte-compiling under emulation: minutes
    site = tmp_path / "fresh-site"
    r = subprocess.run(["sh", str(top / "install.sh"), "--site", str(site)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "self-check: ok on aarch64" in r.stdout
    assert (site / "tvm" / "lib" / "libtvm_runtime.so").is_file() and not (site / "torch").exists()
    lap("install")

    # 6. the installed runtime on inputs that change the output, against ONNX Runtime on the host
    installed = top / "artifact" / art.name
    xs = distinct_inputs((1, 3, 32, 32), n=3, seed=7)
    np.save(tmp_path / "xs.npy", np.concatenate(xs))
    (tmp_path / "board_run.py").write_text(BOARD_RUN)
    r = subprocess.run([str(py), str(tmp_path / "board_run.py"), str(installed), str(tmp_path / "xs.npy"),
                        str(tmp_path / "ys.npy")], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                       env={**env, "PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert Path(info["pkg"]).is_relative_to(site), info["pkg"]               # the bundle's wheel, not this checkout
    assert info["arch"] == "aarch64" and info["selfcheck"]["ok"], info
    ys = iter(np.load(tmp_path / "ys.npy"))
    worst = check_correctness(lambda x: next(ys), installed / "model.onnx", xs)
    lap("run installed")
    print(f"steps (s): {seconds}; installed runtime vs ONNX Runtime: max abs err {worst:.2e}")
