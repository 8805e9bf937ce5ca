"""The ``mythos`` command line.

Fast by design: this module and ``openmythos.hub`` import only the standard library at the top, and the package
does not load torch/transformers inside the ``mythos`` command (see ``openmythos/__init__.py``). So ``--help``,
argument errors and refused exports return at once; a command loads the stack (``_load_stack``) only after its
inputs were checked. A user error prints one line, ``mythos <command>: error: ...``, and exits with status 2, as
argparse does; anything else is a bug and keeps its traceback.
"""

import argparse
import importlib.util
import math
import os
import sys
import warnings
from pathlib import Path


# the preset names, without importing the configuration (and torch) for --help
_PRESET_NAMES = ("mythos_tiny", "mythos_1b", "mythos_3b", "mythos_10b", "mythos_50b", "mythos_100b", "mythos_500b",
                 "mythos_1t")


class CommandError(Exception):
    """A refused command: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``<prog>: error: ...`` (argparse prints the usage block first);
    ``--help`` still shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def _load_stack():
    """Import torch/transformers and register the Auto classes (what a plain ``import openmythos`` does)."""
    from . import _load

    _load()


def _presets(args):
    _load_stack()
    from .parameters import preset_table

    print(preset_table())


def _plan(args):
    """``mythos plan``: every flag is checked by argparse or here, before torch is imported."""
    from .plan import LAYOUTS, Precision, format_plan, parse_memory
    from .plan import plan as make_plan

    try:
        gpu_memory = parse_memory(args.gpu_memory)
    except ValueError:
        raise CommandError(f"--gpu-memory must be a positive size such as 80GB, 141GB or 96GiB, got "
                           f"{args.gpu_memory!r}") from None
    for flag, value in (("--gpus", args.gpus), ("--batch", args.batch), ("--seq-len", args.seq_len),
                        ("--n-loops", args.n_loops), ("--context", args.context), ("--tp", args.tp),
                        ("--ep", args.ep)):
        if value is not None and value < 1:
            raise CommandError(f"{flag} must be a positive integer, got {value}")
    # a degree the chosen layouts never use would be silently ignored
    if args.tp is not None and args.layout not in ("all", "fsdp+ep+tp"):
        raise CommandError(f"--tp is the TP degree of the fsdp+ep+tp layout; --layout {args.layout} has no TP")
    if args.ep is not None and args.layout == "fsdp":
        raise CommandError("--ep is the EP degree of the fsdp+ep and fsdp+ep+tp layouts; --layout fsdp has no EP")
    precision = Precision(args.param_dtype, args.grad_dtype, args.master_dtype, args.optimizer_state_dtype)
    _load_stack()
    from .configuration_mythos import PRESETS

    config = PRESETS[args.preset]()
    if args.n_loops is not None and args.n_loops > config.loop_limit:
        raise CommandError(f"--n-loops must be at most {config.loop_limit} for {args.preset} (the model refuses more), "
                           f"got {args.n_loops}")
    if args.loop_kv_sharing:
        config.loop_kv_sharing = "first"
    layouts = LAYOUTS if args.layout == "all" else (args.layout,)
    try:
        result = make_plan(config, args.gpus, gpu_memory, batch=args.batch, seq_len=args.seq_len,
                           n_loops=args.n_loops, context=args.context, precision=precision,
                           checkpointing=not args.no_checkpointing, optimizer=args.optimizer, layouts=layouts,
                           tp=args.tp, ep=args.ep, config_name=args.preset, adamw_impl=args.adamw_impl)
    except ValueError as error:  # a TP / EP degree that does not divide the GPUs, heads or experts
        raise CommandError(str(error).replace("`tp`", "--tp").replace("`ep`", "--ep")) from None
    print(format_plan(result))


def _quickstart(args):
    bad = [n for n in args.n_loops if n < 1]
    if bad:
        raise CommandError(f"--n-loops must be positive integers, got {bad[0]}")
    _load_stack()
    from .quickstart import readme_config, run

    limit = readme_config("gqa").loop_limit
    if max(args.n_loops) > limit:
        raise CommandError(f"--n-loops must be at most {limit} for this model (8 x max_loop_iters), got "
                           f"{max(args.n_loops)}")

    run(attn_types=args.attn_type, n_loops=args.n_loops)


def _demo(args, demo_argv):
    from .demo import parse_args, run  # the standard library only: run imports the training pipeline

    demo_args = parse_args(demo_argv)  # --help and refused flags exit here, before torch is imported
    from .demo.files import claim_output_dir
    from .demo.flags import output_problem

    if (problem := output_problem(demo_args)) is not None:
        print(f"mythos demo: error: {problem}", file=sys.stderr)
        return 2
    try:
        claim_output_dir(Path(demo_args.output_dir))
    except OSError as error:  # what a permission check cannot see (a read-only mount, /proc)
        print(f"mythos demo: error: --output-dir {demo_args.output_dir!r} cannot be created: "
              f"{error.strerror or error}", file=sys.stderr)
        return 2
    _load_stack()
    run(demo_args)
    return 0


def _serve(args, serve_argv):
    from .serving import serve  # checks its dependencies, then loads the stack

    return serve(serve_argv)


def _check_mythos_folder(flag: str, folder: Path) -> None:
    """A save_pretrained folder of a Mythos model: a readable config.json of model_type "mythos", and weights."""
    import json

    if not (folder / "config.json").is_file():
        raise CommandError(f"{flag} {str(folder)!r} has no config.json; pass a folder written by save_pretrained")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (ValueError, OSError) as error:
        raise CommandError(f"{flag} {str(folder)!r}: config.json is not readable JSON ({error})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "mythos":
        raise CommandError(f"{flag} {str(folder)!r} holds a {model_type or 'model without a model_type'!s} checkpoint, "
                           f"not a Mythos one (config.json model_type 'mythos')")
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if not any((folder / name).is_file() for name in weights):
        raise CommandError(f"{flag} {str(folder)!r} has no weights ({' or '.join(weights[:2])}); pass the folder "
                           f"save_pretrained wrote")


def _load_checkpoint(flag: str, folder: Path):
    """The model of a checked folder; a file that does not load is one line, not a traceback."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as error:
        raise CommandError(f"{flag} {str(folder)!r} did not load: {error}") from None


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text", ".markdown")


def _check_export(args):
    """Every refusal of ``mythos export``, before the checkpoint is loaded."""
    from .hub import _check_card_inputs, check_export_target

    checkpoint = Path(args.checkpoint)
    _check_mythos_folder("--from", checkpoint)
    check_export_target(args.folder, sources=[checkpoint], overwrite=args.overwrite, repo_id=args.repo_id)
    _check_card_inputs({"datasets": args.datasets, "training": args.training})
    training = args.training
    if training and not Path(training).is_file() and not any(ch.isspace() for ch in training) and (
            Path(training).suffix.lower() in TEXT_SUFFIXES or os.sep in training):
        raise ValueError(f"--training {training!r} looks like a file name and no such file exists: give an existing "
                         f"file, or the notes themselves as text (words separated by spaces)")


def _export(args):
    from .hub import export

    try:
        _check_export(args)
    except (ValueError, TypeError, OSError) as error:
        raise CommandError(error) from None
    _load_stack()
    checkpoint = Path(args.checkpoint)
    model = _load_checkpoint("--from", checkpoint)
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


def _check_loops(args):
    """Every refusal of ``mythos loops`` that needs no model: the flags, the folder, matplotlib for --heatmap."""
    folder = Path(args.model)
    _check_mythos_folder("--model", folder)
    if not any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        raise CommandError(f"--model {str(folder)!r} has no tokenizer (tokenizer_config.json); save one beside the "
                           f"weights with tokenizer.save_pretrained({str(folder)!r})")
    if not args.prompt:
        raise CommandError("--prompt is empty; pass the text to run")
    if args.n_loops is not None and args.n_loops < 1:
        raise CommandError(f"--n-loops must be a positive integer, got {args.n_loops}")
    if args.exit_threshold is not None and args.exit_criterion is None:
        raise CommandError(f"--exit-threshold {args.exit_threshold} needs --exit-criterion (act, delta or kl)")
    if args.exit_criterion is not None and args.exit_threshold is None:
        raise CommandError(f"--exit-criterion {args.exit_criterion} needs --exit-threshold (a number > 0)")
    if args.exit_threshold is not None and not (math.isfinite(args.exit_threshold) and args.exit_threshold > 0):
        raise CommandError(f"--exit-threshold must be a finite number > 0, got {args.exit_threshold}")
    if args.exit_scope is not None and args.exit_criterion not in ("delta", "kl"):
        raise CommandError(f"--exit-scope {args.exit_scope} needs --exit-criterion delta or kl (act decides each "
                           f"position by its own halting mass)")
    if args.exit_criterion == "act" and args.exit_threshold > 1:
        raise CommandError(f"--exit-threshold must be at most 1 for --exit-criterion act (a halting mass), got "
                           f"{args.exit_threshold}")
    if args.max_new_tokens < 0:
        raise CommandError(f"--max-new-tokens must be >= 0 (0: just the prompt), got {args.max_new_tokens}")
    if args.heatmap is not None:
        _check_heatmap(Path(args.heatmap), args.overwrite)


def _check_heatmap(path: Path, overwrite: bool = False):
    if path.suffix.lower() != ".png":
        raise CommandError(f"--heatmap {str(path)!r} must name a .png file")
    if path.is_dir():
        raise CommandError(f"--heatmap {str(path)!r} is a folder; name the .png file to write")
    if not path.parent.is_dir():
        raise CommandError(f"--heatmap {str(path)!r}: {str(path.parent)!r} is not an existing folder")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise CommandError(f"--heatmap {str(path)!r} already exists; name a new file, or pass --overwrite to replace "
                           f"it")
    import os

    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CommandError(f"--heatmap {str(path)!r}: the folder {str(path.parent)!r} is not writable")
    if importlib.util.find_spec("matplotlib") is None:
        raise CommandError("--heatmap needs matplotlib: pip install matplotlib (or pip install 'openmythos[demo]')")


def _loops(args):
    _check_loops(args)
    _load_stack()
    from transformers import AutoTokenizer
    from transformers.utils.logging import disable_progress_bar

    from .loop_report import format_table, loop_report, write_heatmap

    if not sys.stderr.isatty():  # a log or a pipe: keep stderr for the errors
        disable_progress_bar()
    model = _load_checkpoint("--model", Path(args.model)).eval()
    if args.exit_scope is not None:  # this run only: the folder's config is not written
        model.config.exit_scope = args.exit_scope
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    try:
        report = loop_report(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                             n_loops=args.n_loops, exit_criterion=args.exit_criterion,
                             exit_threshold=args.exit_threshold)
    except ValueError as error:  # the model's refusals: n_loops above its bound, a prompt too long, ...
        raise CommandError(error) from None
    print(format_table(report))
    if args.heatmap is not None:
        try:
            write_heatmap(report, Path(args.heatmap))
        except OSError as error:
            raise CommandError(f"--heatmap {args.heatmap!r} could not be written: {error}") from None
        print(f"heatmap written to {args.heatmap}")


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="mythos", description="OpenMythos looped transformer tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("presets", help="print the preset table with total and active parameter counts")
    p.set_defaults(func=_presets)
    p = sub.add_parser("plan", help="per-GPU memory, per-step traffic and fit of a preset under FSDP, FSDP+EP and "
                                     "FSDP+EP+TP (docs/plan.md)")
    p.add_argument("--preset", required=True, choices=[name for name in _PRESET_NAMES])
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-memory", default="80GB", help="memory of one GPU, e.g. 80GB, 141GB, 96GiB (default 80GB)")
    p.add_argument("--batch", type=int, default=1, help="sequences per data-parallel rank (per TP group) per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: max_seq_len, at most 4096)")
    p.add_argument("--n-loops", type=int, default=None, help="loop iterations (default: the preset's max_loop_iters)")
    p.add_argument("--context", type=int, default=None, help="tokens of the KV-cache figure (default: max_seq_len)")
    p.add_argument("--loop-kv-sharing", action="store_true", help="KV cache with one loop slot (loop_kv_sharing)")
    p.add_argument("--layout", choices=["all", "fsdp", "fsdp+ep", "fsdp+ep+tp"], default="all")
    p.add_argument("--tp", type=int, default=None, help="TP degree of fsdp+ep+tp (default: up to 8, one node)")
    p.add_argument("--ep", type=int, default=None, help="EP degree (default: the most that divides GPUs and experts)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw", help="the optimizer the fit uses")
    p.add_argument("--no-checkpointing", action="store_true", help="judge the fit without activation checkpointing")
    p.add_argument("--adamw-impl", choices=["foreach", "per-tensor", "fused"], default="foreach",
                   help="torch's AdamW implementation, for the optimizer step's temporaries (default foreach, "
                        "torch's default on GPUs)")
    p.add_argument("--param-dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                   help="parameters as the forward reads them; also activations and the KV cache (default bf16)")
    p.add_argument("--grad-dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--master-dtype", choices=["fp32", "bf16", "fp16", "none"], default="fp32",
                   help="master copy of the parameters kept by the optimizer ('none': the parameters are the master)")
    p.add_argument("--optimizer-state-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.set_defaults(func=_plan)
    p = sub.add_parser("quickstart", help="build a small model, run a forward pass and generate with several n_loops")
    p.add_argument("--attn-type", nargs="+", default=["mla", "gqa"], choices=["mla", "gqa"])
    p.add_argument("--n-loops", nargs="+", type=int, default=[1, 4, 8])
    p.set_defaults(func=_quickstart)
    p = sub.add_parser("demo", add_help=False,
                       help="train a looped model and dense baselines on multi-hop reasoning; `mythos demo --help` "
                            "lists its flags")
    p.set_defaults(func=_demo)
    p = sub.add_parser("serve", add_help=False,
                       help="serve a checkpoint with transformers serve (OpenAI-compatible API); takes the options of "
                            "`transformers serve`, listed by `mythos serve --help`")
    p.set_defaults(func=_serve)
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
    p = sub.add_parser("loops", help="run a prompt and print the loops every token used, and its state change per "
                                     "loop (optionally as a heatmap)")
    p.add_argument("--model", required=True, help="a save_pretrained folder with a tokenizer")
    p.add_argument("--prompt", required=True, help="the text to run")
    p.add_argument("--n-loops", type=int, default=None, help="loop budget (default: the config's n_loops, else max_loop_iters)")
    p.add_argument("--exit-criterion", choices=["act", "delta", "kl"], default=None,
                   help="stop a position's loop early: act (halting head), delta (state change), kl (prediction)")
    p.add_argument("--exit-threshold", type=float, default=None, help="the criterion's threshold (> 0; at most 1 for act)")
    p.add_argument("--exit-scope", choices=["position", "prefix", "row"], default=None,
                   help="delta or kl: what a position waits for before it stops (config.exit_scope; default: the "
                        "checkpoint's): nothing, every earlier position, or its whole row")
    p.add_argument("--max-new-tokens", type=int, default=0, help="tokens to generate greedily (0: just the prompt)")
    p.add_argument("--heatmap", default=None, metavar="PATH.png",
                   help="also write a tokens x loops heatmap of the state change (needs matplotlib)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --heatmap file")
    p.set_defaults(func=_loops)
    return parser


def main(argv=None):
    parser = _parser()
    # the demo owns its flags (openmythos.demo.parse_args), serve those of `transformers serve`; every other command
    # takes only its own
    args, extra = parser.parse_known_args(argv)
    if args.func in (_demo, _serve):
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
