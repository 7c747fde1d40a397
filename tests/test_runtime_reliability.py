"""Runtime reliability (mbn_codegen.runtime): one Model shared by threads, memory and temp files
released across loads, non-finite input, malformed artifacts, read-only inputs, predict's k and
a self-check tolerance that scales with the reference output.

Whatever could crash the interpreter (threads, hundreds of loads, reloading a rebuilt library)
runs in a subprocess, so a segfault fails the test instead of killing pytest.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest

from helpers import copy_artifact as _copy, edit_manifest as _edit_manifest
from mbn_codegen.build import BuildConfig, build
from mbn_codegen.errors import (ArtifactError, InputValueError, MbnError, NonFiniteInputError,
                                NonFiniteInputWarning, SelfCheckError)
from mbn_codegen.runtime import MANIFEST, load, sha256

ALPHA, RES = 0.25, 32
REPO = Path(__file__).resolve().parents[1]


def _build(out: Path, seed: int = 0) -> Path:
    return build(BuildConfig(model="mobilenet_v1", alpha=ALPHA, resolution=RES, target="x86_64",
                             seed=seed, out=str(out)), log=lambda s: None)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("rel") / "v1-seed0")


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory) -> Path:
    """The same model built again with other weights: another lib.so of the same shape."""
    return _build(tmp_path_factory.mktemp("rel") / "v1-seed1", seed=1)


@pytest.fixture(scope="module")
def model(artifact):
    return load(artifact)


def _run_py(code: str, *args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=e)


def _result(p: subprocess.CompletedProcess) -> dict:
    tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-20:])
    assert p.returncode == 0, f"subprocess exited with {p.returncode} (-11 = SIGSEGV):\n{tail}"
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# 1. One Model called from several threads.

THREADS_PROBE = textwrap.dedent("""
    import json, sys, threading, numpy as np
    from mbn_codegen.runtime import load
    m = load(sys.argv[1])
    n_threads, calls = int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(m.input_shape).astype(np.float32) for _ in range(n_threads)]
    want = [m(x) for x in xs]                 # single-threaded outputs, one distinct input per thread
    mismatches, errors = [0], []
    def work(i):
        try:
            for _ in range(calls):
                if not np.array_equal(m(xs[i]), want[i]):
                    mismatches[0] += 1
        except BaseException as e:
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")
    ts = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in ts: t.start()
    for t in ts: t.join()
    print(json.dumps({"mismatches": mismatches[0], "errors": errors}))
""")


@pytest.mark.parametrize("n_threads", [2, 4])
def test_one_model_many_threads(artifact, n_threads):
    calls = 40
    r = _result(_run_py(THREADS_PROBE, str(artifact), str(n_threads), str(calls)))
    assert r["errors"] == [], f"calls from {n_threads} threads raised: {r['errors'][:3]}"
    assert r["mismatches"] == 0, f"{r['mismatches']} of {n_threads * calls} outputs differ from single-threaded"


# ---------------------------------------------------------------------------------------------
# 2. Loading and unloading release memory and the temporary library copies.

MEMORY_PROBE = textwrap.dedent("""
    import gc, json, sys, numpy as np, psutil
    from mbn_codegen.runtime import load
    d = sys.argv[1]
    proc = psutil.Process()
    def rss_mib():
        gc.collect()
        return proc.memory_info().rss / 2**20
    def lib_mapped():
        return any(d in line for line in open("/proc/self/maps"))
    x = np.load(d + "/reference_input.npy")
    want = load(d).run(x)
    out = {}
    for i in range(1, 201):
        m = load(d)
        assert np.array_equal(m.run(x), want)
        del m                                 # freed by reference counting: no gc.collect here
        if i == 20:
            out["rss_20"] = rss_mib()
    out["rss_200"] = rss_mib()
    out["mapped_after_del"] = lib_mapped()
    kept = [load(d) for _ in range(10)]
    out["rss_keep_10"] = rss_mib()
    kept += [load(d) for _ in range(90)]
    out["rss_keep_100"] = rss_mib()
    out["same_output"] = all(np.array_equal(k.run(x), want) for k in kept[::10])
    out["mapped_while_kept"] = lib_mapped()
    del kept
    out["mapped_after_del_kept"] = lib_mapped()
    print(json.dumps(out))
""")


def test_load_unload_releases_memory(artifact):
    r = _result(_run_py(MEMORY_PROBE, str(artifact)))
    grow = r["rss_200"] - r["rss_20"]
    assert grow < 20, f"RSS grew {grow:.1f} MiB over 180 load()/del cycles ({grow / 180:.2f} MiB per load)"
    keep = r["rss_keep_100"] - r["rss_keep_10"]
    assert keep < 20, f"90 more live Models of one artifact took {keep:.1f} MiB: each loaded its own weights"
    assert r["same_output"] and r["mapped_while_kept"]
    assert not r["mapped_after_del"] and not r["mapped_after_del_kept"], "lib.so stays mapped after the last Model is gone"


RELOAD_PROBE = textwrap.dedent("""
    import json, os, shutil, sys, tempfile, numpy as np
    from mbn_codegen.runtime import load
    a, b, path = sys.argv[1:4]
    xa, xb = np.load(a + "/reference_input.npy"), np.load(b + "/reference_input.npy")
    ref_a, ref_b = np.load(a + "/reference_output.npy"), np.load(b + "/reference_output.npy")
    def replace(src):                          # what `mbn-codegen build` does to an existing --out
        shutil.rmtree(path, ignore_errors=True)
        shutil.copytree(src, path)
    def err(got, ref):
        return float(np.abs(got - ref).max() / np.abs(ref).max())
    replace(a)
    m1 = load(path)
    replace(b)
    m2 = load(path)                            # m1 still holds the old lib.so at the same path
    out = {"selfcheck_2": m2.selfcheck()["ok"], "tmp": tempfile.gettempdir()}
    replace(a)
    m3 = load(path)
    out.update(err_1a=err(m1(xa), ref_a), err_2b=err(m2(xb), ref_b), err_3a=err(m3(xa), ref_a),
               err_2a=err(m2(xa), ref_a))
    del m1, m2, m3
    for src in (b, a, b):                      # nothing alive: every reload loads the new file
        replace(src)
        m = load(path)
        out.setdefault("later", []).append(m.selfcheck()["ok"])
        del m
    out["left"] = sorted(os.listdir(tempfile.gettempdir()))
    print(json.dumps(out))
""")


def test_reload_rebuilt_artifact(artifact, rebuilt, tmp_path):
    assert sha256(artifact / "lib.so") != sha256(rebuilt / "lib.so")
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    r = _result(_run_py(RELOAD_PROBE, str(artifact), str(rebuilt), str(tmp_path / "out"),
                        env={"TMPDIR": str(tmp)}))
    assert r["tmp"] == str(tmp)
    # each Model runs the library that was at the path when it was loaded, not a stale one
    assert r["err_1a"] < 1e-3 and r["err_2b"] < 1e-3 and r["err_3a"] < 1e-3, r
    assert r["err_2a"] > 0.1, r                 # the two libraries really compute different things
    assert r["selfcheck_2"] and r["later"] == [True, True, True]
    assert [f for f in r["left"] if f.startswith("mbn-")] == [], f"temporary copies left behind: {r['left']}"


# ---------------------------------------------------------------------------------------------
# 3. Non-finite input.

def _poisoned(model, kind: str) -> np.ndarray:
    x = np.load(model.dir / "reference_input.npy")
    if kind == "all-nan":
        return np.full_like(x, np.nan)
    x = x.copy()
    x[0, 1, 5, 7] = {"nan": np.nan, "+inf": np.inf, "-inf": -np.inf}[kind]
    return x


@pytest.mark.parametrize("kind", ["nan", "+inf", "-inf", "all-nan"])
@pytest.mark.parametrize("call", ["run", "__call__", "predict"])
def test_nonfinite_input_is_refused(model, kind, call):
    x = _poisoned(model, kind)
    with pytest.raises(NonFiniteInputError) as e:
        getattr(model, call)(x)
    msg = str(e.value)
    n = x.size if kind == "all-nan" else 1
    assert isinstance(e.value, InputValueError) and isinstance(e.value, MbnError)
    assert f"{n} of its {x.size} values are not finite" in msg
    assert (f"{n} NaN" if "nan" in kind else f"1 {kind}") in msg
    assert ("(0, 0, 0, 0)" if kind == "all-nan" else "(0, 1, 5, 7)") in msg
    assert "check_finite=False" in msg and "nan_to_num" in msg


def test_nonfinite_opt_out_warns_once(artifact, model):
    x = _poisoned(model, "nan")
    for m, kw in ((load(artifact, check_finite=False), {}), (load(artifact), {"check_finite": False})):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            y1 = m.run(x, **kw)
            y2 = m(_poisoned(model, "all-nan"), **kw)
            m.predict(x, k=3, **kw)
        got = [str(i.message) for i in w if issubclass(i.category, NonFiniteInputWarning)]
        assert len(got) == 1, got
        assert "ieee-maxnum" in got[0] and "NaN-preserving" in got[0]
        # the documented limitation: this artifact's max/min activations drop NaN
        assert np.isfinite(y1).all() and np.isfinite(y2).all()
    with pytest.raises(NonFiniteInputError):       # the per-call flag also turns it back on
        load(artifact, check_finite=False).run(x, check_finite=True)


def test_nonfinite_propagate_manifest_runs_without_check(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    _edit_manifest(d, lambda m: m.update(nan_semantics="propagate"))
    m = load(d)
    assert m.nan_semantics == "propagate" and m.check_finite is False
    x = _poisoned(m, "nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # no NonFiniteInputWarning: this is the natural mode
        assert m.run(x).shape == m.output_shape
    with pytest.raises(NonFiniteInputError):
        m.run(x, check_finite=True)
    with pytest.raises(NonFiniteInputError):
        load(d, check_finite=True).run(x)


def test_unknown_nan_semantics(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    _edit_manifest(d, lambda m: m.update(nan_semantics="sometimes"))
    with pytest.raises(ArtifactError, match="nan_semantics") as e:
        load(d)
    assert "rebuild" in str(e.value)


# ---------------------------------------------------------------------------------------------
# 4. Malformed artifacts: ArtifactError naming the file and the item, and saying to rebuild or copy.

def _assert_artifact_error(e, *words):
    msg = str(e.value)
    assert type(e.value) is ArtifactError
    for w in words:
        assert w in msg, (w, msg)
    assert "rebuild" in msg or "copy" in msg, msg


@pytest.mark.parametrize("content", ["[]", '"manifest"', "null", "3"])
def test_manifest_not_an_object(artifact, tmp_path, content):
    d = _copy(artifact, tmp_path)
    (d / MANIFEST).write_text(content)
    with pytest.raises(ArtifactError) as e:
        load(d)
    _assert_artifact_error(e, MANIFEST, "not an object")


@pytest.mark.parametrize("key", ["format", "arch", "device", "target", "target.name",
                                 "target.required_cpu_flags", "library", "library.file",
                                 "library.sha256", "input", "input.name", "input.shape",
                                 "input.dtype", "output", "output.shape", "reference",
                                 "reference.input", "reference.output"])
def test_manifest_missing_key(artifact, tmp_path, key):
    d = _copy(artifact, tmp_path)

    def drop(m):
        *parents, last = key.split(".")
        node = m
        for p in parents:
            node = node[p]
        del node[last]
    _edit_manifest(d, drop)
    with pytest.raises(ArtifactError) as e:
        load(d)
    _assert_artifact_error(e, MANIFEST, f"lacks the key {key!r}" if "." in key else repr(key))


@pytest.mark.parametrize("key,value", [("input.shape", "1x3x32x32"), ("input.shape", [1, 3, 0, 32]),
                                       ("input.dtype", "float128x"), ("output.shape", None),
                                       ("library.sha256", 12), ("device", "tpu"), ("format", "1"),
                                       ("target.required_cpu_flags", "avx2"), ("target", ["x86_64"]),
                                       ("labels_file", 5)])
def test_manifest_wrong_type(artifact, tmp_path, key, value):
    d = _copy(artifact, tmp_path)

    def put(m):
        *parents, last = key.split(".")
        node = m
        for p in parents:
            node = node[p]
        node[last] = value
    _edit_manifest(d, put)
    with pytest.raises(ArtifactError) as e:
        load(d)
    _assert_artifact_error(e, MANIFEST, repr(key) if key != "target" else "'target'")


def test_labels_file_missing(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    (d / "labels.txt").unlink()
    with pytest.raises(ArtifactError) as e:
        load(d)
    _assert_artifact_error(e, "labels.txt", "missing")


def test_labels_file_too_short(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    (d / "labels.txt").write_text("tench\ngoldfish\n")
    with pytest.raises(ArtifactError) as e:
        load(d)
    _assert_artifact_error(e, "labels.txt", "2 lines", "1000 classes")


@pytest.mark.parametrize("which", ["input", "output"])
def test_reference_file_missing_fails_only_selfcheck(artifact, tmp_path, which):
    d = _copy(artifact, tmp_path)
    x = np.load(d / "reference_input.npy")
    (d / f"reference_{which}.npy").unlink()
    m = load(d)                                     # loads and runs without the reference pair
    assert m.run(x).shape == m.output_shape
    with pytest.raises(ArtifactError) as e:
        m.selfcheck()
    _assert_artifact_error(e, f"reference_{which}.npy", f"reference.{which}", "missing")


def test_reference_output_wrong_shape(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    np.save(d / "reference_output.npy", np.zeros((1, 10), np.float32))
    with pytest.raises(ArtifactError) as e:
        load(d).selfcheck()
    _assert_artifact_error(e, "reference_output.npy", "(1, 10)", "(1, 1000)")


def test_reference_output_not_npy(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    (d / "reference_output.npy").write_bytes(b"not a numpy file")
    with pytest.raises(ArtifactError) as e:
        load(d).selfcheck()
    _assert_artifact_error(e, "reference_output.npy", "cannot read")


# ---------------------------------------------------------------------------------------------
# 5. Read-only inputs (np.load(mmap_mode="r"), broadcasts) are copied, not refused by DLPack.

def test_readonly_memmap_input(model):
    path = model.dir / "reference_input.npy"
    x = np.load(path)
    xm = np.load(path, mmap_mode="r")
    assert not xm.flags.writeable
    np.testing.assert_array_equal(model.run(xm), model.run(x))
    np.testing.assert_array_equal(model(xm), model.run(x))
    assert model.predict(xm, k=3) == model.predict(x, k=3)


def test_readonly_broadcast_input(model):
    row = np.linspace(-1, 1, model.input_shape[-1], dtype=np.float32)
    xb = np.broadcast_to(row, model.input_shape)
    assert not xb.flags.writeable
    np.testing.assert_array_equal(model.run(xb), model.run(np.ascontiguousarray(xb)))


# ---------------------------------------------------------------------------------------------
# 6. predict(k) takes an integer from 1 to the number of classes.

@pytest.mark.parametrize("k", [-1, 0, 1001, 2.0, "5", True, None])
def test_predict_bad_k(model, k):
    x = np.load(model.dir / "reference_input.npy")
    with pytest.raises(InputValueError) as e:
        model.predict(x, k=k)
    assert "from 1 to 1000" in str(e.value) and repr(k) in str(e.value)


def test_predict_k_bounds(model):
    x = np.load(model.dir / "reference_input.npy")
    logits = model.run(x)[0]
    assert len(model.predict(x, k=1000)) == 1000
    top = model.predict(x, k=np.int64(3))
    assert [i for i, _, _ in top] == list(np.argsort(-logits, kind="stable")[:3])


# ---------------------------------------------------------------------------------------------
# 7. The self-check tolerance scales with the reference output and reports its margin.

def test_selfcheck_reports_margin(model):
    r = model.selfcheck()
    want = np.load(model.dir / "reference_output.npy").astype(np.float64)
    got = model.run(np.load(model.dir / "reference_input.npy")).astype(np.float64)
    err = np.abs(got - want)
    assert r["ok"] and 0 <= r["margin"] < 1
    assert r["atol"] == pytest.approx(1e-3 * np.abs(want).max()) and r["rtol"] == 1e-3
    assert r["margin_elementwise"] == pytest.approx(np.max(err / (r["atol"] + r["rtol"] * np.abs(want))))
    assert r["margin_std"] == pytest.approx(err.max() / (r["std_tol"] * want.std()))
    assert r["margin"] == max(r["margin_elementwise"], r["margin_std"])


def test_selfcheck_fails_on_shift_of_5_percent_of_spread(artifact, tmp_path):
    d = _copy(artifact, tmp_path)
    ref = np.load(d / "reference_output.npy")
    shift = 0.05 * float(np.ptp(ref))
    np.save(d / "reference_output.npy", (ref + shift).astype(ref.dtype))
    m = load(d)
    with pytest.raises(SelfCheckError) as e:
        m.selfcheck()
    msg = str(e.value)
    assert "x the tolerance" in msg and "std(ref)" in msg
    margin = float(msg.split(" is ")[1].split("x the tolerance")[0])
    assert margin > 1
    # explicit arguments are honoured: loose enough, the same shift passes
    r = m.selfcheck(atol=2 * shift, std_tol=1.0)
    assert r["ok"] and r["atol"] == 2 * shift and r["margin"] < 1


def test_selfcheck_ignores_loose_manifest_tolerance(artifact, tmp_path):
    """Older manifests carry reference.atol >= 1e-3 (floored at 1): not a default any more."""
    d = _copy(artifact, tmp_path)
    ref = np.load(d / "reference_output.npy")
    _edit_manifest(d, lambda m: m["reference"].update(rtol=0.5, atol=10 * float(np.abs(ref).max())))
    np.save(d / "reference_output.npy", (ref + 0.05 * float(np.ptp(ref))).astype(ref.dtype))
    with pytest.raises(SelfCheckError):
        load(d).selfcheck()
