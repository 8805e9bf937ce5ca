"""Serving with per-request depth: continuous batching of requests with mixed loop budgets against a uniform budget.

    .venv/bin/python benchmarks/serving.py               # full run: 32 requests, budgets 1-16, MLA and GQA
    .venv/bin/python benchmarks/serving.py --quick       # smoke run (tests/test_benchmarks.py; no time asserted)
    .venv/bin/python benchmarks/serving.py --attn mla --reps 5 --json runs/serving.json

The same requests (prompts of 8-32 random tokens, greedy, ``--new-tokens`` each) go through transformers' continuous
batching (``model.generate_batch`` over the paged cache) twice: once with mixed budgets, ``n_loops`` = 1, 2, ..., 16
over the requests (a list, one per request), and once with every request at 16. The two runs alternate, the first
one rotating every round, so load from other work hits both alike; the report gives tokens/s (wall clock) and the
process's CPU time (all threads) for each, and the ratios mixed / uniform (above 1: mixed budgets serve faster). The
ideal ratio, if time were proportional to loops, is 16 / mean budget; the prelude, coda, head and per-step overhead
keep the measured one below it.

The model is one of run.py's sizes (``--size``; "small" is the reference README's config, "medium" 4x wider) with
``max_loop_iters=16``, random weights, fp32, sdpa attention. Results: docs/serving_benchmark.md.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_reference as refbench  # noqa: E402  (the interleaved timer)
import run as runbench  # noqa: E402  (the model sizes and the machine description)
from transformers import ContinuousBatchingConfig, GenerationConfig  # noqa: E402

MAX_BUDGET = 16


def build_requests(count: int, size: str = "small", seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """``count`` prompts of 8-32 tokens and their budgets, 1..16 in turn (every budget equally often)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = runbench.SIZES[size]["common"]["vocab_size"]
    lengths = torch.randint(8, 33, (count,), generator=gen).tolist()
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
    return prompts, [1 + i % MAX_BUDGET for i in range(count)]


def serve(model, prompts, n_loops, new_tokens, page_size=32):
    """One generate_batch over every request; returns the generated tokens of each, in order."""
    blocks = sum(-(-(len(p) + new_tokens) // page_size) for p in prompts)
    cb_config = ContinuousBatchingConfig(num_blocks=blocks + 8, page_size=page_size, max_batch_tokens=512)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config,
                                   n_loops=n_loops)
    results = [output.generated_tokens for output in outputs.values() if output.error is None]
    if len(results) != len(prompts) or any(len(tokens) != new_tokens for tokens in results):
        raise RuntimeError(f"continuous batching returned {len(results)} of {len(prompts)} requests in full")
    return results


def bench_attn(attn: str, args, prompts, budgets) -> dict:
    model = runbench.build_ours(args.size, attn, max_loop_iters=MAX_BUDGET)
    cpu = {"mixed": [], "uniform": []}

    def timed_cpu(name, n_loops):
        def run():
            start = time.process_time()  # every thread's CPU time: the work done, whatever else the machine runs
            serve(model, prompts, n_loops, args.new_tokens)
            cpu[name].append(time.process_time() - start)
        return run

    runs = {"mixed": timed_cpu("mixed", budgets), "uniform": timed_cpu("uniform", MAX_BUDGET)}
    # no_grad, not inference_mode: transformers 5.23's batching thread zeroes tensors made here in place, which an
    # inference tensor refuses outside inference mode
    with torch.no_grad():
        timings = refbench.interleaved(runs, args.reps, args.warmup)
    tokens = len(prompts) * args.new_tokens
    for name, timing in timings.items():
        timing["tokens"] = tokens
        timing["tokens_per_s"] = tokens / (timing["median_ms"] / 1e3)
        timing["cpu_s_median"] = statistics.median(cpu[name][args.warmup:])
    return {"timings": timings, "ideal": MAX_BUDGET / (sum(budgets) / len(budgets)),
            "mixed_over_uniform": timings["mixed"]["tokens_per_s"] / timings["uniform"]["tokens_per_s"],
            "mixed_over_uniform_cpu": timings["uniform"]["cpu_s_median"] / timings["mixed"]["cpu_s_median"]}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 requests, 2 new tokens, one round")
    parser.add_argument("--requests", type=int, default=None, help="requests per run (default 32; quick 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per request (default 16; quick 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds (default 5; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; quick 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--attn", nargs="+", choices=["mla", "gqa"], default=["mla", "gqa"])
    parser.add_argument("--size", choices=list(runbench.SIZES), default="small",
                        help="run.py's model size, with max_loop_iters=16 (default small)")
    parser.add_argument("--json", metavar="PATH", help="write every number and the machine description to PATH")
    args = parser.parse_args(argv)
    defaults = dict(requests=8 if args.quick else 32, new_tokens=2 if args.quick else 16, reps=1 if args.quick else 5,
                    warmup=0 if args.quick else 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problems = [f"--{name.replace('_', '-')} must be >= {low} (got {getattr(args, name)})"
                for name, low in [("requests", 1), ("new_tokens", 1), ("reps", 1), ("warmup", 0), ("threads", 1)]
                if getattr(args, name) < low]
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    prompts, budgets = build_requests(args.requests, args.size)
    machine = runbench.describe_machine(args.threads, dtype="float32")
    print(f"openmythos {machine['openmythos']} | torch {machine['torch']} | transformers {machine['transformers']}")
    print(runbench.machine_line(machine))
    lengths = [len(p) for p in prompts]
    print(f"size {args.size}; {len(prompts)} requests, prompts {min(lengths)}-{max(lengths)} tokens, "
          f"+{args.new_tokens} tokens each, greedy; budgets {min(budgets)}-{max(budgets)} (mean "
          f"{sum(budgets) / len(budgets):.1f}) vs all {MAX_BUDGET}; medians of {args.reps} rounds")
    results = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "json"},
               "budgets": budgets, "prompt_lengths": [len(p) for p in prompts], "attn": {}}
    print(f"\n{'attn':<5} {'run':<8} {'median':>9} {'tokens/s':>9} {'CPU time':>9}   mixed / uniform: tokens/s, "
          f"CPU time (ideal)")
    for attn in args.attn:
        res = results["attn"][attn] = bench_attn(attn, args, prompts, budgets)
        for name, timing in res["timings"].items():
            ratio = "" if name != "uniform" else (
                f"   {res['mixed_over_uniform']:.2f}, {res['mixed_over_uniform_cpu']:.2f} ({res['ideal']:.2f})")
            print(f"{attn:<5} {name:<8} {timing['median_ms'] / 1e3:>7.2f} s {timing['tokens_per_s']:>9.1f} "
                  f"{timing['cpu_s_median']:>7.2f} s{ratio}")
        sys.stdout.flush()
    runbench.finish_run(machine, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
