from __future__ import annotations

import json

from .common import alpha, resolution


def add_parser(sub) -> None:
    p = sub.add_parser("cost", help="MobileNet v1 mult-adds and parameters per layer (the paper's cost model)")
    p.add_argument("--alpha", type=alpha, default=1.0)
    p.add_argument("--resolution", type=resolution, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def main(args) -> int:
    from ..cost import cost_model

    report = cost_model(args.alpha, args.resolution, args.num_classes)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 0
