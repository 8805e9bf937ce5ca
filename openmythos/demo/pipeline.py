"""Does looping buy reasoning depth? Train on shallow multi-hop questions, test on deeper ones.

``mythos demo`` (or ``python -m openmythos.demo``) trains three models with the Hugging Face Trainer on k-hop
pointer chasing (``openmythos.tasks``) with k <= K:

- a small looped OpenMythos model, run with ``n_loops = k`` (one loop per hop);
- a dense transformer (Llama) with about the same number of parameters;
- a dense transformer with about the same compute per token as the looped model at depth K (one layer per pass).

It then scores every model on every question with 1..2K hops (the looped one at n_loops 1..2K+2), prints the
accuracy table, writes it as ``results.json`` / ``accuracy.md`` and plots ``accuracy.png``, saves the looped model
with ``save_pretrained``, reloads it through ``AutoModelForCausalLM`` and answers sample questions with
``generate(n_loops=...)``. Every setting is a flag. A seed fixes the results on one machine: the same seed, torch
version, thread count and CPU kernels (or GPU) give the same table, and ``results.json`` records them. Another CPU
can round differently (AVX-512 and AVX2 kernels sum in another order), so its table can differ by a few points.

``--task context`` swaps the hidden graph for one written in the prompt, a new graph per example
(``InContextPointerChasingTask``): training prompts query every node of graphs of varied size, the first
``--curriculum-steps`` batches are 1-hop only, and all three models see the same batches in the same order. Its
defaults are the recipe that makes the looped model learn it (docs/demo.md).
"""

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import datasets
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, ProgressCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
from transformers.utils import logging as hf_logging

from .configuration_mythos import MythosConfig
from .modeling_mythos import MythosForCausalLM
from .tasks import InContextPointerChasingTask, PointerChasingTask
from .tokenization_mythos import MythosTokenizer
from .training import MythosTrainingCallback

LOOPED, SAME_PARAMS, SAME_COMPUTE = "looped", "dense_same_params", "dense_same_compute"
# per-task defaults of the flags left at None: hidden graph / in-context graph
TASK_DEFAULTS = {
    "hidden": {"num_nodes": 24, "dim": 96, "steps": 1500, "lr": 2e-3, "train_examples": 20000,
               "curriculum_steps": 0},
    "context": {"num_nodes": 9, "dim": 64, "steps": 1200, "lr": 3e-3, "train_examples": None,
                "curriculum_steps": 300},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mythos demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(TASK_DEFAULTS), default="hidden",
                   help="hidden: one graph learned into the weights; context: a new graph written in every prompt")
    p.add_argument("--train-hops", type=int, default=4, help="K: training questions have 1..K hops")
    p.add_argument("--eval-hops", type=int, default=None, help="evaluate 1..this many hops (default 2K)")
    p.add_argument("--max-loops", type=int, default=None, help="evaluate the looped model at n_loops 1..this "
                                                                 "(default 2K + 2)")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes in the hidden graph (2 to 52; default 24), or "
                                                                 "most nodes of an in-context graph (3 to 52; "
                                                                 "default 9)")
    p.add_argument("--dim", type=int, default=None, help="hidden size of every model (default 96; context: 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads of every model")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps for the looped model (default 1500; "
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
    p.add_argument("--samples", type=int, default=4, help="sample questions answered after reloading")
    p.add_argument("--seed", type=int, default=0, help="seed of the graph, the data and the models (same "
                                                         "seed, machine, torch version and --threads: same results)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (these models are too small to gain "
                                                           "from more)")
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--no-plot", action="store_true", help="skip accuracy.png (no matplotlib needed)")
    args = p.parse_args(argv)
    for name, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.eval_hops = args.eval_hops or 2 * args.train_hops
    args.max_loops = args.max_loops or 2 * args.train_hops + 2
    args.baseline_steps = args.baseline_steps if args.baseline_steps is not None else args.steps
    if args.train_examples is None:
        args.train_examples = max(args.steps, args.baseline_steps) * args.batch_size
    for name in ("train_hops", "eval_hops", "max_loops", "dim", "heads", "steps", "batch_size", "train_examples",
                 "eval_examples"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_hops >= args.num_nodes:
        p.error(f"--eval-hops ({args.eval_hops}) must be below --num-nodes ({args.num_nodes}): past that, the "
                f"cycle repeats and deeper questions share answers with shallower ones")
    if args.curriculum_steps < 0:
        p.error(f"--curriculum-steps must be >= 0, got {args.curriculum_steps}")
    if args.task == "context" and args.train_examples < args.curriculum_steps * args.batch_size:
        p.error("--train-examples must cover the --curriculum-steps batches")
    if args.dim % args.heads or (args.dim // args.heads) % 2:
        p.error(f"--dim ({args.dim}) must be divisible by --heads ({args.heads}) into an even head size")
    return args


# ------------------------------------------------------------------------------------------------------------ models
def looped_config(args, tokenizer) -> MythosConfig:
    """A tiny looped model: one prelude block, one shared MoE block looped n_loops times, one coda block.

    The loop-index signal and the depth-wise LoRA are off: both are indexed by the loop number, and questions deeper
    than K would reach loop indices that training never used. Without them every iteration applies the same map,
    which is what lets the model run more loops than it was trained with.
    """
    return MythosConfig(
        vocab_size=len(tokenizer), dim=args.dim, n_heads=args.heads, n_kv_heads=args.heads, attn_type="gqa",
        max_seq_len=max_seq_len(args), max_loop_iters=args.train_hops, prelude_layers=1, coda_layers=1,
        n_experts=4, n_shared_experts=1, n_experts_per_tok=2, expert_dim=args.dim, lora_rank=0,
        loop_signal_scale=0.0, rope_theta=10000.0, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def max_seq_len(args) -> int:
    return 64 if args.task == "hidden" else 128


def dense_config(args, tokenizer, layers: int, ffn_dim: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.dim, intermediate_size=ffn_dim, num_hidden_layers=layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max_seq_len(args),
        rope_theta=10000.0, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def build_models(args, tokenizer) -> dict[str, torch.nn.Module]:
    """The looped model and its two dense baselines.

    Same parameters: dense layers as wide as the looped model's prelude/coda, as many as bring the total closest to
    the looped model's. Same compute: one dense layer per block pass of the looped model at depth K (prelude, K loops,
    coda), each with the FFN width a token actually uses in the looped block (top-k routed plus shared experts).
    """
    set_seed(args.seed)
    looped = MythosForCausalLM(looped_config(args, tokenizer))
    cfg = looped.config
    target = looped.num_parameters()

    def dense(layers, ffn_dim):
        set_seed(args.seed)
        return LlamaForCausalLM(dense_config(args, tokenizer, layers, ffn_dim))

    one_layer = dense(1, cfg.dense_ffn_dim).num_parameters()
    per_layer = dense(2, cfg.dense_ffn_dim).num_parameters() - one_layer
    same_params_layers = max(1, round((target - (one_layer - per_layer)) / per_layer))
    active_ffn = (cfg.n_experts_per_tok + cfg.n_shared_experts * cfg.n_experts_per_tok) * cfg.expert_dim
    passes = cfg.prelude_layers + args.train_hops + cfg.coda_layers
    return {
        LOOPED: looped,
        SAME_PARAMS: dense(same_params_layers, cfg.dense_ffn_dim),
        SAME_COMPUTE: dense(passes, active_ffn),
    }


def describe(name: str, model, args) -> str:
    if name == LOOPED:
        cfg = model.config
        return (f"looped: {cfg.prelude_layers} prelude + 1 shared MoE block x n_loops + {cfg.coda_layers} coda, "
                f"{model.num_parameters():,} parameters, {cfg.prelude_layers + args.train_hops + cfg.coda_layers} "
                f"block passes per token at n_loops={args.train_hops}")
    cfg = model.config
    return (f"{name}: {cfg.num_hidden_layers} dense layers (FFN {cfg.intermediate_size}), "
            f"{model.num_parameters():,} parameters, {cfg.num_hidden_layers} block passes per token")


# ---------------------------------------------------------------------------------------------------------- training
def collate(features: list[dict], pad_token_id: int, with_hops: bool) -> dict:
    """Right-pad questions of different lengths; padded labels are -100."""
    width = max(len(f["input_ids"]) for f in features)
    batch = {
        "input_ids": torch.tensor([f["input_ids"] + [pad_token_id] * (width - len(f["input_ids"])) for f in features]),
        "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * (width - len(f["input_ids"]))
                                       for f in features]),
        "labels": torch.tensor([f["labels"] + [-100] * (width - len(f["labels"])) for f in features]),
    }
    if with_hops:
        batch["hops"] = torch.tensor([f["hops"] for f in features])
    return batch


class InOrderTrainer(Trainer):
    """Trainer that reads the training set in order, not shuffled: the context task's curriculum is its row order."""

    def _get_train_sampler(self, train_dataset=None):
        return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)


class LoopsPerHopTrainer(Trainer):
    """Trainer for the looped model: each question runs ``n_loops = hops`` iterations.

    ``n_loops`` is one number per forward, so a batch is split by hop count; every group's loss is a sum divided by
    the batch's label count (``num_items_in_batch``), so the groups add up to the batch mean.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        hops = inputs.pop("hops")
        labels = inputs["labels"]
        if num_items_in_batch is None:
            num_items_in_batch = (labels[:, 1:] != -100).sum()
        loss = 0.0
        for k in hops.unique().tolist():
            rows = hops == k
            out = model(input_ids=inputs["input_ids"][rows], attention_mask=inputs["attention_mask"][rows],
                        labels=labels[rows], n_loops=int(k), num_items_in_batch=num_items_in_batch)
            loss = loss + out.loss
        return (loss, None) if return_outputs else loss


class InOrderLoopsPerHopTrainer(InOrderTrainer, LoopsPerHopTrainer):
    """The looped model's trainer for a curriculum: batches in dataset order, each hop group with n_loops = hops."""


class BarOnlyProgressCallback(ProgressCallback):
    """The Trainer's tqdm progress bar without the raw log dict it prints at every logging step.

    The logs still reach ``trainer.state.log_history``; ``train`` prints one readable summary line from them.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


def training_record(steps: int, seconds: float, log_history: list[dict]) -> dict:
    """Steps, time, first and last logged loss and, for the looped model, the expert load balance at the end."""
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    record = {"steps": steps, "seconds": seconds, "first_loss": losses[0] if losses else None,
              "last_loss": losses[-1] if losses else None}
    balance = [entry for entry in log_history if "moe/load_cv" in entry]
    if balance:
        # load_cv is finite even when an expert got no token (where load_max_min_ratio is inf)
        record["expert_load_cv"] = balance[-1]["moe/load_cv"]
        record["idle_expert"] = balance[-1].get("moe/load_max_min_ratio") == float("inf")
    return record


def describe_training(name: str, record: dict) -> str:
    """One console line per trained model, e.g. ``looped: 1500 steps in 95 s, loss 3.10 -> 0.02, ...``."""
    line = f"  {name}: {record['steps']} steps in {record['seconds']:.0f} s"
    if record["first_loss"] is not None:
        line += f", loss {record['first_loss']:.3f} -> {record['last_loss']:.3f}"
    if "expert_load_cv" in record:
        idle = "; an expert got no token" if record["idle_expert"] else ""
        line += (f", expert load CV {record['expert_load_cv']:.2f} at the last step (std/mean of tokens per expert, "
                 f"0 = even{idle})")
    return line


def train(name: str, model, dataset, tokenizer, args) -> dict:
    looped = name == LOOPED
    steps = args.steps if looped else args.baseline_steps
    if steps == 0:
        return training_record(0, 0.0, [])
    schedule = {"lr_scheduler_type": "cosine"} if args.task == "hidden" else {  # context: decay to 0.1x, not to 0
        "lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1}}
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "trainer" / name), max_steps=steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
        warmup_steps=max(1, steps // 10), weight_decay=0.0, adam_beta2=0.98, max_grad_norm=1.0,
        logging_steps=max(1, steps // 10), save_strategy="no", report_to="none", seed=args.seed,
        data_seed=args.seed, remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(), **schedule,
    )
    if args.task == "hidden":
        trainer_cls = LoopsPerHopTrainer if looped else Trainer
    else:
        trainer_cls = InOrderLoopsPerHopTrainer if looped else InOrderTrainer
    trainer = trainer_cls(
        model=model, args=training_args, train_dataset=dataset,
        data_collator=lambda features: collate(features, tokenizer.pad_token_id, with_hops=looped),
        callbacks=[MythosTrainingCallback()] if looped else None,
    )
    trainer.remove_callback(DEFAULT_PROGRESS_CALLBACK)  # it prints every log dict, moe/... keys included
    trainer.add_callback(BarOnlyProgressCallback())
    print(f"\nTraining {describe(name, model, args)}", flush=True)
    start = time.perf_counter()
    trainer.train()
    record = training_record(steps, time.perf_counter() - start, trainer.state.log_history)
    print(describe_training(name, record), flush=True)
    return record


# -------------------------------------------------------------------------------------------------------- evaluation
def make_task(args):
    if args.task == "hidden":
        return PointerChasingTask(num_nodes=args.num_nodes, seed=args.seed)
    return InContextPointerChasingTask(max_nodes=args.num_nodes, seed=args.seed)


def training_set(task, tokenizer, args):
    """Hidden task: shuffled questions. Context task: ``--curriculum-steps`` batches of 1-hop prompts, then prompts
    with 1..K hops; each batch shares one hop count and graph size (read in order by ``InOrderTrainer``)."""
    hops = range(1, args.train_hops + 1)
    if args.task == "hidden":
        return task.dataset(tokenizer, hops, args.train_examples, seed=args.seed)
    first = args.curriculum_steps * args.batch_size
    parts = [task.dataset(tokenizer, [1], first, seed=args.seed, group_size=args.batch_size)] if first else []
    if args.train_examples > first:
        parts.append(task.dataset(tokenizer, hops, args.train_examples - first, seed=args.seed + 1,
                                  group_size=args.batch_size))
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def eval_questions(task, hops: int, args) -> list[tuple[str, str]]:
    """(question, answer) pairs scored at ``hops`` hops: every start node of the hidden graph, or
    ``--eval-examples`` seeded single-query prompts over fresh ``--num-nodes``-node graphs."""
    if args.task == "hidden":
        return [(task.question(start, hops), task.follow(start, hops)) for start in task.nodes]
    return [(row["question"], row["answer"]) for row in task.eval_examples(hops, args.eval_examples)]


@torch.no_grad()
def accuracy(model, questions: list[tuple[str, str]], tokenizer, n_loops: int | None = None) -> float:
    """Exact accuracy: the answer is the model's most likely next token after the question (questions of one
    hop count have one length)."""
    model.eval()
    answers = [tokenizer.encode(a, add_special_tokens=False)[0] for _, a in questions]
    input_ids = torch.tensor([tokenizer.encode(q, add_special_tokens=False) for q, _ in questions],
                             device=model.device)
    kwargs = {"n_loops": n_loops} if n_loops is not None else {}
    logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=1, **kwargs).logits[:, -1]
    return (logits.argmax(-1).cpu() == torch.tensor(answers)).float().mean().item()


def evaluate(models, task, tokenizer, args) -> dict:
    hop_range = range(1, args.eval_hops + 1)
    questions = {k: eval_questions(task, k, args) for k in hop_range}
    table = {f"{LOOPED}@{n}": [accuracy(models[LOOPED], questions[k], tokenizer, n) for k in hop_range]
             for n in range(1, args.max_loops + 1)}
    # n_loops = hops is the diagonal of the columns above; only depths past --max-loops need their own run
    table[f"{LOOPED}@hops"] = [table[f"{LOOPED}@{k}"][k - 1] if k <= args.max_loops
                               else accuracy(models[LOOPED], questions[k], tokenizer, k) for k in hop_range]
    for name in (SAME_PARAMS, SAME_COMPUTE):
        table[name] = [accuracy(models[name], questions[k], tokenizer) for k in hop_range]
    return table


def format_table(table: dict, args) -> str:
    """Markdown: one row per hop count, one column per model (the looped one at each n_loops)."""
    columns = [f"{LOOPED}@hops"] + [f"{LOOPED}@{n}" for n in range(1, args.max_loops + 1)] + [SAME_PARAMS,
                                                                                                SAME_COMPUTE]
    titles = ["hops", "looped, n_loops=hops"] + [f"n_loops={n}" for n in range(1, args.max_loops + 1)] + [
        "dense, same params", "dense, same compute"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for i in range(args.eval_hops):
        mark = "" if i < args.train_hops else " (held out)"
        cells = [f"{table[c][i] * 100:.0f}%" for c in columns]
        lines.append(f"| {i + 1}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary(table: dict, args) -> dict:
    """The headline numbers the demo is judged by."""
    k, deep = args.train_hops, args.eval_hops
    in_dist = table[f"{LOOPED}@hops"][:k]
    return {
        "looped_in_distribution": sum(in_dist) / len(in_dist),
        "looped_at_eval_hops_with_n_loops_eq_hops": table[f"{LOOPED}@hops"][deep - 1],
        "looped_at_eval_hops_with_training_depth": table[f"{LOOPED}@{min(k, args.max_loops)}"][deep - 1],
        "dense_same_params_in_distribution": sum(table[SAME_PARAMS][:k]) / k,
        "dense_same_params_at_eval_hops": table[SAME_PARAMS][deep - 1],
        "dense_same_compute_in_distribution": sum(table[SAME_COMPUTE][:k]) / k,
        "dense_same_compute_at_eval_hops": table[SAME_COMPUTE][deep - 1],
    }


def plot(table: dict, args, path: Path) -> None:
    """Left: accuracy against hops, one line per n_loops and per baseline. Right: the looped model's accuracy for
    every (hops, n_loops) pair, where a correct model lights up the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hops = list(range(1, args.eval_hops + 1))
    loops = list(range(1, args.max_loops + 1))
    fig, (ax, heat) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1.25, 1]})
    colors = plt.cm.viridis([i / max(1, args.max_loops - 1) for i in range(args.max_loops)])
    for n in loops:
        ax.plot(hops, [a * 100 for a in table[f"{LOOPED}@{n}"]], color=colors[n - 1], marker="o", markersize=3,
                linewidth=0.8, alpha=0.6, label=f"looped, n_loops={n}")
    ax.plot(hops, [a * 100 for a in table[f"{LOOPED}@hops"]], color="black", linewidth=2.5, marker="o",
            label="looped, n_loops=hops")
    ax.plot(hops, [a * 100 for a in table[SAME_PARAMS]], "r--", linewidth=2, marker="s", label="dense, same params")
    ax.plot(hops, [a * 100 for a in table[SAME_COMPUTE]], "m:", linewidth=2, marker="^", label="dense, same compute")
    ax.axvspan(args.train_hops + 0.5, args.eval_hops + 0.5, color="grey", alpha=0.12, label="held out")
    ax.set(xlabel="hops in the question", ylabel="accuracy (%)", xticks=hops, ylim=(-3, 103),
           xlim=(0.5, args.eval_hops + 0.5), title=f"Trained on 1..{args.train_hops} hops")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))

    grid = [[table[f"{LOOPED}@{n}"][k - 1] * 100 for n in loops] for k in hops]
    heat.imshow(grid, cmap="Greens", vmin=0, vmax=100, origin="lower", aspect="auto",
                extent=(0.5, args.max_loops + 0.5, 0.5, args.eval_hops + 0.5))
    for k in hops:
        for n in loops:
            value = grid[k - 1][n - 1]
            heat.text(n, k, f"{value:.0f}", ha="center", va="center", fontsize=7,
                      color="white" if value > 60 else "black")
    heat.axhline(args.train_hops + 0.5, color="grey", linestyle="--", linewidth=1)
    heat.set(xlabel="n_loops at inference", ylabel="hops in the question", xticks=loops, yticks=hops,
             title="Looped model accuracy (%)")
    fig.suptitle(f"k-hop pointer chasing over a hidden {args.num_nodes}-node cycle" if args.task == "hidden" else
                 f"in-context k-hop pointer chasing, a new {args.num_nodes}-node cycle in every prompt")
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def answer_samples(folder: Path, task, args) -> list[dict]:
    """Reload the saved looped model through the Auto classes and answer questions with generate(n_loops=hops)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    depths = sorted({1, args.train_hops, min(args.train_hops + 2, args.eval_hops), args.eval_hops})
    samples = []
    for i in range(args.samples):
        hops = depths[i % len(depths)]
        if args.task == "hidden":
            start = task.nodes[(7 * i + 3) % task.num_nodes]
            prompt, expected = task.question(start, hops), task.follow(start, hops)
        else:
            row = task.eval_examples(hops, 1, seed=f"sample-{args.seed}-{i}")[0]
            prompt, expected = row["question"], row["answer"]
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        # the answer is one node name: one new token
        out = model.generate(ids, max_new_tokens=1, do_sample=False, n_loops=hops,
                             pad_token_id=tokenizer.pad_token_id)
        reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        samples.append({"question": prompt, "hops": hops, "n_loops": hops, "answer": reply,
                        "expected": expected})
    return samples


# ------------------------------------------------------------------------------------------------------------- files
def write_atomically(path: Path, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one rename: a crash
    leaves the old file whole (and at most a stale temporary, overwritten next time), never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # on disk before the rename, so a power cut cannot leave an empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(text))


def _swap_names(folder: Path) -> tuple[Path, Path]:
    return folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")


def _files_under(folder: Path) -> set[str]:
    return {str(f.relative_to(folder)) for f in folder.rglob("*") if not f.is_dir()}


def _retire(old: Path, folder: Path) -> Path | None:
    """Delete the replaced folder if every file in it is one the new save wrote again; otherwise keep it, renamed
    to a free ``<name>.previous[-i]``, since the extra files are not the demo's to delete. Returns that name."""
    if _files_under(old) <= _files_under(folder):
        shutil.rmtree(old)
        return None
    kept, i = folder.with_name(f"{folder.name}.previous"), 1
    while kept.exists():
        kept, i = folder.with_name(f"{folder.name}.previous-{i}"), i + 1
    os.replace(old, kept)
    return kept


def recover_folder(folder: Path) -> Path | None:
    """Finish a swap that a crash interrupted (see ``save_folder_atomically``): put the old folder back if the new
    one never arrived, otherwise retire it. Returns where a folder with foreign files was kept, if anywhere."""
    tmp, old = _swap_names(folder)
    if tmp.exists():  # a save that never finished: the demo's own partial output
        shutil.rmtree(tmp)
    if not old.exists():
        return None
    if not folder.exists():
        os.replace(old, folder)
        return None
    return _retire(old, folder)


def save_folder_atomically(folder: Path, save) -> Path | None:
    """``save(tmp)`` fills a fresh folder beside ``folder``, which then replaces it: rename the current one aside,
    rename the new one in, retire the old one. A crash at any point leaves a whole folder (old or new) that
    ``recover_folder`` (run first here, and by the next run) puts back in place. Returns where an old folder holding
    files the demo did not write was kept, if anywhere."""
    kept = recover_folder(folder)
    tmp, old = _swap_names(folder)
    try:
        save(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # only our half-written copy; the current folder is untouched
        raise
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    return _retire(old, folder) if old.exists() else kept


def environment() -> dict:
    """What besides the seed the numbers depend on: same values here, same table."""
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "device": device, "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version()}


# -------------------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tokenizer = MythosTokenizer()
    task = make_task(args)
    if args.task == "hidden":
        print(f"Task: {task.num_nodes} nodes on one hidden random cycle; '{task.question('q', 3)}' asks for the "
              f"node 3 links after 'q'. Training on 1..{args.train_hops} hops, testing on 1..{args.eval_hops}.")
    else:
        example = task.eval_examples(2, 1, seed="intro")[0]
        print(f"Task: a new random cycle of up to {args.num_nodes} nodes in every prompt; '{example['question']}' "
              f"asks for the node 2 links after '{example['question'][-1]}' ({example['answer']!r}). Training on "
              f"1..{args.train_hops} hops ({args.curriculum_steps} 1-hop batches first), testing on "
              f"1..{args.eval_hops} over {args.num_nodes}-node graphs.")
    env = environment()
    print(f"Seed {args.seed}; torch {env['torch']}, {env['torch_threads']} CPU thread(s), {env['cpu_capability']} "
          f"kernels, {env['device']}, {env['platform']}. The same seed gives the same table on this machine with "
          f"this torch version and thread count; other CPUs can round differently.")
    dataset = training_set(task, tokenizer, args)
    models = build_models(args, tokenizer)
    training = {name: train(name, model, dataset, tokenizer, args) for name, model in models.items()}

    table = evaluate(models, task, tokenizer, args)
    text = format_table(table, args)
    scored = "every start node" if args.task == "hidden" else f"{args.eval_examples} prompts per hop count"
    print(f"\nAccuracy ({scored}, exact):\n" + text)
    write_text_atomically(out / "accuracy.md", text + "\n")
    if not args.no_plot:
        plot(table, args, out / "accuracy.png")

    folder = out / "looped-model"

    def save(tmp):
        models[LOOPED].save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    kept = save_folder_atomically(folder, save)
    if kept is not None:
        print(f"\nThe previous {folder} held files the demo did not write; it is kept as {kept}.")
    samples = answer_samples(folder, task, args)
    print(f"\nSample questions, answered by the reloaded model ({folder}) with generate(n_loops=hops):")
    for s in samples:
        verdict = "right" if s["answer"] == s["expected"] else f"wrong, expected {s['expected']!r}"
        print(f"  {s['question']!r} ({s['hops']} hops) -> {s['answer']!r} ({verdict})")

    results = {
        "settings": {k: v for k, v in vars(args).items()},
        "models": {name: describe(name, m, args) for name, m in models.items()},
        "parameters": {name: m.num_parameters() for name, m in models.items()},
        "train_seconds": {name: record["seconds"] for name, record in training.items()},
        "training": training,
        "environment": env,
        "hops": list(range(1, args.eval_hops + 1)),
        "accuracy": table,
        "summary": summary(table, args),
        "samples": samples,
        "total_seconds": time.perf_counter() - started,
    }
    write_text_atomically(out / "results.json", json.dumps(results, indent=2) + "\n")
    s = results["summary"]
    print(f"\nLooped model: {s['looped_in_distribution']:.0%} on 1..{args.train_hops} hops; at {args.eval_hops} hops "
          f"{s['looped_at_eval_hops_with_n_loops_eq_hops']:.0%} with n_loops={args.eval_hops} vs "
          f"{s['looped_at_eval_hops_with_training_depth']:.0%} with n_loops={args.train_hops}. "
          f"Dense, same params: {s['dense_same_params_at_eval_hops']:.0%}; dense, same compute: "
          f"{s['dense_same_compute_at_eval_hops']:.0%} at {args.eval_hops} hops.")
    print(f"Wrote {out / 'results.json'}, {out / 'accuracy.md'}"
          + ("" if args.no_plot else f", {out / 'accuracy.png'}") + f" in {results['total_seconds']:.0f} s.")
    return results


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
