from __future__ import annotations

import argparse
import os
import sys
import tempfile


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="load an artifact with the runtime wrapper: self-check, classify images "
                       "(arm64 artifacts on an x86 host run under qemu-aarch64 when it is set up)")
    p.add_argument("artifact", help="artifact directory written by `mbn-codegen build`")
    p.add_argument("images", nargs="*", help="JPEG/PNG files to classify (default: self-check only)")
    p.add_argument("-k", type=int, default=5, help="top-k classes to print")
    # the emulated child gets the images decoded and preprocessed by the host (no PIL there)
    p.add_argument("--preprocessed", help=argparse.SUPPRESS)


def main(args) -> int:
    from ..errors import ArchitectureMismatchError
    from ..runtime import load, read_manifest

    try:
        model = load(args.artifact)
    except ArchitectureMismatchError as e:
        manifest = read_manifest(args.artifact)     # load() read it before checking the machine
        if manifest["arch"] != "aarch64" or args.preprocessed:
            raise
        from ..emulation import qemu_available
        reason = qemu_available()
        if reason is not None:
            raise ArchitectureMismatchError(f"{e}; or run it here under emulation, which is not set up "
                                            f"({reason})") from None
        return _run_emulated(args, manifest["input"]["shape"][-1])
    model._check_k(args.k)                    # before the self-check, so a bad -k fails fast
    r = model.selfcheck()
    print(f"self-check: ok on {r['arch']} ({r['device']}), max |error| vs ONNX Runtime {r['max_abs_err']:.2g} "
          f"({r['margin']:.2g} of the tolerance)")
    if args.images:
        import numpy as np
        pre = np.load(args.preprocessed) if args.preprocessed else None
        for i, path in enumerate(args.images):
            x = pre[f"x{i}"] if pre is not None else _preprocess(path, model.input_shape[-1])
            print(path)
            for idx, label, p in model.predict(x, k=args.k):
                print(f"  {p:7.2%}  {idx:4d}  {label}")
    return 0


def _preprocess(path: str, resolution: int):
    from ..errors import MbnError
    from ..images import load_image, preprocess
    try:
        img = load_image(path)
    except ValueError as e:
        raise MbnError(str(e)) from None
    return preprocess(img, resolution)


def _run_emulated(args, resolution: int) -> int:
    import numpy as np

    from ..emulation import run_python_arm64

    print("note: emulated under qemu-aarch64: timings mean nothing", file=sys.stderr, flush=True)
    cmd = ["-m", "mbn_codegen.cli.main", "run", os.path.abspath(args.artifact), *args.images, "-k", str(args.k)]
    with tempfile.TemporaryDirectory(prefix="mbn-run-") as tmp:
        if args.images:
            npz = os.path.join(tmp, "inputs.npz")
            np.savez(npz, **{f"x{i}": _preprocess(p, resolution) for i, p in enumerate(args.images)})
            cmd += ["--preprocessed", npz]
        return run_python_arm64(cmd, capture_output=False, timeout=None).returncode
