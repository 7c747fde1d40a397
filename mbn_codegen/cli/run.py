from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="load an artifact with the runtime wrapper: self-check, classify images")
    p.add_argument("artifact", help="artifact directory written by `mbn-codegen build`")
    p.add_argument("images", nargs="*", help="JPEG/PNG files to classify (default: self-check only)")
    p.add_argument("-k", type=int, default=5, help="top-k classes to print")


def main(args) -> int:
    from ..runtime import load

    model = load(args.artifact)
    model._check_k(args.k)                    # before the self-check, so a bad -k fails fast
    r = model.selfcheck()
    print(f"self-check: ok on {r['arch']} ({r['device']}), max |error| vs ONNX Runtime {r['max_abs_err']:.2g} "
          f"({r['margin']:.2g} of the tolerance)")
    if args.images:
        from ..images import load_image, preprocess
        from ..errors import MbnError
        for path in args.images:
            try:
                img = load_image(path)
            except ValueError as e:
                raise MbnError(str(e)) from None
            x = preprocess(img, model.input_shape[-1])
            print(path)
            for idx, label, p in model.predict(x, k=args.k):
                print(f"  {p:7.2%}  {idx:4d}  {label}")
    return 0
