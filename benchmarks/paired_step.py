"""Compiled forward and train step with and without one of their fast paths, paired: same weights, timed round robin.

    .venv/bin/python benchmarks/paired_step.py --path causal --seq-len 128 512 2048
    .venv/bin/python benchmarks/paired_step.py --path rope --runs small/gqa small/mla

``--path`` picks the fast path that one of the two models runs without:
- ``causal``: a call with no padding mask, no cache and the default positions passes sdpa no mask and runs it with
  ``is_causal`` (``modeling_mythos.plainly_causal``), instead of the [batch, 1, seq, seq] mask transformers builds
  whenever it traces;
- ``rope``: the RoPE frequencies are a graph constant (``MythosRotary.frequencies``), instead of
  ``1 / theta ** (2i / d)`` computed in the graph.

Two models with the same weights are compiled (inductor); the plain one runs with the switch turned back while it
runs. Their forward outputs must agree (to 1e-5: inductor may fuse the two graphs differently), then forward and train
step (batch 2) are timed round robin, 1 torch thread, and the medians printed. Results: docs/benchmarks.md ("A compiled
call without padding attends causally without a mask", "RoPE frequencies are constants").
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (the models and the compiled runner)

from openmythos import modeling_mythos  # noqa: E402


def _formula_frequencies(self, device):
    """The frequencies as computed before they became constants: from theta, in the graph."""
    exponent = torch.arange(0, self.rope_dim, 2, device=device, dtype=torch.float32) / self.rope_dim
    return 1.0 / (self.theta**exponent)


SWITCHES = {"causal": (modeling_mythos, "plainly_causal", lambda *args: False),
            "rope": (modeling_mythos.MythosRotary, "frequencies", _formula_frequencies)}


def paired(path: str, size: str, attn: str, seq_len: int, rounds: int) -> dict:
    owner, name, plain = SWITCHES[path]
    fast = getattr(owner, name)
    ids = torch.randint(0, bench.SIZES[size]["common"]["vocab_size"], (2, seq_len),
                        generator=torch.Generator().manual_seed(0))
    modes = ("plain", path)
    runners, times = {}, {(mode, work): [] for mode in modes for work in ("forward", "train_step")}

    def use(mode):
        setattr(owner, name, fast if mode == path else plain)

    try:
        base = bench.build_ours(size, attn)
        outputs = {}
        for mode in modes:
            use(mode)
            model = bench.build_ours(size, attn)
            model.load_state_dict(base.state_dict())
            runners[mode] = bench.Runner("ours+compile", model, "inductor")
            outputs[mode] = runners[mode].forward(ids)
        if not torch.allclose(outputs["plain"], outputs[path], atol=1e-5, rtol=1e-4):
            raise SystemExit(f"{size}/{attn}: the two forms disagree")
        for work in ("forward", "train_step"):
            for mode in modes:
                use(mode)
                runners[mode].model.train(work == "train_step")
                getattr(runners[mode], work)(ids)  # compile and warm up
            for _ in range(rounds):
                for mode in modes:
                    use(mode)
                    start = time.perf_counter()
                    getattr(runners[mode], work)(ids)
                    times[mode, work].append(1e3 * (time.perf_counter() - start))
    finally:
        setattr(owner, name, fast)
    return {key: statistics.median(ms) for key, ms in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", choices=list(SWITCHES), default="causal", help="the fast path to pair")
    parser.add_argument("--runs", nargs="+", default=["small/gqa"],
                        help="size/attention pairs (sizes: %s; attention: mla, gqa)" % ", ".join(bench.SIZES))
    parser.add_argument("--seq-len", type=int, nargs="+", default=[128], help="tokens per row (batch 2)")
    parser.add_argument("--rounds", type=int, default=9, help="timed rounds per form and workload")
    args = parser.parse_args(argv)
    for run in args.runs:
        size, _, attn = run.partition("/")
        if size not in bench.SIZES or attn not in ("mla", "gqa"):
            parser.error(f"--runs takes size/attention pairs such as small/gqa, got {run!r}")
    if args.rounds < 1 or min(args.seq_len) < 2 or max(args.seq_len) > bench.MAX_SEQ_LEN:
        parser.error(f"--rounds must be >= 1 and --seq-len between 2 and {bench.MAX_SEQ_LEN}")
    torch.set_num_threads(1)
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} | torch {torch.__version__} | 1 torch thread | batch 2 "
          f"| path {args.path}")
    print(f"| model | tokens | forward plain / {args.path} ms | ratio | train step plain / {args.path} ms | ratio |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        size, _, attn = run.partition("/")
        for seq_len in args.seq_len:
            ms = paired(args.path, size, attn, seq_len, args.rounds)
            cells = [f"{ms['plain', w]:.1f} / {ms[args.path, w]:.1f} | {ms['plain', w] / ms[args.path, w]:.2f}"
                     for w in ("forward", "train_step")]
            print(f"| {run} | {seq_len} | {cells[0]} | {cells[1]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
