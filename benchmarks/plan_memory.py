"""Check ``mythos plan``'s memory model against the measured peak memory of real training steps (CPU, one process).

    .venv/bin/python benchmarks/plan_memory.py            # the validation configs, as in docs/plan.md
    .venv/bin/python benchmarks/plan_memory.py --json runs/plan_memory.json

One process is the FSDP-degree-1 case of the plan: fp32 parameters, fp32 gradients, no master copy, fp32 AdamW
state (``Precision("fp32", "fp32", "none")``). Each config takes one AdamW step first (so the optimizer state exists,
as in every later step), then a second step runs under the profiler. Measured peak = the bytes live before that step
(parameters and AdamW state, counted from the tensors) + the peak of the bytes the step allocated on top (profiler
allocator events, ``peak_allocated_bytes``). tests/test_plan.py runs the first two configs.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


from openmythos import MythosForCausalLM, mythos_tiny  # noqa: E402
from openmythos.plan import Precision, plan  # noqa: E402

# (name, config overrides, batch, seq_len, n_loops, activation checkpointing). The first config's peak is mostly
# activations, the second's mostly parameters, gradients and AdamW state; the MoE runs the grouped_mm kernel.
CONFIGS = [
    ("mla-d128", dict(attn_type="mla", dim=128, n_experts=16, expert_dim=64), 4, 64, 4, False),
    ("gqa-d128-wide-experts", dict(attn_type="gqa", dim=128, n_heads=4, n_kv_heads=2, n_experts=32, expert_dim=256),
     1, 32, 4, False),
    ("gqa-d128", dict(attn_type="gqa", dim=128, n_heads=4, n_kv_heads=2, n_experts=16, expert_dim=64), 4, 64, 4,
     False),
    ("mla-d128-ckpt", dict(attn_type="mla", dim=128, n_experts=16, expert_dim=64), 4, 64, 4, True),
    ("gqa-d128-wide-experts-ckpt", dict(attn_type="gqa", dim=128, n_heads=4, n_kv_heads=2, n_experts=32,
                                        expert_dim=256), 1, 32, 4, True),
    ("mla-d256-8loops", dict(attn_type="mla", dim=256, n_heads=8, max_loop_iters=8, n_experts=16, expert_dim=128,
                             kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, qk_nope_head_dim=16,
                             v_head_dim=32), 2, 128, 8, False),
]
FP32 = Precision("fp32", "fp32", "none")


def peak_allocated_bytes(fn) -> int:
    """Peak of the bytes allocated while ``fn`` runs, above what was live when it started.

    Read from the allocator's own events (one ``[memory]`` event per allocation and free, at the time it happened)
    in the profiler's trace. ``run.peak_memory_mb`` sums the ops' memory columns instead, where the frees inside a
    ``record_function`` scope count at the scope's start: it sees 0 bytes for an AdamW step that allocates two
    temporaries per parameter, so it misses the optimizer step's peak.
    """
    from torch.profiler import ProfilerActivity, profile

    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    with tempfile.TemporaryDirectory() as folder:
        trace = Path(folder) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    deltas = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                    if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0)  # CPU
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def measure(overrides: dict, batch: int, seq_len: int, n_loops: int, checkpointing: bool, seed: int = 0) -> dict:
    """Estimated and measured peak bytes of one AdamW training step (after a first one) in one process."""
    torch.manual_seed(seed)
    config = mythos_tiny(vocab_size=512, max_seq_len=max(seq_len, 128), **overrides)
    model = MythosForCausalLM._from_config(config, attn_implementation="sdpa").train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(4, config.vocab_size, (batch, seq_len))

    def step():
        model(ids, labels=ids, n_loops=n_loops).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # allocates the AdamW state
    live = sum(t.numel() * t.element_size() for t in model.parameters())
    live += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                if torch.is_tensor(t))
    measured = live + peak_allocated_bytes(step)
    # torch's AdamW runs its per-tensor implementation on CPU tensors
    layout = plan(config, 1, batch=batch, seq_len=seq_len, n_loops=n_loops, precision=FP32,
                  checkpointing=checkpointing, layouts=("fsdp",), adamw_impl="per-tensor").layouts[0]
    estimate = layout.peak("adamw", checkpointing)
    return {"estimate_bytes": int(estimate), "measured_bytes": int(measured), "ratio": estimate / measured,
            "params": layout.params, "grads": layout.grads, "adamw": layout.optimizer["adamw"],
            "activations": layout.activations.peak(checkpointing),
            "workspace": layout.activations.workspace}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    print("| config | attention | batch x seq | n_loops | checkpointing | estimate MiB | measured MiB | "
          "estimate / measured |")
    print("|---|---|---|---|---|---|---|---|")
    for name, overrides, batch, seq_len, n_loops, ckpt in CONFIGS:
        r = results[name] = measure(overrides, batch, seq_len, n_loops, ckpt)
        print(f"| {name} | {overrides['attn_type'].upper()} | {batch} x {seq_len} | {n_loops} | "
              f"{'yes' if ckpt else 'no'} | "
              f"{r['estimate_bytes'] / 2**20:.2f} | {r['measured_bytes'] / 2**20:.2f} | {r['ratio']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
