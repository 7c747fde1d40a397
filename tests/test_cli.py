"""The `mbn-codegen` command line: cost, targets, build (with --dump-ir), run, and error exits.

Commands that execute a compiled library (`run`) go through the console script in a subprocess,
so that a native crash shows up as a failed test rather than killing pytest.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mbn_codegen import targets
from mbn_codegen.cli.main import main
from mbn_codegen.cost import cost_model

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--alpha", "0.25", "--resolution", "32"]


def _console_script() -> str:
    exe = Path(sys.executable).with_name("mbn-codegen")
    if exe.exists():
        return str(exe)
    found = shutil.which("mbn-codegen")
    if found is None:
        pytest.skip("the mbn-codegen console script is not installed (pip install -e .)")
    return found


def cli(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([_console_script(), *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def call(argv: list[str], capsys) -> tuple[int, str, str]:
    """main() in-process: (exit code, stdout, stderr). argparse errors exit via SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------------------------------------
# cost

def test_cost_table_total(capsys):
    rc, out, err = call(["cost", "--alpha", "0.5", "--resolution", "160"], capsys)
    assert rc == 0, err
    assert "alpha=0.5" in out and "resolution=160" in out
    m = re.search(r"^Total: ([0-9.]+)M mult-adds", out, re.M)
    assert m, out
    printed = float(m.group(1))
    exact = cost_model(0.5, 160).total_mult_adds
    assert printed == round(exact / 1e6, 2)
    # Table 9 prints 76M for 0.5 MobileNet-160; the exact count is 76.52M.
    assert 76.0 <= printed < 77.0 and printed == pytest.approx(76.52, abs=0.005)
    # one row per layer: 27 convolutions, pool, fc
    assert len(re.findall(r"^\s*\d+\s+(conv|dw|pw|pool|fc)\d*\s", out, re.M)) == 29


def test_cost_json(capsys):
    rc, out, err = call(["cost", "--alpha", "0.5", "--resolution", "160", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    report = cost_model(0.5, 160)
    assert d["total_mult_adds"] == report.total_mult_adds
    assert d["alpha"] == 0.5 and d["resolution"] == 160 and d["num_classes"] == 1000
    assert len(d["layers"]) == len(report.layers)
    assert sum(l["mult_adds"] for l in d["layers"]) == d["total_mult_adds"]


def test_cost_default_is_paper_model(capsys):
    rc, out, _ = call(["cost", "--json"], capsys)
    assert rc == 0
    assert json.loads(out)["total_mult_adds"] == cost_model(1.0, 224).total_mult_adds


@pytest.mark.parametrize("argv, words", [
    (["cost", "--alpha", "0"], ["--alpha", "(0, 1]"]),
    (["cost", "--alpha", "abc"], ["--alpha", "not a number"]),
    (["cost", "--resolution", "100"], ["--resolution", "multiple of 32"]),
])
def test_cost_bad_args(capsys, argv, words):
    rc, out, err = call(argv, capsys)
    assert rc == 2 and out == ""
    for w in words:
        assert w in err


def test_cost_bad_num_classes(capsys):
    rc, out, err = call(["cost", "--num-classes", "0"], capsys)
    assert rc == 2
    assert "ModelConfigError" in err and "num_classes=0" in err


# ---------------------------------------------------------------------------------------------
# targets

def test_targets_lists_every_target(capsys):
    rc, out, _ = call(["targets"], capsys)
    assert rc == 0
    listed = {line.split()[0] for line in out.splitlines()[1:] if line.strip() and not line.startswith("(")}
    assert listed == set(targets.names())
    assert "aarch64-linux-gnu-g++" in out


def test_targets_json(capsys):
    rc, out, _ = call(["targets", "--json"], capsys)
    assert rc == 0
    assert [t["name"] for t in json.loads(out)] == targets.names()


# ---------------------------------------------------------------------------------------------
# build: errors

def test_build_alpha_out_of_range(capsys, tmp_path):
    rc, out, err = call(["build", "--alpha", "1.5", "--resolution", "32", "--out", str(tmp_path / "a")],
                        capsys)
    assert rc == 2
    assert "--alpha" in err and "1.5" in err and "(0, 1]" in err
    assert not (tmp_path / "a").exists()


def test_build_resolution_not_multiple_of_32(capsys, tmp_path):
    rc, _, err = call(["build", "--alpha", "0.25", "--resolution", "100", "--out", str(tmp_path / "a")],
                      capsys)
    assert rc == 2 and "multiple of 32" in err


def test_build_unknown_target(capsys, tmp_path):
    rc, out, err = call(["build", *SMALL, "--target", "nope", "--out", str(tmp_path / "a")], capsys)
    assert rc == 2
    assert "UnknownTargetError" in err and "'nope'" in err
    for n in targets.names():
        assert n in err
    assert "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_build_bad_onnx(capsys, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    rc, _, err = call(["build", "--onnx", str(bad), "--out", str(tmp_path / "a")], capsys)
    assert rc == 2 and "OnnxModelError" in err and str(bad) in err


def test_build_missing_cross_compiler(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    rc, _, err = call(["build", *SMALL, "--target", "arm64", "--out", str(tmp_path / "a")], capsys)
    assert rc == 2
    assert "CrossCompilerMissingError" in err and "g++-aarch64-linux-gnu" in err


# ---------------------------------------------------------------------------------------------
# build for real, then run

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One in-process `mbn-codegen build --dump-ir` (its output captured by hand: capsys is
    function-scoped)."""
    import contextlib
    import io

    d = tmp_path_factory.mktemp("cli")
    out, ir = d / "artifact", d / "ir"
    so, se = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(se):
        rc = main(["build", *SMALL, "--out", str(out), "--dump-ir", str(ir)])
    return {"rc": rc, "out": out, "ir": ir, "stdout": so.getvalue(), "stderr": se.getvalue()}


def test_build_in_process(built):
    assert built["rc"] == 0, built["stderr"]
    out = built["out"]
    for f in ("manifest.json", "lib.so", "model.onnx", "reference_input.npy",
              "reference_output.npy", "labels.txt"):
        assert (out / f).is_file(), f
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["alpha"] == 0.25 and m["model"]["resolution"] == 32
    assert m["input"]["shape"] == [1, 3, 32, 32] and m["target"]["name"] == "x86_64"
    assert sorted(p.name for p in out.parent.iterdir()) == ["artifact", "ir"]      # no *.partial left
    assert f"wrote {out}" in built["stdout"]


def test_build_dump_ir_one_file_per_phase(built):
    from mbn_codegen.lower import PHASES

    assert built["rc"] == 0, built["stderr"]
    want = ["00-import.py"] + [f"{i:02d}-{name}.py" for i, (name, _) in enumerate(PHASES, start=1)]
    assert want[:2] == ["00-import.py", "01-fold-batchnorm.py"]
    assert want[-1] == f"{len(PHASES):02d}-schedule.py"
    assert sorted(p.name for p in built["ir"].iterdir()) == want
    for name in want:
        text = (built["ir"] / name).read_text()
        assert "def main" in text, name
    # torch's exporter folded BatchNorm into the convs already (constant folding)
    imported = (built["ir"] / "00-import.py").read_text()
    assert "conv2d" in imported and "batch_norm" not in imported
    # every phase is logged
    for name, _ in PHASES:
        assert f"phase {name}" in built["stdout"]


def test_build_console_script(tmp_path):
    out, ir = tmp_path / "artifact", tmp_path / "ir"
    p = cli("build", *SMALL, "--seed", "3", "--out", str(out), "--dump-ir", str(ir))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (out / "manifest.json").is_file() and (out / "lib.so").is_file()
    assert (ir / "00-import.py").is_file()
    assert f"wrote {out}" in p.stdout


def test_console_script_error_exit(tmp_path):
    p = cli("build", "--alpha", "1.5", "--out", str(tmp_path / "a"))
    assert p.returncode == 2 and "--alpha" in p.stderr and p.stdout == ""


def test_run_selfcheck(built):
    assert built["rc"] == 0, built["stderr"]
    p = cli("run", str(built["out"]))
    assert p.returncode == 0, (f"`mbn-codegen run` exited with {p.returncode} (-11 = SIGSEGV)\n"
                               + p.stdout[-1500:] + p.stderr[-1500:])
    assert "self-check: ok" in p.stdout


@pytest.fixture(scope="module")
def chelsea_png(tmp_path_factory) -> Path:
    from PIL import Image

    from mbn_codegen.images import sample_images

    path = tmp_path_factory.mktemp("img") / "chelsea.png"
    Image.fromarray(sample_images()["chelsea"]).save(path)
    return path


def test_run_image(built, chelsea_png):
    assert built["rc"] == 0, built["stderr"]
    labels = (built["out"] / "labels.txt").read_text().splitlines()
    p = cli("run", str(built["out"]), str(chelsea_png))
    assert p.returncode == 0, (f"`mbn-codegen run IMAGE` exited with {p.returncode} (-11 = SIGSEGV)\n"
                               + p.stdout[-1500:] + p.stderr[-1500:])
    lines = p.stdout.splitlines()
    assert lines[0].startswith("self-check: ok")
    assert lines[1] == str(chelsea_png)
    preds = lines[2:]
    assert len(preds) == 5, p.stdout
    probs = []
    for line in preds:
        m = re.fullmatch(r"\s+([0-9.]+)%\s+(\d+)\s+(.+)", line)
        assert m, line
        probs.append(float(m.group(1)))
        assert m.group(3) == labels[int(m.group(2))]
    assert probs == sorted(probs, reverse=True) and sum(probs) <= 100.0 + 0.05


def test_run_missing_artifact(tmp_path, capsys):
    rc, _, err = call(["run", str(tmp_path / "nope")], capsys)
    assert rc == 2 and "ArtifactError" in err and "mbn-codegen build" in err


def test_run_unreadable_image(built, tmp_path):
    """An image that PIL cannot read: an error message, not a traceback."""
    assert built["rc"] == 0, built["stderr"]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    p = cli("run", str(built["out"]), str(bad))
    assert p.returncode == 2, p.stdout + p.stderr
    assert str(bad) in p.stderr
    assert "Traceback" not in p.stderr, p.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# build: options and interrupts (the builds themselves: tests/test_build_reliability.py)

def test_build_options_parse():
    from mbn_codegen.cli.main import parser

    a = parser().parse_args(["build", "--propagate-nan", "--onnx", "m.onnx"])
    assert a.propagate_nan is True and a.resolution is None        # --onnx: the file's own size
    assert parser().parse_args(["build"]).propagate_nan is False
    assert parser().parse_args(["cost"]).resolution == 224


def test_build_and_tune_args_make_one_model_spec():
    from mbn_codegen.cli.common import model_spec
    from mbn_codegen.cli.main import parser
    from mbn_codegen.model_spec import ModelSpec

    args = ["--model", "mobilenet_v2", "--alpha", "0.5", "--resolution", "96", "--num-classes", "10"]
    b = parser().parse_args(["build", *args, "--weights", "w.pt", "--seed", "3"])
    assert model_spec(b) == ModelSpec("mobilenet_v2", 0.5, 96, 10, weights="w.pt", seed=3)
    t = parser().parse_args(["tune", *args])
    assert model_spec(t) == ModelSpec("mobilenet_v2", 0.5, 96, 10)
    # --onnx: no --resolution means the file's own (tune used to force 224)
    assert model_spec(parser().parse_args(["tune", "--onnx", "m.onnx"])) == ModelSpec(onnx="m.onnx")


def test_model_choices_come_from_the_registry(capsys):
    from mbn_codegen import models

    rc, _, err = call(["build", "--model", "resnet50"], capsys)
    assert rc == 2 and "invalid choice: 'resnet50'" in err
    for name in models.names():
        assert name in err


def test_demo_names_where_the_kernels_came_from(built):
    from mbn_codegen.demo import schedule_summary

    assert built["rc"] == 0, built["stderr"]
    kernels = json.loads((built["out"] / "manifest.json").read_text())["kernels"]
    n = len(kernels)
    ours = sum(k["source"].startswith("ours-default") for k in kernels)
    said = schedule_summary(kernels)
    assert ours > 0 and f"{ours} of {n} kernels our schedules with default knobs" in said
    assert "untuned TVM kernels" not in said and "tuned (tuning database)" not in said
    assert schedule_summary([{"source": "tuned"}] * 4) == "4 of 4 kernels tuned (tuning database)"
    mixed = schedule_summary([{"source": "tuned"}, {"source": "tvm-stock"}])
    assert mixed == ("1 of 2 kernels tuned (tuning database); 1 of 2 kernels TVM's stock untuned loops; "
                     "`make tune` tunes the other 1")


@pytest.mark.parametrize("exc", [RuntimeError(""), RuntimeError("Traceback ...\nKeyboardInterrupt")],
                         ids=["empty-message", "named"])
def test_interrupt_wrapped_by_tvm_exits_130(capsys, monkeypatch, exc):
    """TVM turns a KeyboardInterrupt raised in a Python callback into a RuntimeError (its text
    empty or naming KeyboardInterrupt); the CLI still reports an interrupt."""
    import signal

    import mbn_codegen.build as build_mod

    def fake_build(cfg, log=print):
        if not str(exc):
            try:
                signal.raise_signal(signal.SIGINT)       # the CLI's handler raises and remembers it
            except KeyboardInterrupt:
                pass
        raise exc

    monkeypatch.setattr(build_mod, "build", fake_build)
    # the CLI installs its handler only over Python's default one, as a fresh process has it;
    # an earlier test in this process may have left another
    prev = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        rc, _, err = call(["build", *SMALL], capsys)
    finally:
        signal.signal(signal.SIGINT, prev)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err


def test_other_runtime_errors_still_raise(monkeypatch, capsys):
    import mbn_codegen.build as build_mod

    def fake_build(cfg, log=print):
        raise RuntimeError("something else")

    monkeypatch.setattr(build_mod, "build", fake_build)
    with pytest.raises(RuntimeError, match="something else"):
        main(["build", *SMALL])
