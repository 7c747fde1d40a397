"""make gpu-check: on a machine with an NVIDIA GPU, build the `cuda` target for that GPU's arch with
our schedules and with dlight, run the gpu-marked tests, and time ours vs dlight vs TVM stock vs
PyTorch end to end (and ours vs dlight per kernel) on MobileNet v1. Writes JSON + Markdown under
benchmarks/results/gpu-<date>/. A step that fails is recorded in the report, not fatal.

--dry-run (or no GPU with --dry-run): build the artifacts for --arch and stop. Without a GPU and
without --dry-run: exit 3 with a message. Uses only what is installed (no network).
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
        lines = [f"# gpu-check {self.doc.get('date')}", "", f"GPU: {self.doc.get('gpu', '?')}, arch "
                 f"{self.doc.get('arch')}, driver CUDA {self.doc.get('driver_cuda')}", ""]
        lines += ["| step | ok | s | note |", "|---|---|---|---|"]
        for k, v in self.doc["steps"].items():
            note = v.get("error", "") if not v["ok"] else ""
            lines.append(f"| {k} | {'yes' if v['ok'] else 'NO'} | {v['seconds']} | {note[:160]} |")
        e2e = self.doc["steps"].get("end-to-end", {}).get("result") or {}
        if e2e:
            lines += ["", "End to end, MobileNet v1 1.0-224 batch 1 (median ms):", ""]
            lines += [f"- {k}: {v}" for k, v in e2e.items()]
        for note in self.doc.get("notes", []):
            lines.append(f"- note: {note}")
        (self.out / "gpu-check.md").write_text("\n".join(lines) + "\n")


def build(target: Path, out: Path, kernels: str | None, schedules: str, alpha: float, res: int) -> dict:
    from mbn_codegen.build import BuildConfig, build as do_build

    env_old = os.environ.get("MBN_CUDA_KERNELS")
    if kernels:
        os.environ["MBN_CUDA_KERNELS"] = kernels
    else:
        os.environ.pop("MBN_CUDA_KERNELS", None)
    try:
        art = do_build(BuildConfig(alpha=alpha, resolution=res, target=str(target), schedules=schedules,
                                   out=str(out)), log=lambda s: print("   " + s, flush=True))
    finally:
        if env_old is None:
            os.environ.pop("MBN_CUDA_KERNELS", None)
        else:
            os.environ["MBN_CUDA_KERNELS"] = env_old
    man = json.loads((art / "manifest.json").read_text())
    return {"artifact": str(art), "gpu": man["gpu"], "compile_s": man["phase_seconds"].get("compile")}


def time_e2e(artifacts: dict, res: int, rounds: int = 7, block: int = 50) -> dict:
    """Interleaved blocks per variant, medians of the per-call block means (ms)."""
    import numpy as np
    from mbn_codegen.runtime import load

    x = np.random.default_rng(0).standard_normal((1, 3, res, res)).astype("float32")
    runs = {}
    for name, art in artifacts.items():
        m = load(art)
        m.run(x)
        runs[name] = m.run
    try:
        import torch
        if torch.cuda.is_available():
            from mbn_codegen.models import create
            tm = create("mobilenet_v1", 1.0, res).eval().cuda()
            xt = torch.from_numpy(x).cuda()
            torch.backends.cudnn.benchmark = True

            def torch_run(_x, tm=tm, xt=xt):
                with torch.no_grad():
                    y = tm(xt)
                torch.cuda.synchronize()
                return y
            torch_run(x)
            runs["pytorch-cudnn"] = torch_run
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
    """Per-kernel GPU time (ms) of one artifact: the VM's instrument hook collects each kernel call
    and its arguments, then each is timed with time_evaluator on the GPU."""
    import numpy as np
    from mbn_codegen._tvm import relax, tvm

    man = json.loads((Path(art) / "manifest.json").read_text())
    dev = tvm.cuda(0)
    lib = tvm.runtime.load_module(str(Path(art) / man["library"]["file"]))
    vm = relax.VirtualMachine(lib, dev)
    xt = tvm.runtime.tensor(np.zeros((1, 3, res, res), "float32"), dev)
    vm["main"](xt)
    calls = []

    def hook(_func, sym, before, _ret, *args):
        if before and not sym.startswith("vm.builtin"):
            calls.append((sym, list(args)))
        return 0

    vm.set_instrument(hook)
    vm["main"](xt)
    symbols = {k["symbol"]: k["name"] for k in man["kernels"]}
    out: dict[str, float] = {}
    for mod in [lib] + list(lib.imports):
        for sym, args in calls:
            name = symbols.get(sym)
            if name is None or name in out:
                continue
            try:
                f = mod.time_evaluator(sym, dev, number=20, repeat=5)
                out[name] = round(float(np.median(f(*args).results)) * 1e3, 5)
            except Exception:   # noqa: BLE001 - the symbol lives in another module of the tree
                continue
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="build the artifacts and stop (no GPU needed)")
    ap.add_argument("--arch", default=os.environ.get("MBN_CUDA_ARCH"),
                    help="sm_XY to build for (default: the GPU's, from nvidia-smi; sm_90 for --dry-run)")
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument("--out", default=None)
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
    rep.doc.update({"date": date, "arch": arch, "driver_cuda": driver_cuda, "nvidia_smi": smi,
                    "gpu": smi.strip().splitlines()[-1] if gpu_arch else None, "dry_run": args.dry_run,
                    "model": f"mobilenet_v1 {args.alpha:g}-{args.resolution} batch 1", "notes": []})
    target = target_file(arch, out)
    res = args.resolution
    arts = {}
    for name, kernels, schedules in (("ours", "ours", "ours"), ("dlight", "dlight", "ours"),
                                     ("tvm-stock", None, "stock")):
        r = rep.step(f"build {name}", lambda k=kernels, s=schedules, n=name:
                     build(target, out / f"art-{n}", k, s, args.alpha, res))
        if r:
            arts[name] = r["artifact"]
    if args.dry_run or gpu_arch is None:
        rep.doc["notes"].append("dry run: artifacts built, nothing run")
        rep.save()
        print(f"gpu-check (dry run): {len(arts)}/3 artifacts built in {out}; failed: {rep.failures or 'none'}")
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
    env = dict(os.environ, MBN_CUDA_TARGET=str(target))
    rep.step("pytest -m gpu", lambda: _pytest(env, out))
    if arts:
        rep.step("end-to-end", lambda: time_e2e(arts, res))
    if "ours" in arts and "dlight" in arts:
        def per_kernel():
            ours, dl = time_kernels(arts["ours"], res), time_kernels(arts["dlight"], res)
            ks = {k: {"ours_ms": ours[k], "dlight_ms": dl[k]} for k in sorted(set(ours) & set(dl))}
            doc = {"arch": arch, "device": rep.doc["gpu"], "date": date, "model": rep.doc["model"], "kernels": ks}
            (out / "kernel_timings.json").write_text(json.dumps(doc, indent=2) + "\n")
            dest = ROOT / "targets" / "databases" / "cuda"
            if arch == "sm_90":          # the shipped `cuda` target's arch: its builds pick per kernel
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(out / "kernel_timings.json", dest / "kernel_timings.json")
            return {"kernels": len(ks), "ours_faster": sum(v["ours_ms"] <= v["dlight_ms"] for v in ks.values())}
        rep.step("per-kernel ours vs dlight", per_kernel)
    rep.save()
    print(f"gpu-check: report in {out}; failed steps: {rep.failures or 'none'}")
    return 1 if rep.failures else 0


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
