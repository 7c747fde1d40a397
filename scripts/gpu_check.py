"""make gpu-check: on a machine with an NVIDIA GPU, build the `cuda` target for that GPU's arch with
our schedules and with dlight, run the gpu-marked tests, and time ours vs dlight vs TVM stock vs
PyTorch end to end (and ours vs dlight per kernel) on MobileNet v1. Writes JSON + Markdown under
benchmarks/results/gpu-<date>/. A step that fails is recorded in the report, not fatal.

--dry-run (or no GPU with --dry-run): build the artifacts for --arch, compute ONNX Runtime's outputs
for three distinct inputs (reference.npz), and stop. Without a GPU and without --dry-run: exit 3.
--prebuilt DIR: run a dry run's artifacts on a GPU machine that has only the runtime (numpy,
apache-tvm-ffi and the wheel's libtvm_runtime*.so; no TVM compiler, no onnx): each is checked
against reference.npz and timed; the gpu-marked tests, which compile, are not run. This is the
deployment path: build on the workstation, run on the GPU box. Uses only what is installed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def nvidia_smi() -> tuple[str, str | None, str | None]:
    """(nvidia-smi output, 'sm_90' from the first GPU's compute capability, driver CUDA version)."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi not found", None, None
    out = subprocess.run(["nvidia-smi"], capture_output=True, text=True).stdout
    q = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap,name", "--format=csv,noheader"],
                       capture_output=True, text=True)
    m = re.match(r"\s*(\d+)\.(\d+)", q.stdout or "")
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", out)
    return out + q.stdout, (f"sm_{m.group(1)}{m.group(2)}" if m else None), (cuda.group(1) if cuda else None)


def target_file(arch: str, out: Path) -> Path:
    """targets/cuda.toml with its arch replaced (an H200 or H100 is sm_90, an A100 sm_80, ...)."""
    text = (ROOT / "targets" / "cuda.toml").read_text()
    text = re.sub(r'(?m)^(cuda_arch|arch)\s*=\s*"sm_\d+[a-z]?"', lambda m: f'{m.group(1)} = "{arch}"', text)
    path = out / "cuda-here.toml"
    path.write_text(text)
    return path


class Report:
    def __init__(self, out: Path):
        self.out, self.doc, self.failures = out, {"steps": {}}, []

    def step(self, name: str, fn):
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            res = fn()
            self.doc["steps"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 1), "result": res}
            return res
        except BaseException as e:           # noqa: BLE001 - every failure goes into the report
            if isinstance(e, KeyboardInterrupt):
                raise
            msg = f"{type(e).__name__}: {e}"[:2000]
            print(f"   FAILED: {msg}", flush=True)
            self.doc["steps"][name] = {"ok": False, "seconds": round(time.perf_counter() - t0, 1), "error": msg,
                                       "traceback": traceback.format_exc()[-3000:]}
            self.failures.append(name)
            return None

    def save(self):
        (self.out / "gpu-check.json").write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        host = self.doc.get("host") or {}
        lines = [f"# gpu-check {self.doc.get('date')}", "", f"GPU: {self.doc.get('gpu', '?')}, arch "
                 f"{self.doc.get('arch')}, driver CUDA {self.doc.get('driver_cuda')}", "",
                 f"Host CPU: {host.get('cpu_model', '?')}, SIMD flags: {' '.join(host.get('simd_flags', []))}", ""]
        lines += ["| step | ok | s | note |", "|---|---|---|---|"]
        for k, v in self.doc["steps"].items():
            note = v.get("error", "") if not v["ok"] else ""
            lines.append(f"| {k} | {'yes' if v['ok'] else 'NO'} | {v['seconds']} | {note[:160]} |")
        for step, v in self.doc["steps"].items():
            if step.startswith("end-to-end") and v.get("result"):
                what = step.removeprefix("end-to-end").strip() or self.doc.get("model", "")
                lines += ["", f"End to end, {what} (batch 1), host array in and out (median ms):", ""]
                lines += [f"- {k}: {t}" for k, t in v["result"].items()]
        for note in self.doc.get("notes", []):
            lines.append(f"- note: {note}")
        (self.out / "gpu-check.md").write_text("\n".join(lines) + "\n")


def build(target: Path, out: Path, env: dict, schedules: str, alpha: float, res: int,
          model: str = "mobilenet_v1") -> dict:
    """One artifact, with the MBN_CUDA_* variables of `env` set for the build only."""
    from mbn_codegen.build import BuildConfig, build as do_build
    from mbn_codegen.cuda import timings_path

    names = ("MBN_CUDA_KERNELS", "MBN_CUDA_GRAPH", "MBN_CUDA_KERNEL_TIMINGS")
    saved = {k: os.environ.get(k) for k in names}
    for k in names:
        os.environ.pop(k, None)
    # the build looks for timings under the target's name; this target is `cuda` with another arch
    os.environ["MBN_CUDA_KERNEL_TIMINGS"] = saved["MBN_CUDA_KERNEL_TIMINGS"] or str(timings_path("cuda"))
    os.environ.update(env)
    try:
        art = do_build(BuildConfig(model=model, alpha=alpha, resolution=res, target=str(target),
                                   schedules=schedules, out=str(out)), log=lambda s: print("   " + s, flush=True))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    man = json.loads((art / "manifest.json").read_text())
    return {"artifact": str(art), "gpu": man["gpu"], "compile_s": man["phase_seconds"].get("compile")}


REFERENCE = "reference.npz"


def tolerance(want) -> dict:
    """The tests' tolerance for logits: rtol 1e-3, atol 1e-3 of the largest |logit|."""
    import numpy as np

    return {"rtol": 1e-3, "atol": 1e-3 * float(np.abs(want).max())}


def write_reference(art: Path, out: Path, res: int) -> dict:
    """ONNX Runtime's logits (CPU) for three distinct inputs, so that a GPU machine with only the
    runtime can check the artifacts (all variants share the model, hence one reference)."""
    import numpy as np
    from mbn_codegen.export import onnxruntime_run

    rng = np.random.default_rng(0)
    xs = np.stack([rng.standard_normal((1, 3, res, res)).astype("float32") for _ in range(3)])
    ys = np.stack([onnxruntime_run(art / "model.onnx", x) for x in xs])
    np.savez(out / REFERENCE, inputs=xs, outputs=ys)
    return {"inputs": len(xs), "spread": float(np.abs(ys[0] - ys[1]).max())}


def check_against_reference(art: str, ref: Path) -> dict:
    """The artifact on the GPU against ONNX Runtime's logits, within `tolerance`; the outputs must
    also differ between inputs, or agreement proves nothing."""
    import numpy as np
    from mbn_codegen.runtime import load

    m = load(art)
    if m.device != "cuda":
        raise RuntimeError(f"{art} is a {m.device} artifact, not cuda")
    d = np.load(ref)
    worst, outs = 0.0, []
    for x, want in zip(d["inputs"], d["outputs"]):
        got = m.run(x)
        np.testing.assert_allclose(got, want, **tolerance(want))
        worst = max(worst, float(np.abs(got - want).max()))
        outs.append(got)
    spread = float(np.abs(outs[0] - outs[1]).max())
    if spread < 1e-2 * float(np.abs(outs[0]).max()):
        raise AssertionError(f"outputs for different inputs differ by only {spread:.3g}: dead activations")
    return {"max_abs_err": worst, "selfcheck": m.selfcheck()["ok"], "output_spread": spread}


def two_threads(art: str, ref: Path, calls: int = 20) -> dict:
    """One Model called from two threads at once (the runtime serialises them): every result
    must still be the logits of its own input."""
    import threading

    import numpy as np
    from mbn_codegen.runtime import load

    m = load(art)
    with np.load(ref) as d:                    # an NpzFile is not safe to read from two threads
        inputs, outputs = d["inputs"], d["outputs"]
    bad: list[str] = []

    def worker(i):
        try:
            for _ in range(calls):
                got = m.run(inputs[i])
                if not np.allclose(got, outputs[i], **tolerance(outputs[i])):
                    bad.append(f"thread {i}: max error {float(np.abs(got - outputs[i]).max()):.3g}")
        except Exception as e:          # noqa: BLE001 - a thread's exception is otherwise only printed
            bad.append(f"thread {i}: {type(e).__name__}: {e}")
    ts = [threading.Thread(target=worker, args=(i,)) for i in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if bad:
        raise AssertionError("; ".join(bad[:4]))
    return {"threads": 2, "calls_each": calls}


def time_e2e(artifacts: dict, res: int, rounds: int = 7, block: int = 50) -> dict:
    """Interleaved blocks per variant, medians of the per-call block means (ms). Every variant
    takes a host array and returns host logits (the copies in and out are timed for all), except
    the "device in/out" row: the first artifact on an input already on the GPU, up to a stream
    sync, which separates the VM and its kernels from the copies."""
    import numpy as np
    from mbn_codegen.runtime import load

    x = np.random.default_rng(0).standard_normal((1, 3, res, res)).astype("float32")
    model = json.loads((Path(next(iter(artifacts.values()))) / "manifest.json").read_text())["model"]
    models = {name: load(art) for name, art in artifacts.items()}
    runs = {}
    for name, m in models.items():
        m.run(x)
        runs[name] = m.run
    first = next(iter(models.values()))
    ffi = first._ffi
    dev_x = ffi.get_global_func("runtime.TVMTensorAllocWithScope")(ffi.Shape(x.shape), ffi.dtype("float32"),
                                                                   first._dev, "global")
    ffi.get_global_func("runtime.TVMTensorCopyFromTo")(ffi.from_dlpack(x), dev_x)
    sync = ffi.get_global_func("runtime.Device_StreamSync")

    def resident(_x, main=first._main, dev=first._dev):
        y = main(dev_x)
        sync(dev, 0)
        return y
    runs[f"{next(iter(artifacts))} (device in/out)"] = resident
    try:
        import torch
        if torch.cuda.is_available():
            from mbn_codegen.models import create
            tm = create(model["name"], model["alpha"], res).eval().cuda()
            torch.backends.cudnn.benchmark = True

            def torch_run(x, tm=tm):
                with torch.no_grad():
                    return tm(torch.from_numpy(x).cuda()).cpu().numpy()
            torch_run(x)
            runs["pytorch-cudnn"] = torch_run
            # PyTorch's lowest-overhead form: the whole forward captured once as a CUDA graph
            static_x = torch.from_numpy(x).cuda()
            with torch.no_grad():
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    for _ in range(3):
                        tm(static_x)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    static_y = tm(static_x)

            def torch_graph(x):
                static_x.copy_(torch.from_numpy(x))
                graph.replay()
                return static_y.cpu().numpy()
            want = torch_run(x)
            if not np.allclose(torch_graph(x), want, **tolerance(want)):
                raise AssertionError("the CUDA graph's logits differ from eager PyTorch's")
            runs["pytorch-cudnn-cudagraph"] = torch_graph
    except ImportError:
        pass
    samples = {k: [] for k in runs}
    for _ in range(rounds):
        for name, f in runs.items():
            t0 = time.perf_counter()
            for _ in range(block):
                f(x)
            samples[name].append((time.perf_counter() - t0) * 1e3 / block)
    return {k: round(sorted(v)[len(v) // 2], 4) for k, v in samples.items()}


def time_kernels(art: str, res: int) -> dict:
    """Per-kernel GPU time (ms) of one artifact, with the runtime alone: the VM's instrument hook
    collects each kernel call and its arguments, then the runtime's time evaluator (what
    `Module.time_evaluator` wraps) runs each 20 x 5 times on the GPU; the median of the 5."""
    import struct

    import numpy as np
    from mbn_codegen.cuda import module_tree
    from mbn_codegen.runtime import _DEVICE_TYPE, load

    m = load(art)         # a Model of its own: a CUDA graph build captures on this first run,
    x = np.zeros((1, 3, res, res), "float32")   # the only one whose kernel calls the hook sees
    calls = []

    def hook(_func, sym, before, _ret, *args):
        if before and not sym.startswith("vm.builtin"):
            calls.append((sym, list(args)))
        return 0

    m._vm["set_instrument"](hook)
    m.run(x)
    symbols = {k["symbol"]: k["name"] for k in m.manifest["kernels"]}
    evaluator = m._ffi.get_global_func("runtime.RPCTimeEvaluator")
    # the evaluator looks the symbol up in the module given, not its imports: find its holder
    tree = module_tree(m._lib.module)
    out: dict[str, float] = {}
    for sym, args in calls:
        name = symbols.get(sym)
        holder = next((mod for mod in tree if mod.implements_function(sym)), None)
        if name is None or name in out or holder is None:
            continue
        # number 20, repeat 5, min_repeat_ms 0, limit_zero_time_iterations 100, no cooldown, no flush
        f = evaluator(holder, sym, _DEVICE_TYPE[m.device], 0, 20, 5, 0, 100, 0, 1, 0, "")
        out[name] = round(float(np.median(struct.unpack("@5d", f(*args)))) * 1e3, 5)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="build the artifacts and stop (no GPU needed)")
    ap.add_argument("--arch", default=os.environ.get("MBN_CUDA_ARCH"),
                    help="sm_XY to build for (default: the GPU's, from nvidia-smi; sm_90 for --dry-run)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--out", default=None)
    ap.add_argument("--also", default="", metavar="MODELS",
                    help="more models (comma-separated registry names, e.g. mobilenet_v2,mobilenet_v3_large) "
                         "built as the default variant, checked by their built-in reference and timed")
    ap.add_argument("--prebuilt", default=None, metavar="DIR",
                    help="a dry run's output folder: check and time its artifacts with the runtime alone")
    args = ap.parse_args(argv)

    smi, gpu_arch, driver_cuda = nvidia_smi()
    print(smi, flush=True)
    if gpu_arch is None and not args.dry_run:
        print("gpu-check: no NVIDIA GPU here (nvidia-smi missing or lists no GPU). Run it on a GPU "
              "machine, or `python scripts/gpu_check.py --dry-run` to only build the artifacts.", file=sys.stderr)
        return 3
    arch = args.arch or gpu_arch or "sm_90"
    date = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"gpu-{date}")
    out.mkdir(parents=True, exist_ok=True)
    rep = Report(out)
    from mbn_codegen.database import this_cpu

    rep.doc.update({"date": date, "arch": arch, "driver_cuda": driver_cuda, "nvidia_smi": smi,
                    "host": this_cpu(),        # host-to-host times depend on it
                    "gpu": smi.strip().splitlines()[-1] if gpu_arch else None, "dry_run": args.dry_run,
                    "model": f"mobilenet_v1 {args.alpha:g}-{args.resolution}", "notes": []})
    extras: dict[str, str] = {}
    target = target_file(arch, out)
    res = args.resolution
    arts = {}
    # default: what `mbn-codegen build --target cuda` gives (per kernel the faster of ours and
    # dlight by the committed GPU timings, replayed as a CUDA graph); ours / dlight: one side for
    # every kernel
    variants = (("default", {}, "ours"), ("default-no-graph", {"MBN_CUDA_GRAPH": "0"}, "ours"),
                ("ours", {"MBN_CUDA_KERNELS": "ours"}, "ours"), ("dlight", {"MBN_CUDA_KERNELS": "dlight"}, "ours"),
                ("tvm-stock", {}, "stock"))
    if args.prebuilt:
        pre = Path(args.prebuilt)
        arts = {n: str(pre / f"art-{n}") for n, _, _ in variants if (pre / f"art-{n}" / "manifest.json").is_file()}
        extras = {d.name[4:]: str(d) for d in sorted(pre.glob("art-*"))
                  if d.name[4:] not in arts and (d / "manifest.json").is_file()}
        reference = pre / REFERENCE
        if not arts or not reference.is_file():
            print(f"gpu-check: {pre} holds no art-*/ or no {REFERENCE}: make it with --dry-run", file=sys.stderr)
            return 2
        mans = [json.loads((Path(a) / "manifest.json").read_text()) for a in arts.values()]
        built = {m["gpu"]["cuda_arch"] for m in mans}
        model = mans[0]["model"]         # what was built, not this run's --alpha/--resolution
        rep.doc["model"] = f"{model['name']} {model['alpha']:g}-{mans[0]['input']['shape'][-1]}"
        rep.doc["notes"].append(f"prebuilt artifacts from {pre} (built for {sorted(map(str, built))}); "
                                "the gpu-marked tests compile, so they are not run here")
    else:
        for name, env, schedules in variants:
            r = rep.step(f"build {name}", lambda e=env, s=schedules, n=name:
                         build(target, out / f"art-{n}", e, s, args.alpha, res))
            if r:
                arts[name] = r["artifact"]
        extras = {}
        for model in filter(None, args.also.split(",")):
            r = rep.step(f"build {model}", lambda m=model: build(target, out / f"art-{m}", {}, "ours",
                                                                  1.0, res, model=m))
            if r:
                extras[model] = r["artifact"]
        reference = out / REFERENCE
        if arts:
            rep.step("ONNX Runtime reference", lambda: write_reference(Path(next(iter(arts.values()))), out, res))
    if args.dry_run or gpu_arch is None:
        rep.doc["notes"].append("dry run: artifacts built, nothing run")
        rep.save()
        print(f"gpu-check (dry run): {len(arts) + len(extras)} artifacts built in {out}; failed: {rep.failures or 'none'}")
        return 1 if rep.failures else 0

    try:
        import torch
        if not torch.cuda.is_available():
            rep.doc["notes"].append(f"torch {torch.__version__} has no CUDA here: no PyTorch/cuDNN baseline")
    except ImportError:
        rep.doc["notes"].append("torch not importable: no PyTorch baseline")
    import importlib.util
    for opt in ("onnxruntime", "tensorrt"):
        rep.doc["notes"].append(f"{opt}: " + ("importable, not timed by this script" if importlib.util.find_spec(opt)
                                              else "not installed"))
    for name, art in arts.items():
        if reference.is_file():
            rep.step(f"{name} vs ONNX Runtime", lambda a=art: check_against_reference(a, reference))
    for model, art in extras.items():
        rep.step(f"{model} vs its built-in reference", lambda a=art: _selfcheck(a))
    if reference.is_file() and arts:
        rep.step("two threads, one model", lambda: two_threads(next(iter(arts.values())), reference))
    if not args.prebuilt:
        env = dict(os.environ, MBN_CUDA_TARGET=str(target))
        rep.step("pytest -m gpu", lambda: _pytest(env, out))
    if arts:
        rep.step("end-to-end", lambda: time_e2e(arts, res))
    for model, art in extras.items():
        rep.step(f"end-to-end {model}", lambda a=art: time_e2e({"default": a}, res))
    if "ours" in arts and "dlight" in arts:
        def per_kernel():
            ours, dl = time_kernels(arts["ours"], res), time_kernels(arts["dlight"], res)
            man = json.loads((Path(arts["ours"]) / "manifest.json").read_text())
            about = {k["name"]: {"kind": k["kind"], "macs": k["macs"]} for k in man["kernels"]}
            ks = {k: {**about.get(k, {}), "ours_ms": ours[k], "dlight_ms": dl[k]} for k in sorted(set(ours) & set(dl))}
            doc = {"arch": arch, "device": rep.doc["gpu"], "date": date, "model": rep.doc["model"], "kernels": ks}
            (out / "kernel_timings.json").write_text(json.dumps(doc, indent=2) + "\n")
            if arch == "sm_90":          # the shipped `cuda` target's arch: its builds pick per kernel
                from mbn_codegen.cuda import timings_path

                timings_path("cuda").parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / "kernel_timings.json", timings_path("cuda"))
            return {"kernels": len(ks), "ours_faster": sum(v["ours_ms"] <= v["dlight_ms"] for v in ks.values())}
        rep.step("per-kernel ours vs dlight", per_kernel)
    rep.save()
    print(f"gpu-check: report in {out}; failed steps: {rep.failures or 'none'}")
    return 1 if rep.failures else 0


def _selfcheck(art: str) -> dict:
    """A model without reference.npz: its artifact's own reference (ONNX Runtime's logits for the
    seeded input, stored at build time) on the GPU."""
    from mbn_codegen.runtime import load

    m = load(art)
    r = m.selfcheck()
    if not r["ok"]:
        raise AssertionError(f"selfcheck failed: {r}")
    return {k: r[k] for k in r if k != "ok"} | {"model": m.manifest["model"]["name"]}


def _pytest(env, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    (out / "pytest-gpu.txt").write_text(proc.stdout + proc.stderr)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    if proc.returncode not in (0, 5):
        raise RuntimeError(f"pytest -m gpu exit {proc.returncode}: {tail[0]}")
    return {"summary": tail[0]}


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
