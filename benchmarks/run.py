"""One benchmark command: openmythos (eager and compiled) against the reference and an unrolled peer, in one process.

    .venv/bin/python benchmarks/run.py              # full run: small and medium, every section (15 min on 2 cores)
    .venv/bin/python benchmarks/run.py --quick      # smoke run (about 1 min; CI runs it, no time is asserted)
    .venv/bin/python benchmarks/run.py --sizes medium --sections models --json runs/bench.json

Models, each built from its own config object, fp32, with the kernels it runs printed beside every number:
- ``ours``: ``AutoModelForCausalLM.from_config(MythosConfig(...))``, sdpa attention, grouped_mm experts, eager.
- ``ours+compile``: the same weights under ``torch.compile`` (forward, train step) and, for generate, transformers'
  compiled static-cache decoding (``cache_implementation="static"`` with a ``CompileConfig``).
- ``ref``: the reference implementation (PyPI ``open-mythos`` 0.5.0, ``pip install --no-deps open-mythos==0.5.0``);
  its column is left out, with a note, where it is not installed.
- ``peer`` (and ``peer+compile``, compiled like ours): the same compute unrolled in a stock transformers model,
  prelude + n_loops + coda layers of ``DeepseekV3ForCausalLM`` for MLA (dense first and last layers, MoE between),
  of ``Qwen2MoeForCausalLM`` for GQA (DeepSeek-V3 has no GQA; ``mlp_only_layers`` makes its first and last layers
  dense). Same widths, experts, top-k, shared-expert width and tied embeddings. It has no input injection, loop
  signal or depth-wise LoRA, so it does slightly less work than ours.

Sections (``--sections``): ``models`` (forward, greedy generate from prompts of 16 and 128 tokens +32 tokens, train
step, peak memory, KV bytes per token), ``context`` (decode ms per token against prompt length), ``loops`` (decode ms
per token and KV bytes per token against n_loops, for each ``loop_kv_sharing``), ``roofline`` (the fraction of a
measured fp32 matmul peak that forward and train step reach, and the share of the memory-bandwidth floor that a
batch-2 decode step reaches). Timings are interleaved round-robin across models (the first rotates every round), so
load from other work hits all alike; read the ratios, not the milliseconds. Results: docs/benchmarks.md.
"""

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_reference as refbench  # noqa: E402  (the reference's workloads and the configs it is timed on)
import transformers  # noqa: E402
from torch.utils import flop_counter  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

import openmythos  # noqa: E402
from openmythos.modeling_mythos import CACHE_NAME  # noqa: E402

N_LOOPS = refbench.N_LOOPS
# one model compiles forward, train step and a decode step per prompt length: more graphs than dynamo's default 8
torch._dynamo.config.recompile_limit = 32
SIZES = refbench.SIZES
# RoPE tables are sized by max_seq_len; 4096 leaves room for the 2048-token context sweep and changes no arithmetic.
MAX_SEQ_LEN = 4096
SECTIONS = ("models", "context", "loops", "roofline")
SHARINGS = ("none", "first", "last")


# ------------------------------------------------------------------------------------------------------ models
def fields(size: str, attn: str) -> dict:
    return {**SIZES[size]["common"], **SIZES[size]["variants"][attn], "max_seq_len": MAX_SEQ_LEN}


def build_ours(size, attn, seed=0, **overrides):
    torch.manual_seed(seed)
    config = openmythos.MythosConfig(**{**fields(size, attn), **overrides})  # one config object per model
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def build_reference(size, attn, seed=0):
    if refbench.open_mythos is None:
        return None
    torch.manual_seed(seed)
    # ACT threshold above any reachable halting mass: the reference then runs every loop (bench_reference.py)
    config = refbench.open_mythos.MythosConfig(**fields(size, attn), act_threshold=float("inf"))
    model = refbench.open_mythos.OpenMythos(config)
    if not (model.freqs_cis.is_complex() and model.freqs_cis_mla.is_complex()):
        raise RuntimeError("the reference's RoPE tables are not complex: its RoPE would be off")
    return model.eval()


def build_peer(size, attn, n_loops=N_LOOPS, seed=0):
    """Prelude + n_loops + coda layers of a stock transformers MoE model, at our widths (see the module docstring)."""
    f = fields(size, attn)
    ours_defaults = openmythos.MythosConfig(**f)
    prelude, coda = f["prelude_layers"], f["coda_layers"]
    layers = prelude + n_loops + coda
    shared = f["n_shared_experts"] * f["expert_dim"] * f["n_experts_per_tok"]  # our shared-expert width
    common = dict(vocab_size=f["vocab_size"], hidden_size=f["dim"], intermediate_size=ours_defaults.dense_ffn_dim,
                  moe_intermediate_size=f["expert_dim"], num_hidden_layers=layers, num_attention_heads=f["n_heads"],
                  num_experts_per_tok=f["n_experts_per_tok"], max_position_embeddings=MAX_SEQ_LEN,
                  tie_word_embeddings=True, norm_topk_prob=True, pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    if attn == "mla":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP
        config = transformers.DeepseekV3Config(
            **common, num_key_value_heads=f["n_heads"], n_shared_experts=shared // f["expert_dim"],
            n_routed_experts=f["n_experts"], routed_scaling_factor=1.0, kv_lora_rank=f["kv_lora_rank"],
            q_lora_rank=f["q_lora_rank"], qk_rope_head_dim=f["qk_rope_head_dim"], v_head_dim=f["v_head_dim"],
            qk_nope_head_dim=f["qk_nope_head_dim"], n_group=1, topk_group=1, first_k_dense_replace=prelude)
        model = transformers.AutoModelForCausalLM.from_config(config)
        for layer in model.model.layers[layers - coda:]:
            layer.mlp = DeepseekV3MLP(model.config)  # dense coda, as ours
    else:
        config = transformers.Qwen2MoeConfig(
            **common, num_key_value_heads=f["n_kv_heads"], num_experts=f["n_experts"],
            shared_expert_intermediate_size=shared, qkv_bias=False,
            mlp_only_layers=list(range(prelude)) + list(range(layers - coda, layers)))
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def kernels(model) -> str:
    if not hasattr(getattr(model, "config", None), "_attn_implementation"):
        return "reference (plain PyTorch)"
    return (f"attn={model.config._attn_implementation}, "
            f"experts={getattr(model.config, '_experts_implementation', None)}")


# ------------------------------------------------------------------------------------------------ workloads
def decode_compile_config(backend: str) -> transformers.CompileConfig:
    """transformers' compiled static-cache decoding on the CPU (the README's recipe). With inductor the step's
    wrapper is C++ (``cpp_wrapper``): a Python wrapper spent about a third of a small model's compiled decode step
    launching kernels and making views (under cProfile); the C++ one made generate 1.09-1.16x faster
    (docs/benchmarks.md). The forward and the train step keep the Python wrapper, which measured the same (0.88-1.11x,
    within noise)."""
    options = {"cpp_wrapper": True} if backend == "inductor" else None
    config = transformers.CompileConfig(fullgraph=True, backend=backend, mode=None, options=options)
    config._compile_all_devices = True  # CPU: transformers compiles only on accelerators otherwise
    return config


class Runner:
    """The workloads of one model kind, behind one interface (our model, its compiled form, the reference, a peer)."""

    def __init__(self, kind, model, compile_backend=None):
        self.kind, self.model = kind, model
        self.compiled = None
        self.compile_config = None
        if compile_backend is not None:
            self.compiled = torch.compile(model, backend=compile_backend)
            self.compile_config = decode_compile_config(compile_backend)

    @property
    def is_ref(self):
        return self.kind == "ref"

    def _depth(self, n_loops=N_LOOPS) -> dict:
        """The loop-count argument: ours take ``n_loops``; a peer's depth is its layer count."""
        return {"n_loops": n_loops} if self.kind.startswith("ours") else {}

    def forward(self, ids):
        with torch.no_grad():
            if self.is_ref:
                return self.model(ids, n_loops=N_LOOPS)
            model = self.model if self.compiled is None else self.compiled
            return model(input_ids=ids, use_cache=False, **self._depth()).logits

    def generate(self, prompt, new_tokens, **extra):
        if self.is_ref:
            return refbench.ref_generate(self.model, prompt, new_tokens)
        extra.update(self._depth())
        if self.compile_config is not None:
            extra.update(cache_implementation="static", compile_config=self.compile_config)
        return self.model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=0, **extra)

    def train_step(self, ids):
        if self.is_ref:
            return refbench.ref_train_step(self.model, ids)
        model = self.model if self.compiled is None else self.compiled
        loss = model(input_ids=ids, labels=ids, use_cache=False, **self._depth()).loss
        loss.backward()
        self.model.zero_grad(set_to_none=True)
        return loss

    # cached decoding, one step at a time (context and loops sections)
    def prefill(self, prompt, n_loops=N_LOOPS):
        with torch.no_grad():
            if self.is_ref:
                cache = {}
                self.model(prompt, n_loops=n_loops, kv_cache=cache, start_pos=0)
                return {"cache": cache, "pos": prompt.shape[1]}
            out = self.model(input_ids=prompt, use_cache=True, **self._depth(n_loops))
            return {"cache": getattr(out, CACHE_NAME), "pos": prompt.shape[1]}

    def decode_step(self, state, token, n_loops=N_LOOPS):
        with torch.no_grad():
            if self.is_ref:
                self.model(token, n_loops=n_loops, kv_cache=state["cache"], start_pos=state["pos"])
            else:
                self.model(input_ids=token, use_cache=True, **{CACHE_NAME: state["cache"]}, **self._depth(n_loops))
            state["pos"] += 1


def cache_bytes(state) -> int:
    cache = state["cache"]
    if isinstance(cache, dict):  # the reference: {layer key: {"k"/"v"/latent...: tensor}}
        return sum(t.numel() * t.element_size() for entry in cache.values() for t in entry.values())
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


# ------------------------------------------------------------------------------------------------- measures
interleaved = refbench.interleaved  # median and minimum ms of each callable, run round-robin


def peak_memory_mb(fn) -> float:
    """Peak of the bytes allocated during ``fn`` above what was live when it started (profiler memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    # an op event carries the net bytes it allocated itself; "[memory]" events are frees between ops
    events = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    live = peak = 0
    for _, delta in events:
        live += delta
        peak = max(peak, live)
    return peak / 2**20


def _grouped_mm_flops(a, b, *args, out_shape=None, **kwargs) -> int:
    """``torch._grouped_mm`` (our and the peer's routed experts): each output entry is one dot product of length
    ``a[-1]``; when both operands are 2-D the groups split that length instead (the weight gradient)."""
    if len(a) == len(b) == 2:  # [k, m] x [m, n] -> [groups, k, n], m split among the groups
        return 2 * math.prod(out_shape[1:]) * a[-1]
    return 2 * math.prod(out_shape) * a[-1]


def _cpu_flash_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Without the kernel's recomputation of the scores, as model FLOPs (and a math-path backward) count it."""
    batch, heads, q_len, head_dim = query
    recompute = flop_counter.bmm_flop((batch * heads, q_len, head_dim), (batch * heads, head_dim, key[2]))
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value) - recompute


# Kernels torch's FlopCounterMode has no formula for: without these it counts them as 0 FLOPs, and a model that runs
# them (ours, the peer: grouped_mm experts, sdpa on the CPU) looks as if it did less arithmetic than it does.
# Attention counts the full score matrix, as a bmm path does; its backward leaves out the score recomputation that
# torch's formula for the CUDA kernels includes, so that the fused and the plain path count the same model FLOPs.
UNCOUNTED_KERNELS = {
    getattr(torch.ops.aten, name): formula for name, formula in (
        ("_grouped_mm", _grouped_mm_flops),  # an aten op since torch 2.8
        ("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash_flops),
        ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward_flops),
    ) if hasattr(torch.ops.aten, name)
}


def flops_of(fn) -> int:
    counter = FlopCounterMode(display=False, custom_mapping=UNCOUNTED_KERNELS)
    with counter:
        fn()
    return counter.get_total_flops()


def matmul_peak_gflops(reps: int) -> dict:
    """The best fp32 ``torch.mm`` rate over a few square and model-like shapes, at the current thread count."""
    shapes = [(1024, 1024, 1024), (2048, 2048, 2048), (512, 512, 2048), (512, 2048, 512)]
    best = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        times = []
        for _ in range(max(reps, 3)):
            start = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - start)
        best[f"{m}x{k}x{n}"] = 2 * m * k * n / min(times) / 1e9
    return {"per_shape_gflops": best, "peak_gflops": max(best.values())}


def read_bandwidth_gbs(reps: int, mb: int = 512) -> float:
    """Memory read bandwidth: bytes / time of summing a tensor far larger than any cache (best of ``reps``)."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(max(reps, 3)):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * 4 / min(times) / 1e9


def decode_weight_bytes(model, prompt, n_loops=N_LOOPS) -> tuple[int, int]:
    """Bytes of weights one cached decode step reads: each module's parameters once per call of it (the looped
    layer's every loop), routed experts only for the experts the step chose; and the same counting every weight once
    (the shared block re-read from cache). Their floors bracket a step that streams weights from memory."""
    from openmythos.modeling_mythos import MythosExperts
    state = Runner("ours", model).prefill(prompt, n_loops)
    total = [0]
    distinct = {}  # each weight (or expert) once: the floor if every re-read came from cache
    handles = []

    def leaf_hook(module, args, output):
        for p in module.parameters(recurse=False):
            total[0] += p.numel() * p.element_size()
            distinct[id(p)] = p.numel() * p.element_size()

    def experts_hook(module, args, output):
        chosen = torch.unique(args[1]).tolist()
        per_expert = sum(p[0].numel() * p.element_size() for p in module.parameters(recurse=False))
        total[0] += per_expert * len(chosen)
        distinct.update({(id(module), e): per_expert for e in chosen})

    for module in model.modules():
        if isinstance(module, MythosExperts):
            handles.append(module.register_forward_hook(experts_hook))
        elif any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_hook(leaf_hook))
    try:
        Runner("ours", model).decode_step(state, prompt[:, -1:], n_loops)
    finally:
        for handle in handles:
            handle.remove()
    # a tied LM head is the embedding module, which ran once for one row; the head reads all of it
    embed = model.get_input_embeddings().weight
    head = embed.numel() * embed.element_size() if model.config.tie_word_embeddings else 0
    return total[0] + head, sum(distinct.values()) + head


# -------------------------------------------------------------------------------------------------- sections
def runners_for(size, attn, args, with_compiled=True):
    compile_too = with_compiled and args.compile_backend != "none"
    ours = build_ours(size, attn)
    runners = {"ours": Runner("ours", ours)}
    if compile_too:
        # every model's forward is one code object to dynamo: start each size and attention type with a clean
        # slate, so that earlier models' graphs do not count against the recompile limit of this one
        torch._dynamo.reset()
        compiled = build_ours(size, attn)
        compiled.load_state_dict(ours.state_dict())
        runners["ours+compile"] = Runner("ours+compile", compiled, compile_backend=args.compile_backend)
    ref = build_reference(size, attn)
    if ref is not None:
        runners["ref"] = Runner("ref", ref)
    runners["peer"] = Runner("peer", build_peer(size, attn))
    if compile_too:  # the peer compiled the same way, for a like-for-like ratio
        compiled_peer = build_peer(size, attn)
        compiled_peer.load_state_dict(runners["peer"].model.state_dict())
        runners["peer+compile"] = Runner("peer+compile", compiled_peer, compile_backend=args.compile_backend)
    return runners


def section_models(size, attn, args, inputs):
    runners = runners_for(size, attn, args)
    ids, prompts = inputs["ids"], inputs["prompts"]
    result = {"kernels": {n: kernels(r.model) for n, r in runners.items()},
              "params": {n: refbench.count_params(r.model) for n, r in runners.items()}, "timings": {}, "compile_s": {},
              "peak_memory_mb": {}, "kv_bytes_per_token": {}}
    for kind in ("ours+compile", "peer+compile"):  # first calls compile; timed apart, so the table shows their cost
        if kind not in runners:
            continue
        compiled = runners[kind]
        for name, fn in [("forward", lambda: compiled.forward(ids)),
                         *[(f"generate_p{p.shape[1]}", lambda p=p: compiled.generate(p, args.new_tokens))
                           for p in prompts]]:
            start = time.perf_counter()
            fn()
            result["compile_s"].setdefault(kind, {})[name] = time.perf_counter() - start
    check_generate_matches(runners, prompts, args.new_tokens)

    def timed(label, make):
        fns = {name: make(r) for name, r in runners.items()}
        result["timings"][label] = interleaved(fns, args.reps, args.warmup)
        result["peak_memory_mb"][label] = {name: peak_memory_mb(fn) for name, fn in fns.items()}

    timed("forward", lambda r: (lambda: r.forward(ids)))
    for prompt in prompts:
        timed(f"generate_p{prompt.shape[1]}", lambda r, p=prompt: (lambda: r.generate(p, args.new_tokens)))
    for runner in runners.values():
        runner.model.train()
    for kind in ("ours+compile", "peer+compile"):
        if kind in runners:
            start = time.perf_counter()
            runners[kind].train_step(ids)
            result["compile_s"][kind]["train_step"] = time.perf_counter() - start
    timed("train_step", lambda r: (lambda: r.train_step(ids)))
    for runner in runners.values():
        runner.model.eval()
    for name, runner in runners.items():
        if name.endswith("+compile"):
            continue
        state = runner.prefill(prompts[0])
        result["kv_bytes_per_token"][name] = cache_bytes(state) / prompts[0].numel()
    return result, runners


def check_generate_matches(runners, prompts, new_tokens):
    """Compiled generation must give eager's tokens, and every model exactly ``new_tokens`` new tokens."""
    for prompt in prompts:
        outputs = {name: r.generate(prompt, new_tokens) for name, r in runners.items()}
        for name, out in outputs.items():
            if out.shape != (prompt.shape[0], prompt.shape[1] + new_tokens):
                raise RuntimeError(f"{name}: generate returned {tuple(out.shape)} for a {tuple(prompt.shape)} prompt "
                                   f"and {new_tokens} new tokens")
        for kind in ("ours", "peer"):
            if f"{kind}+compile" in outputs and not torch.equal(outputs[f"{kind}+compile"], outputs[kind]):
                raise RuntimeError(f"{kind}: compiled static-cache generate gave other tokens than eager generate")


def decode_times(runners, prompt, steps, n_loops=N_LOOPS):
    """Median ms per cached single-token decode step after a prompt, round-robin across runners."""
    states = {name: r.prefill(prompt, n_loops) for name, r in runners.items()}
    token = prompt[:, -1:]
    fns = {name: (lambda r=r, s=states[name]: r.decode_step(s, token, n_loops)) for name, r in runners.items()}
    return interleaved(fns, steps, warmup=1)


def section_context(size, attn, args, inputs):
    runners = runners_for(size, attn, args, with_compiled=False)
    gen = torch.Generator().manual_seed(3)
    rows = {}
    for length in args.context_lengths:
        prompt = torch.randint(0, SIZES[size]["common"]["vocab_size"], (inputs["batch"], length), generator=gen)
        rows[length] = decode_times(runners, prompt, args.decode_steps)
    return {"kernels": {n: kernels(r.model) for n, r in runners.items()}, "decode_ms": rows}


def section_loops(size, attn, args, inputs):
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, SIZES[size]["common"]["vocab_size"], (inputs["batch"], args.loops_prompt),
                           generator=gen)
    base = build_ours(size, attn)
    runners = {"ours": Runner("ours", base)}
    for sharing in SHARINGS[1:]:
        model = build_ours(size, attn, loop_kv_sharing=sharing)
        model.load_state_dict(base.state_dict())
        runners[f"ours[{sharing}]"] = Runner("ours", model)
    rows, kv = {}, {}
    for n in args.loop_counts:
        peer = Runner("peer", build_peer(size, attn, n_loops=n))
        per_n = {**runners, "peer": peer}
        # peer with P + n + C layers: the decode step it runs is the unrolled form of ours at n loops
        rows[n] = decode_times(per_n, prompt, args.decode_steps, n_loops=n)
        kv[n] = {name: cache_bytes(r.prefill(prompt, n)) / prompt.numel() for name, r in per_n.items()}
    return {"prompt_len": args.loops_prompt, "decode_ms": rows, "kv_bytes_per_token": kv}


class _Stamp(LogitsProcessor):
    """Takes a timestamp whenever generate has a token's logits."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _decode_step_seconds(runner, prompt, tokens) -> tuple[float, int]:
    """One generate of ``tokens``: seconds per decode step from the first token's logits to the last one's (the first
    token comes from the eager prefill and is not counted), and the number of those steps."""
    stamp = _Stamp()
    runner.generate(prompt, tokens, logits_processor=LogitsProcessorList([stamp]))
    steps = len(stamp.times) - 1
    return (stamp.times[-1] - stamp.times[0]) / steps, steps


def compiled_decode_ms(runner, prompt, new_tokens, reps):
    """ms per decode step of compiled static-cache generate (``_decode_step_seconds``), best of ``reps`` calls. Timed
    inside one call, so it is never negative however noisy the machine."""
    return 1e3 * min(_decode_step_seconds(runner, prompt, max(new_tokens, 4))[0] for _ in range(max(reps, 2)))


def compiled_decode_split(runner, prompt, new_tokens, reps) -> dict:
    """Where a compiled decode step's time goes, in the generate call with the fastest steps of ``reps``: the step
    (as ``compiled_decode_ms`` times it), the compiled call inside it (transformers' ``_compiled_call``, timed around
    each decode step's call), the generation loop outside the call (the difference: ``prepare_inputs_for_generation``,
    the kwargs update, logits processing, stopping) and dynamo's guard check inside the call (the profiler's
    "TorchDynamo Cache Lookup", per call, from one more generate, profiled)."""
    model, tokens = runner.model, max(new_tokens, 4)
    runner.generate(prompt, tokens)  # the compiled call exists (and is warm) from here on
    compiled = model._compiled_call
    calls = []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = compiled(*args, **kwargs)
        calls.append(time.perf_counter() - start)
        return out

    model._compiled_call = timed  # transformers' get_compiled_call returns it while the compile config is the same
    best = None
    try:
        for _ in range(max(reps, 2)):
            calls.clear()
            step, steps = _decode_step_seconds(runner, prompt, tokens)
            call = sum(calls[-steps:]) / steps  # each decode step between the first and the last logits: one call
            if best is None or step < best[0]:
                best = (step, call)
    finally:
        model._compiled_call = compiled
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner.generate(prompt, tokens)
    lookups = [e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup"]
    guard = lookups[0].self_cpu_time_total / lookups[0].count / 1e3 if lookups else None
    return {"step_ms": 1e3 * best[0], "call_ms": 1e3 * best[1], "loop_ms": 1e3 * (best[0] - best[1]),
            "guard_ms": guard}


def section_roofline(size, attn, args, inputs, machine, models=None, compiled=None):
    """Matmul-peak fractions of forward and train step, from the models section's timings when it ran (so that
    nothing compiles twice), else timed here without the compiled column; and the decode bandwidth floor."""
    runners = runners_for(size, attn, args, with_compiled=False)
    ids = inputs["ids"]
    flops = {}
    for name, runner in runners.items():
        flops[name] = {"forward": flops_of(lambda: runner.forward(ids))}
        runner.model.train()
        flops[name]["train_step"] = flops_of(lambda: runner.train_step(ids))
        runner.model.eval()
    if models is not None:
        timings = {"forward": models["timings"]["forward"], "train_step": models["timings"]["train_step"]}
    else:
        timings = {"forward": interleaved({n: (lambda r=r: r.forward(ids)) for n, r in runners.items()},
                                          args.reps, args.warmup)}
        for runner in runners.values():
            runner.model.train()
        timings["train_step"] = interleaved({n: (lambda r=r: r.train_step(ids)) for n, r in runners.items()},
                                            args.reps, args.warmup)
        for runner in runners.values():
            runner.model.eval()
    for kind in ("ours", "peer"):  # the same arithmetic (FlopCounterMode cannot see into compiled code)
        if f"{kind}+compile" in timings["forward"]:
            flops[f"{kind}+compile"] = flops[kind]
    # This machine's speed drifts by up to 40% within an hour: measure the peak again now and use the higher of the
    # two, so that a slow period at the start cannot inflate the shares (the same for the bandwidth below)
    peak = max(machine["matmul_peak_gflops"], matmul_peak_gflops(args.reps)["peak_gflops"])
    fraction = {name: {w: flops[name][w] / (timings[w][name]["median_ms"] / 1e3) / 1e9 / peak
                       for w in ("forward", "train_step")} for name in flops}
    # memory-bandwidth floor of a decode step (batch 2 in the full run)
    prompt = inputs["prompts"][0]
    weight_bytes, distinct_bytes = decode_weight_bytes(runners["ours"].model, prompt)
    bandwidth_gbs = max(machine["read_bandwidth_gbs"], read_bandwidth_gbs(args.reps, mb=64 if args.quick else 512))
    floor_ms, distinct_floor_ms = weight_bytes / bandwidth_gbs / 1e6, distinct_bytes / bandwidth_gbs / 1e6
    step = decode_times({"ours": runners["ours"]}, prompt, args.decode_steps)["ours"]["median_ms"]
    decode = {"batch": prompt.shape[0], "weight_bytes": weight_bytes, "distinct_weight_bytes": distinct_bytes,
              "read_bandwidth_gbs": bandwidth_gbs,
              "floor_ms": floor_ms, "distinct_floor_ms": distinct_floor_ms,
              "step_ms": {"ours": step}, "floor_fraction": {"ours": floor_ms / step},
              "distinct_floor_fraction": {"ours": distinct_floor_ms / step}}
    if compiled is not None and args.new_tokens > 1:
        split = compiled_decode_split(compiled, prompt, args.new_tokens, args.reps)
        step = split["step_ms"]
        decode["step_ms"]["ours+compile"] = step
        decode["floor_fraction"]["ours+compile"] = floor_ms / step
        decode["distinct_floor_fraction"]["ours+compile"] = distinct_floor_ms / step
        decode["compiled_step_split"] = split
    return {"flops": flops, "forward": timings["forward"], "train_step": timings["train_step"],
            "matmul_peak_gflops": peak, "matmul_peak_fraction": fraction, "decode": decode}


# ----------------------------------------------------------------------------------------------------- report
def fmt_ratio(a, b):
    return f"{a / b:.2f}" if a and b else "-"


def print_models(size, attn, res, args):
    names = list(res["kernels"])
    print(f"\n## {size} {attn.upper()}: workloads (median ms; peak MB allocated during the call)")
    for name in names:
        print(f"  {name:<13} {res['params'][name]:>10,} params  [{res['kernels'][name]}]")
    for kind, seconds in res["compile_s"].items():
        print(f"  first compiled calls of {kind} (compile + run): "
              + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
    header = ("  | workload | " + " | ".join(names)
              + " | ref/ours+compile | ref/ours | ours/peer | ours+compile/peer | ours+compile/peer+compile |")
    print(header)
    print("  |" + "---|" * (header.count("|") - 1))
    for label, t in res["timings"].items():
        cells = " | ".join(f"{t[n]['median_ms']:.1f} ({res['peak_memory_mb'][label][n]:.1f} MB)" for n in names)
        med = {n: t[n]["median_ms"] for n in names}
        print(f"  | {label} | {cells} | {fmt_ratio(med.get('ref'), med.get('ours+compile'))} | "
              f"{fmt_ratio(med.get('ref'), med.get('ours'))} | {fmt_ratio(med.get('ours'), med.get('peer'))} | "
              f"{fmt_ratio(med.get('ours+compile'), med.get('peer'))} | "
              f"{fmt_ratio(med.get('ours+compile'), med.get('peer+compile'))} |")
    kv = res["kv_bytes_per_token"]
    print("  KV cache bytes per token: " + ", ".join(f"{n} {v:.0f}" for n, v in kv.items()))


def print_context(size, attn, res):
    names = list(res["kernels"])
    print(f"\n## {size} {attn.upper()}: decode ms per token against prompt length ({N_LOOPS} loops)")
    print("  | prompt | " + " | ".join(names) + " | ours/peer |")
    print("  |" + "---|" * (len(names) + 2))
    for length, t in res["decode_ms"].items():
        print(f"  | {length} | " + " | ".join(f"{t[n]['median_ms']:.2f}" for n in names)
              + f" | {fmt_ratio(t['ours']['median_ms'], t['peer']['median_ms'])} |")


def print_loops(size, attn, res):
    print(f"\n## {size} {attn.upper()}: decode ms per token and KV bytes per token against n_loops "
          f"(prompt {res['prompt_len']}; peer = P + n_loops + C unrolled layers)")
    names = list(next(iter(res["decode_ms"].values())))
    print("  | n_loops | " + " | ".join(f"{n} ms" for n in names) + " | " + " | ".join(f"{n} B/tok" for n in names)
          + " |")
    print("  |" + "---|" * (2 * len(names) + 1))
    for n, t in res["decode_ms"].items():
        kv = res["kv_bytes_per_token"][n]
        print(f"  | {n} | " + " | ".join(f"{t[m]['median_ms']:.2f}" for m in names) + " | "
              + " | ".join(f"{kv[m]:.0f}" for m in names) + " |")


def print_roofline(size, attn, res, machine):
    peak = res["matmul_peak_gflops"]
    print(f"\n## {size} {attn.upper()}: fraction of the fp32 matmul peak ({peak:.1f} GFLOP/s: the higher of the "
          f"run's start, {machine['matmul_peak_gflops']:.1f}, and now)")
    print("  | model | forward GFLOP | forward ms | forward share | train GFLOP | train ms | train share |")
    print("  |---|---|---|---|---|---|---|")
    for name, share in res["matmul_peak_fraction"].items():
        f = res["flops"][name]
        print(f"  | {name} | {f['forward'] / 1e9:.2f} | {res['forward'][name]['median_ms']:.1f} | "
              f"{share['forward']:.0%} | {f['train_step'] / 1e9:.2f} | {res['train_step'][name]['median_ms']:.1f} | "
              f"{share['train_step']:.0%} |")
    d = res["decode"]
    print(f"  batch-{d['batch']} decode step: reads {d['weight_bytes'] / 1e6:.1f} MB of weights "
          f"({d['distinct_weight_bytes'] / 1e6:.1f} MB distinct); at {d['read_bandwidth_gbs']:.1f} GB/s (the higher "
          f"of the run's start and now) the "
          f"floor is {d['floor_ms']:.2f} ms ({d['distinct_floor_ms']:.2f} ms if re-reads hit cache)")
    for name, step in d["step_ms"].items():
        print(f"    {name}: {step:.2f} ms per step = {d['floor_fraction'][name]:.0%} of the floor's speed "
              f"({d['distinct_floor_fraction'][name]:.0%} of the distinct-bytes floor)")
    split = d.get("compiled_step_split")
    if split is not None:
        guard = split["guard_ms"]
        line = (f"    ours+compile's step: the compiled call {split['call_ms']:.2f} ms; transformers' generation loop "
                f"outside the call {split['loop_ms']:.2f} ms")
        if guard is not None:  # the profiler saw dynamo's cache lookup
            graph = split["call_ms"] - guard
            line += (f"; dynamo's guard check {guard:.2f} ms of the call, which without it takes {graph:.2f} ms = "
                     f"{d['floor_ms'] / graph:.0%} of the floor's speed")
        print(line)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: small size, 1 rep, short sweeps, compile with the 'eager' dynamo backend")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=None,
                        help="model sizes (default: small medium; quick: small)")
    parser.add_argument("--attn", nargs="+", choices=["mla", "gqa"], default=["mla", "gqa"])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per workload (default 7; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1; quick 0)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens to generate (default 32; quick 2)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend for ours+compile: inductor (default), aot_eager, eager (quick), "
                             "or none to leave the compiled column out")
    parser.add_argument("--context-lengths", nargs="+", type=int, default=None,
                        help="prompt lengths of the context sweep (default 64 128 256 512 1024 2048; quick 64 128)")
    parser.add_argument("--loop-counts", nargs="+", type=int, default=None,
                        help="n_loops of the loops sweep (default 1 2 4 8 16; quick 1 2)")
    parser.add_argument("--loops-prompt", type=int, default=None, help="prompt length of the loops sweep (default 256)")
    parser.add_argument("--decode-steps", type=int, default=None, help="timed decode steps per point (default 8)")
    parser.add_argument("--json", metavar="PATH", help="write every number and the machine description to PATH")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = dict(sizes=["small"] if quick else ["small", "medium"], reps=1 if quick else 7,
                    warmup=0 if quick else 1, new_tokens=2 if quick else 32,
                    compile_backend="eager" if quick else "inductor",
                    context_lengths=[64, 128] if quick else [64, 128, 256, 512, 1024, 2048],
                    loop_counts=[1, 2] if quick else [1, 2, 4, 8, 16], loops_prompt=32 if quick else 256,
                    decode_steps=2 if quick else 8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    problems = [f"--{name.replace('_', '-')} must be >= {low} (got {getattr(args, name)})"
                for name, low in [("reps", 1), ("warmup", 0), ("threads", 1), ("new_tokens", 1),
                                  ("loops_prompt", 1), ("decode_steps", 1)] if getattr(args, name) < low]
    if any(n < 1 for n in args.loop_counts):
        problems.append(f"--loop-counts must all be >= 1 (got {args.loop_counts})")
    if any(not 1 <= n <= MAX_SEQ_LEN - 64 for n in args.context_lengths):
        problems.append(f"--context-lengths must lie in 1..{MAX_SEQ_LEN - 64} (got {args.context_lengths})")
    if args.loops_prompt > MAX_SEQ_LEN - 64:
        problems.append(f"--loops-prompt must be at most {MAX_SEQ_LEN - 64} (got {args.loops_prompt})")
    if args.compile_backend not in ("inductor", "aot_eager", "eager", "none"):
        problems.append(f"--compile-backend must be one of inductor, aot_eager, eager, none "
                        f"(got {args.compile_backend!r})")
    if problems:
        parser.error("; ".join(problems))
    return args


def describe_machine(threads: int, **extra) -> dict:
    """When and where a run happened: date, CPU, load, versions and torch threads (plus ``extra`` settings)."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {refbench.cpu_model()}".strip(), "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0], "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "openmythos": openmythos.__version__,
        "threads": threads, **extra,
    }


def machine_line(machine: dict) -> str:
    return (f"{machine['date']} | {machine['machine']} | {machine['cpu_count']} CPUs | {machine['threads']} torch "
            f"threads | {machine.get('dtype', 'float32').replace('float', 'fp')} | 1-min load average "
            f"{machine['load_average_at_start']:.1f} at start")


def finish_run(machine: dict, results: dict, json_path: str | None) -> None:
    """Print the load average at the end, and write ``results`` to ``json_path`` (if given) atomically."""
    machine["load_average_at_end"] = os.getloadavg()[0]
    print(f"\n1-min load average {machine['load_average_at_end']:.1f} at end (this run counts too)")
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        os.replace(tmp, path)
        print(f"wrote {json_path}")


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from importlib.metadata import PackageNotFoundError, version
    try:
        ref_version = version("open-mythos") if refbench.open_mythos is not None else None
    except PackageNotFoundError:
        ref_version = None
    machine = describe_machine(args.threads, reference=ref_version, dtype="float32", n_loops=N_LOOPS)
    print(f"openmythos {openmythos.__version__} | torch {torch.__version__} | transformers {transformers.__version__} |"
          f" reference {ref_version or 'not installed (pip install --no-deps open-mythos==0.5.0): column left out'}")
    print(machine_line(machine))
    if "roofline" in args.sections:
        machine.update(matmul=matmul_peak_gflops(args.reps))
        machine["matmul_peak_gflops"] = machine["matmul"]["peak_gflops"]
        machine["read_bandwidth_gbs"] = read_bandwidth_gbs(args.reps, mb=64 if args.quick else 512)
        print(f"fp32 matmul peak {machine['matmul_peak_gflops']:.1f} GFLOP/s (best of "
              f"{', '.join(machine['matmul']['per_shape_gflops'])}); read bandwidth "
              f"{machine['read_bandwidth_gbs']:.1f} GB/s")
    results = {"machine": machine, "settings": {k: v for k, v in vars(args).items() if k != "json"}, "runs": {}}
    for size in args.sizes:
        spec = SIZES[size]
        gen = torch.Generator().manual_seed(1)
        vocab = spec["common"]["vocab_size"]
        batch = 1 if args.quick else spec["batch"]
        seq = 32 if args.quick else spec["seq_len"]
        inputs = {"batch": batch, "ids": torch.randint(0, vocab, (batch, seq), generator=gen),
                  "prompts": [torch.randint(0, vocab, (batch, p), generator=gen)
                              for p in ((16,) if args.quick else (16, 128))]}
        print(f"\n# size {size}: forward and train step {batch}x{seq}; generate prompts "
              f"{[p.shape[1] for p in inputs['prompts']]} x{batch} rows +{args.new_tokens} tokens; {N_LOOPS} loops")
        for attn in args.attn:
            run = results["runs"].setdefault(f"{size}/{attn}", {})
            models_runners = {}
            if "models" in args.sections:
                run["models"], models_runners = section_models(size, attn, args, inputs)
                print_models(size, attn, run["models"], args)
            if "context" in args.sections:
                run["context"] = section_context(size, attn, args, inputs)
                print_context(size, attn, run["context"])
            if "loops" in args.sections:
                run["loops"] = section_loops(size, attn, args, inputs)
                print_loops(size, attn, run["loops"])
            if "roofline" in args.sections:
                run["roofline"] = section_roofline(size, attn, args, inputs, machine, run.get("models"),
                                                   models_runners.get("ours+compile"))
                print_roofline(size, attn, run["roofline"], machine)
            sys.stdout.flush()
    finish_run(machine, results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
