"""``mythos demo --task text``'s run: build the corpus and its splits, train the two looped models and the dense
baseline with the Trainer, score held-out bits per byte at every loop count and with the exit rule, write the results.

Imported by ``openmythos.demo.text.run`` only, so parsing the flags never imports torch.
"""

import argparse
import functools
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments, set_seed
from transformers.trainer import DEFAULT_PROGRESS_CALLBACK
from transformers.utils import logging as hf_logging

from ..configuration_mythos import MythosConfig
from ..modeling_mythos import MythosForCausalLM
from ..tokenization_mythos import MythosTokenizer
from ..training import MythosTrainingCallback
from ..training.data import causal_lm_collator, pack_documents
from .files import claim_output_dir, write_text_atomically
from .parallel import train_models
from .pipeline import BarOnlyProgressCallback, dense_config, environment
from .report import describe_training, training_record
from .text import (DENSE, FIXED, SAMPLED, TITLES, collect_documents, extrapolation_line, format_table, plot,
                   split_documents, summary)


# -------------------------------------------------------------------------------------------------------------- data
def encode(tokenizer, documents) -> list[list[int]]:
    return [tokenizer.encode(doc.text, add_special_tokens=False) for doc in documents]


def blocks(token_lists: list[list[int]], seq_len: int, eos_token_id: int,
           limit: int | None = None) -> tuple[torch.Tensor, int]:
    """Documents joined with EOS after each and cut into rows of ``seq_len`` ids (the last partial row dropped); with
    ``limit``, that many rows evenly spaced over all of them, so a smaller sample still spans the whole split.
    Returns the rows and how many there were before the sample."""
    rows = list(pack_documents(token_lists, seq_len, eos_token_id))
    if not rows:
        raise ValueError(f"the text is shorter than one block of --seq-len {seq_len} bytes")
    if limit is not None and limit < len(rows):
        return torch.tensor([rows[i * len(rows) // limit] for i in range(limit)]), len(rows)
    return torch.tensor(rows), len(rows)


def corpus(tokenizer, args) -> tuple[dict[str, torch.Tensor], dict]:
    """Blocks of each split and a record of what they hold (document and byte counts, a checksum of the corpus)."""
    documents = collect_documents()
    splits = split_documents(documents)
    train_docs = splits["train"]
    if args.train_bytes is not None:  # the first documents up to --train-bytes (toy runs)
        kept, total = [], 0
        for doc in train_docs:
            if total >= args.train_bytes:
                break
            kept.append(doc)
            total += len(doc.text.encode("utf-8"))
        train_docs = kept
    eos = tokenizer.eos_token_id
    packed = {"train": blocks(encode(tokenizer, train_docs), args.seq_len, eos),
              "validation": blocks(encode(tokenizer, splits["validation"]), args.seq_len, eos, args.val_blocks),
              "test": blocks(encode(tokenizer, splits["test"]), args.seq_len, eos, args.test_blocks)}
    data = {name: rows for name, (rows, _) in packed.items()}
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.name.encode("utf-8") + b"\0" + doc.text.encode("utf-8") + b"\0")
    record = {
        "documents": {"all": len(documents), "train": len(train_docs), "validation": len(splits["validation"]),
                      "test": len(splits["test"])},
        "bytes": {"all": sum(len(d.text.encode("utf-8")) for d in documents),
                  "train": sum(len(d.text.encode("utf-8")) for d in train_docs),
                  "validation": sum(len(d.text.encode("utf-8")) for d in splits["validation"]),
                  "test": sum(len(d.text.encode("utf-8")) for d in splits["test"])},
        "blocks": {name: int(rows.shape[0]) for name, rows in data.items()},
        "blocks_in_split": {name: total for name, (_, total) in packed.items()},
        "sha256": digest.hexdigest(),
    }
    return data, record


# ------------------------------------------------------------------------------------------------------------ models
def looped_config(args, tokenizer, sampled: bool) -> MythosConfig:
    """One prelude block, one shared MoE block looped n_loops times, one coda block (GQA).

    As in the pointer-chasing demo, the loop-index signal and the depth-wise LoRA are off: both are indexed by the loop
    number, and scoring at 32 loops would reach indices training never used. The sampled model draws
    ``1 + Poisson(rate)`` loops per step (log-normal rate, mean ``--mean-loops``, at most twice that), the fixed model
    always runs ``--mean-loops``.
    """
    deepest = max(args.eval_loops)
    return MythosConfig(
        vocab_size=len(tokenizer), dim=args.dim, n_heads=args.heads, n_kv_heads=args.heads, attn_type="gqa",
        max_seq_len=args.seq_len, max_loop_iters=args.mean_loops, prelude_layers=1, coda_layers=1,
        n_experts=4, n_shared_experts=1, n_experts_per_tok=2, expert_dim=args.dim, lora_rank=0,
        loop_signal_scale=0.0, rope_theta=10000.0, max_inference_loops=max(deepest, 2 * args.mean_loops),
        loop_sampling="poisson_lognormal" if sampled else "fixed", mean_train_loops=float(args.mean_loops),
        backprop_loops=args.backprop_loops if sampled else None,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )


def build_models(args, tokenizer) -> dict[str, torch.nn.Module]:
    """The two looped models (same architecture and initial weights) and a Llama whose layer count brings its
    parameter count closest to theirs (layers as wide as the looped model's prelude/coda)."""
    set_seed(args.seed)
    sampled = MythosForCausalLM(looped_config(args, tokenizer, sampled=True))
    set_seed(args.seed)
    fixed = MythosForCausalLM(looped_config(args, tokenizer, sampled=False))
    target = sampled.num_parameters()

    def dense(layers):  # dense_config reads --dim and --heads from the flags
        set_seed(args.seed)
        return LlamaForCausalLM(dense_config(args, tokenizer, layers, sampled.config.dense_ffn_dim, args.seq_len))

    one_layer = dense(1).num_parameters()
    per_layer = dense(2).num_parameters() - one_layer
    layers = max(1, round((target - (one_layer - per_layer)) / per_layer))
    return {SAMPLED: sampled, FIXED: fixed, DENSE: dense(layers)}


def describe(name: str, model, args) -> str:
    cfg = model.config
    if name == DENSE:
        return (f"{TITLES[name]}: {cfg.num_hidden_layers} layers (FFN {cfg.intermediate_size}), "
                f"{model.num_parameters():,} parameters")
    how = (f"loop sampling, mean {args.mean_loops}, at most {2 * args.mean_loops}"
           + (f", backprop through the last {args.backprop_loops}" if args.backprop_loops else "")
           if name == SAMPLED else f"fixed {args.mean_loops} loops")
    return (f"{TITLES[name]}: {cfg.prelude_layers} prelude + 1 shared MoE block x n_loops + {cfg.coda_layers} coda, "
            f"{model.num_parameters():,} parameters, trained with {how}")


# ---------------------------------------------------------------------------------------------------------- training
def train(name: str, model, rows: torch.Tensor, args, progress_bar: bool = True) -> dict:
    """The stock Trainer on the packed training blocks (the same shuffled order for every model: same data seed);
    the looped models get ``MythosTrainingCallback`` (loop sampling and expert balancing)."""
    training_args = TrainingArguments(
        output_dir=str(Path(args.output_dir) / "trainer" / name), max_steps=args.steps,
        per_device_train_batch_size=args.batch_size, learning_rate=args.lr, warmup_steps=max(1, args.steps // 20),
        lr_scheduler_type="cosine", weight_decay=0.1, adam_beta2=0.95, max_grad_norm=1.0,
        logging_steps=max(1, args.steps // 10), save_strategy="no", report_to="none", seed=args.seed,
        data_seed=args.seed, remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=False,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    dataset = [{"input_ids": row.tolist()} for row in rows]
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset, data_collator=causal_lm_collator,
                      callbacks=[MythosTrainingCallback()] if name != DENSE else None)
    trainer.remove_callback(DEFAULT_PROGRESS_CALLBACK)
    if progress_bar:
        trainer.add_callback(BarOnlyProgressCallback())
    where = "" if progress_bar else " (in a second process)"
    print(f"\nTraining {describe(name, model, args)}{where}", flush=True)
    start = time.perf_counter()
    trainer.train()
    record = training_record(args.steps, time.perf_counter() - start, trainer.state.log_history)
    # from the second process, start a line of its own: the first one's progress bar holds the current one
    print(("" if progress_bar else "\n") + describe_training(name, record), flush=True)
    return record


# ---------------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def bits_per_byte(model, rows: torch.Tensor, eos_token_id: int, batch_size: int = 32, **loop_kwargs) -> dict:
    """Mean next-token loss in bits over every predicted byte of ``rows`` (each row's first byte has no context and
    is not predicted; EOS document separators are context, not scored), and the mean loops those positions ran
    (``loops_used``; None for a model without loops)."""
    model.eval()
    nll, count, loops = 0.0, 0, 0.0
    has_loops = False
    for chunk in rows.split(batch_size):
        out = model(input_ids=chunk, use_cache=False, **loop_kwargs)
        targets = chunk[:, 1:]
        scored = targets != eos_token_id
        losses = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                                   reduction="none").view_as(targets)
        nll += losses[scored].sum().item()
        count += int(scored.sum())
        if getattr(out, "loops_used", None) is not None:
            has_loops = True
            # loops_used at position i is the depth that produced the prediction of byte i + 1
            loops += out.loops_used[:, :-1][scored].float().sum().item()
    return {"bpb": nll / count / math.log(2), "mean_loops": loops / count if has_loops else None}


def pick_threshold(model, validation: torch.Tensor, args, eos_token_id: int) -> dict:
    """The exit rule's threshold, by one fixed rule: on the validation split, the largest of ``--exit-thresholds``
    whose bits per byte (budget = the largest ``--eval-loops``) are at most ``--exit-tolerance`` above the model's best
    fixed loop count's. Larger thresholds stop earlier, so this is the cheapest candidate that costs (almost) nothing
    in quality. When none passes, the candidate with the lowest validation bits per byte. Returns the choice and every
    validation number."""
    budget = max(args.eval_loops)
    fixed = {str(n): bits_per_byte(model, validation, eos_token_id, n_loops=n)["bpb"] for n in args.eval_loops}
    best = min(fixed.values())
    tried = {}
    chosen = None
    for threshold in args.exit_thresholds:  # largest first
        result = bits_per_byte(model, validation, eos_token_id, n_loops=budget, exit_criterion=args.exit_criterion,
                               exit_threshold=threshold)
        tried[f"{threshold:g}"] = result
        if result["bpb"] <= best * (1 + args.exit_tolerance):
            chosen = threshold
            break
    passed = chosen is not None
    if not passed:  # every candidate costs more than the tolerance: the one that costs least
        chosen = float(min(tried, key=lambda t: tried[t]["bpb"]))
    return {"threshold": chosen, "validation_fixed_bpb": fixed, "validation_best_bpb": best,
            "validation_tried": tried, "passed": passed}


def score(name: str, model, data: dict, args, eos_token_id: int) -> dict:
    """Test bits per byte: the looped models at every ``--eval-loops`` and with the exit rule, the dense model once."""
    test = data["test"]
    if name == DENSE:
        value = bits_per_byte(model, test, eos_token_id)["bpb"]
        return {"n_loops": {str(n): value for n in args.eval_loops}}
    row = {"n_loops": {str(n): bits_per_byte(model, test, eos_token_id, n_loops=n)["bpb"] for n in args.eval_loops}}
    choice = pick_threshold(model, data["validation"], args, eos_token_id)
    result = bits_per_byte(model, test, eos_token_id, n_loops=max(args.eval_loops), exit_criterion=args.exit_criterion,
                           exit_threshold=choice["threshold"])
    row["exit"] = {"criterion": args.exit_criterion, "threshold": choice["threshold"], "budget": max(args.eval_loops),
                   "bpb": result["bpb"], "mean_loops": result["mean_loops"], "choice": choice}
    return row


def train_and_score(name: str, model, data: dict, args, eos_token_id: int, progress_bar: bool = True) -> dict:
    """Train one model, then score it: one process's whole share of the work for that model."""
    record = {"training": train(name, model, data["train"], args, progress_bar=progress_bar)}
    started = time.perf_counter()
    record["bpb"] = score(name, model, data, args, eos_token_id)
    record["scoring_seconds"] = time.perf_counter() - started
    return record


def load_average() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return None


# -------------------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    load_at_start = load_average()
    out = Path(args.output_dir)
    claim_output_dir(out)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    tokenizer = MythosTokenizer()
    data, corpus_record = corpus(tokenizer, args)
    print(f"Text: {corpus_record['documents']['all']:,} documents of Python's own documentation (pydoc topics and "
          f"standard-library docstrings), {corpus_record['bytes']['all']:,} bytes; split by document: "
          f"{corpus_record['blocks']['train']:,} training, {corpus_record['blocks']['validation']:,} validation and "
          f"{corpus_record['blocks']['test']:,} test blocks of {args.seq_len} bytes.")
    env = environment(args)
    print(f"Seed {args.seed}; torch {env['torch']}, {env['torch_threads']} CPU thread(s), {env['cpu_capability']} "
          f"kernels, {env['device']}, {env['platform']}; load average {load_at_start}.")
    models = build_models(args, tokenizer)
    # with 2 jobs the fixed-loop model trains and is scored in a second process while the loop-sampled and dense
    # models are trained and scored here (the two shares take about as long)
    work = train_models(models, functools.partial(train_and_score, data=data, args=args,
                                                  eos_token_id=tokenizer.eos_token_id), [FIXED], args)
    training = {name: record["training"] for name, record in work.items()}
    bpb = {name: record["bpb"] for name, record in work.items()}
    scoring_seconds = sum(record["scoring_seconds"] for record in work.values())
    text = format_table(bpb, args)
    print(f"\nTest bits per byte ({corpus_record['blocks']['test']} blocks of {args.seq_len} bytes; lower is better):\n"
          + text)
    write_text_atomically(out / "bpb.md", text + "\n")
    if not args.no_plot:
        plot(bpb, args, out / "bpb.png", f"Held-out bits per byte on Python's documentation ({args.steps} steps)")

    results = {
        "settings": dict(vars(args)),
        "models": {name: describe(name, m, args) for name, m in models.items()},
        "parameters": {name: m.num_parameters() for name, m in models.items()},
        "corpus": corpus_record,
        "training": training,
        "train_seconds": {name: record["seconds"] for name, record in training.items()},
        "scoring_seconds": scoring_seconds,
        "environment": env,
        "load_average": {"start": load_at_start, "end": load_average()},
        "eval_loops": args.eval_loops,
        "bpb": bpb,
        "summary": summary(bpb, args),
        "total_seconds": time.perf_counter() - started,
    }
    write_text_atomically(out / "results.json", json.dumps(results, indent=2) + "\n")
    s = results["summary"]
    line = extrapolation_line(s)
    if line:
        print("\n" + line)
    print(f"Wrote {out / 'results.json'}, {out / 'bpb.md'}" + ("" if args.no_plot else f", {out / 'bpb.png'}")
          + f" in {results['total_seconds']:.0f} s.")
    return results
