from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="build pretrained MobileNet v2 for this machine and classify real photos")
    p.add_argument("--target", help="default: the best target this machine runs natively")
    p.add_argument("--out", help="artifact directory")


def main(args) -> int:
    from ..demo import run_demo

    r = run_demo(args.target, args.out)
    bad = [k for k, v in r["results"].items() if v["top5"][0][0] != v["torch_top1"]]
    return 1 if bad else 0
