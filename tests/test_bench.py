"""The benchmark report on a tiny model with few repetitions: schema, the measured peak and its
hot loop, per-layer work counted from the ONNX graph, isolation of identical builds, interruption,
and what a browser shows."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mbn_codegen.bench import BenchConfig, run_bench
from mbn_codegen.bench.results import load, validate

ALPHA, RES = 0.25, 64
VARIANTS = ["stock", "ours-tuned", "pytorch", "onnxruntime"]
QUIET = dict(log=lambda s: None)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(alpha=ALPHA, resolution=RES, threads=[1, 2], variants=VARIANTS,
                      database=str(base / "no-such-db"), rounds=3, reps=3, warmup=1, layer_rounds=2,
                      quick_peak=True, out=str(base / "report"))
    return run_bench(cfg, **QUIET)


@pytest.fixture(scope="module")
def doc(report) -> dict:
    return load(report)


def test_report_files_and_schema(report, doc):
    assert doc["status"] == "complete"
    for f in ("report.html", "e2e.png", "layers-1.png", "roofline-1.png", "roofline-2.png"):
        assert (report / f).is_file(), f
    assert validate(doc) == []
    broken = json.loads(json.dumps(doc))
    broken["e2e"][0]["samples_ms"].append(-1.0)
    del broken["layers"][0]["consistency"]
    broken["peak"][0]["fma_gflops"] = 0
    errs = validate(broken)
    assert "layers/0: 'consistency' is a required property" in errs, errs
    assert any(e.startswith("e2e/0/samples_ms/") and "minimum" in e for e in errs), errs
    assert any(e.startswith("peak/0/fma_gflops:") for e in errs) and len(errs) == 3, errs


def test_every_requested_variant_is_accounted_for(doc):
    assert [v["name"] for v in doc["variants"]] == VARIANTS
    st = {v["name"]: v for v in doc["variants"]}
    assert st["ours-tuned"]["status"] == "unavailable" and "no database at" in st["ours-tuned"]["note"]
    assert all(st[n]["status"] == "ok" for n in ("stock", "pytorch", "onnxruntime"))


def test_end_to_end_samples_checks_and_noise(doc):
    c = doc["config"]
    assert {(e["variant"], e["threads"]) for e in doc["e2e"]} == {(n, t) for n in ("stock", "pytorch", "onnxruntime")
                                                                 for t in (1, 2)}
    for e in doc["e2e"]:
        assert len(e["samples_ms"]) == c["rounds"] * c["reps"] and len(e["block_medians_ms"]) == c["rounds"]
        s = e["stats"]
        assert 0 < s["p10"] <= s["median"] <= s["p90"] and s["ci95"][0] <= s["median"] <= s["ci95"][1]
        assert e["noise"] >= 0
    for v in doc["variants"]:
        assert all(ch["ok"] for ch in v["checks"]) and len(v["checks"]) == (2 if v["status"] == "ok" else 0)
    head = [r for r in doc["summary"]["headline"] if r["variant"] == "stock"]
    assert [r["vs_stock"] for r in head] == [pytest.approx(1.0)] * 2
    assert {f["blocks"] for f in doc["isolation"]["fence"].values()} == {3 * 3}


def test_peak_is_a_register_resident_fma_loop(doc):
    assert [p["threads"] for p in doc["peak"]] == [1, 2]
    for p in doc["peak"]:
        chk = p["asm_check"]
        assert chk["ok"], chk
        assert chk["fmas_in_loop"] >= 12 and all(r.startswith("ymm") for r in chk["registers"]), chk
        assert p["ridge_flop_per_byte"] == pytest.approx(p["fma_gflops"] / p["triad_gbs"])


def test_hot_loop_check_rejects_memory_operands_and_spills():
    from mbn_codegen.bench.peak import hot_loop_check

    fma = [f"\tvfmadd213ps\t%ymm13, %ymm12, %ymm{i}" for i in range(12)]
    def loop(body):
        return "\n".join([".LBB0_5:", *body, "\taddl\t$-1, %ecx", "\tjne\t.LBB0_5", ".LBB0_6:", "\tret"])
    assert hot_loop_check(loop(fma))["ok"]
    assert not hot_loop_check(loop(fma[:-1] + ["\tvfmadd213ps\t(%rax), %ymm12, %ymm11"]))["ok"]
    assert not hot_loop_check(loop(fma + ["\tvmovups\t%ymm0, 32(%rsp)"]))["ok"]
    assert not hot_loop_check(loop(fma[:6]))["ok"]


def test_percent_of_peak_never_exceeds_100(report):
    from mbn_codegen.bench.report import pct_of_peak

    assert pct_of_peak(50.0, {"fma_gflops": 100.0}) == "50.0%"
    assert pct_of_peak(120.0, {"fma_gflops": 100.0}) == "above peak: peak wrong"
    page = (report / "report.html").read_text()
    layers = page[page.index("<h2>Per layer"):page.index("<h2>Machine peak")]
    pcts = [float(x) for x in re.findall(r"<td>(\d+(?:\.\d+)?)%</td>", layers)]
    assert pcts and max(pcts) <= 100.0
    assert "machine peak (FMA loop):" in page and "GFLOP/s at 2 threads" in page


def test_per_layer_work_comes_from_the_onnx_graph(doc):
    from mbn_codegen.cost import cost_model

    cost = [l for l in cost_model(ALPHA, RES).to_dict()["layers"] if l["kind"] != "pool"]
    assert [(l["name"], l["mult_adds"]) for l in doc["model"]["layers"]] == [(l["name"], l["mult_adds"]) for l in cost]
    assert {(e["variant"], e["threads"]) for e in doc["layers"]} == {(v, t) for v in ("stock", "onnxruntime")
                                                                      for t in (1, 2)}
    for e in doc["layers"]:                    # ours by the VM hook, ONNX Runtime by its own profiler
        assert all(c["median_ms"] > 0 for c in e["calls"] if c["layer"])
        assert e["mapping_problem"] is None
        assert [c["layer"] for c in e["calls"] if c["layer"]] == [l["name"] for l in cost]
        assert sum(c["mult_adds"] or 0 for c in e["calls"]) == doc["model"]["mult_adds"]
        cons = e["consistency"]
        assert cons["kernel_sum_ms"] == pytest.approx(sum(c["median_ms"] for c in e["calls"]))
        assert cons["unattributed_ms"] == pytest.approx(cons["e2e_ms"] - cons["kernel_sum_ms"])
    assert "overhead: end to end − sum of kernels" in (Path(doc["config"]["out"]) / "report.html").read_text()


def test_onnx_model_is_named_and_counted_from_its_graph(report, doc, tmp_path):
    onnx = tmp_path / "my_net.onnx"
    shutil.copyfile(report / "model" / "model.onnx", onnx)
    out = run_bench(BenchConfig(onnx=str(onnx), threads=[1], variants=["pytorch", "onnxruntime"],
                                artifacts={"prebuilt": str(report / "builds" / "stock")}, rounds=1, reps=1,
                                warmup=0, layer_rounds=1, peak=False, out=str(tmp_path / "r")), **QUIET)
    d = load(out)
    assert d["model"]["name"] == "my_net.onnx" and d["model"]["weights"] == "from the ONNX file"
    assert d["model"]["mult_adds"] == doc["model"]["mult_adds"]
    assert next(v for v in d["variants"] if v["name"] == "pytorch")["status"] == "unavailable"
    calls = d["layers"][0]["calls"]
    compute = [c for c in calls if c["kind"] in ("conv", "depthwise", "pointwise", "dense")]
    assert len(compute) == 28 and all(c["mult_adds"] for c in compute)
    page = (out / "report.html").read_text()
    assert "<h1>Benchmark: my_net.onnx on" in page and "weights: random" not in page and "alpha=1" not in page


def test_identical_builds_agree_within_the_noise(report, tmp_path):
    """Two processes of the same library, interleaved, at 1 and 2 threads: a leftover spinning
    pool or an order effect would make one look slower than the other."""
    build = str(report / "builds" / "stock")
    out = run_bench(BenchConfig(alpha=ALPHA, resolution=RES, threads=[1, 2], variants=[],
                                artifacts={"a": build, "b": build}, rounds=8, reps=3, warmup=2, layers=False,
                                peak=False, out=str(tmp_path / "same")), **QUIET)
    d = load(out)
    for t in (1, 2):
        a, b = (next(e for e in d["e2e"] if e["variant"] == n and e["threads"] == t) for n in "ab")
        ratio = a["stats"]["median"] / b["stats"]["median"]
        tol = max(0.10, 3 * max(a["noise"], b["noise"]))
        assert abs(ratio - 1) <= tol, (t, ratio, a["noise"], b["noise"])


def _assert_real_png(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 200, path
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 8, f"{path} is (nearly) blank"


def test_every_plot_is_a_real_png_and_embedded(report):
    pngs = sorted(report.glob("*.png"))
    assert len(pngs) == 5
    for p in pngs:
        _assert_real_png(p)
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs) and ".png'" not in page


def test_cli_report_only(report, tmp_path):
    import argparse

    from mbn_codegen.cli import bench as cli

    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers(dest="command"))
    copy = tmp_path / "again"
    shutil.copytree(report, copy)
    (copy / "report.html").unlink()
    assert cli.main(p.parse_args(["bench", "--report-only", str(copy)])) == 0
    assert (copy / "report.html").read_text() == (report / "report.html").read_text()
    for bad in (["--threads", "0"], ["--variants", "stock,tensorrt"]):
        with pytest.raises(SystemExit):
            p.parse_args(["bench", *bad])


def test_interrupted_bench_keeps_what_it_measured(report, tmp_path):
    out = tmp_path / "partial"
    code = ("from mbn_codegen.bench import BenchConfig, run_bench\n"
            f"run_bench(BenchConfig(alpha={ALPHA}, resolution={RES}, threads=[1], variants=['onnxruntime'], "
            f"artifacts={{'prebuilt': {str(report / 'builds' / 'stock')!r}}}, rounds=100000, reps=5, "
            f"warmup=1, layers=False, peak=False, out={str(out)!r}), log=print)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            try:
                if sum(len(e["samples_ms"]) for e in json.loads((out / "results.json").read_text())["e2e"]) >= 40:
                    break
            except (OSError, json.JSONDecodeError, KeyError):
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.3)
        else:
            pytest.fail("the bench took no samples in time")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    d = load(out)
    assert d["status"] == "interrupted" and validate(d) == []
    assert {e["variant"] for e in d["e2e"] if e["samples_ms"]} == {"prebuilt", "onnxruntime"}
    assert "interrupted" in (out / "report.html").read_text()


def test_layer_mapping_reports_a_mismatch(doc):
    from mbn_codegen.bench.layers import map_to_layers

    kernels = [{"name": "c", "kind": "conv"}, {"name": "d", "kind": "depthwise"}, {"name": "p", "kind": "pointwise"},
               {"name": "mean", "kind": "other"}, {"name": "fc", "kind": "dense"}]
    call = lambda i, s: {"index": i, "symbol": s, "shapes": [[1]], "bytes": 4, "samples_ms": [1.0]}  # noqa: E731
    seq = ["c"] + ["d", "p"] * 13 + ["mean", "fc"]
    rows, problem = map_to_layers([call(i, s) for i, s in enumerate(seq)], kernels, doc["model"]["layers"])
    assert problem is None and [r["layer"] for r in rows if r["layer"]] == [l["name"] for l in doc["model"]["layers"]]
    assert rows[-2]["layer"] is None and rows[-2]["mult_adds"] is None
    swapped = [call(i, s) for i, s in enumerate(["c", "p"] + seq[2:])]
    rows, problem = map_to_layers(swapped, kernels, doc["model"]["layers"])
    assert problem == "kernel call #1 (p, pointwise) is not layer dw2 (dw)"


# --- the report in a browser (chromium comes with `make apt-deps`) -----------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-probe', JSON.stringify({tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('tr').length, images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length}));
});
</script>"""


def test_report_renders_in_headless_chromium(report, tmp_path):
    import html as _html

    assert CHROMIUM, "chromium is not installed: `make apt-deps`"
    page = tmp_path / "probe.html"
    page.write_text((report / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'ud'}", "--virtual-time-budget=10000",
                        "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    i = r.stdout.find('data-probe="')
    assert i >= 0, "the page's load handler did not run: " + r.stdout[:500]
    probe = json.loads(_html.unescape(r.stdout[i + 12:r.stdout.index('"', i + 12)]))
    assert probe["images"] == probe["decoded"] == 5, probe
    assert probe["tables"] >= 8 and probe["rows"] >= 80, probe
    for text in ("End to end", "Per layer", "Machine peak and isolation", "TVM stock (untuned)", "ONNX Runtime",
                 "conv1", "fc", "Only ratios within one interleaved run count"):
        assert text in r.stdout, text
