"""Side-by-side speed of openmythos and the reference implementation (PyPI ``open-mythos`` 0.5.0).

Both models are built in this process on the reference README config, in fp32, and timed interleaved (ours,
reference, ours, reference, ...) so that noise from other work on the machine hits both alike. It reports medians
and minimums; the ratio is reference time / our time, so a ratio above 1 means we are faster.

    .venv/bin/python benchmarks/bench_reference.py            # full run (1-2 minutes on 2 idle CPU cores)
    .venv/bin/python benchmarks/bench_reference.py --quick    # smoke run
    .venv/bin/python benchmarks/bench_reference.py --json results.json --profile

The reference is not a dependency of this package; install it beside ours with
``pip install --no-deps open-mythos==0.5.0`` (it pins an old torch exactly, hence ``--no-deps``).
See benchmarks/README.md for what is measured and the numbers.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import open_mythos
except ImportError:  # checked again in main() so that --help works without it
    open_mythos = None

import transformers  # noqa: E402

import openmythos  # noqa: E402

INSTALL_HINT = ("The reference implementation is not installed. Install it beside openmythos with:\n"
                "    .venv/bin/pip install --no-deps open-mythos==0.5.0\n"
                "(--no-deps because it pins torch==2.11.0 exactly; it runs on the torch you already have).")

# "small": the reference README's example config, with its two attention variants. Per-op overhead dominates it.
# "medium": 4x wider, 16 experts, 256-token sequences: big enough that arithmetic, not dispatch, dominates. Its MLA
# has DeepSeek's shape ratios (v head narrower than q/k, latent 4x the rope dim).
SIZES = {
    "small": dict(
        common=dict(vocab_size=1000, dim=256, n_heads=8, max_seq_len=128, max_loop_iters=4, prelude_layers=1,
                    coda_layers=1, n_experts=8, n_shared_experts=1, n_experts_per_tok=2, expert_dim=64, lora_rank=8),
        variants={"mla": dict(attn_type="mla", n_kv_heads=8, kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16,
                              qk_nope_head_dim=16, v_head_dim=16),
                  "gqa": dict(attn_type="gqa", n_kv_heads=2)},
        batch=2, seq_len=128, prompt_len=16, reps=30),
    "medium": dict(
        common=dict(vocab_size=4096, dim=512, n_heads=8, max_seq_len=512, max_loop_iters=4, prelude_layers=1,
                    coda_layers=1, n_experts=16, n_shared_experts=1, n_experts_per_tok=2, expert_dim=256,
                    lora_rank=8),
        variants={"mla": dict(attn_type="mla", n_kv_heads=8, kv_lora_rank=128, q_lora_rank=256,
                              qk_rope_head_dim=32, qk_nope_head_dim=64, v_head_dim=64),
                  "gqa": dict(attn_type="gqa", n_kv_heads=2)},
        batch=2, seq_len=256, prompt_len=128, reps=10),
}
N_LOOPS = 4

# Our model in the configurations worth comparing; "ours" is the default a user gets from from_config().
OUR_VARIANTS = {
    "ours": dict(),
    "ours[experts=eager]": dict(experts_implementation="eager"),
    "ours[attn=eager]": dict(attn_implementation="eager"),
}


# ------------------------------------------------------------------------------------------------------ models
def build_models(attn: str, with_variants: bool, seed: int = 0, size: str = "small"):
    """The reference (ACT forced off) and our model(s), fp32. Our variants share one set of weights."""
    fields = {**SIZES[size]["common"], **SIZES[size]["variants"][attn]}
    torch.manual_seed(seed)
    # act_threshold above the largest possible cumulative halting probability (n_loops * 1): the reference's ACT
    # never halts, so it runs every loop. With the default 0.99 it stops after 2-3 loops and n_loops is a no-op.
    ref = open_mythos.OpenMythos(open_mythos.MythosConfig(**fields, act_threshold=float("inf")))
    torch.manual_seed(seed)
    # One config object per model: from_config(cfg, attn_implementation=...) writes its choice onto the object it is
    # given, so a shared config would switch every model built from it to the last variant's implementation.
    ours = {}
    base = transformers.AutoModelForCausalLM.from_config(openmythos.MythosConfig(**fields))  # use_act off: all loops
    ours["ours"] = base
    if with_variants:
        for name, kwargs in OUR_VARIANTS.items():
            if name == "ours":
                continue
            model = transformers.AutoModelForCausalLM.from_config(openmythos.MythosConfig(**fields), **kwargs)
            model.load_state_dict(base.state_dict())
            ours[name] = model
    for name, model in ours.items():  # each model runs what its name says (see the note on configs above)
        asked = OUR_VARIANTS[name]
        used = implementations(model)
        wrong = {key: (value, used[key]) for key, value in asked.items() if used[key] != value}
        if wrong or (name != "ours" and used == implementations(base)):
            raise RuntimeError(f"{name} runs {used}, not what it asks for ({asked})")
    # Both are built in fp32 (torch's default dtype). Never call .to(dtype) on the reference: it casts its complex
    # RoPE tables to real, which silently switches its RoPE off.
    for model in [ref, *ours.values()]:
        dtypes = {p.dtype for p in model.parameters()}
        if dtypes != {torch.float32}:
            raise RuntimeError(f"expected fp32 parameters only, got {dtypes}")
    if not (ref.freqs_cis.is_complex() and ref.freqs_cis_mla.is_complex()):
        raise RuntimeError("the reference's RoPE tables are not complex: its RoPE would be off")
    return ref, ours


def implementations(model) -> dict:
    """The attention and experts kernels a model of ours runs, as printed beside its numbers."""
    return {"attn_implementation": model.config._attn_implementation,
            "experts_implementation": getattr(model.config, "_experts_implementation", None)}


def count_params(model) -> int:
    # unique tensors: both models tie the LM head to the embedding
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


class LoopCounter:
    """Counts calls of a module (one per loop iteration for the recurrent block)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


# ------------------------------------------------------------------------------------------------ workloads
def ref_forward(model, ids):
    with torch.no_grad():
        return model(ids, n_loops=N_LOOPS)


def ours_forward(model, ids):
    with torch.no_grad():
        return model(ids, n_loops=N_LOOPS, use_cache=False).logits


def ref_generate(model, ids, new_tokens):
    # The reference has no greedy mode (temperature=0 gives NaN); top_k=1 makes its sampling greedy.
    return model.generate(ids, max_new_tokens=new_tokens, n_loops=N_LOOPS, top_k=1)


def ours_generate(model, ids, new_tokens):
    return model.generate(ids, max_new_tokens=new_tokens, do_sample=False, n_loops=N_LOOPS)


def ref_train_step(model, ids):
    logits = model(ids, n_loops=N_LOOPS)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss


def ours_train_step(model, ids):
    loss = model(ids, labels=ids, n_loops=N_LOOPS, use_cache=False).loss  # same shifted cross-entropy
    loss.backward()
    model.zero_grad(set_to_none=True)
    return loss


# ------------------------------------------------------------------------------------------------- checks
def loop_counters(ref, ours) -> dict:
    counters = {"ref": LoopCounter(ref.recurrent.block)}
    counters.update({name: LoopCounter(model.model.recurrent.layer) for name, model in ours.items()})
    return counters


def check_loops_run(ref, ours, ids):
    """Every model must really run N_LOOPS loop iterations per forward (in the current train/eval mode)."""
    counters = loop_counters(ref, ours)
    try:
        with torch.no_grad():
            ref(ids, n_loops=N_LOOPS)
            for model in ours.values():
                model(ids, n_loops=N_LOOPS, use_cache=False)
        for name, counter in counters.items():
            calls = counter.take()
            if calls != N_LOOPS:
                raise RuntimeError(f"{name}: the recurrent block ran {calls} times in a forward, expected {N_LOOPS}")
    finally:
        for counter in counters.values():
            counter.handle.remove()


def check_generate(ref, ours, prompt, new_tokens):
    """Each generate call must return exactly ``new_tokens`` new tokens, running N_LOOPS loops for every one."""
    counters = loop_counters(ref, ours)
    try:
        outputs = {"ref": ref_generate(ref, prompt, new_tokens)}
        outputs.update({name: ours_generate(model, prompt, new_tokens) for name, model in ours.items()})
        for name, out in outputs.items():
            expected = (prompt.shape[0], prompt.shape[1] + new_tokens)
            if out.shape != expected or not torch.equal(out[:, :prompt.shape[1]], prompt):
                raise RuntimeError(f"{name}: generate returned shape {tuple(out.shape)}, expected the prompt plus "
                                   f"{new_tokens} new tokens {expected}")
            calls = counters[name].take()
            if calls != N_LOOPS * new_tokens:
                raise RuntimeError(f"{name}: generate ran the recurrent block {calls} times, expected "
                                   f"{N_LOOPS} loops x {new_tokens} forwards = {N_LOOPS * new_tokens}")
    finally:
        for counter in counters.values():
            counter.handle.remove()


def kv_bytes_per_token(ref, ours, prompt):
    """Bytes of KV cache per cached token (all layers and loop slots), measured on real caches after a prefill."""
    tokens = prompt.numel()
    cache = {}
    with torch.no_grad():
        ref(prompt, n_loops=N_LOOPS, kv_cache=cache)
    ref_bytes = sum(t.numel() * t.element_size() for entry in cache.values() for t in entry.values())
    with torch.no_grad():
        out = ours(prompt, n_loops=N_LOOPS, use_cache=True)
    our_cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    our_bytes = sum(t.numel() * t.element_size() for layer in our_cache.layers for t in (layer.keys, layer.values))
    return {"ref": ref_bytes / tokens, "ours": our_bytes / tokens,
            "ref_slots": len(cache), "ours_slots": len(our_cache.layers)}


# ------------------------------------------------------------------------------------------------- timing
def interleaved(fns: dict, reps: int, warmup: int) -> dict:
    """Median and minimum milliseconds of each callable, run round-robin; the first one rotates every round."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: {"median_ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t), "reps": len(t)}
            for name, t in times.items()}


def bench_attn(attn, args):
    ref, ours = build_models(attn, with_variants=not args.no_variants, size=args.size)
    gen = torch.Generator().manual_seed(1)
    vocab = SIZES[args.size]["common"]["vocab_size"]
    seq_ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=gen)
    prompt = torch.randint(0, vocab, (args.batch, args.prompt_len), generator=gen)
    result = {"params": {"ref": count_params(ref), **{n: count_params(m) for n, m in ours.items()}},
              "implementations": {n: implementations(m) for n, m in ours.items()}}

    for model in [ref, *ours.values()]:
        model.eval()
    check_loops_run(ref, ours, seq_ids)
    check_generate(ref, ours, prompt, args.new_tokens)
    result["kv_cache_bytes_per_token"] = kv_bytes_per_token(ref, ours["ours"], prompt)

    def suite(ref_fn, our_fn, *fn_args):
        fns = {"ref": lambda: ref_fn(ref, *fn_args)}
        fns.update({name: (lambda m=model: our_fn(m, *fn_args)) for name, model in ours.items()})
        return fns

    timings = {}
    timings["forward"] = interleaved(suite(ref_forward, ours_forward, seq_ids), args.reps, args.warmup)
    timings["generate"] = interleaved(suite(ref_generate, ours_generate, prompt, args.new_tokens), args.reps,
                                      args.warmup)
    for model in [ref, *ours.values()]:
        model.train()
    check_loops_run(ref, ours, seq_ids)
    timings["train_step"] = interleaved(suite(ref_train_step, ours_train_step, seq_ids), args.reps, args.warmup)
    for model in [ref, *ours.values()]:
        model.eval()
    result["timings"] = timings
    if args.profile:
        result["profile"] = profile(ref, ours["ours"], seq_ids, prompt, args)
    return result


def profile(ref, ours, seq_ids, prompt, args):
    """Top ops by self CPU time for each workload (printed; the tables also go into the JSON)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    workloads = {
        "forward": (lambda: ref_forward(ref, seq_ids), lambda: ours_forward(ours, seq_ids)),
        "generate": (lambda: ref_generate(ref, prompt, args.new_tokens),
                     lambda: ours_generate(ours, prompt, args.new_tokens)),
    }
    tables = {}
    for workload, fns in workloads.items():
        for who, fn in zip(("ref", "ours"), fns):
            fn()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            tables[f"{workload}/{who}"] = table
            print(f"\n--- profile: {workload}, {who} ---\n{table}")
    return tables


# ------------------------------------------------------------------------------------------------- report
def print_report(results, args):
    print(f"\nopenmythos {openmythos.__version__} vs open-mythos {results['meta']['reference_version']} | "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, fp32")
    meta = results["meta"]
    print(f"{meta['date']}, {meta['cpu_count']} CPUs, 1-minute load average {meta['load_average_at_start']:.1f} at "
          f"start, {meta['load_average_at_end']:.1f} at end (counts this run too; more means noisier timings)")
    print(f"size {args.size}; forward and train step: {args.batch}x{args.seq_len}; generate: prompt {args.batch}x{args.prompt_len}, "
          f"+{args.new_tokens} tokens; {N_LOOPS} loops everywhere. Medians; ratio = ref / ours (>1: we are faster)")
    for attn, res in results["attn"].items():
        params = res["params"]
        kv = res["kv_cache_bytes_per_token"]
        print(f"\n[{attn.upper()}] params: ref {params['ref']:,}, ours {params['ours']:,} "
              f"(ref has +{params['ref'] - params['ours']:,}: its ACT halting head and recurrent-input norm)")
        print(f"  KV cache per token (all {kv['ours_slots']} layer/loop slots): ref {kv['ref']:.0f} B, "
              f"ours {kv['ours']:.0f} B (ref / ours = {kv['ref'] / kv['ours']:.2f})")
        print(f"  {'workload':<11} {'model':<20} {'median':>10} {'min':>10}   {'ref/model (median)':>18}"
              f" {'ref/model (min)':>16}")
        for workload, t in res["timings"].items():
            for name, v in t.items():
                ratios = "" if name == "ref" else (f"   {t['ref']['median_ms'] / v['median_ms']:>18.2f}"
                                                   f" {t['ref']['min_ms'] / v['min_ms']:>16.2f}")
                used = res.get("implementations", {}).get(name)
                kernels = "" if used is None else (f"   [attn={used['attn_implementation']}, "
                                                   f"experts={used['experts_implementation']}]")
                print(f"  {workload:<11} {name:<20} {v['median_ms']:>7.1f} ms {v['min_ms']:>7.1f} ms{ratios}{kernels}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor() or ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few repetitions, no extra variants")
    parser.add_argument("--size", choices=list(SIZES), default="small",
                        help="model and input size: small (the reference README config, default) or medium")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed repetitions per model (default 30 small, 10 medium; quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per model first (default 3; quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--attn", choices=["mla", "gqa", "both"], default="both")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--no-variants", action="store_true",
                        help="time only our default model (sdpa attention, grouped_mm experts)")
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler top ops per workload")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if open_mythos is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    if args.reps is None:
        args.reps = 3 if args.quick else SIZES[args.size]["reps"]
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.reps < 1 or args.warmup < 0 or args.threads < 1 or args.new_tokens < 1:
        parser.error(f"need --reps >= 1, --warmup >= 0, --threads >= 1, --new-tokens >= 1; got reps={args.reps}, "
                     f"warmup={args.warmup}, threads={args.threads}, new_tokens={args.new_tokens}")
    args.no_variants = args.no_variants or args.quick
    size = SIZES[args.size]
    args.batch, args.seq_len, args.prompt_len = size["batch"], size["seq_len"], size["prompt_len"]
    torch.set_num_threads(args.threads)

    from importlib.metadata import version
    results = {
        "meta": {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {cpu_model()}".strip(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": os.getloadavg()[0],  # other work on the machine; noise grows with it
            "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "openmythos": openmythos.__version__, "reference_version": version("open-mythos"),
            "threads": args.threads, "dtype": "float32", "n_loops": N_LOOPS, "size": args.size,
            "config": SIZES[args.size]["common"], "attn_configs": SIZES[args.size]["variants"],
            "batch": args.batch, "seq_len": args.seq_len, "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens, "reps": args.reps, "warmup": args.warmup, "quick": args.quick,
        },
        "attn": {},
    }
    for attn in (["mla", "gqa"] if args.attn == "both" else [args.attn]):
        results["attn"][attn] = bench_attn(attn, args)
    results["meta"]["load_average_at_end"] = os.getloadavg()[0]
    print_report(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
