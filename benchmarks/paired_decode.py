"""Compiled decode with and without one of its CPU fast paths, paired: same weights, same tokens, timed round robin.

    .venv/bin/python benchmarks/paired_decode.py                                   # streamed: medium MLA, small MLA/GQA
    .venv/bin/python benchmarks/paired_decode.py --path grouped --runs small/gqa medium/gqa --prompt-len 16 128 512
    .venv/bin/python benchmarks/paired_decode.py --path grouped --runs small/gqa --kv-heads 8 --prompt-len 128 1024
    .venv/bin/python benchmarks/paired_decode.py --runs small/gqa --rounds 3
    .venv/bin/python benchmarks/paired_decode.py --path cpp-wrapper --runs small/mla small/gqa --prompt-len 16 128
    .venv/bin/python benchmarks/paired_decode.py --path own-mask --runs small/mla small/gqa --prompt-len 16 128

``--path`` picks the fast path that one of the two models runs without:
- ``streamed``: :class:`MythosLinear`'s ``weight @ x^T`` for 2-4 rows (``modeling_mythos.streams_weight``);
- ``grouped``: GQA's one-position attention as two matmuls of the grouped queries by the cached keys
  (``modeling_mythos.decodes_grouped``), instead of sdpa;
- ``cpp-wrapper``: inductor's C++ wrapper around the step's kernels (``run.decode_compile_config``), instead of the
  Python one. The wrapper changes only the compiled call; the per-step time also holds transformers' generation loop,
  which is the same for both.
- ``own-mask``: no prepared mask when generate has no padding (``MythosForCausalLM.create_masks_for_generate``), so
  the compiled step builds its causal mask from the cache position; the plain model takes transformers' function,
  which builds a [batch, 1, 1, cache length] mask in Python every step and passes it in.

Two models with the same weights are compiled (inductor, transformers' static-cache generate); the switch is made to
answer False while the plain model runs (for ``cpp-wrapper``, the plain model compiles without the option; for
``own-mask``, it takes transformers' ``create_masks_for_generate``). Their greedy tokens must be equal; then the ms
per decode step inside one generate (benchmarks/run.py's ``compiled_decode_ms``) is timed round robin, 1 torch
thread, and the medians printed. Results: docs/benchmarks.md ("Batched decode streams its weights", "GQA decode reads
each cached key once", "Compiled decode runs a C++ wrapper", "Compiled decode builds its own causal mask").
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (the models, the compiled runner and the decode-step timer)
from transformers import masking_utils  # noqa: E402

from openmythos import modeling_mythos  # noqa: E402

SWITCHES = {"streamed": "streams_weight", "grouped": "decodes_grouped", "cpp-wrapper": None, "own-mask": None}


def paired(path: str, size: str, attn: str, batch: int, prompt_len: int, rounds: int, new_tokens: int,
           **overrides) -> dict:
    name = SWITCHES[path]
    fast = getattr(modeling_mythos, name) if name else None
    prompt = torch.randint(0, bench.SIZES[size]["common"]["vocab_size"], (batch, prompt_len),
                           generator=torch.Generator().manual_seed(0))
    runners, tokens, steps = {}, {}, {"plain": [], path: []}

    def use(mode):
        if name:
            setattr(modeling_mythos, name, fast if mode == path else (lambda *args: False))

    try:
        base = bench.build_ours(size, attn, **overrides)
        for mode in steps:
            use(mode)
            model = bench.build_ours(size, attn, **overrides)
            model.load_state_dict(base.state_dict())
            if path == "own-mask" and mode == "plain":
                model.create_masks_for_generate = masking_utils.create_masks_for_generate  # transformers' own
            runners[mode] = bench.Runner("ours+compile", model, "inductor")
            if path == "cpp-wrapper" and mode == "plain":
                runners[mode].compile_config.options = None  # inductor's Python wrapper
            tokens[mode] = runners[mode].generate(prompt, new_tokens)
        if not torch.equal(tokens["plain"], tokens[path]):
            raise SystemExit(f"{size}/{attn}: the two forms generated different tokens")
        for _ in range(rounds):
            for mode in steps:
                use(mode)
                steps[mode].append(bench.compiled_decode_ms(runners[mode], prompt, new_tokens, 1))
    finally:
        if name:
            setattr(modeling_mythos, name, fast)
    return {mode: statistics.median(ms) for mode, ms in steps.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=list(SWITCHES), default="streamed", help="the fast path to pair")
    parser.add_argument("--runs", nargs="+", default=None,
                        help="size/attention pairs (sizes: %s; attention: mla, gqa; default: medium/mla small/mla "
                             "small/gqa, or small/gqa medium/gqa for grouped)" % ", ".join(bench.SIZES))
    parser.add_argument("--batch", type=int, default=2, help="rows decoded at once (the streamed form takes 2-4)")
    parser.add_argument("--prompt-len", type=int, nargs="+", default=[16], help="prompt lengths (tokens)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="GQA key/value heads instead of the config's (e.g. 8 of 8 for MHA at the small size)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per form")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per timed generate")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = (["small/gqa", "medium/gqa"] if args.path == "grouped"
                     else ["medium/mla", "small/mla", "small/gqa"])
    for run in args.runs:
        size, _, attn = run.partition("/")
        if size not in bench.SIZES or attn not in ("mla", "gqa"):
            parser.error(f"--runs takes size/attention pairs such as small/gqa, got {run!r}")
        if args.path == "grouped" and attn != "gqa":
            parser.error(f"--path grouped pairs GQA attention only, got {run!r}")
    heads = {size: bench.SIZES[size]["common"]["n_heads"] for size in bench.SIZES}
    if args.kv_heads is not None:
        for run in args.runs:
            size, _, attn = run.partition("/")
            if attn != "gqa" or args.kv_heads < 1 or heads[size] % args.kv_heads:
                parser.error(f"--kv-heads must divide the {heads[size]} heads of a GQA run, got {args.kv_heads} "
                             f"for {run!r}")
    if args.batch < 1 or args.rounds < 1 or args.new_tokens < 2 or min(args.prompt_len) < 1:
        parser.error("--batch, --rounds and --prompt-len must be >= 1 and --new-tokens >= 2")
    if max(args.prompt_len) + args.new_tokens > bench.MAX_SEQ_LEN:
        parser.error(f"--prompt-len + --new-tokens must be at most {bench.MAX_SEQ_LEN}")
    torch.set_num_threads(1)
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} | torch {torch.__version__} | 1 torch thread | batch {args.batch} "
          f"| path {args.path}" + ("" if args.kv_heads is None else f" | {args.kv_heads} key/value heads"))
    print(f"| model | prompt | plain ms per step | {args.path} ms per step | ratio |")
    print("|---|---|---|---|---|")
    for run in args.runs:
        size, _, attn = run.partition("/")
        for prompt_len in args.prompt_len:
            overrides = {} if args.kv_heads is None else {"n_kv_heads": args.kv_heads}
            ms = paired(args.path, size, attn, args.batch, prompt_len, args.rounds, args.new_tokens, **overrides)
            print(f"| {run} | {prompt_len} | {ms['plain']:.2f} | {ms[args.path]:.2f} | "
                  f"{ms['plain'] / ms[args.path]:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
