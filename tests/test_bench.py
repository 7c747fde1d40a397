"""The benchmark report (issue 4), on a tiny model with few repetitions. Timings are noisy, so no
number is asserted: structure, schema, consistency of per-layer and end-to-end times, real PNGs,
compare, interruption, and what a browser shows."""
from __future__ import annotations

import json
import os
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
VARIANTS = ["stock", "ours", "ours-tuned", "pytorch", "onnxruntime", "openvino"]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(alpha=ALPHA, resolution=RES, threads=[1], variants=VARIANTS,
                      database=str(base / "no-such-db"), rounds=2, reps=3, warmup=1, layer_rounds=3,
                      quick_peak=True, grid=True, grid_points=[(0.25, 32), (0.25, 64)],
                      grid_variants=["stock", "onnxruntime"], grid_rounds=1, grid_reps=1,
                      out=str(base / "report"))
    return run_bench(cfg, log=lambda s: None)


@pytest.fixture(scope="module")
def doc(report) -> dict:
    return load(report)


def _measured(doc):
    return [v for v in doc["variants"] if v["status"] == "ok"]


def test_report_files(report, doc):
    assert doc["status"] == "complete"
    for f in ("report.md", "report.html", "results.json", "e2e.png", "layers-1.png", "roofline-1.png", "grid.png"):
        assert (report / f).is_file(), f
    md = (report / "report.md").read_text()
    assert "## End to end" in md and "## Per layer" in md and "## Provenance" in md
    assert "vs stock" in md and "vs fastest peer" in md


def test_results_validate_against_schema(doc):
    assert validate(doc) == []
    broken = json.loads(json.dumps(doc))
    broken["e2e"][0]["samples_ms"].append(-1.0)
    del broken["layers"][0]["consistency"]
    errs = validate(broken)
    assert any("samples_ms" in e for e in errs) and any("consistency" in e for e in errs), errs


def test_every_requested_variant_is_accounted_for(doc):
    names = [v["name"] for v in doc["variants"]]
    assert names == VARIANTS
    for v in doc["variants"]:
        assert v["status"] in ("ok", "unavailable", "failed")
        if v["status"] != "ok":
            assert v["note"], v
    tuned = next(v for v in doc["variants"] if v["name"] == "ours-tuned")
    assert tuned["status"] == "unavailable"
    assert "no database at" in tuned["note"] or "not present" in tuned["note"] or "schedules" in tuned["note"]
    assert {"stock", "onnxruntime", "pytorch"} <= {v["name"] for v in _measured(doc)}


def test_end_to_end_samples_and_checks(doc):
    c = doc["config"]
    for v in _measured(doc):
        e = next(e for e in doc["e2e"] if e["variant"] == v["name"] and e["threads"] == 1)
        assert len(e["samples_ms"]) == c["rounds"] * c["reps"]
        s = e["stats"]
        assert 0 < s["p10"] <= s["median"] <= s["p90"] and s["ci95"][0] <= s["median"] <= s["ci95"][1]
        chk = v["checks"][0]
        assert chk["ok"], (v["name"], chk)          # same function as ONNX Runtime's
    head = [r for r in doc["summary"]["headline"] if r["variant"] == "stock"][0]
    assert head["vs_stock"] == pytest.approx(1.0)


def test_per_layer_maps_to_the_cost_model_and_adds_up(doc):
    layers = doc["model"]["cost_layers"]
    tvm = [v["name"] for v in _measured(doc) if v["kind"] == "tvm"]
    assert "stock" in tvm
    for e in doc["layers"]:
        assert e["mapping_problem"] is None, e["mapping_problem"]
        mapped = [c for c in e["calls"] if c["layer"]]
        assert [c["layer"] for c in mapped] == [l["name"] for l in layers]
        assert sum(c["mult_adds"] for c in mapped) == doc["model"]["mult_adds"]
        for c in mapped:                               # shapes recount the cost model independently
            if c["kind"] in ("conv", "depthwise", "pointwise", "dense") and c["mult_adds_from_shapes"]:
                assert c["mult_adds_from_shapes"] == c["mult_adds"], c
        cons = e["consistency"]
        assert cons["ok"], cons
        assert cons["kernel_sum_ms"] == pytest.approx(sum(c["median_ms"] for c in e["calls"]))
    assert {e["variant"] for e in doc["layers"]} == set(tvm)


def _assert_real_png(path: Path):
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 8_000, (path, len(data))
    with Image.open(path) as im:
        im.load()
        assert im.width > 300 and im.height > 200
        colours = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 8, f"{path} is (nearly) blank"


def test_every_plot_is_a_real_png_and_embedded(report):
    pngs = sorted(report.glob("*.png"))
    assert len(pngs) >= 4
    for p in pngs:
        _assert_real_png(p)
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(pngs)
    assert "src='e2e.png'" not in html          # self-contained: nothing fetched from disk


def test_grid(doc):
    pts = [g for g in doc["grid"] if g["stats"].get("n")]
    assert {(g["alpha"], g["resolution"]) for g in pts} == {(0.25, 32), (0.25, 64)}
    assert {g["variant"] for g in pts} == {"stock", "onnxruntime"}


def test_compare_two_reports(report, doc, tmp_path):
    b = tmp_path / "after"
    b.mkdir()
    faster = json.loads(json.dumps(doc))           # B: every stock kernel and the model 2x faster
    for e in faster["e2e"]:
        if e["variant"] == "stock":
            e["stats"]["median"] /= 2
    for e in faster["layers"]:
        if e["variant"] == "stock":
            for c in e["calls"]:
                c["median_ms"] /= 2
    (b / "results.json").write_text(json.dumps(faster))
    from mbn_codegen.bench.compare import compare

    r = compare(report, b, out=tmp_path / "cmp")
    stock = [x for x in r["e2e"] if x["variant"] == "stock"]
    assert stock and stock[0]["speedup"] == pytest.approx(2.0)
    lay = [x for x in r["layers"] if x["variant"] == "stock" and x["name"].startswith("pw")]
    assert lay and all(x["speedup"] == pytest.approx(2.0) for x in lay)
    assert "Per layer" in r["text"] and (tmp_path / "cmp" / "compare.md").is_file()
    _assert_real_png(tmp_path / "cmp" / "compare.png")


def test_cli_compare_and_report_only(report, tmp_path, capsys):
    import argparse

    from mbn_codegen.cli import bench as cli

    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers(dest="command"))
    assert cli.main(p.parse_args(["bench", "--compare", str(report), str(report), "--out", str(tmp_path)])) == 0
    assert "speedup" in capsys.readouterr().out
    copy = tmp_path / "again"
    shutil.copytree(report, copy)
    (copy / "report.html").unlink()
    assert cli.main(p.parse_args(["bench", "--report-only", str(copy)])) == 0
    assert (copy / "report.html").is_file()
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--threads", "0"])
    with pytest.raises(SystemExit):
        p.parse_args(["bench", "--variants", "stock,tensorrt"])


def test_interrupted_bench_keeps_what_it_measured(report, tmp_path):
    """SIGTERM mid-run: results.json says 'interrupted', holds the samples taken, still validates,
    and the report is written from them."""
    out = tmp_path / "partial"
    code = ("from mbn_codegen.bench import BenchConfig, run_bench\n"
            f"run_bench(BenchConfig(alpha={ALPHA}, resolution={RES}, threads=[1], variants=['onnxruntime'], "
            f"artifacts={{'prebuilt': {str(report / 'builds' / 'stock')!r}}}, rounds=100000, reps=5, "
            f"warmup=1, layers=False, quick_peak=True, out={str(out)!r}), log=print)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            try:
                d = json.loads((out / "results.json").read_text())
                if sum(len(e["samples_ms"]) for e in d["e2e"]) >= 40:
                    break
            except (OSError, json.JSONDecodeError, KeyError):
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        else:
            pytest.fail("the bench took no samples in time")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    d = load(out)
    assert d["status"] == "interrupted"
    assert validate(d) == []
    assert {e["variant"] for e in d["e2e"] if e["samples_ms"]} == {"prebuilt", "onnxruntime"}
    assert (out / "report.md").is_file() and "interrupted" in (out / "report.md").read_text()


# --- the report in a browser -----------------------------------------------------------------------

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-probe', JSON.stringify({
    tables: document.querySelectorAll('table').length,
    rows: document.querySelectorAll('tbody tr').length,
    images: imgs.length,
    decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length}));
});
</script>"""


def _chromium(args: list[str], user_dir: Path) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={user_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium "
                    "chromium-driver); the HTML report is rendered in a headless browser only where it is")
def test_report_renders_in_headless_chromium(report, tmp_path):
    import html as _html

    page = tmp_path / "probe.html"
    page.write_text((report / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    r = _chromium(["--virtual-time-budget=10000", "--dump-dom", page.as_uri()], tmp_path / "ud1")
    assert r.returncode == 0, r.stderr[-2000:]
    i = r.stdout.find('data-probe="')
    assert i >= 0, "the page's load handler did not run: " + r.stdout[:500]
    probe = json.loads(_html.unescape(r.stdout[i + 12:r.stdout.index('"', i + 12)]))
    n_png = len(list(report.glob("*.png")))
    assert probe["images"] == n_png and probe["decoded"] == n_png, probe
    assert probe["tables"] >= 5 and probe["rows"] >= 40, probe
    for text in ("End to end", "Per layer", "Provenance", "TVM stock (untuned)", "ONNX Runtime", "conv1", "fc"):
        assert text in r.stdout, text
    shot = tmp_path / "shot.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1280,2000", "--hide-scrollbars",
                   (report / "report.html").as_uri()], tmp_path / "ud2")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    _assert_real_png(shot)
    if os.environ.get("MBN_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["MBN_KEEP_SCREENSHOT"])


# --- units: no measuring ----------------------------------------------------------------------------

def test_variants_feature_detection(monkeypatch, tmp_path):
    from mbn_codegen.bench import variants

    monkeypatch.setattr(variants, "build_config_fields", lambda: {"model", "alpha", "database"})
    vs = variants.resolve(["stock", "ours", "ours-tuned"], {"model": "mobilenet_v1"}, "x86_64")
    assert vs[0].ok and "schedules" not in vs[0].build_kwargs
    assert not vs[1].ok and "schedules" in vs[1].note and not vs[2].ok
    monkeypatch.setattr(variants, "build_config_fields", lambda: {"model", "schedules", "database"})
    vs = variants.resolve(["ours-tuned", "metaschedule"], {}, "x86_64", database=str(tmp_path / "nope"),
                          ms_database=str(tmp_path / "nope2"))
    for v in vs:
        assert not v.ok and (f"no database at {tmp_path}" in v.note or "not present" in v.note)
    (tmp_path / "db").mkdir()
    v, = variants.resolve(["ours-tuned"], {"alpha": 1.0}, "x86_64", database=str(tmp_path / "db"))
    if v.ok:
        assert v.build_kwargs == {"alpha": 1.0, "schedules": "ours", "database": str(tmp_path / "db")}


def test_layer_mapping_reports_a_mismatch():
    from mbn_codegen.bench.layers import map_to_layers
    from mbn_codegen.cost import cost_model

    cost = cost_model(0.25, 64).to_dict()["layers"]
    call = lambda i, s: {"index": i, "symbol": s, "shapes": [[1]], "bytes": 4, "samples_ms": [1.0]}  # noqa: E731
    kinds = {"c": "conv", "d": "depthwise", "p": "pointwise", "mean": "other", "fc": "dense", "r": "other"}
    seq = ["c"] + ["d", "p"] * 13 + ["mean", "r", "fc"]
    rows, problem = map_to_layers([call(i, s) for i, s in enumerate(seq)], kinds, cost)
    assert problem is None and [r["layer"] for r in rows if r["layer"]] == [l["name"] for l in cost]
    assert rows[-2]["layer"] is None                      # the reshape belongs to no layer
    rows, problem = map_to_layers([call(i, s) for i, s in enumerate(["c", "p"])], kinds, cost)
    assert problem and "does not match" in problem
