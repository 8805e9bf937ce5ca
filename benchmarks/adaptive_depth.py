"""Adaptive depth: how many loops each early-exit criterion saves, what it costs in perplexity, what it buys in time.

It trains (once; the model is cached in --model-dir) a small looped model with loop sampling and an ACT halting head
on the text the package ships (openmythos/data/tiny_corpus.txt) plus the pydoc topics that are not held out, byte
tokenizer, then, in one process, compares the fixed budget (n_loops=8, no criterion) with the "act", "delta" and "kl"
exit criteria at several thresholds:

- mean loops used (outputs.loops_used) and perplexity on held-out text (Python's own pydoc_data.topics, real
  English that the model never saw), and its change against the fixed budget;
- forward and greedy generate wall time as ratios against the fixed budget, timed interleaved (fixed, criterion,
  fixed, criterion, ...) with the median of several rounds, because the machine is shared and noisy;
- per-row budgets: 8 rows with n_loops=[1..8] against all rows at 8.

Given the model that ``mythos demo`` saves (``--model demo_output/looped-model``; its folder's ``demo_task.json``
names the hidden graph it learned), it scores accuracy instead of perplexity: every start node at 1..8 hops, the
answer read at the last mark, against the model's own budget (``config.n_loops``, 16 for the demo) with no criterion.
Time is one forward (``logits_to_keep=1``) and one ``generate`` of the answer token per hop count (1..8), summed over
the hop counts; the "delta" and "kl" thresholds include the one the demo chose, if it chose one.

The issue's goal, judged per criterion: at some threshold, >= 30% fewer loops, perplexity at most 1% higher, and each
time ratio (forward, generate) <= 1 - (2/3) * that workload's loop saving.

    python benchmarks/adaptive_depth.py                       # trains in runs/adaptive-depth-model the first time
    python benchmarks/adaptive_depth.py --quick --json out.json   # seconds: tiny model, few steps (smoke test)
    python benchmarks/adaptive_depth.py --model demo_output/looped-model   # the reasoning demo's model: accuracy
"""

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import openmythos  # noqa: E402  (registers the Auto classes)
from openmythos import MythosConfig, MythosForCausalLM, MythosTokenizer  # noqa: E402
from openmythos.training.data import SAMPLE_CORPUS  # noqa: E402

CRITERIA = ("act", "delta", "kl")
BUDGET = 8
# act: halting mass to stop at; delta: relative state change; kl: KL between successive loops' next-token distributions
DEFAULT_THRESHOLDS = {"act": [0.5, 0.8, 0.9, 0.99], "delta": [0.2, 0.1, 0.05, 0.02],
                      "kl": [0.03, 0.01, 0.003, 0.001]}
# on the reasoning demo's model: a mark that has its node keeps it, so its state change falls to about 0.1-0.5 and
# its KL to numerical noise (about 1e-7); a mark still moving changes by about 1 and has a KL of about 15
DEMO_THRESHOLDS = {"act": [0.5, 0.9], "delta": [0.5, 0.3, 0.1], "kl": [1e-2, 1e-3, 1e-4, 1e-5]}
GOAL_ACCURACY_DROP = 0.01
RECIPE = 1  # bump when model_config or train change, so that cached models are trained again
HALTING_WARMUP = 2 / 3  # share of the training steps with the halting head held at its initialisation
GOAL_LOOP_SAVING = 0.30
GOAL_PPL_CHANGE = 0.01
GOAL_TIME_SHARE = 2 / 3


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, few steps, one round: a smoke run in seconds")
    p.add_argument("--model", default=None, help="evaluate this saved model folder (save_pretrained) instead of "
                                                 "training one")
    p.add_argument("--model-dir", default=None, help="where the trained model is cached (default "
                                                     "runs/adaptive-depth-model, --quick: runs/adaptive-depth-quick)")
    p.add_argument("--retrain", action="store_true", help="train again even when --model-dir holds a model")
    p.add_argument("--dim", type=int, default=None, help="hidden size of the model trained (default 128, --quick 64); "
                   "a multiple of 16. Larger models spend more of each loop in matrix products, where skipped "
                   "positions save the most")
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps (default 600, --quick 6)")
    p.add_argument("--train-text", choices=["corpus", "corpus+pydoc"], default=None,
                   help="the shipped corpus alone (5 kB), or with the pydoc topics that are not held out (default; "
                        "--quick: corpus)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: on a shared machine two "
                                                          "threads wait on each other)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per comparison (default 7, --quick 1)")
    p.add_argument("--eval-bytes", type=int, default=None, help="held-out bytes scored (default 16384, --quick 1024)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per generate (default 32, --quick 8)")
    for name in CRITERIA:
        p.add_argument(f"--{name}-thresholds", type=float, nargs="+", default=None,
                       help=f"thresholds of the {name!r} criterion (default {DEFAULT_THRESHOLDS[name]})")
    p.add_argument("--shorter-budgets", type=int, nargs="*", default=None,
                   help="also run these fixed budgets without a criterion, for comparison (default 4 6, --quick none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write every result, the machine and the versions here")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = dict(train_steps=6 if quick else 600, reps=1 if quick else 7, eval_bytes=1024 if quick else 16384,
                    new_tokens=8 if quick else 32, shorter_budgets=[] if quick else [4, 6],
                    train_text="corpus" if quick else "corpus+pydoc",
                    model_dir=str(ROOT / "runs" / (("adaptive-depth-quick" if quick else "adaptive-depth-model")
                                                   + (f"-dim{args.dim}" if args.dim else ""))))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.dim is not None and (args.dim < 32 or args.dim % 16):
        p.error(f"--dim must be a multiple of 16 and at least 32, got {args.dim}")
    for name in ("train_steps", "reps", "eval_bytes", "new_tokens", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if any(n < 1 for n in args.shorter_budgets):
        p.error(f"--shorter-budgets must be loop counts >= 1, got {args.shorter_budgets}")
    for name in CRITERIA:
        given = getattr(args, f"{name}_thresholds") or []
        if any(not (t > 0 and (name != "act" or t <= 1)) for t in given):
            accepted = "in (0, 1]" if name == "act" else "> 0"
            p.error(f"--{name}-thresholds must be numbers {accepted}, got {given}")
    # --quick runs one default threshold per criterion; thresholds given on the command line all run
    default = {name: DEFAULT_THRESHOLDS[name][1:2] if quick else DEFAULT_THRESHOLDS[name] for name in CRITERIA}
    args.thresholds = {name: getattr(args, f"{name}_thresholds") or default[name] for name in CRITERIA}
    args.given_thresholds = {name: getattr(args, f"{name}_thresholds") for name in CRITERIA}
    return args


# ------------------------------------------------------------------------------------------------------- the texts
def pydoc_topics() -> list[str]:
    """Python's pydoc topics (sorted by name): English prose with some code, shipped with every Python."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def heldout_text(n_bytes: int) -> str:
    """The first ``n_bytes`` of every 8th pydoc topic: never trained on."""
    text = "\n\n".join(pydoc_topics()[::8])
    return text.encode("utf-8")[:n_bytes].decode("utf-8", errors="ignore")


def training_documents(source: str) -> list[str]:
    """The shipped corpus (one document per paragraph), and with ``source="corpus+pydoc"`` also the pydoc topics
    that are not held out. The corpus alone is 5 kB: enough for a smoke run, too little to learn English from."""
    documents = [p.strip() for p in SAMPLE_CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    if source == "corpus+pydoc":
        documents += [topic for i, topic in enumerate(pydoc_topics()) if i % 8 != 0]
    return documents


def blocks(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """``text`` as rows of ``seq_len`` token ids (the remainder is dropped)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(f"{len(ids)} tokens are fewer than one block of {seq_len}; raise --eval-bytes")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


# ------------------------------------------------------------------------------------------------------- the model
def model_config(tokenizer, quick: bool, dim: int | None = None) -> MythosConfig:
    """A small MLA model with 8 loop slots, loop sampling around 5 loops and an ACT halting head (so that the
    "act" criterion has a trained head to read). ``dim`` defaults to 128 (64 with --quick)."""
    dim = dim or (64 if quick else 128)
    return openmythos.mythos_tiny(
        vocab_size=len(tokenizer), dim=dim, n_heads=4, max_seq_len=256, max_loop_iters=BUDGET, kv_lora_rank=32,
        q_lora_rank=dim // 2, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=dim // 4, n_experts=8,
        n_shared_experts=1, n_experts_per_tok=2, expert_dim=dim // 2, lora_rank=4, use_act=True,
        loop_sampling="poisson_lognormal", mean_train_loops=5.0, max_train_loops=BUDGET, backprop_loops=None,
        router_bias_update_rate=0.01, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)


def halting_warmup(share: float):
    """A Trainer callback that holds the ACT halting head at its initialisation (p = 1 / n_loops per loop: the
    output mixes all loops) for the first ``share`` of the steps, then trains it. Trained from the start, the head
    learns to halt after the first loop before the loop body has learned anything that later loops could add, and
    then the later loops get no gradient: ACT collapses to one loop."""
    from transformers import TrainerCallback

    class HaltingWarmup(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            train_halting = state.global_step >= share * state.max_steps
            for parameter in model.model.recurrent.halt.parameters():
                parameter.requires_grad_(train_halting)

    return HaltingWarmup()


def train(args, folder: Path) -> None:
    """Train with the package's recipe (Trainer + MythosTrainingCallback: a sampled loop count per step, balanced
    experts) on ``training_documents(args.train_text)``, and save model, tokenizer and ``training.json`` (written
    last: a folder without it holds no finished model) to ``folder``."""
    from transformers import Trainer, TrainingArguments, set_seed

    from openmythos.training import MythosTrainingCallback
    from openmythos.training.data import causal_lm_collator, pack_documents

    (folder / "training.json").unlink(missing_ok=True)
    set_seed(args.seed)
    tokenizer = MythosTokenizer()
    model = MythosForCausalLM(model_config(tokenizer, args.quick, args.dim))
    seq_len = 64 if args.quick else 128
    documents = (tokenizer(d, add_special_tokens=False)["input_ids"] for d in training_documents(args.train_text))
    data = [{"input_ids": block} for block in pack_documents(documents, seq_len, tokenizer.eos_token_id)]
    training_args = TrainingArguments(
        output_dir=str(folder / "trainer"), max_steps=args.train_steps, per_device_train_batch_size=8,
        learning_rate=3e-3, warmup_steps=min(20, args.train_steps // 10), lr_scheduler_type="cosine",
        weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0, logging_steps=max(1, args.train_steps // 10),
        save_strategy="no", report_to="none", seed=args.seed, data_seed=args.seed, dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=True)
    trainer = Trainer(model=model, args=training_args, train_dataset=data, data_collator=causal_lm_collator,
                      callbacks=[MythosTrainingCallback(), halting_warmup(HALTING_WARMUP)])
    started = time.perf_counter()
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    record = {"settings": training_settings(args), "seq_len": seq_len, "blocks": len(data), "losses": losses,
              "seconds": round(time.perf_counter() - started, 1)}
    (folder / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def training_settings(args) -> dict:
    """What the cached model depends on: a cache trained with other settings is trained again."""
    return {"recipe": RECIPE, "steps": args.train_steps, "quick": args.quick, "seed": args.seed,
            "train_text": args.train_text, "dim": args.dim}


def load_model(args):
    """``(model, tokenizer, info)``: the model of --model, else the one cached in --model-dir (trained first when
    the folder holds none, or one trained with other settings)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(args.model or args.model_dir)
    info = {"folder": str(folder), "trained_now": False}
    if not args.model:
        record_path = folder / "training.json"
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if args.retrain or record is None or record.get("settings") != training_settings(args):
            print(f"Training the benchmark model ({args.train_steps} steps on {args.train_text}) into {folder} ...",
                  flush=True)
            train(args, folder)
            info["trained_now"] = True
        else:
            print(f"Using the model cached in {folder} (--retrain to train it again)", flush=True)
        info["training"] = json.loads(record_path.read_text())
    elif not (folder / "config.json").exists():
        raise SystemExit(f"--model {folder}: no config.json there; pass a folder written by save_pretrained")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = model.config
    info.update(parameters=model.num_parameters(), use_act=config.use_act, max_loop_iters=config.max_loop_iters,
                dim=config.dim, attn_type=config.attn_type, loop_sampling=config.loop_sampling)
    task_file = folder / "demo_task.json"
    if task_file.exists():
        info["demo_task"] = json.loads(task_file.read_text())
        if info["demo_task"].get("task") != "hidden":
            raise SystemExit(f"--model {folder}: a `mythos demo --task {info['demo_task'].get('task')}` model; the "
                             f"benchmark scores the hidden-graph task (the default `mythos demo`) or text models")
    return model, tokenizer, info


# --------------------------------------------------------------------------------------------------- measurements
def loop_kwargs(criterion: str | None, threshold: float | None, n_loops=BUDGET) -> dict:
    if criterion is None:
        return {"n_loops": n_loops}
    return {"n_loops": n_loops, "exit_criterion": criterion, "exit_threshold": threshold}


@torch.no_grad()
def score(model, rows: torch.Tensor, batch_size: int, kwargs: dict) -> dict:
    """Perplexity of next-byte prediction over ``rows`` and the mean loops the positions ran (the model's loss
    is not used: with ACT it includes the ponder cost)."""
    nll, predicted, loops, positions = 0.0, 0, 0.0, 0
    for chunk in rows.split(batch_size):
        out = model(input_ids=chunk, use_cache=False, **kwargs)
        logits = out.logits[:, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        predicted += chunk[:, 1:].numel()
        loops += out.loops_used.float().sum().item()
        positions += out.loops_used.numel()
    return {"perplexity": math.exp(nll / predicted), "mean_loops": loops / positions}


def interleaved(first, second, reps: int, warmup: int = 1) -> dict:
    """Time two callables in alternation (the one that goes first swaps every round, so that drift and other jobs
    on the machine hit both alike); medians in ms and the ratio second / first."""
    times = ([], [])
    for r in range(warmup + reps):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for which in order:
            fn = (first, second)[which]
            started = time.perf_counter()
            fn()
            if r >= warmup:
                times[which].append((time.perf_counter() - started) * 1e3)
    medians = [statistics.median(t) for t in times]
    return {"fixed_ms": round(medians[0], 3), "adaptive_ms": round(medians[1], 3),
            "ratio": medians[1] / medians[0], "reps": reps}


def generate_fn(model, prompts: torch.Tensor, new_tokens: int, kwargs: dict):
    """A greedy generate of exactly ``new_tokens`` tokens that returns the loop recorder it filled."""
    from openmythos import MythosLoopRecorder

    @torch.no_grad()
    def run():
        recorder = MythosLoopRecorder()
        model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, loop_recorder=recorder, pad_token_id=model.config.pad_token_id,
                       **kwargs)
        return recorder

    return run


def eval_data(tokenizer, args, max_seq_len: int) -> dict:
    """Held-out rows to score, the batch the forward timings run on, and the generate prompts (8 rows each). Rows
    are 128 bytes (64 with --quick), or shorter where the model's max_seq_len is (the demo's models)."""
    seq_len = min(64 if args.quick else 128, max_seq_len)
    rows = blocks(tokenizer, heldout_text(args.eval_bytes), seq_len)
    if rows.shape[0] < 8:
        raise SystemExit(f"--eval-bytes {args.eval_bytes} gives {rows.shape[0]} rows of {seq_len} bytes; the "
                         f"benchmark needs 8: pass --eval-bytes {8 * seq_len} or more")
    prompt_len = max(1, seq_len // 4)
    if prompt_len + args.new_tokens > max_seq_len:
        args.new_tokens = max_seq_len - prompt_len
        print(f"Generating {args.new_tokens} tokens per prompt: the model holds at most {max_seq_len}", flush=True)
    return {"rows": rows, "batch": rows[:8], "prompts": rows[:8, :prompt_len], "seq_len": seq_len}


def misses(result: dict) -> list[str]:
    """The parts of the goal a setting misses (none: the goal is met). Each time ratio is judged against the loop
    saving of its own workload."""
    missed = []
    if result["loop_saving"] < GOAL_LOOP_SAVING:
        missed.append("loops")
    if result["ppl_change"] > GOAL_PPL_CHANGE:
        missed.append("ppl")
    for workload, name in (("forward", "forward"), ("generate", "8-row generate"), ("generate_1", "1-row generate")):
        timing = result[workload]
        if timing["ratio"] > 1 - GOAL_TIME_SHARE * timing["loop_saving"]:
            missed.append(f"{name} time")
    return missed


@torch.no_grad()
def compare(model, data: dict, args, kwargs: dict, fixed: dict) -> dict:
    """One adaptive setting against the fixed budget: loops, perplexity, and forward and generate time ratios."""
    result = score(model, data["rows"], 8, kwargs)
    result["loop_saving"] = 1 - result["mean_loops"] / BUDGET
    result["ppl_change"] = result["perplexity"] / fixed["perplexity"] - 1
    batch = data["batch"]
    loops = model(input_ids=batch, use_cache=False, **kwargs).loops_used.float().mean().item()
    result["forward"] = interleaved(lambda: model(input_ids=batch, use_cache=False, **loop_kwargs(None, None)),
                                    lambda: model(input_ids=batch, use_cache=False, **kwargs), args.reps)
    result["forward"].update(mean_loops=loops, loop_saving=1 - loops / BUDGET)
    for workload, prompts in (("generate", data["prompts"]), ("generate_1", data["prompts"][:1])):
        adaptive = generate_fn(model, prompts, args.new_tokens, kwargs)
        token_loops = adaptive().token_loops().float()  # [rows, steps]
        per_token = token_loops.mean().item()
        result[workload] = interleaved(generate_fn(model, prompts, args.new_tokens, loop_kwargs(None, None)),
                                       adaptive, args.reps)
        # a decode step runs each loop while any of its rows still needs it: the most loops of its tokens
        result[workload].update(loops_per_token=per_token, loop_saving=1 - per_token / BUDGET,
                                loops_per_step=token_loops.amax(0).mean().item())
    result["missed"] = misses(result)
    return result


@torch.no_grad()
def per_row_budgets(model, data: dict, args) -> dict:
    """8 rows with n_loops=[1, 2, ..., 8] against all 8 rows at 8: is one batch with mixed budgets faster?"""
    budgets = list(range(1, BUDGET + 1))
    batch = data["batch"]
    loops = model(input_ids=batch, use_cache=False, n_loops=budgets).loops_used.float()
    forward = interleaved(lambda: model(input_ids=batch, use_cache=False, n_loops=BUDGET),
                          lambda: model(input_ids=batch, use_cache=False, n_loops=budgets), args.reps)
    mixed = generate_fn(model, data["prompts"], args.new_tokens, {"n_loops": budgets})
    token_loops = mixed().token_loops().float()
    generate = interleaved(generate_fn(model, data["prompts"], args.new_tokens, {"n_loops": BUDGET}), mixed,
                           args.reps)
    return {"n_loops": budgets, "row_loops": loops.mean(1).tolist(), "mean_loops": loops.mean().item(),
            "generate_row_loops": token_loops.mean(1).tolist(), "forward": forward, "generate": generate,
            "faster": forward["ratio"] < 1 and generate["ratio"] < 1}


@torch.no_grad()
def fixed_budget(model, data: dict, args) -> dict:
    """The reference point: every position runs all 8 loops."""
    result = score(model, data["rows"], 8, loop_kwargs(None, None))
    result["generate_loops_per_token"] = (
        generate_fn(model, data["prompts"], args.new_tokens, loop_kwargs(None, None))().token_loops().float().mean()
        .item())
    return result


def criteria_available(model) -> dict[str, str | None]:
    """Why a criterion cannot run on this model (None: it can)."""
    act = None if model.config.use_act else "the model has no halting head (use_act=False)"
    return {"act": act, "delta": None, "kl": None}


def run_all(model, data: dict, args) -> dict:
    """Every measurement, with a progress line before each (the runs take a while)."""
    print("Scoring the fixed budget (n_loops=8) ...", flush=True)
    fixed = fixed_budget(model, data, args)
    results, skipped = {}, {}
    settings = [(c, t) for c, why in criteria_available(model).items() if why is None for t in args.thresholds[c]]
    for name, why in criteria_available(model).items():
        if why is not None:
            skipped[name] = why
            print(f"Skipping {name!r}: {why}", flush=True)
    settings += [("shorter", n) for n in args.shorter_budgets]
    shorter = []
    for i, (name, value) in enumerate(settings, 1):
        what = f"n_loops={value}, no criterion" if name == "shorter" else f"{name} threshold {value}"
        print(f"[{i}/{len(settings)}] {what}: perplexity, forward and generate timings ...", flush=True)
        if name == "shorter":
            shorter.append({"n_loops": value, **compare(model, data, args, {"n_loops": value}, fixed)})
        else:
            results.setdefault(name, []).append(
                {"threshold": value, **compare(model, data, args, loop_kwargs(name, value), fixed)})
    print("Per-row budgets n_loops=[1..8] against 8 ...", flush=True)
    return {"fixed": fixed, "criteria": results, "skipped": skipped, "shorter_budgets": shorter,
            "per_row": per_row_budgets(model, data, args)}


# ------------------------------------------------------------------------------ the reasoning demo's model: accuracy
def pointer_questions(demo_task: dict, tokenizer) -> dict[int, dict]:
    """Per hop count 1..eval_hops (1..8 in the default demo): every start node's question of the demo's hidden
    graph, as one batch (a hop count has one length), and the answers."""
    from openmythos.demo.tasks import PointerChasingTask

    task = PointerChasingTask(num_nodes=demo_task["num_nodes"], seed=demo_task["seed"])
    questions = {}
    for k in range(1, demo_task["eval_hops"] + 1):
        pairs = [(task.question(start, k), task.follow(start, k)) for start in task.nodes]
        questions[k] = {"input_ids": torch.tensor([tokenizer.encode(q, add_special_tokens=False) for q, _ in pairs]),
                        "answers": torch.tensor([tokenizer.encode(a, add_special_tokens=False)[0] for _, a in pairs])}
    return questions


@torch.no_grad()
def pointer_score(model, questions: dict, kwargs: dict) -> dict:
    """Exact accuracy (the most likely token after the last mark) per hop count and over all questions; mean loops
    over every position (the work done) and at the answer position."""
    accuracy, loops, answer_loops, weights = [], [], [], []
    for q in questions.values():
        out = model(input_ids=q["input_ids"], use_cache=False, logits_to_keep=1, **kwargs)
        accuracy.append((out.logits[:, -1].argmax(-1) == q["answers"]).float().mean().item())
        used = out.loops_used.float()
        loops.append(used.mean().item())
        answer_loops.append(used[:, -1].mean().item())
        weights.append(used.numel())
    return {"accuracy": statistics.mean(accuracy), "accuracy_by_hops": accuracy,
            "mean_loops": sum(n * w for n, w in zip(loops, weights)) / sum(weights), "loops_by_hops": loops,
            "answer_loops_by_hops": answer_loops}


def pointer_misses(result: dict) -> list[str]:
    """The parts of the goal a setting misses on the demo's model. Answering a question with generate is its
    prefill, so both time ratios are judged against the loop saving over every position."""
    missed = []
    if result["loop_saving"] < GOAL_LOOP_SAVING:
        missed.append("loops")
    if result["accuracy_change"] < -GOAL_ACCURACY_DROP:
        missed.append("accuracy")
    for workload in ("forward", "generate"):
        if result[workload]["ratio"] > 1 - GOAL_TIME_SHARE * result["loop_saving"]:
            missed.append(f"{workload} time")
    return missed


@torch.no_grad()
def pointer_compare(model, questions: dict, args, kwargs: dict, fixed: dict) -> dict:
    """One adaptive setting against the fixed budget on the demo's questions: accuracy, loops, and the forward and
    generate (the answer token) times, interleaved per hop count and summed over the hop counts."""
    result = pointer_score(model, questions, kwargs)
    budget = fixed["mean_loops"]
    result["loop_saving"] = 1 - result["mean_loops"] / budget
    result["accuracy_change"] = result["accuracy"] - fixed["accuracy"]
    for workload in ("forward", "generate"):
        by_hops = []
        for q in questions.values():
            ids = q["input_ids"]
            if workload == "forward":
                pair = [lambda kw=kw: model(input_ids=ids, use_cache=False, logits_to_keep=1, **kw)
                        for kw in (fixed["kwargs"], kwargs)]
            else:
                pair = [generate_fn(model, ids, 1, kw) for kw in (fixed["kwargs"], kwargs)]
            by_hops.append(interleaved(*pair, args.reps))
        fixed_ms, adaptive_ms = sum(t["fixed_ms"] for t in by_hops), sum(t["adaptive_ms"] for t in by_hops)
        result[workload] = {"fixed_ms": round(fixed_ms, 3), "adaptive_ms": round(adaptive_ms, 3),
                            "ratio": adaptive_ms / fixed_ms, "ratio_by_hops": [t["ratio"] for t in by_hops],
                            "reps": args.reps}
    result["missed"] = pointer_misses(result)
    return result


def pointer_thresholds(args, demo_task: dict) -> dict[str, list[float]]:
    """Thresholds given on the command line, else DEMO_THRESHOLDS (--quick: the first), plus the demo's own."""
    chosen = demo_task.get("exit_rule") or {}
    thresholds = {}
    for name in CRITERIA:
        values = args.given_thresholds[name] or DEMO_THRESHOLDS[name][: 1 if args.quick else None]
        if chosen.get("criterion") == name and not args.given_thresholds[name]:
            values = sorted({*values, chosen["threshold"]}, reverse=True)
        thresholds[name] = list(values)
    return thresholds


def run_pointer(model, questions: dict, args, demo_task: dict) -> dict:
    """Every measurement on the demo's model, with a progress line before each."""
    budget = model.config.n_loops
    print(f"Scoring the fixed budget (n_loops={budget}, the model's default) ...", flush=True)
    fixed_kwargs = {"n_loops": budget}
    fixed = {**pointer_score(model, questions, fixed_kwargs), "kwargs": fixed_kwargs}
    thresholds = pointer_thresholds(args, demo_task)
    results, skipped = {}, {}
    for name, why in criteria_available(model).items():
        if why is not None:
            skipped[name] = why
            print(f"Skipping {name!r}: {why}", flush=True)
    settings = [(c, t) for c, why in criteria_available(model).items() if why is None for t in thresholds[c]]
    for i, (name, value) in enumerate(settings, 1):
        print(f"[{i}/{len(settings)}] {name} threshold {value:g}: accuracy, forward and generate timings ...",
              flush=True)
        results.setdefault(name, []).append(
            {"threshold": value, **pointer_compare(model, questions, args, loop_kwargs(name, value, budget), fixed)})
    fixed.pop("kwargs")
    return {"fixed": fixed, "budget": budget, "criteria": results, "skipped": skipped}


def pointer_table(measured: dict) -> str:
    """The demo model's results as a markdown table; time ratios are adaptive / fixed (below 1: faster)."""
    fixed, budget = measured["fixed"], measured["budget"]

    def by_hops(values, fmt):
        return " / ".join(format(v, fmt) for v in values)

    hops = len(fixed["accuracy_by_hops"])
    lines = ["| criterion | threshold | mean loops (every position) | loops saved | accuracy | accuracy change | "
             f"accuracy at 1..{hops} hops | loops at the answer, 1..{hops} hops | forward time | generate time | "
             "goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| fixed (n_loops={budget}) | - | {fixed['mean_loops']:.2f} | 0% | {fixed['accuracy']:.1%} | - | "
             f"{by_hops([100 * a for a in fixed['accuracy_by_hops']], '.0f')} | "
             f"{by_hops(fixed['answer_loops_by_hops'], '.0f')} | 1 | 1 | - |"]
    for name, rows in measured["criteria"].items():
        for r in rows:
            goal = "met" if not r["missed"] else "misses " + ", ".join(r["missed"])
            lines.append(f"| {name} | {r['threshold']:g} | {r['mean_loops']:.2f} | {r['loop_saving']:.1%} | "
                         f"{r['accuracy']:.1%} | {100 * r['accuracy_change']:+.1f} pt | "
                         f"{by_hops([100 * a for a in r['accuracy_by_hops']], '.0f')} | "
                         f"{by_hops(r['answer_loops_by_hops'], '.2f')} | {r['forward']['ratio']:.3f} | "
                         f"{r['generate']['ratio']:.3f} | {goal} |")
    return "\n".join(lines)


def pointer_summary(best: dict) -> str:
    """How a setting that meets the goal on the demo's model did, for its verdict line."""
    return (f"{best['loop_saving']:.1%} fewer loops, accuracy {100 * best['accuracy_change']:+.1f} points, forward "
            f"time x{best['forward']['ratio']:.3f}, generate time x{best['generate']['ratio']:.3f}")


def main_pointer(args, model, tokenizer, info: dict, started: dict) -> dict:
    demo_task = info["demo_task"]
    questions = pointer_questions(demo_task, tokenizer)
    print(f"Model: {info['folder']} ({info['parameters']:,} parameters, dim {info['dim']}), the reasoning demo's "
          f"(hidden graph of {demo_task['num_nodes']} nodes, seed {demo_task['seed']}, trained on 1.."
          f"{demo_task['train_hops']} hops); questions: every start node at 1..{demo_task['eval_hops']} hops; "
          f"{args.threads} torch thread(s), {args.reps} timed rounds; load average {started['load_average']}",
          flush=True)
    measured = run_pointer(model, questions, args, demo_task)
    judged = verdicts(measured, pointer_summary)
    print(f"\nAdaptive depth against the fixed budget n_loops={measured['budget']} on pointer chasing (time = "
          "adaptive / fixed median wall time, interleaved per hop count and summed; below 1 is faster)\n")
    print(pointer_table(measured))
    print(f"\nGoal: >= {GOAL_LOOP_SAVING:.0%} fewer loops, accuracy at most {100 * GOAL_ACCURACY_DROP:.0f} point "
          f"lower, and each time ratio <= 1 - {GOAL_TIME_SHARE:.2f} x the loop saving")
    for verdict in judged.values():
        print(verdict["line"])
    return {"meta": {"start": started, "end": machine(), "argv": sys.argv, "args": vars(args),
                     "budget": measured["budget"]},
            "model": info, "eval": {"source": "demo_task.json", "hops": list(questions),
                                    "questions_per_hop_count": demo_task["num_nodes"]},
            **measured, "verdicts": judged}


# --------------------------------------------------------------------------------------------------------- report
def table(measured: dict) -> str:
    """The results as a markdown table; time ratios are adaptive / fixed medians (below 1: faster)."""
    fixed = measured["fixed"]
    lines = ["| criterion | threshold | mean loops | loops saved | perplexity | ppl change | forward time | "
             "generate loops/token (8 rows) | loops/step (8 rows) | generate time (8 rows) | loops/token (1 row) | "
             "generate time (1 row) | goal |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| fixed (n_loops=8) | - | {fixed['mean_loops']:.2f} | 0% | {fixed['perplexity']:.3f} | - | 1 | "
             f"{fixed['generate_loops_per_token']:.2f} | 8.00 | 1 | 8.00 | 1 | - |"]
    rows = [(name, f"{r['threshold']:g}", r) for name, rs in measured["criteria"].items() for r in rs]
    rows += [(f"fixed (n_loops={r['n_loops']})", "-", r) for r in measured["shorter_budgets"]]
    for name, threshold, r in rows:
        goal = "met" if not r["missed"] else "misses " + ", ".join(r["missed"])
        lines.append(f"| {name} | {threshold} | {r['mean_loops']:.2f} | {r['loop_saving']:.1%} | "
                     f"{r['perplexity']:.3f} | {r['ppl_change']:+.2%} | {r['forward']['ratio']:.3f} | "
                     f"{r['generate']['loops_per_token']:.2f} | {r['generate']['loops_per_step']:.2f} | "
                     f"{r['generate']['ratio']:.3f} | "
                     f"{r['generate_1']['loops_per_token']:.2f} | {r['generate_1']['ratio']:.3f} | {goal} |")
    return "\n".join(lines)


def per_row_table(per_row: dict) -> str:
    lines = ["| per-row budgets, 8 rows, n_loops=[1..8] vs all 8 | mean loops | fixed ms | mixed ms | time ratio | "
             "ratio the goal asks |", "|---|---|---|---|---|---|"]
    loops = {"forward": per_row["mean_loops"], "generate": statistics.mean(per_row["generate_row_loops"])}
    for workload, mean_loops in loops.items():
        t = per_row[workload]
        needed = 1 - GOAL_TIME_SHARE * (1 - mean_loops / BUDGET)
        lines.append(f"| {workload} | {mean_loops:.2f} | {t['fixed_ms']:.1f} | {t['adaptive_ms']:.1f} | "
                     f"{t['ratio']:.3f} | <= {needed:.3f} |")
    return "\n".join(lines)


def text_summary(best: dict) -> str:
    """How a setting that meets the goal on a text model did, for its verdict line."""
    return (f"{best['loop_saving']:.1%} fewer loops, perplexity {best['ppl_change']:+.2%}, forward time "
            f"x{best['forward']['ratio']:.3f}, generate time x{best['generate']['ratio']:.3f} (8 rows), "
            f"x{best['generate_1']['ratio']:.3f} (1 row)")


def verdicts(measured: dict, summary=text_summary) -> dict[str, dict]:
    """Per criterion: whether some threshold meets the goal, and the sentence that says so (``summary(best)``
    describes the setting that saves the most loops among those that meet it)."""
    out = {}
    for name, why in measured["skipped"].items():
        out[name] = {"met": None, "threshold": None, "line": f"{name}: not run ({why})"}
    for name, rows in measured["criteria"].items():
        met = [r for r in rows if not r["missed"]]
        if met:
            best = max(met, key=lambda r: r["loop_saving"])
            line = f"{name}: GOAL MET at threshold {best['threshold']:g} ({summary(best)})"
        else:
            reasons = "; ".join(f"{r['threshold']:g} misses {', '.join(r['missed'])}" for r in rows)
            line = f"{name}: goal NOT met at any threshold ({reasons})"
        out[name] = {"met": bool(met), "threshold": best["threshold"] if met else None, "line": line}
    return out


def machine() -> dict:
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "load_average": list(load) if load else None, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "openmythos": getattr(openmythos, "__version__", None), "torch_threads": torch.get_num_threads()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = machine()
    model, tokenizer, info = load_model(args)
    if "demo_task" in info:
        result = main_pointer(args, model, tokenizer, info, started)
        write_json(args, result)
        return result
    data = eval_data(tokenizer, args, model.config.max_seq_len)
    print(f"Model: {info['folder']} ({info['parameters']:,} parameters, dim {info['dim']}, use_act "
          f"{info['use_act']}); held-out text: {data['rows'].numel()} bytes of pydoc topics in "
          f"{data['rows'].shape[0]} rows of {data['seq_len']}; {args.threads} torch thread(s), {args.reps} timed "
          f"rounds; load average {started['load_average']}", flush=True)
    measured = run_all(model, data, args)
    judged = verdicts(measured)
    print("\nAdaptive depth against the fixed budget n_loops=8 (time = adaptive / fixed median wall time, "
          "interleaved; below 1 is faster)\n")
    print(table(measured))
    print()
    print(per_row_table(measured["per_row"]))
    print(f"\nPer-row budgets faster than all rows at 8: {'yes' if measured['per_row']['faster'] else 'NO'}")
    print(f"\nGoal: >= {GOAL_LOOP_SAVING:.0%} fewer loops, perplexity at most {GOAL_PPL_CHANGE:.0%} higher, and each "
          f"time ratio <= 1 - {GOAL_TIME_SHARE:.2f} x its own loop saving")
    for verdict in judged.values():
        print(verdict["line"])
    result = {"meta": {"start": started, "end": machine(), "argv": sys.argv if argv is None else argv,
                       "args": {k: v for k, v in vars(args).items()}, "budget": BUDGET},
              "model": info, "eval": {"source": "pydoc_data.topics[::8]", "bytes": data["rows"].numel(),
                                      "rows": data["rows"].shape[0], "seq_len": data["seq_len"],
                                      "prompt_shape": list(data["prompts"].shape), "new_tokens": args.new_tokens},
              **measured, "verdicts": judged}
    write_json(args, result)
    return result


def write_json(args, result: dict) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nWrote {args.json}")


if __name__ == "__main__":
    main()
