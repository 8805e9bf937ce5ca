"""Does looping buy reasoning depth? Train on shallow multi-hop questions, test on deeper ones.

``mythos demo`` (or ``python -m openmythos.demo``) trains three models with the Hugging Face Trainer on k-hop
pointer chasing (``openmythos.demo.tasks``) with k <= K: the question ``q+++`` asks for the node three links after
``q``, and every mark is trained to hold its intermediate node.

- a small looped OpenMythos model, trained on every mark's node after every loop (the j-th mark holds the node
  min(j, t) links on after t loops), with n_loops drawn from the batch's deepest hop count to that + ``--extra-loops``;
- a dense transformer (Llama) with about the same number of parameters;
- a dense transformer with about the same compute per token as the looped model at depth K (one layer per pass).

The dense models learn the same labels from their one output. The demo then scores every model on every question
with 1..2K hops: the looped one at every n_loops 1..16 and with an exit rule that is given no hop count (each
question's positions stop together, at the first loop where every one's next-token distribution has stopped changing,
``exit_criterion="kl"`` with ``exit_scope="row"``, at most ``--exit-budget`` loops, the threshold chosen on training
questions only). It prints the accuracy table, writes it as ``results.json`` /
``accuracy.md`` and plots ``accuracy.png``, saves the looped model with ``save_pretrained``, reloads it through
``AutoModelForCausalLM`` and answers sample questions with ``generate`` and the exit rule. Every setting is a flag.
A seed fixes the results on one machine: the same seed, torch version, thread count and CPU kernels (or GPU) give the
same table, and ``results.json`` records them. Another CPU can round differently (AVX-512 and AVX2 kernels sum in
another order), so its table can differ by a few points.

``--task context`` swaps the hidden graph for one written in the prompt, a new graph per example
(``InContextPointerChasingTask``): training prompts query every node of graphs of varied size, the first
``--curriculum-steps`` batches are 1-hop only, and all three models see the same batches in the same order. Its
defaults are the recipe that makes the looped model learn it (docs/demo.md): the looped model trains with
``n_loops = k`` and is scored at n_loops 1..2K+2 (no exit rule).

``--task text`` is a separate demo with its own flags (``mythos demo --task text --help``, ``openmythos.demo.text``):
byte-level models on Python's own documentation, scored in held-out bits per byte at every loop count.
"""

# The docstring above is `mythos demo --help`'s description, so the layout is explained here instead: `mythos demo
# --help` and a refused flag must not pay for importing torch. This module, the task kinds (tasks.py), the result files
# (files.py) and the report (report.py) import only the standard library at the top; `run` imports the training
# pipeline (pipeline.py: torch, transformers, datasets) when it is called.

import argparse
import math
import sys

from . import text
from .files import recover_folder, save_folder_atomically, write_atomically, write_text_atomically
from ..cli import OneLineParser
from .flags import common_problem, output_problem
from .report import EXIT, EXIT_LOOPS, LOOPED, SAME_COMPUTE, SAME_PARAMS, format_table, summary
from .tasks import NODE_NAMES, InContextPointerChasingTask, PointerChasingTask

# --task value -> task kind
TASKS = {kind.flag: kind for kind in (PointerChasingTask, InContextPointerChasingTask)}


def parse_args(argv=None) -> argparse.Namespace:
    if text.wants_text(argv):  # --task text has its own flags (openmythos.demo.text)
        return text.parse_args(argv)
    p = OneLineParser(prog="mythos demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted([*TASKS, text.FLAG]), default="hidden",
                   help="hidden: one graph learned into the weights; context: a new graph written in every prompt; "
                        "text: bits per byte on Python's documentation at every loop count (`mythos demo --task text "
                        "--help` lists its flags)")
    p.add_argument("--train-hops", type=int, default=4, help="K: training questions have 1..K hops")
    p.add_argument("--eval-hops", type=int, default=None, help="evaluate 1..this many hops (default 2K)")
    p.add_argument("--max-loops", type=int, default=None, help="evaluate the looped model at n_loops 1..this "
                                                                 "(default 16; context: 2K + 2)")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes in the hidden graph (2 to 52; default 24), or "
                                                                 "most nodes of an in-context graph (3 to 52; "
                                                                 "default 9)")
    p.add_argument("--dim", type=int, default=None, help="hidden size of every model (default 96; context: 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads of every model")
    p.add_argument("--loop-kv-sharing", choices=("none", "first", "last"), default="none",
                   help="the looped model's cross-loop KV sharing (config.loop_kv_sharing; 'last' trains one token "
                        "at a time, slowly)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps for the looped model (default 1700; "
                                                              "context: 1200)")
    p.add_argument("--baseline-steps", type=int, default=None, help="optimizer steps per dense model "
                                                                      "(default: --steps)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-3; context: 3e-3)")
    p.add_argument("--train-examples", type=int, default=None, help="questions in the training set (default 20000; "
                                                                      "context: one batch per step)")
    p.add_argument("--curriculum-steps", type=int, default=None, help="context: the first this many batches are "
                                                                        "1-hop only (default 300)")
    p.add_argument("--eval-examples", type=int, default=500, help="context: scored prompts per hop count")
    p.add_argument("--pack", type=int, default=None, help="hidden: each training row holds 1..this many questions "
                                                          "(default 3)")
    p.add_argument("--extra-loops", type=int, default=None,
                   help="hidden: a training batch runs n_loops drawn from its deepest question's hops to that + this "
                        "many, every loop's output trained on (default 4)")
    for flag, what in (  # training changes tried on the late seeds, none the default (docs/demo.md)
            ("--state-noise", "add Gaussian noise of this size relative to each position's RMS to the loop state after "
                              "every loop (default: none; tried at 0.1)"),
            ("--arrival-weight", "the loss of the mark the wave reaches at each loop counts this many times (default: "
                                 "1, the plain mean)"),
            ("--moving-weight", "the loss of every mark whose target changes at a loop (the arriving mark and the "
                                "waiting ones) counts this many times (default: 1)")):
        p.add_argument(flag, type=float, default=None, help=f"hidden: in training, {what}; docs/demo.md")
    p.add_argument("--loop-state-norm", action="store_true", default=None,
                   help="hidden: the looped model rescales its state after every loop to the root-mean-square of its "
                        "input (config.loop_state_norm), so the state's size does not drift with the loop count "
                        "(default: off; docs/demo.md)")
    p.add_argument("--exit-budget", type=int, default=None,
                   help="hidden: most loops the exit rule may run (default 16); it is given no hop count")
    p.add_argument("--exit-criterion", choices=("kl", "delta"), default=None,
                   help="hidden: what the exit rule watches; kl: the KL divergence between successive loops' "
                        "next-token distributions (runs the coda and head every loop), delta: the relative state "
                        "change (default kl)")
    p.add_argument("--exit-scope", choices=("position", "prefix", "row"), default=None,
                   help="hidden: what the exit rule waits for (the looped model's config.exit_scope); position: each "
                        "position stops on its own measure, prefix: also only once every earlier position has stopped, "
                        "row: a question's positions stop together, at the first loop where every one has settled "
                        "(default row)")
    p.add_argument("--samples", type=int, default=4, help="sample questions answered after reloading")
    p.add_argument("--seed", type=int, default=0, help="seed of the graph, the data and the models (same "
                                                         "seed, machine, torch version and --threads: same results)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (these models are too small to gain "
                                                           "from more)")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                   help="training processes: 2 trains the dense baselines in a second process beside the looped "
                        "model (same results as 1; default 2 where the machine has 2 or more CPUs and no GPU)")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output-dir that no earlier demo run wrote (its files of the demo's "
                        "names are replaced)")
    p.add_argument("--no-plot", action="store_true", help="skip accuracy.png (no matplotlib needed)")
    args = p.parse_args(argv)
    task_kind = kind_of(args)
    defaulted = {name for name in task_kind.flag_defaults if getattr(args, name) is None}
    for name, value in task_kind.flag_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.train_hops < 1:
        p.error(f"--train-hops must be >= 1, got {args.train_hops}")
    # the looped model's loop bound (MythosConfig.loop_limit: 8 x max_loop_iters, and max_loop_iters is K)
    limit = 8 * args.train_hops
    for name in ("max_loops", "exit_budget"):
        if name in defaulted and getattr(args, name) is not None:
            setattr(args, name, min(getattr(args, name), limit))
    if args.eval_hops is None:
        args.eval_hops = 2 * args.train_hops
    if args.max_loops is None:
        args.max_loops = 2 * args.train_hops + 2
    args.baseline_steps = args.baseline_steps if args.baseline_steps is not None else args.steps
    if args.train_examples is None:
        args.train_examples = max(args.steps, args.baseline_steps) * args.batch_size
    for name in ("train_hops", "eval_hops", "max_loops", "dim", "heads", "steps", "batch_size", "train_examples",
                 "eval_examples", "pack", "exit_budget"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("extra_loops", "baseline_steps", "samples"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.extra_loops is not None and args.train_hops + args.extra_loops > limit:
        p.error(f"--extra-loops must be at most {limit - args.train_hops} (--train-hops + --extra-loops loops must fit "
                f"the looped model's bound of {limit}), got {args.extra_loops}")
    for name in ("max_loops", "exit_budget"):
        if getattr(args, name) is not None and getattr(args, name) > limit:
            p.error(f"--{name.replace('_', '-')} must be at most {limit} (8 x --train-hops, the looped model's loop "
                    f"bound), got {getattr(args, name)}")
    if args.state_noise is not None and not (math.isfinite(args.state_noise) and 0 <= args.state_noise < 10):
        p.error(f"--state-noise must be a number in [0, 10), got {args.state_noise}")
    for name in ("arrival_weight", "moving_weight"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and 0 < value <= 100):
            p.error(f"--{name.replace('_', '-')} must be a number in (0, 100], got {value}")
    if (problem := common_problem(args)) is not None:
        p.error(problem)
    low = 3 if args.task == "context" else 2
    if not low <= args.num_nodes <= len(NODE_NAMES):
        p.error(f"--num-nodes must be from {low} to {len(NODE_NAMES)} for --task {args.task}, got {args.num_nodes}")
    if args.eval_hops >= args.num_nodes:
        p.error(f"--eval-hops ({args.eval_hops}) must be below --num-nodes ({args.num_nodes}): past that, the "
                f"cycle repeats and deeper questions share answers with shallower ones")
    if args.curriculum_steps < 0:
        p.error(f"--curriculum-steps must be >= 0, got {args.curriculum_steps}")
    if (problem := task_kind.check_args(args)) is not None:
        p.error(problem)
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        p.error(f"--dim ({args.dim}) must be divisible by --heads ({args.heads}) into an even head size")
    return args


def kind_of(args: argparse.Namespace) -> type:
    """The task kind ``--task`` names. The demo's only use of ``--task``: whatever differs between the kinds (flag
    defaults, sequence length, training set, evaluation questions, console text) is an attribute of the kind."""
    return TASKS[args.task]


def task_of(args: argparse.Namespace):
    """The task the demo trains and scores on, built from the parsed flags."""
    return kind_of(args).from_args(args)


def run(args: argparse.Namespace) -> dict:
    """Train the three models, score them, write the results and return them (``results.json``'s content)."""
    if args.task == text.FLAG:
        return text.run(args)
    from .pipeline import run as run_pipeline  # torch, transformers, datasets: only for a run

    return run_pipeline(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    if (problem := output_problem(args)) is not None:
        print(f"mythos demo: error: {problem}", file=sys.stderr)
        return 2
    run(args)
    return 0


__all__ = ["TASKS", "LOOPED", "EXIT", "EXIT_LOOPS", "SAME_PARAMS", "SAME_COMPUTE", "parse_args", "kind_of", "task_of", "run", "main",
           "format_table", "summary", "write_atomically", "write_text_atomically", "save_folder_atomically",
           "recover_folder", "PointerChasingTask", "InContextPointerChasingTask"]
