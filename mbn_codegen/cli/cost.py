from __future__ import annotations

import json

from .common import add_model_args


def add_parser(sub) -> None:
    p = sub.add_parser("cost", help="MobileNet v1 mult-adds and parameters per layer (the paper's cost model)")
    add_model_args(p, zoo=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args) -> None:
    from ..cost import cost_model

    report = cost_model(args.alpha, args.resolution, args.num_classes)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
