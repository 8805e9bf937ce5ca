"""Fine-tune an OpenMythos checkpoint with PEFT LoRA and the Hugging Face Trainer.

    python examples/finetune_lora.py --model runs/mythos --data-files my_text.jsonl --output-dir runs/lora

`import openmythos` registers default LoRA targets for model_type "mythos" (attention and dense FFN projections), so
`LoraConfig(task_type="CAUSAL_LM")` needs no target list; `--experts` also adapts the routed experts' 3-D weights.
With no --model, a toy run trains a fresh tiny model briefly and then fine-tunes it on the shipped corpus (CPU, about
a minute): `python examples/finetune_lora.py --toy --output-dir runs/lora-toy`.
"""

import argparse
import json

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

import openmythos
from openmythos import MythosForCausalLM, MythosTokenizer, mythos_tiny
from openmythos.training.checkpoints import AtomicCheckpointTrainer
from openmythos.training.data import SAMPLE_CORPUS, causal_lm_collator, pretraining_dataset
from openmythos.peft_support import expert_lora_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="fresh tiny model + shipped corpus, CPU-sized")
    p.add_argument("--model", default=None, help="a saved OpenMythos checkpoint (save_pretrained folder)")
    p.add_argument("--data-files", nargs="+", default=None)
    p.add_argument("--text-column", default="text")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=int, default=32)
    p.add_argument("--experts", action="store_true", help="also adapt the routed experts (target_parameters)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--output-dir", default="runs/lora")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.toy:
        args.data_files = args.data_files or [str(SAMPLE_CORPUS)]
        args.seq_len, args.max_steps, args.lr, args.batch_size = 64, 20, 3e-3, 8
    if args.model is None and not args.toy:
        p.error("--model is required (or --toy)")
    return args


def main(argv=None):
    args = parse_args(argv)
    set_seed(args.seed)
    if args.model is None:
        tokenizer = MythosTokenizer()
        model = MythosForCausalLM(mythos_tiny(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id))
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    data = pretraining_dataset(tokenizer, args.seq_len, max_seq_len=model.config.max_seq_len,
                               text_column=args.text_column, data_files=args.data_files, streaming=False)
    lora = dict(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0)
    config = expert_lora_config(**lora) if args.experts else LoraConfig(task_type="CAUSAL_LM", **lora)
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=5, save_steps=max(args.max_steps, 1), report_to="none", seed=args.seed,
        use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, dataloader_num_workers=0)
    trainer = AtomicCheckpointTrainer(model=model, args=training_args, train_dataset=data,
                                      data_collator=causal_lm_collator)
    trainer.train()
    model.save_pretrained(args.output_dir)  # the adapter only
    tokenizer.save_pretrained(args.output_dir)

    # Merging the adapter gives a plain model with the same outputs.
    ids = torch.tensor([data[0]["input_ids"][:32]])
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        same = torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    summary = {"first_loss": losses[0], "last_loss": losses[-1], "merged_matches_adapter": same,
               "merged_is_plain_model": not isinstance(merged, PeftModel), "adapter_dir": args.output_dir,
               "package": openmythos.__version__}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
