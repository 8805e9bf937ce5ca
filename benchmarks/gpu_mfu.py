"""Training-step MFU and decode tokens/s of a preset on one GPU (a step of benchmarks/gpu_check.sh).

    python benchmarks/gpu_mfu.py train --preset mythos_1b --attn sdpa flash_attention_2 --json out.json
    python benchmarks/gpu_mfu.py decode --preset mythos_1b --batch 1 64 --json out.json
    python benchmarks/gpu_mfu.py train --dry-run        # the config and FLOPs per step, no GPU needed
    python benchmarks/gpu_mfu.py report --out runs/gpu_check   # gpu_check.sh's JSON and markdown table

MFU = model FLOPs per step / step time / the GPU's dense bf16 peak. Model FLOPs count each matmul a training step
runs, forward and backward (3x forward), without activation-checkpointing recomputation: every projection a token
passes through (prelude, n_loops x the looped block with its top-k routed experts and shared experts, coda, head)
and the attention score and value products over the full sequence (as torch's FlopCounterMode counts them; a
causal kernel does about half of that work). ``model_flops`` is checked against FlopCounterMode on CPU in
tests/test_gpu_check.py.
"""

import argparse
import json
import sys
import time
from pathlib import Path

# dense bf16 tensor-core peak (no sparsity), TFLOP/s, by device-name fragment
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def attention_flops_per_token(config, seq_len: int) -> int:
    """Forward FLOPs per token of one attention call's score and value products over ``seq_len`` keys."""
    if config.attn_type == "mla":
        qk = config.qk_nope_head_dim + config.qk_rope_head_dim
        v = max(qk, config.v_head_dim)  # the value is padded to the query/key size for the fused kernels
    else:
        qk = v = config.dim // config.n_heads
    return 2 * config.n_heads * seq_len * (qk + v)


def matmul_parameters(config) -> tuple[int, int]:
    """(dense layers', looped block's) matrix entries one token is multiplied by in one pass (from the meta-device
    model): every 2-D weight (projections, router, depth-wise LoRA) and its top-k routed experts, not the norms,
    the injection or the LoRA scale table."""
    from openmythos.parameters import meta_model

    model = meta_model(config)
    dense = loop = 0
    for name, param in model.named_parameters():
        if name.startswith("model.recurrent.layer.mlp.experts."):
            loop += param.numel() // config.n_experts * config.n_experts_per_tok
        elif param.ndim == 2 and not name.endswith("lora.scale") and "embed_tokens" not in name:
            if name.startswith("model.recurrent."):
                loop += param.numel()
            elif name.startswith(("model.prelude.", "model.coda.")):
                dense += param.numel()
    return dense, loop


def model_flops(config, batch: int, seq_len: int, n_loops: int | None = None) -> int:
    """Matmul FLOPs of one training step (forward + backward = 3 x forward) of ``batch`` x ``seq_len`` tokens."""
    n_loops = config.default_n_loops if n_loops is None else n_loops
    dense, loop = matmul_parameters(config)
    head = config.vocab_size * config.dim  # the (tied) output projection
    attention = (config.prelude_layers + config.coda_layers + n_loops) * attention_flops_per_token(config, seq_len)
    return 3 * batch * seq_len * (2 * (dense + n_loops * loop + head) + attention)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    for fragment, tflops in PEAK_TFLOPS.items():
        if fragment in device_name:
            return tflops
    return None


def build(args, attn: str):
    import torch

    import openmythos
    from openmythos import MythosForCausalLM

    config = openmythos.PRESETS[args.preset]()
    with torch.device(args.device):  # initialised in place: a 1B-parameter init on the CPU takes longer than a step
        return MythosForCausalLM._from_config(config, attn_implementation=attn, torch_dtype=torch.bfloat16)


def _sync(device: str):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def train(args) -> dict:
    import torch

    cuda = args.device == "cuda"
    results = {}
    for attn in args.attn:
        torch.manual_seed(0)
        model = build(args, attn).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        ids = torch.randint(4, model.config.vocab_size, (args.batch, args.seq_len), device=args.device)

        def step():
            model(ids, labels=ids, n_loops=args.n_loops).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        _sync(args.device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(args.device)
        seconds = (time.perf_counter() - start) / args.steps
        flops = model_flops(model.config, args.batch, args.seq_len, args.n_loops)
        peak = peak_tflops(torch.cuda.get_device_name() if cuda else "cpu", args.peak_tflops)
        results[attn] = {"step_s": seconds, "model_tflops_per_step": flops / 1e12,
                         "achieved_tflops": flops / seconds / 1e12,
                         "mfu": flops / seconds / 1e12 / peak if peak else None,
                         "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None}
        del model, optimizer
        if cuda:
            torch.cuda.empty_cache()
    return results


def decode(args) -> dict:
    import torch

    results = {}
    model = build(args, args.attn[0]).eval()
    for batch in args.batch_sizes:
        prompt = torch.randint(4, model.config.vocab_size, (batch, args.prompt_len), device=args.device)
        kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                      n_loops=args.n_loops)
        model.generate(prompt, **dict(kwargs, max_new_tokens=2, min_new_tokens=2))  # warm-up
        _sync(args.device)
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        _sync(args.device)
        seconds = time.perf_counter() - start
        new = (out.shape[1] - args.prompt_len) * batch
        results[str(batch)] = {"tokens_per_s": new / seconds, "seconds": seconds, "new_tokens": new}
    return results


def report(out: Path, device: str, gpus: int, torch_version: str) -> str:
    """Gather gpu_check.sh's step records (``steps.jsonl``) and the numbers of the mfu and decode steps into
    ``gpu_check.json`` and a markdown table, ``gpu_check.md``; returns the table."""
    import datetime

    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines() if line.strip()]
    numbers = {name: json.loads((out / f"{name}.json").read_text()) for name in ("mfu", "decode")
               if (out / f"{name}.json").exists()}
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    data = {"date": date, "device": device, "gpus": gpus, "torch": torch_version, "steps": steps, **numbers}
    rows = [f"GPU check, {date}: {gpus} x {device}, torch {torch_version}", "",
            "| step | result | seconds |", "|---|---|---|"]
    for s in steps:
        result = "timed out" if s["timed_out"] else "passed" if s["rc"] == 0 else f"failed (exit {s['rc']})"
        if s["rc"] == 5 and "pytest" in s["command"]:  # pytest's exit status when nothing matched the selection
            result = "no test matched"
        rows.append(f"| {s['step']} | {result} | {s['seconds']} |")
    if "mfu" in numbers:
        m = numbers["mfu"]
        rows += ["", f"{m['preset']} training step, {m['batch']} x {m['seq_len']} tokens, n_loops={m['n_loops']}, "
                     f"bf16, {m['model_tflops_per_step']:.1f} model TFLOP per step:", "",
                 "| attention | step s | TFLOP/s | MFU | peak memory GB |", "|---|---|---|---|---|"]
        for attn, r in m["results"].items():
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "- (unknown peak: --peak-tflops)"
            memory = "-" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.1f}"
            rows.append(f"| {attn} | {r['step_s']:.3f} | {r['achieved_tflops']:.1f} | {mfu} | {memory} |")
    if "decode" in numbers:
        d = numbers["decode"]
        rows += ["", f"{d['preset']} greedy decode, prompt {d['prompt_len']} tokens, {d['new_tokens']} new tokens, "
                     f"n_loops={d['n_loops']}:", "", "| batch | tokens/s |", "|---|---|"]
        rows += [f"| {batch} | {r['tokens_per_s']:.1f} |" for batch, r in d["results"].items()]
    table = "\n".join(rows) + "\n"
    (out / "gpu_check.json").write_text(json.dumps(data, indent=1))
    (out / "gpu_check.md").write_text(table)
    return table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["train", "decode", "report"])
    parser.add_argument("--out", default="runs/gpu_check", help="report: the folder gpu_check.sh wrote")
    parser.add_argument("--preset", default="mythos_1b")
    parser.add_argument("--attn", nargs="+", default=["sdpa", "flash_attention_2"],
                        choices=["eager", "sdpa", "flash_attention_2"])
    parser.add_argument("--batch", type=int, default=2, help="train: sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048, help="train: tokens per sequence")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="decode: batch sizes")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--n-loops", type=int, default=None, help="default: the preset's max_loop_iters")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not known")
    parser.add_argument("--json", default=None)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu runs the same code on a small preset (tests do), without MFU or peak memory")
    parser.add_argument("--dry-run", action="store_true", help="print the config and FLOPs per step; no GPU needed")
    args = parser.parse_args(argv)
    for name in ("batch", "seq_len", "prompt_len", "new_tokens", "steps", "n_loops"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.warmup < 0 or any(b < 1 for b in args.batch_sizes):
        parser.error("--warmup must be >= 0 and every --batch-sizes value >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode == "report":
        import torch

        gpus = torch.cuda.device_count()
        device = torch.cuda.get_device_name() if gpus else "no CUDA device"
        print(report(Path(args.out), device, gpus, torch.__version__), end="")
        return 0
    import openmythos

    if args.preset not in openmythos.PRESETS:
        print(f"gpu_mfu.py: error: --preset must be one of {', '.join(openmythos.PRESETS)}, got {args.preset!r}",
              file=sys.stderr)
        return 2
    config = openmythos.PRESETS[args.preset]()
    n_loops = config.default_n_loops if args.n_loops is None else args.n_loops
    summary = {"mode": args.mode, "preset": args.preset, "n_loops": n_loops, "attn": args.attn}
    if args.mode == "train":
        summary.update(batch=args.batch, seq_len=args.seq_len,
                       model_tflops_per_step=model_flops(config, args.batch, args.seq_len, n_loops) / 1e12)
    else:
        summary.update(batch_sizes=args.batch_sizes, prompt_len=args.prompt_len, new_tokens=args.new_tokens)
    if args.dry_run:
        print(json.dumps(summary))
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_mfu.py: error: no CUDA GPU; --dry-run prints the plan without one", file=sys.stderr)
        return 2
    summary["device"] = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    summary["results"] = train(args) if args.mode == "train" else decode(args)
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
