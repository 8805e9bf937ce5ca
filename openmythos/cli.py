"""The ``mythos`` command line."""

import argparse
import sys


def _presets(args):
    from .parameters import preset_table

    print(preset_table())


def _quickstart(args):
    from .quickstart import run

    run(attn_types=args.attn_type, n_loops=args.n_loops)


def _demo(args, demo_argv):
    from .demo import main as demo_main

    return demo_main(demo_argv)


def _export(args):
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from .hub import export

    model = AutoModelForCausalLM.from_pretrained(args.checkpoint)
    tokenizer = None
    if any((Path(args.checkpoint) / name).exists() for name in ("tokenizer_config.json", "tokenizer.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    training = Path(args.training).read_text() if args.training and Path(args.training).is_file() else args.training
    files = export(model, args.folder, tokenizer, repo_id=args.repo_id, training=training, datasets=args.datasets,
                   overwrite=args.overwrite)
    for path in files:
        print(f"{path.stat().st_size:>12,}  {path}")


def _push(args):
    from .hub import push

    names = push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run)
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(names)} files to {args.repo_id}:")
    for name in names:
        print(f"  {name}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="mythos", description="OpenMythos looped transformer tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="print the preset table with total and active parameter counts")
    p.set_defaults(func=_presets)
    p = sub.add_parser("quickstart", help="build a small model, run a forward pass and generate with several n_loops")
    p.add_argument("--attn-type", nargs="+", default=["mla", "gqa"], choices=["mla", "gqa"])
    p.add_argument("--n-loops", nargs="+", type=int, default=[1, 4, 8])
    p.set_defaults(func=_quickstart)
    p = sub.add_parser("demo", add_help=False,
                       help="train a looped model and dense baselines on multi-hop reasoning; `mythos demo --help` "
                            "lists its flags")
    p.set_defaults(func=_demo)
    p = sub.add_parser("export", help="write a Hub-ready folder (weights, remote code, tokenizer, model card)")
    p.add_argument("folder", help="output folder")
    p.add_argument("--from", dest="checkpoint", required=True, help="a save_pretrained / Trainer checkpoint folder")
    p.add_argument("--repo-id", default=None, help="the Hub repo the card's examples should name")
    p.add_argument("--training", default=None, help="training notes for the card (text, or a file to read)")
    p.add_argument("--datasets", nargs="*", default=None, help="datasets for the card's metadata")
    p.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty output folder")
    p.set_defaults(func=_export)
    p = sub.add_parser("push", help="upload an exported folder to the Hugging Face Hub")
    p.add_argument("repo_id")
    p.add_argument("--folder", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded; contact nobody")
    p.set_defaults(func=_push)
    # the demo owns its flags (openmythos.demo.parse_args); every other command takes only its own
    args, extra = parser.parse_known_args(argv)
    if args.func is _demo:
        return args.func(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
