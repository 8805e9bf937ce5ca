"""The ``mythos`` command line."""

import argparse
import sys


def _presets(args):
    from .parameters import preset_table

    print(preset_table())


def _quickstart(args):
    from .quickstart import run

    run(attn_types=args.attn_type, n_loops=args.n_loops)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mythos", description="OpenMythos looped transformer tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="print the preset table with total and active parameter counts")
    p.set_defaults(func=_presets)
    p = sub.add_parser("quickstart", help="build a small model, run a forward pass and generate with several n_loops")
    p.add_argument("--attn-type", nargs="+", default=["mla", "gqa"], choices=["mla", "gqa"])
    p.add_argument("--n-loops", nargs="+", type=int, default=[1, 4, 8])
    p.set_defaults(func=_quickstart)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
