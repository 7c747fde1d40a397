"""Argument types shared by subcommands, and the one place the command line becomes a ModelSpec:
they validate, the API does the work."""
from __future__ import annotations

import argparse


def _checked(s: str, kind: type, ok, fix: str):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not {'a number' if kind is float else 'an integer'}") from None
    if not ok(v):
        raise argparse.ArgumentTypeError(f"{s}: {fix}")
    return v


def alpha(s: str) -> float:
    # NaN fails the comparison too
    return _checked(s, float, lambda v: 0.0 < v <= 1.0,
                    "the width multiplier must be in (0, 1], e.g. 1.0, 0.75, 0.5, 0.25")


def resolution(s: str) -> int:
    return _checked(s, int, lambda v: v > 0 and v % 32 == 0, "the resolution must be a positive multiple "
                    "of 32 (MobileNet downsamples by 32), e.g. 224, 192, 160, 128")


def add_model_args(p: argparse.ArgumentParser, resolution_default: int | None = 224,
                   resolution_help: str = "input size (default 224)", zoo: bool = True, onnx: bool = False) -> None:
    """--model (with zoo), --alpha, --resolution, --num-classes; onnx=True adds --onnx, and the
    resolution then defaults to the file's own."""
    if zoo:
        from ..models import DEFAULT_MODEL, names

        p.add_argument("--model", default=DEFAULT_MODEL, choices=names())
    if onnx:
        p.add_argument("--onnx", help="this ONNX file instead of a zoo model")
        resolution_default = None
        resolution_help = "input size (default 224; with --onnx: the file's own, and this fixes a dynamic height/width)"
    p.add_argument("--alpha", type=alpha, default=1.0, help="width multiplier (default 1.0)")
    p.add_argument("--resolution", type=resolution, default=resolution_default, help=resolution_help)
    p.add_argument("--num-classes", type=int, default=1000)


def model_spec(args: argparse.Namespace):
    """The ModelSpec of add_model_args' options, plus --weights, --onnx and --seed where the
    subcommand has them."""
    from ..model_spec import ModelSpec

    return ModelSpec(name=args.model, alpha=args.alpha, resolution=args.resolution,
                     num_classes=args.num_classes, weights=getattr(args, "weights", None),
                     onnx=getattr(args, "onnx", None), seed=getattr(args, "seed", 0))
