"""Pretrain an OpenMythos model with the Hugging Face Trainer.

Defaults follow the seed's 3B FineWeb-Edu recipe (mythos_3b, FineWeb-Edu sample-10BT streamed, the gpt-oss-20b
tokenizer, AdamW with linear warmup and cosine decay, bf16). On a GPU box:

    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/pretrain.py --output-dir runs/mythos-3b

A toy run that needs no download and finishes in about a minute on a laptop CPU (tiny model, the byte-level
tokenizer, the small corpus shipped with the package):

    python examples/pretrain.py --toy --output-dir runs/toy

Checkpoints are written atomically (openmythos.training.checkpoints), so a run killed at any moment, even mid-save,
continues with the same command plus --resume: it picks the newest complete checkpoint and says which broken ones it
skipped.
"""

import argparse
import json
import math

import torch
from transformers import TrainingArguments, set_seed

import openmythos
from openmythos import MythosForCausalLM, MythosTokenizer
from openmythos.training.checkpoints import AtomicCheckpointTrainer, has_checkpoints, latest_complete_checkpoint
from openmythos.training.data import SAMPLE_CORPUS, causal_lm_collator, pretraining_dataset
from openmythos.training.optim import MuonAdamW
from openmythos.training import MythosTrainingCallback


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="tiny model, byte tokenizer, shipped corpus, CPU-sized run")
    p.add_argument("--preset", default="mythos_3b", choices=sorted(openmythos.PRESETS))
    p.add_argument("--attn-type", default=None, choices=["mla", "gqa"], help="override the preset's attention")
    p.add_argument("--tokenizer", default="openai/gpt-oss-20b",
                   help="a Hub name or local path for AutoTokenizer, or 'byte' for the built-in byte-level tokenizer")
    p.add_argument("--dataset", default="HuggingFaceFW/fineweb-edu")
    p.add_argument("--dataset-config", default="sample-10BT")
    p.add_argument("--data-files", nargs="+", default=None, help="local .txt/.jsonl/.json/.parquet/.csv instead")
    p.add_argument("--text-column", default="text")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=4, help="per device")
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--max-steps", type=int, default=30000)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=2000)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                   help="muon: Muon for hidden matrices + AdamW for the rest (openmythos.training.optim.MuonAdamW)")
    p.add_argument("--muon-lr", type=float, default=0.02)
    p.add_argument("--mean-loops", type=float, default=None,
                   help="sample n_loops per step around this mean (Poisson, log-normal rate); default: preset depth")
    p.add_argument("--fixed-loops", action="store_true", help="train with a fixed n_loops instead of sampling")
    p.add_argument("--backprop-loops", type=int, default=8, help="backpropagate through only the last k loops")
    p.add_argument("--router-bias-rate", type=float, default=1e-3,
                   help="step of the aux-loss-free router-bias balancing update (DeepSeek-V3 uses 1e-3)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    p.add_argument("--output-dir", default="runs/mythos")
    p.add_argument("--save-steps", type=int, default=1000)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--resume", action="store_true",
                   help="resume from the newest complete checkpoint in --output-dir (start fresh when there is none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.toy:
        toy = dict(preset="mythos_tiny", tokenizer="byte", data_files=[str(SAMPLE_CORPUS)], seq_len=64,
                   batch_size=8, grad_accum=1, max_steps=40, lr=3e-3, warmup_steps=5, backprop_loops=2,
                   save_steps=20, logging_steps=5, mean_loops=3.0, router_bias_rate=0.02)
        defaults = {a.dest: a.default for a in p._actions}
        for key, value in toy.items():  # a flag given on the command line wins over the toy value
            if getattr(args, key) == defaults[key]:
                setattr(args, key, value)
    return args


def load_tokenizer(name: str):
    if name == "byte":
        return MythosTokenizer()
    return MythosTokenizer.from_pretrained_or_default(name)


def build_model(args, tokenizer) -> MythosForCausalLM:
    overrides = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     backprop_loops=args.backprop_loops, router_bias_update_rate=args.router_bias_rate)
    if args.attn_type:
        overrides["attn_type"] = args.attn_type
    if not args.fixed_loops:
        overrides.update(loop_sampling="poisson_lognormal", mean_train_loops=args.mean_loops)
    if args.toy:
        overrides["max_seq_len"] = max(args.seq_len, 128)
    config = openmythos.PRESETS[args.preset](**overrides)
    return MythosForCausalLM(config)


def resume_checkpoint(output_dir: str) -> str | None:
    """The checkpoint --resume continues from: the newest complete one (broken newer ones are skipped, with the
    reason logged). None when the folder has no checkpoint yet; an error when it has some but none is complete,
    rather than silently training from scratch over them."""
    checkpoint = latest_complete_checkpoint(output_dir)
    if checkpoint is None and has_checkpoints(output_dir):
        raise SystemExit(f"--resume: no complete checkpoint-N folder in {output_dir} (see the reasons above)")
    if checkpoint is not None:
        print(f"Resuming from {checkpoint}", flush=True)
    return checkpoint


def main(argv=None):
    args = parse_args(argv)
    resume = resume_checkpoint(args.output_dir) if args.resume else None  # before any work: it may refuse
    set_seed(args.seed)
    tokenizer = load_tokenizer(args.tokenizer)
    model = build_model(args, tokenizer)
    streaming = args.data_files is None
    train_data = pretraining_dataset(
        tokenizer, args.seq_len, max_seq_len=model.config.max_seq_len, text_column=args.text_column,
        dataset=args.dataset, name=args.dataset_config, data_files=args.data_files, streaming=streaming)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and torch.cuda.is_available()
                                         and torch.cuda.is_bf16_supported())
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, warmup_steps=args.warmup_steps,
        lr_scheduler_type="cosine", weight_decay=args.weight_decay, adam_beta2=0.95, max_grad_norm=1.0,
        bf16=bf16, logging_steps=args.logging_steps, save_steps=args.save_steps, save_total_limit=3,
        seed=args.seed, data_seed=args.seed, report_to="none",
        activation_checkpointing=args.gradient_checkpointing, dataloader_num_workers=0,
        remove_unused_columns=False, use_cpu=not torch.cuda.is_available(),
    )
    optimizers = (None, None)
    if args.optimizer == "muon":
        optimizers = (MuonAdamW.from_model(model, lr=args.lr, muon_lr=args.muon_lr,
                                           weight_decay=args.weight_decay), None)
    # Checkpoints are written atomically, so a kill or a full disk mid-save never leaves a folder that blocks --resume.
    trainer = AtomicCheckpointTrainer(model=model, args=training_args, train_dataset=train_data,
                                      data_collator=causal_lm_collator, callbacks=[MythosTrainingCallback()],
                                      optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {"first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "steps": trainer.state.global_step, "output_dir": args.output_dir}
    if losses:
        summary["last_perplexity"] = math.exp(min(losses[-1], 50))
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
