"""Compiled batched decode with and without MythosLinear's streamed form (weight @ x^T for 2-4 rows), paired.

    .venv/bin/python benchmarks/streamed_decode.py                       # medium MLA and small MLA/GQA, batch 2
    .venv/bin/python benchmarks/streamed_decode.py --runs small/gqa --rounds 3

Two models with the same weights are compiled (inductor, transformers' static-cache generate), one with the streamed
form switched off (``modeling_mythos.streams_weight`` made to answer False while it runs). Their greedy tokens must be
equal; then the ms per decode step inside one generate (benchmarks/run.py's ``compiled_decode_ms``) is timed round
robin, 1 torch thread, and the medians printed. Results: docs/benchmarks.md ("Batched decode streams its weights").
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (the models, the compiled runner and the decode-step timer)

from openmythos import modeling_mythos  # noqa: E402

STREAMS = modeling_mythos.streams_weight


def paired(size: str, attn: str, batch: int, rounds: int, new_tokens: int) -> dict:
    prompt = torch.randint(0, bench.SIZES[size]["common"]["vocab_size"], (batch, 16),
                           generator=torch.Generator().manual_seed(0))
    runners, tokens, steps = {}, {}, {"nn.Linear": [], "streamed": []}

    def use(mode):
        modeling_mythos.streams_weight = STREAMS if mode == "streamed" else (lambda hidden_states: False)

    try:
        for mode in steps:
            use(mode)
            runners[mode] = bench.Runner("ours+compile", bench.build_ours(size, attn), "inductor")
            tokens[mode] = runners[mode].generate(prompt, new_tokens)
        if not torch.equal(tokens["nn.Linear"], tokens["streamed"]):
            raise SystemExit(f"{size}/{attn}: the two forms generated different tokens")
        for _ in range(rounds):
            for mode in steps:
                use(mode)
                steps[mode].append(bench.compiled_decode_ms(runners[mode], prompt, new_tokens, 1))
    finally:
        modeling_mythos.streams_weight = STREAMS
    return {mode: statistics.median(ms) for mode, ms in steps.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["medium/mla", "small/mla", "small/gqa"],
                        help="size/attention pairs (sizes: %s; attention: mla, gqa)" % ", ".join(bench.SIZES))
    parser.add_argument("--batch", type=int, default=2, help="rows decoded at once (the streamed form takes 2-4)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per form")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per timed generate")
    args = parser.parse_args(argv)
    for run in args.runs:
        size, _, attn = run.partition("/")
        if size not in bench.SIZES or attn not in ("mla", "gqa"):
            parser.error(f"--runs takes size/attention pairs such as small/gqa, got {run!r}")
    if args.batch < 1 or args.rounds < 1 or args.new_tokens < 2:
        parser.error("--batch and --rounds must be >= 1 and --new-tokens >= 2")
    torch.set_num_threads(1)
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} | torch {torch.__version__} | 1 torch thread | batch {args.batch}")
    print("| model | nn.Linear ms per step | streamed ms per step | ratio |")
    print("|---|---|---|---|")
    for run in args.runs:
        size, _, attn = run.partition("/")
        ms = paired(size, attn, args.batch, args.rounds, args.new_tokens)
        print(f"| {run} | {ms['nn.Linear']:.2f} | {ms['streamed']:.2f} | {ms['nn.Linear'] / ms['streamed']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
