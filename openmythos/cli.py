"""The ``mythos`` command line.

Fast by design: this module and ``openmythos.hub`` import only the standard library at the top, and the package
does not load torch/transformers inside the ``mythos`` command (see ``openmythos/__init__.py``). So ``--help``,
argument errors and refused exports return at once; a command loads the stack (``_load_stack``) only after its
inputs were checked. A user error prints one line, ``mythos <command>: error: ...``, and exits with status 2, as
argparse does; anything else is a bug and keeps its traceback.
"""

import argparse
import sys
import warnings
from pathlib import Path


class CommandError(Exception):
    """A refused command: printed as one line, exit status 2."""


def _load_stack():
    """Import torch/transformers and register the Auto classes (what a plain ``import openmythos`` does)."""
    from . import _load

    _load()


def _presets(args):
    _load_stack()
    from .parameters import preset_table

    print(preset_table())


def _quickstart(args):
    _load_stack()
    from .quickstart import run

    run(attn_types=args.attn_type, n_loops=args.n_loops)


def _demo(args, demo_argv):
    from .demo import parse_args, run  # the standard library only: run imports the training pipeline

    demo_args = parse_args(demo_argv)  # --help and refused flags exit here, before torch is imported
    _load_stack()
    run(demo_args)
    return 0


def _check_export(args):
    """Every refusal of ``mythos export``, before the checkpoint is loaded."""
    from .hub import _check_card_inputs, check_export_target

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(f"--from {str(checkpoint)!r} has no config.json; pass a save_pretrained / Trainer "
                                f"checkpoint folder")
    check_export_target(args.folder, sources=[checkpoint], overwrite=args.overwrite, repo_id=args.repo_id)
    _check_card_inputs({"datasets": args.datasets, "training": args.training})


def _export(args):
    from .hub import export

    try:
        _check_export(args)
    except (ValueError, TypeError, OSError) as error:
        raise CommandError(error) from None
    _load_stack()
    from transformers import AutoModelForCausalLM

    checkpoint = Path(args.checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = None
    if any((checkpoint / name).exists() for name in ("tokenizer_config.json", "tokenizer.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    training = Path(args.training).read_text() if args.training and Path(args.training).is_file() else args.training
    try:
        files = export(model, args.folder, tokenizer, source=checkpoint, repo_id=args.repo_id, training=training,
                       datasets=args.datasets, overwrite=args.overwrite)
    except FileExistsError as error:  # the folder changed (or a crashed export was restored) since the check
        raise CommandError(error) from None
    for path in files:
        print(f"{path.stat().st_size:>12,}  {path}")


def _push(args):
    from .hub import push

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            names = push(args.folder, args.repo_id, private=args.private, dry_run=args.dry_run)
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise CommandError(error) from None
    verb = "would upload" if args.dry_run else "uploaded"
    print(f"{verb} {len(names)} files to {args.repo_id}:")
    for name in names:
        print(f"  {name}")
    for warning in caught:
        print(f"mythos push: warning: {warning.message}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
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
    p.add_argument("folder", help="output folder (not inside the --from folder)")
    p.add_argument("--from", dest="checkpoint", required=True, help="a save_pretrained / Trainer checkpoint folder")
    p.add_argument("--repo-id", default=None, help="the Hub repo the card's examples should name")
    p.add_argument("--training", default=None, help="training notes for the card (text, or a file to read)")
    p.add_argument("--datasets", nargs="*", default=None, help="datasets for the card's metadata")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the contents of a non-empty output folder (hidden entries are always refused)")
    p.set_defaults(func=_export)
    p = sub.add_parser("push", help="upload the files an export wrote (its export_manifest.json) to the Hub")
    p.add_argument("repo_id")
    p.add_argument("--folder", required=True)
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list exactly what would be uploaded; contact nobody")
    p.set_defaults(func=_push)
    return parser


def main(argv=None):
    parser = _parser()
    # the demo owns its flags (openmythos.demo.parse_args); every other command takes only its own
    args, extra = parser.parse_known_args(argv)
    if args.func is _demo:
        return args.func(args, extra)
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except CommandError as error:
        message = " ".join(str(error).split())  # one line, whatever the message held
        print(f"mythos {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
