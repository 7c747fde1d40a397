from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("bundle", help="one .tar.gz for a board without internet: the artifact, the runtime's "
                       "wheels for its CPU and the board's Python, and install.sh")
    p.add_argument("artifact", help="artifact directory written by `mbn-codegen build`")
    p.add_argument("--python", default="3.11", metavar="X.Y",
                   help="the board's Python (`python3 --version` there): 3.10, 3.11 (default) or 3.12")
    p.add_argument("--out", help="archive to write (default: <artifact>-bundle-py<X.Y>.tar.gz next to it)")
    p.add_argument("--wheel", help="mbn-codegen wheel to ship (default: built from this source checkout)")


def main(args) -> None:
    from ..bundle import bundle

    bundle(args.artifact, python=args.python, out=args.out, wheel=args.wheel)
