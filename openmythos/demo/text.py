"""Does looping hurt on real text? ``mythos demo --task text`` trains byte-level models on English text that ships
with Python and scores held-out bits per byte at every loop count.

The text is Python's own documentation: the language reference's pydoc topics (``pydoc_data.topics``) plus the
docstrings of a fixed list of standard-library modules (``TEXT_MODULES``), one document per topic or docstring,
collected in a fixed order and deduplicated by text. A document goes to the test split, the validation split (used
only to pick the exit threshold) or the training split by a checksum of its name, so the split is the same on every
run and no test text is trained on. Three models of about the same parameter count see the same training batches:

- looped, trained with loop sampling (``loop_sampling="poisson_lognormal"``, mean ``--mean-loops``);
- looped, trained with a fixed ``--mean-loops`` loops (the recipe of the reference's issue #28);
- a dense Llama.

The looped models are scored at every ``--eval-loops`` and with an exit rule (``--exit-criterion``, budget the
largest ``--eval-loops``, threshold picked on the validation split: ``text_pipeline.pick_threshold``), which also
reports the mean loops it used. The run writes ``results.json``, ``bpb.md`` and ``bpb.png`` to ``--output-dir``.
"""

# Like the rest of openmythos.demo, this module imports only the standard library at the top, so that `mythos demo
# --task text --help` and a refused flag never pay for torch. The training and scoring are in text_pipeline.py.

import argparse
import importlib
import inspect
import zlib
from dataclasses import dataclass

from ..cli import OneLineParser
from .flags import common_problem

FLAG = "text"

# The standard-library modules whose docstrings join the pydoc topics. Fixed, so the corpus is the same on every run
# of one Python version; a module a Python lacks is skipped (results.json records the corpus size and checksum).
TEXT_MODULES = (
    "abc argparse ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.queues asyncio.streams "
    "asyncio.subprocess asyncio.tasks base64 bdb binascii bisect builtins bz2 calendar cmd code codecs collections "
    "collections.abc colorsys concurrent.futures configparser contextlib copy copyreg csv dataclasses datetime "
    "decimal difflib dis doctest email.message email.parser email.utils enum filecmp fileinput fnmatch fractions "
    "ftplib functools gc getopt gettext glob gzip hashlib heapq hmac html html.parser http.client http.cookies "
    "http.server imaplib importlib importlib.abc importlib.metadata importlib.resources inspect io ipaddress "
    "itertools json json.decoder json.encoder keyword linecache locale logging logging.handlers lzma mailbox math "
    "mimetypes mmap multiprocessing multiprocessing.pool numbers operator optparse os os.path pathlib pdb pickle "
    "pickletools pkgutil platform plistlib poplib pprint profile pstats queue quopri random re reprlib sched secrets "
    "selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct "
    "subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading time timeit token tokenize trace "
    "traceback tracemalloc types unittest unittest.mock urllib.parse urllib.request uuid warnings wave weakref "
    "xml.dom.minidom xml.etree.ElementTree xml.sax zipfile zipimport zlib"
).split()

# the three models, and the table's row names
SAMPLED, FIXED, DENSE = "looped_sampled", "looped_fixed", "dense"
TITLES = {SAMPLED: "looped, loop sampling", FIXED: "looped, fixed loops", DENSE: "dense Llama"}

DEFAULTS = {"dim": 128, "heads": 4, "seq_len": 128, "batch_size": 16, "steps": 600, "lr": 3e-3, "mean_loops": 4,
            "backprop_loops": None, "eval_loops": "1,2,4,8,16,32", "exit_criterion": "kl",
            "exit_thresholds": "0.03,0.01,0.003,0.001", "exit_tolerance": 0.005, "val_blocks": 64,
            "test_blocks": 256, "train_bytes": None}


# ----------------------------------------------------------------------------------------------------------- corpus
@dataclass(frozen=True)
class Document:
    name: str  # "topic:<name>" for a pydoc topic, else the dotted name of the documented object
    text: str


def _docstrings(module) -> list[Document]:
    """The module's docstring, then those of its public classes and functions (sorted by name) and of their public
    methods and properties (and ``__init__``). Only objects defined in the module itself, so re-exports are not
    counted twice; ``__doc__`` is read directly, because ``inspect.getdoc`` would copy a base class's docstring."""
    found = []

    def add(name, obj):
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            found.append(Document(name, inspect.cleandoc(doc).strip()))

    add(module.__name__, module)
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        add(f"{module.__name__}.{name}", obj)
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if member_name.startswith("_") and member_name != "__init__":
                    continue
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if inspect.isroutine(member) or isinstance(member, property):
                    add(f"{module.__name__}.{name}.{member_name}", member)
    return found


def collect_documents(modules=TEXT_MODULES) -> list[Document]:
    """Every pydoc topic (sorted by name), then every docstring of ``modules`` in order; a text seen before is
    dropped, so no document's text is in two splits."""
    import warnings

    from pydoc_data.topics import topics

    documents = [Document(f"topic:{name}", topics[name].strip()) for name in sorted(topics)]
    with warnings.catch_warnings():  # a few modules warn about deprecated names when their attributes are read
        warnings.simplefilter("ignore")
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # not built into this Python (e.g. no sqlite3 or ssl)
                continue
            documents += _docstrings(module)
    seen, unique = set(), []
    for doc in documents:
        if doc.text not in seen:
            seen.add(doc.text)
            unique.append(doc)
    return unique


def split_of(name: str) -> str:
    """"test" for 1 document in 10, "validation" for 1 in 10, else "train": a checksum of the name, so the split is
    the same on every run and machine and does not depend on the order documents are found in."""
    bucket = zlib.crc32(name.encode("utf-8")) % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def split_documents(documents: list[Document]) -> dict[str, list[Document]]:
    splits = {"train": [], "validation": [], "test": []}
    for doc in documents:
        splits[split_of(doc.name)].append(doc)
    return splits


# ---------------------------------------------------------------------------------------------------------- flags
def _int_list(value: str) -> list[int]:
    try:
        values = [int(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {value!r}")
    return sorted(set(values))


def _float_list(value: str) -> list[float]:
    try:
        values = [float(v) for v in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {value!r}") from None
    if not values or any(not 0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers > 0, got {value!r}")
    return sorted(set(values), reverse=True)


MAX_MEAN_LOOPS, MAX_EVAL_LOOPS = 64, 256


def parse_args(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="mythos demo --task text", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    p.add_argument("--task", choices=[FLAG], default=FLAG, help="text (this demo)")
    p.add_argument("--dim", type=int, default=d["dim"], help="hidden size of every model")
    p.add_argument("--heads", type=int, default=d["heads"], help="attention heads of every model")
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="bytes per training and scoring block")
    p.add_argument("--batch-size", type=int, default=d["batch_size"])
    p.add_argument("--steps", type=int, default=d["steps"], help="optimizer steps per model")
    p.add_argument("--lr", type=float, default=d["lr"], help="peak learning rate (warmup, then cosine to 0)")
    p.add_argument("--mean-loops", type=int, default=d["mean_loops"],
                   help="mean of the sampled model's loop draw, and the fixed model's loop count")
    p.add_argument("--backprop-loops", type=int, default=d["backprop_loops"],
                   help="the sampled model backpropagates through only its last this many loops (default: all)")
    p.add_argument("--eval-loops", type=_int_list, default=d["eval_loops"],
                   help="comma-separated loop counts the looped models are scored at; the largest is the exit "
                        "rule's budget")
    p.add_argument("--exit-criterion", choices=("delta", "kl"), default=d["exit_criterion"],
                   help="the exit rule's criterion (the model's exit_criterion)")
    p.add_argument("--exit-thresholds", type=_float_list, default=d["exit_thresholds"],
                   help="comma-separated candidate exit thresholds; the largest one that passes the validation "
                        "check is used (if none passes, the one with the lowest validation bits per byte)")
    p.add_argument("--exit-tolerance", type=float, default=d["exit_tolerance"],
                   help="an exit threshold passes when its validation bits per byte are at most this fraction above "
                        "the model's best fixed loop count's")
    p.add_argument("--val-blocks", type=int, default=d["val_blocks"], help="validation blocks (evenly spaced) "
                                                                           "scored to pick the exit threshold")
    p.add_argument("--test-blocks", type=int, default=d["test_blocks"], help="score this many test blocks, evenly "
                                                                             "spaced over the test split")
    p.add_argument("--train-bytes", type=int, default=d["train_bytes"],
                   help="train on only the first this many bytes of the training split (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models and the batch order")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--jobs", type=int, choices=(1, 2), default=None,
                   help="training processes: 2 trains and scores the fixed-loop model in a second process beside "
                        "the other two (same results as 1; default 2 where the machine has 2 or more CPUs and no GPU)")
    p.add_argument("--output-dir", default="demo_output/text")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output-dir that no earlier demo run wrote (its files of the demo's "
                        "names are replaced)")
    p.add_argument("--no-plot", action="store_true", help="skip bpb.png (no matplotlib needed)")
    args = p.parse_args(argv)
    args.eval_loops = _int_list(args.eval_loops) if isinstance(args.eval_loops, str) else args.eval_loops
    if isinstance(args.exit_thresholds, str):
        args.exit_thresholds = _float_list(args.exit_thresholds)
    for name in ("dim", "heads", "seq_len", "batch_size", "steps", "mean_loops", "val_blocks", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("backprop_loops", "test_blocks", "train_bytes"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        p.error(f"--seq-len must be >= 2 (a block predicts its bytes after the first), got {args.seq_len}")
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        p.error(f"--dim ({args.dim}) must be divisible by --heads ({args.heads}) into an even head size")
    if not 0 <= args.exit_tolerance < 1:
        p.error(f"--exit-tolerance must be in [0, 1), got {args.exit_tolerance}")
    # each loop is one more block pass per token: a mistyped depth would run for hours, not fail
    if args.mean_loops > MAX_MEAN_LOOPS:
        p.error(f"--mean-loops must be from 1 to {MAX_MEAN_LOOPS}, got {args.mean_loops}")
    if max(args.eval_loops) > MAX_EVAL_LOOPS:
        p.error(f"--eval-loops must each be from 1 to {MAX_EVAL_LOOPS}, got {max(args.eval_loops)}")
    if (problem := common_problem(args)) is not None:
        p.error(problem)
    return args


def wants_text(argv) -> bool:
    """Whether ``mythos demo`` was asked for this task (``--task text`` or ``--task=text``); the other tasks keep
    their own parser."""
    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument("--task", nargs="?")  # a missing value is the real parser's error to report
    known, _ = probe.parse_known_args(argv)
    return known.task == FLAG


# ---------------------------------------------------------------------------------------------------------- report
def loop_columns(args) -> list[str]:
    return [f"n_loops={n}" for n in args.eval_loops] + ["exit rule", "exit rule mean loops"]


def format_table(bpb: dict, args) -> str:
    """Markdown: one row per model, one column per n_loops, then the exit rule's bits per byte and mean loops. The
    dense model has one depth, shown in every n_loops column."""
    titles = ["model"] + loop_columns(args)
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for name in (SAMPLED, FIXED, DENSE):
        row = bpb[name]
        cells = [f"{row['n_loops'][str(n)]:.4f}" for n in args.eval_loops]
        if "exit" in row:
            cells += [f"{row['exit']['bpb']:.4f}", f"{row['exit']['mean_loops']:.2f}"]
        else:
            cells += ["-", "-"]
        lines.append(f"| {TITLES[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(bpb: dict, args) -> dict:
    """The headline check: the loop-sampled model's bits per byte at every scored loop count past ``--mean-loops``
    is at most 1% above its value at ``--mean-loops`` (relative)."""
    base_loops = args.mean_loops if args.mean_loops in args.eval_loops else None
    row = bpb[SAMPLED]["n_loops"]
    deeper = [n for n in args.eval_loops if base_loops is not None and n > base_loops]
    worst = {str(n): row[str(n)] / row[str(base_loops)] - 1 for n in deeper}
    return {"reference_loops": base_loops, "relative_change_vs_reference": worst,
            "goal_met": bool(deeper) and all(change <= 0.01 for change in worst.values())}


def extrapolation_line(numbers: dict) -> str | None:
    """The printed verdict of :func:`summary`: the changes past the reference loops, or that none were scored."""
    base = numbers["reference_loops"]
    if base is None:
        return None
    changes = numbers["relative_change_vs_reference"]
    if not changes:
        return (f"No --eval-loops past --mean-loops {base}: the extrapolation check (bits per byte at more loops "
                f"within +1%) was not made.")
    listed = ", ".join(f"{n} loops {c:+.2%}" for n, c in changes.items())
    return (f"Loop-sampled model against its {base} loops: {listed} "
            f"({'each within +1%' if numbers['goal_met'] else 'NOT all within +1%'}).")


def plot(bpb: dict, args, path, title: str) -> None:
    """Bits per byte against n_loops (log scale), one line per looped model, the dense model as a flat line and the
    exit rules as single points at their mean loops."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import write_atomically

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {SAMPLED: ("tab:blue", "o"), FIXED: ("tab:orange", "s")}
    for name, (color, marker) in styles.items():
        values = [bpb[name]["n_loops"][str(n)] for n in args.eval_loops]
        ax.plot(args.eval_loops, values, color=color, marker=marker, linewidth=2, label=TITLES[name])
        ex = bpb[name]["exit"]
        ax.plot([ex["mean_loops"]], [ex["bpb"]], color=color, marker="*", markersize=14, linestyle="none",
                label=f"{TITLES[name]}, exit rule ({ex['criterion']} < {ex['threshold']:g})")
    ax.axhline(bpb[DENSE]["n_loops"][str(args.eval_loops[0])], color="tab:red", linestyle="--", linewidth=2,
               label=f"{TITLES[DENSE]} (one depth)")
    ax.axvline(args.mean_loops, color="grey", linestyle=":", linewidth=1, label=f"training mean ({args.mean_loops})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(args.eval_loops, [str(n) for n in args.eval_loops])
    ax.set(xlabel="n_loops at inference", ylabel="test bits per byte (lower is better)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    """Train the three models, score them, write the results and return them (``results.json``'s content)."""
    from .text_pipeline import run as run_pipeline  # torch, transformers: only for a run

    return run_pipeline(args)


__all__ = ["TEXT_MODULES", "SAMPLED", "FIXED", "DENSE", "Document", "collect_documents", "split_of",
           "split_documents", "parse_args", "wants_text", "format_table", "summary", "plot", "run"]
