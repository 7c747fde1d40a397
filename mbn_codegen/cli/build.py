from __future__ import annotations

from .common import add_model_args, model_spec


def add_parser(sub) -> None:
    p = sub.add_parser("build", help="compile a MobileNet (or an ONNX file) into an artifact directory")
    add_model_args(p, onnx=True)
    p.add_argument("--weights", help="a state_dict file, or 'pretrained' (mobilenet_v2: ImageNet); "
                   "default: random weights (for testing)")
    p.add_argument("--target", default="x86_64", help="a file name in targets/ or a path to a .toml "
                   "(see `mbn-codegen targets`)")
    p.add_argument("--out", help="artifact directory (default artifacts/<model>-<alpha>-<res>-<target>)")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after each lowering phase to DIR")
    p.add_argument("--database", metavar="DIR", help="MetaSchedule tuning database to apply "
                   "(default: the target's shipped one in targets/databases/, if any)")
    p.add_argument("--no-database", action="store_true", help="ignore the shipped database")
    p.add_argument("--schedules", default="ours", choices=["ours", "stock"],
                   help="ours (default): our depthwise/pointwise schedules in NHWC; stock: TVM's defaults")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--propagate-nan", action="store_true",
                   help="ReLU/ReLU6 pass NaN through as ONNX defines them (default: IEEE max/min, "
                   "which turn NaN into 0 or 6)")


def main(args) -> None:
    from ..build import BuildConfig, build

    build(BuildConfig(model=model_spec(args), target=args.target, out=args.out, dump_ir=args.dump_ir,
                      database=args.database, use_shipped_database=not args.no_database,
                      schedules=args.schedules, propagate_nan=args.propagate_nan))
