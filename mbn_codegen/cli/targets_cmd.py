from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("targets", help="list the target files (boards) and what each needs")
    p.add_argument("--json", action="store_true")


def main(args) -> None:
    from .. import targets

    specs = targets.all_targets()
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return
    print(f"{'target':<15} {'arch':<8} {'device':<6} {'runs via':<8} {'linker':<22} description")
    for s in specs:
        print(f"{s.name:<15} {s.arch:<8} {s.device:<6} {s.run:<8} {s.cross_compiler or 'host c++':<22} "
              f"{s.description}")
    print(f"\n(files in {targets.HERE}; --target also takes a path to your own .toml)")
