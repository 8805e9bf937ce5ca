"""Per-GPU memory and per-step traffic of a training layout (FSDP, FSDP+EP, FSDP+EP+TP), for any config or preset.

``mythos plan --preset mythos_100b --gpus 64 --gpu-memory 80GB`` prints it; :func:`plan` is the function behind the
command, and :func:`preset_layout_table` the README's table. Parameter counts come from the model itself, built on
the meta device (``openmythos.parameters.meta_model``), so they cannot drift from the code; activations, the KV cache
and the traffic are formulas over the config, written out in ``docs/plan.md`` and checked against measured peak
memory of a single-process training step (``tests/test_plan.py``).

This module imports only the standard library at the top (the ``mythos`` command stays fast); torch is imported when
parameters are counted.
"""

import math
import re
from dataclasses import dataclass, field

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
LAYOUTS = ("fsdp", "fsdp+ep", "fsdp+ep+tp")
LOOP_GATHERS = ("once", "per-iteration")
OPTIMIZERS = ("adamw", "muon")
# torch's AdamW implementations and the temporaries their step allocates: foreach (the default on GPUs) computes
# sqrt(v) for every tensor at once, per-tensor (the default on CPUs) sqrt(v) and its quotient for one tensor at a time,
# fused none
ADAMW_IMPLS = ("foreach", "per-tensor", "fused")
GPUS_PER_NODE = 8  # the TP degree of the TP layout: tensor parallelism stays inside one NVLink node


@dataclass(frozen=True)
class Precision:
    """Bytes per number of each kind of training state.

    The default is the usual mixed-precision recipe: bf16 parameters (what the forward reads), bf16 gradients, an fp32
    master copy of the parameters and fp32 optimizer state, 16 bytes per parameter in all. FSDP2 with a bf16
    ``MixedPrecisionPolicy`` stores the same 16 bytes differently (fp32 sharded parameters, fp32 sharded gradients,
    fp32 state; bf16 only while gathered). ``master="none"`` means the parameters are the master copy (plain fp32
    training: ``Precision("fp32", "fp32", "none")``). Activations and the KV cache use ``param``'s dtype.
    """

    param: str = "bf16"
    grad: str = "bf16"
    master: str = "fp32"
    optimizer_state: str = "fp32"

    def __post_init__(self):
        for name, choices in (("param", DTYPE_BYTES), ("grad", DTYPE_BYTES), ("optimizer_state", DTYPE_BYTES),
                              ("master", (*DTYPE_BYTES, "none"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"`{name}` must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    @property
    def param_bytes(self) -> int:
        return DTYPE_BYTES[self.param]

    @property
    def grad_bytes(self) -> int:
        return DTYPE_BYTES[self.grad]

    @property
    def master_bytes(self) -> int:
        return 0 if self.master == "none" else DTYPE_BYTES[self.master]

    @property
    def state_bytes(self) -> int:
        return DTYPE_BYTES[self.optimizer_state]


@dataclass(frozen=True)
class ParameterGroups:
    """Parameter counts by where they live and how they shard (from the meta-device model).

    ``*_tp`` counts the 2-D projection weights that tensor parallelism splits (attention and FFN projections, the
    embedding by vocabulary); the rest of a group (norms, router, injection, depth-wise LoRA, halting) is replicated
    across a TP group. ``muon`` counts what ``MuonAdamW`` gives to Muon (hidden 2-D ``nn.Linear`` weights).
    """

    root: int  # embedding (tied head), final norm; an untied head too
    root_tp: int
    dense_layers: tuple[int, ...]  # each prelude and coda layer, in order
    dense_layers_tp: tuple[int, ...]
    loop_dense: int  # the looped block without its routed experts: attention, shared experts, router, injection...
    loop_dense_tp: int
    experts: int  # the routed experts (3-D tensors): what expert parallelism splits
    muon: int
    largest: int  # the largest single tensor (the optimizer's per-tensor temporaries are its size)

    @property
    def total(self) -> int:
        return self.root + sum(self.dense_layers) + self.loop_dense + self.experts


def parameter_groups(config) -> ParameterGroups:
    """Count ``config``'s parameters by group on the meta device (no weights are allocated)."""
    from .parameters import meta_model
    from .training.optim import split_parameters

    model = meta_model(config)
    n_layers = config.prelude_layers + config.coda_layers
    root = root_tp = loop_dense = loop_dense_tp = experts = 0
    layers, layers_tp = [0] * n_layers, [0] * n_layers
    for name, param in model.named_parameters():  # a tied head is yielded once
        n = param.numel()
        splits = param.ndim == 2 and (name.endswith("_proj.weight") or "embed_tokens" in name or "lm_head" in name)
        layer = re.match(r"model\.(prelude|coda)\.(\d+)\.", name)
        if layer:
            index = int(layer[2]) + (config.prelude_layers if layer[1] == "coda" else 0)
            layers[index] += n
            layers_tp[index] += n if splits else 0
        elif name.startswith("model.recurrent.layer.mlp.experts."):
            experts += n
        elif name.startswith("model.recurrent."):
            loop_dense += n
            loop_dense_tp += n if splits else 0
        else:
            root += n
            root_tp += n if splits else 0
    muon = sum(p.numel() for p in split_parameters(model)[0])
    largest = max(p.numel() for p in model.parameters())
    return ParameterGroups(root, root_tp, tuple(layers), tuple(layers_tp), loop_dense, loop_dense_tp, experts, muon,
                           largest)


# ---------------------------------------------------------------------------------------------------- activations
def _norm(n: int, a: int) -> int:
    """Bytes per token an RMSNorm of width ``n`` keeps for backward: its fp32 input (the input itself in fp32, an fp32
    copy otherwise), the fp32 reciprocal RMS, the normalised value (for the weight's gradient) and the output (which
    the next projection keeps)."""
    return 4 * n + 4 + 2 * a * n


def _attention(config, a: int, tp: int) -> int:
    """Bytes per token one attention call keeps (after its input norm), with a fused kernel (sdpa / flash): no
    [seq x seq] matrix, only q, k, v, the output and the fp32 log-sum-exp per head. Heads split ``tp`` ways."""
    heads = config.n_heads / tp
    if config.attn_type == "gqa":
        head_dim = config.dim // config.n_heads
        kv_heads = max(config.n_kv_heads / tp, 1)
        # q, k, v (unrepeated) and the output, which o_proj reads in place
        return int(a * (2 * heads * head_dim + 2 * kv_heads * head_dim) + 4 * heads)
    qk = config.qk_nope_head_dim + config.qk_rope_head_dim
    v_kept = qk if qk > config.v_head_dim else config.qk_nope_head_dim + config.v_head_dim  # padded v, or kv_b's out
    query = _norm(config.q_lora_rank, a) if config.q_lora_rank > 0 else 0  # q_a_layernorm and q_b_proj's input
    latent = _norm(config.kv_lora_rank, a) + a * config.qk_rope_head_dim  # kv_a_layernorm (+ the rope key columns)
    # q, k, v (expanded per head), the kernel's output, o_proj's input
    return int(query + latent + a * heads * (3 * qk + v_kept + config.v_head_dim) + 4 * heads)


def _mlp(width: float, a: int) -> int:
    """SwiGLU: gate and up outputs, silu(gate), and the product that down_proj keeps (its input is the norm's)."""
    return int(4 * a * width)


def _dense_layer(config, a: int, tp: int) -> int:
    return 2 * _norm(config.dim, a) + _attention(config, a, tp) + _mlp(config.dense_ffn_dim / tp, a)


def _loop_iteration(config, a: int, tp: int) -> int:
    """Bytes per token one loop iteration keeps: the loop signal, the block (attention + MoE), depth-wise LoRA and the
    injection. The routed experts' share is per token of this GPU: under TP the group's tokens are split across its
    ranks for dispatch."""
    d, k, e = config.dim, config.n_experts_per_tok, config.n_experts
    signal = 4 * d + 4  # the fp32 state whose RMS scales the loop signal
    router = 4 * e + 12 * k + 4 + (4 * d if a != 4 else 0)  # sigmoid scores, top-k index (int64), weights
    # grouped_mm experts per routed row: the sorted input, gate_up output, silu, product, down output, routing weight,
    # and three int64 permutation indices
    routed = (a * (2 * d + 4 * config.expert_dim + 1) + 24) * k / tp
    shared = _mlp(config.n_shared_experts * config.expert_dim * k / tp, a)
    lora = a * (d + 2 * config.lora_rank) if config.lora_rank > 0 else 0
    injection = a * d  # A * h keeps h
    return int(signal + 2 * _norm(d, a) + _attention(config, a, tp) + router + routed + shared + lora + injection)


def _head(config, a: int) -> int:
    """Bytes per token of the final norm, the logits (the output keeps them) and the loss's fp32 log-softmax."""
    return 8 + _norm(config.dim, a) + a * config.vocab_size + 4 * config.vocab_size + 8  # ids, ..., labels


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one training micro-batch on one GPU.

    Two moments bound the peak of a step: the end of the forward (every kept activation, the logits and the loss's
    log-softmax, plus the loss gradient being formed) and the start of the looped block's backward (its gradients now
    exist; the head's and the coda's activations are gone). ``full`` / ``checkpointed`` are what is kept at the end of
    the forward; under checkpointing one layer's activations come back at a time in backward (``recompute``).
    """

    full: int  # everything kept for backward, no checkpointing (head included)
    checkpointed: int  # with every decoder layer checkpointed (the looped one per iteration): layer inputs, head
    recompute: int  # the largest checkpointed layer's activations, recomputed during its backward
    head: int  # final norm, logits, log-softmax: freed first in backward
    coda: int  # the coda layers' share of ``full``, also freed before the looped block's backward
    coda_checkpointed: int  # their share of ``checkpointed``
    workspace: int  # the loss gradient: one fp32 [tokens, vocab] tensor

    def end_of_forward(self, checkpointing: bool) -> int:
        return (self.checkpointed if checkpointing else self.full) + self.workspace

    def loop_backward(self, checkpointing: bool) -> int:
        """Activations alive when the looped block's gradients are first written (they are added to these)."""
        if checkpointing:
            return self.checkpointed - self.head - self.coda_checkpointed + self.recompute
        return self.full - self.head - self.coda

    def peak(self, checkpointing: bool) -> int:
        """The most activation memory alive at once (the ``activations`` columns of ``mythos plan``)."""
        return max(self.checkpointed if checkpointing else self.full, self.loop_backward(checkpointing))


def activations(config, batch: int, seq_len: int, n_loops: int, act_bytes: int, tp: int = 1) -> Activations:
    """Activation memory of a training step of ``batch`` sequences of ``seq_len`` tokens on one GPU (see
    docs/plan.md for the formulas; layers with ``tp`` > 1 keep 1/tp of their head and FFN-width tensors)."""
    a, tokens, d = act_bytes, batch * seq_len, config.dim
    n_dense = config.prelude_layers + config.coda_layers
    dense, loop, head = _dense_layer(config, a, tp), _loop_iteration(config, a, tp), _head(config, a)
    full = tokens * (n_dense * dense + n_loops * loop + head)
    # checkpointing keeps each layer's input; the loop's signal, LoRA and injection sit outside the checkpointed layer
    # (they are kept, not recomputed)
    outside = (4 * d + 4) + (a * (d + 2 * config.lora_rank) if config.lora_rank > 0 else 0) + a * d
    checkpointed = tokens * (n_dense * a * d + n_loops * (a * d + outside) + head)
    recompute = tokens * max(loop - outside, dense if n_dense else 0)
    return Activations(full=full, checkpointed=checkpointed, recompute=recompute, head=tokens * head,
                       coda=tokens * config.coda_layers * dense, coda_checkpointed=tokens * config.coda_layers * a * d,
                       workspace=tokens * config.vocab_size * 4)


def kv_cache_bytes(config, context: int, batch: int = 1, n_loops: int | None = None, cache_bytes: int = 2,
                   tp: int = 1) -> int:
    """KV-cache bytes on one GPU for ``batch`` sequences of ``context`` tokens. Slots: every prelude and coda layer
    plus one per loop iteration (``n_loops``), or one loop slot with ``loop_kv_sharing``. MLA keeps the latent and
    one rope key per token and slot (replicated across a TP group); GQA keeps keys and values of its KV heads (split
    across a TP group as far as there are heads)."""
    n_loops = config.default_n_loops if n_loops is None else n_loops
    slots = config.prelude_layers + config.coda_layers + (1 if config.loop_kv_sharing != "none" else n_loops)
    if config.attn_type == "mla":
        per_slot = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        per_slot = 2 * math.ceil(config.n_kv_heads / tp) * (config.dim // config.n_heads)
    return slots * per_slot * cache_bytes * context * batch


# ---------------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class Layout:
    """``gpus`` ranks: non-expert weights split ``tp`` ways and sharded (FSDP) over the other ``gpus / tp``; routed
    experts split ``ep`` ways (whole experts per rank) and sharded over the other ``gpus / ep``."""

    name: str
    gpus: int
    tp: int = 1
    ep: int = 1

    @property
    def dense_shards(self) -> int:
        return self.gpus // self.tp

    @property
    def expert_shards(self) -> int:
        return self.gpus // self.ep


def _largest_power_of_two_dividing(*values: int) -> int:
    n = min(values)
    p = 1
    while p * 2 <= n and all(v % (p * 2) == 0 for v in values):
        p *= 2
    return p


def default_layout(name: str, config, gpus: int, tp: int | None = None, ep: int | None = None) -> Layout:
    """The degrees a layout uses on ``gpus`` GPUs: EP as wide as the experts and GPUs allow (experts spread over all
    ranks, so no expert is gathered), TP inside one 8-GPU node."""
    if name not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {', '.join(LAYOUTS)}, got {name!r}")
    if name == "fsdp":
        return Layout(name, gpus)
    ep = _largest_power_of_two_dividing(gpus, config.n_experts) if ep is None else ep
    if name == "fsdp+ep":
        return Layout(name, gpus, ep=ep)
    tp = _largest_power_of_two_dividing(gpus, GPUS_PER_NODE, config.n_heads) if tp is None else tp
    return Layout(name, gpus, tp=tp, ep=ep)


@dataclass(frozen=True)
class LayoutPlan:
    """One layout's per-GPU memory (bytes) and per-step traffic (bytes each GPU sends, ring algorithms)."""

    layout: Layout
    params: int
    grads: int
    grads_at_loop_backward: int  # every gradient but the prelude's, which backward has not reached yet
    optimizer: dict  # "adamw" / "muon" -> master copy + optimizer state
    activations: Activations
    gathered: int  # transient: the two largest FSDP units gathered (one prefetched) and one unit's unsharded grads
    step_temporary: int  # transient in the optimizer step (``adamw_impl``)
    kv_cache: int
    traffic: dict  # loop gather mode -> {"all_gather", "reduce_scatter", "all_to_all", "all_reduce"}
    checkpointing: bool
    optimizer_name: str
    gpu_memory: int | None
    tokens: int  # tokens per data-parallel rank (per TP group) in one micro-batch

    def peak(self, optimizer: str | None = None, checkpointing: bool | None = None) -> int:
        """Peak training memory on one GPU: parameters and optimizer state, plus the largest of three moments:
        (a) the end of the forward (activations and the loss gradient), (b) the start of the looped block's backward
        (every gradient but the prelude's, and the activations still alive, see :class:`Activations`), both with the
        gathered FSDP units; (c) the optimizer step (every gradient and the step's temporaries, see ``ADAMW_IMPLS``)."""
        optimizer = self.optimizer_name if optimizer is None else optimizer
        checkpointing = self.checkpointing if checkpointing is None else checkpointing
        acts = self.activations
        return self.params + self.optimizer[optimizer] + max(
            self.gathered + acts.end_of_forward(checkpointing),
            self.gathered + acts.loop_backward(checkpointing) + self.grads_at_loop_backward,
            self.grads + self.step_temporary)

    def fits(self, optimizer: str | None = None, checkpointing: bool | None = None) -> bool | None:
        return None if self.gpu_memory is None else self.peak(optimizer, checkpointing) <= self.gpu_memory


@dataclass(frozen=True)
class Plan:
    config_name: str
    n_loops: int
    batch: int
    seq_len: int
    context: int
    precision: Precision
    groups: ParameterGroups
    layouts: list = field(default_factory=list)


def _unit_sizes(groups: ParameterGroups, layout: Layout) -> tuple[float, list[float], float, float]:
    """Per-GPU gathered parameter counts: the root unit, each dense layer, the looped block's non-expert part and its
    local experts (after TP / EP splits, before FSDP sharding)."""

    def split(total, tp_part):
        return tp_part / layout.tp + (total - tp_part)

    dense = [split(n, t) for n, t in zip(groups.dense_layers, groups.dense_layers_tp)]
    return (split(groups.root, groups.root_tp), dense,
            split(groups.loop_dense, groups.loop_dense_tp), groups.experts / layout.ep)


def _traffic(config, groups, layout, precision, n_loops, batch, seq_len, checkpointing) -> dict:
    """Bytes one GPU sends per step, by collective, for each loop gather mode (see docs/plan.md)."""
    pb, gb, a = precision.param_bytes, precision.grad_bytes, precision.param_bytes
    root, dense, loop_dense, loop_experts = _unit_sizes(groups, layout)

    def ring(count, group):  # all-gather / reduce-scatter of ``count`` numbers per rank after gathering
        return count * (group - 1) / group

    dense_gathers = sum(ring(n, layout.dense_shards) for n in dense)
    loop_unit = ring(loop_dense, layout.dense_shards) + ring(loop_experts, layout.expert_shards)
    tokens = batch * seq_len
    passes = 3 if checkpointing else 2  # forward, backward, and the recomputed forward
    # EP: dispatch and combine of each routed row, forward and backward (and again when recomputed); under TP each
    # rank dispatches 1/tp of its group's tokens
    a2a = n_loops * 2 * passes * tokens / layout.tp * config.n_experts_per_tok * config.dim * a * (
        (layout.ep - 1) / layout.ep)
    # TP: two all-reduces of the [tokens, dim] output per block and pass (attention, FFN), ring = 2 (tp-1)/tp
    blocks = config.prelude_layers + config.coda_layers + n_loops
    all_reduce = blocks * 2 * passes * 2 * tokens * config.dim * a * (layout.tp - 1) / layout.tp
    result = {}
    for mode in LOOP_GATHERS:
        loop_times = 1 if mode == "once" else n_loops
        # forward gathers every unit; backward re-gathers every unit but the root (FSDP2 keeps the root gathered)
        all_gather = ring(root, layout.dense_shards) + 2 * dense_gathers + 2 * loop_times * loop_unit
        reduce_scatter = ring(root, layout.dense_shards) + dense_gathers + loop_times * loop_unit
        result[mode] = {"all_gather": int(all_gather * pb), "reduce_scatter": int(reduce_scatter * gb),
                        "all_to_all": int(a2a), "all_reduce": int(all_reduce)}
    return result


def plan(config, gpus: int, gpu_memory: int | None = None, *, batch: int = 1, seq_len: int | None = None,
         n_loops: int | None = None, context: int | None = None, precision: Precision | None = None,
         checkpointing: bool = True, optimizer: str = "adamw", layouts=LAYOUTS, tp: int | None = None,
         ep: int | None = None, config_name: str = "config", groups: ParameterGroups | None = None,
         adamw_impl: str = "foreach") -> Plan:
    """Per-GPU memory and per-step traffic of ``config`` on ``gpus`` GPUs, for each of ``layouts``.

    ``batch`` sequences of ``seq_len`` tokens (default: the config's ``max_seq_len``, capped at 4096) per data-parallel
    rank (per TP group), ``n_loops`` loop iterations (default: ``config.default_n_loops``); the KV cache is for one
    sequence of ``context`` tokens (default: ``max_seq_len``). ``gpu_memory`` in bytes decides ``fits``; the fit uses
    ``optimizer`` and ``checkpointing``; ``adamw_impl`` says which temporaries the optimizer step allocates (see
    ``ADAMW_IMPLS``). Every refused value raises a ValueError naming it.
    """
    precision = Precision() if precision is None else precision
    for name, value in (("gpus", gpus), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    seq_len = min(config.max_seq_len, 4096) if seq_len is None else seq_len
    n_loops = config.default_n_loops if n_loops is None else n_loops
    context = config.max_seq_len if context is None else context
    for name, value in (("seq_len", seq_len), ("n_loops", n_loops), ("context", context)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if adamw_impl not in ADAMW_IMPLS:
        raise ValueError(f"`adamw_impl` must be one of {', '.join(ADAMW_IMPLS)}, got {adamw_impl!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if gpu_memory is not None and gpu_memory <= 0:
        raise ValueError(f"`gpu_memory` must be a positive number of bytes, got {gpu_memory!r}")
    chosen = [default_layout(name, config, gpus, tp, ep) for name in layouts]
    for layout in chosen:  # every refusal before the (slow, for a large preset) parameter count
        _check_layout(layout, config)
    groups = parameter_groups(config) if groups is None else groups
    result = Plan(config_name, n_loops, batch, seq_len, context, precision, groups)
    for layout in chosen:
        result.layouts.append(_layout_plan(config, groups, layout, precision, n_loops, batch, seq_len, context,
                                           checkpointing, optimizer, gpu_memory, adamw_impl))
    return result


def _check_layout(layout: Layout, config) -> None:
    if layout.gpus % layout.tp or layout.tp > config.n_heads:
        raise ValueError(f"`tp` must divide the GPU count ({layout.gpus}) and be at most n_heads ({config.n_heads}), "
                         f"got {layout.tp}")
    if layout.gpus % layout.ep or config.n_experts % layout.ep:
        raise ValueError(f"`ep` must divide both the GPU count ({layout.gpus}) and n_experts ({config.n_experts}), "
                         f"got {layout.ep}")


def _step_temporary(adamw_impl: str, local: float, largest: float, state_bytes: int) -> int:
    if adamw_impl == "foreach":
        return int(local * state_bytes)
    return int(2 * largest * state_bytes) if adamw_impl == "per-tensor" else 0


def _layout_plan(config, groups, layout, precision, n_loops, batch, seq_len, context, checkpointing, optimizer,
                 gpu_memory, adamw_impl) -> LayoutPlan:
    root, dense, loop_dense, loop_experts = _unit_sizes(groups, layout)
    # every parameter is stored once across the GPUs: non-expert ones split by TP then FSDP, experts by EP then FSDP
    prelude = sum(dense[:config.prelude_layers])
    local = (root + sum(dense) + loop_dense) / layout.dense_shards + loop_experts / layout.expert_shards
    muon_local = groups.muon / layout.gpus  # Muon's matrices are attention / dense / shared-expert projections
    master = local * precision.master_bytes
    optimizer_bytes = {"adamw": int(master + 2 * local * precision.state_bytes),
                       "muon": int(master + (2 * local - muon_local) * precision.state_bytes)}
    # what FSDP gathers: a part sharded over a single rank (one GPU; experts with ep = GPUs) is already whole
    dense_part = 1 if layout.dense_shards > 1 else 0
    units = sorted([dense_part * root, *(dense_part * n for n in dense),
                    dense_part * loop_dense + (loop_experts if layout.expert_shards > 1 else 0)], reverse=True)
    gathered = int(sum(units[:2]) * precision.param_bytes + units[0] * precision.grad_bytes)
    acts = activations(config, batch, seq_len, n_loops, precision.param_bytes, layout.tp)
    return LayoutPlan(
        layout=layout, params=int(local * precision.param_bytes), grads=int(local * precision.grad_bytes),
        grads_at_loop_backward=int((local - prelude / layout.dense_shards) * precision.grad_bytes),
        optimizer=optimizer_bytes, activations=acts, gathered=gathered,
        step_temporary=_step_temporary(adamw_impl, local, groups.largest / layout.gpus, precision.state_bytes),
        kv_cache=kv_cache_bytes(config, context, 1, n_loops, precision.param_bytes, layout.tp),
        traffic=_traffic(config, groups, layout, precision, n_loops, batch, seq_len, checkpointing),
        checkpointing=checkpointing, optimizer_name=optimizer, gpu_memory=gpu_memory, tokens=batch * seq_len)


# ---------------------------------------------------------------------------------------------------- text
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(GB|GIB|MB|MIB|TB|TIB)?\s*$", re.I)
_UNITS = {"MB": 10**6, "GB": 10**9, "TB": 10**12, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory(text: str) -> int:
    """``"80GB"`` -> bytes. GB/MB/TB are decimal, GiB/MiB/TiB binary; a bare number is GB."""
    match = _SIZE.match(str(text))
    if not match or float(match[1]) <= 0:
        raise ValueError(f"`gpu_memory` must be a positive size such as 80GB, 141GB or 96GiB, got {text!r}")
    return int(float(match[1]) * _UNITS[(match[2] or "GB").upper()])


def gb(n: float) -> str:
    return f"{n / 1e9:.1f}"


def format_plan(result: Plan) -> str:
    """The tables ``mythos plan`` prints: memory per GPU, traffic per step, and whether each layout fits."""
    p = result.precision
    lines = [
        f"{result.config_name}: {result.groups.total / 1e9:.2f}B parameters ({result.groups.experts / 1e9:.2f}B in "
        f"routed experts), n_loops={result.n_loops}, batch {result.batch} x {result.seq_len} tokens per data-parallel "
        f"rank, params {p.param}, grads {p.grad}, master {p.master}, optimizer state {p.optimizer_state}",
        "",
        "Memory per GPU (GB)",
        "| layout | GPUs (tp x ep) | params | grads | AdamW | Muon | gathered | activations | activations "
        "(ckpt) | peak AdamW | peak AdamW (ckpt) | peak Muon (ckpt) | KV cache (1 seq x "
        f"{_tokens(result.context)}) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lp in result.layouts:
        lo = lp.layout
        lines.append(
            f"| {lo.name} | {lo.gpus} ({lo.tp} x {lo.ep}) | {gb(lp.params)} | {gb(lp.grads)} | "
            f"{gb(lp.optimizer['adamw'])} | {gb(lp.optimizer['muon'])} | {gb(lp.gathered)} | "
            f"{gb(lp.activations.peak(False))} | {gb(lp.activations.peak(True))} | {gb(lp.peak('adamw', False))} | "
            f"{gb(lp.peak('adamw', True))} | {gb(lp.peak('muon', True))} | {gb(lp.kv_cache)} |")
    lines += ["", "Traffic per GPU per step (GB sent; loop gathered once / per iteration)",
              "| layout | all-gather | reduce-scatter | all-to-all (EP) | all-reduce (TP) |", "|---|---|---|---|---|"]
    for lp in result.layouts:
        once, each = lp.traffic["once"], lp.traffic["per-iteration"]
        lines.append(f"| {lp.layout.name} | {gb(once['all_gather'])} / {gb(each['all_gather'])} | "
                     f"{gb(once['reduce_scatter'])} / {gb(each['reduce_scatter'])} | {gb(once['all_to_all'])} | "
                     f"{gb(once['all_reduce'])} |")
    first = result.layouts[0]
    if first.gpu_memory is not None:
        setting = f"{first.optimizer_name}, {'with' if first.checkpointing else 'without'} activation checkpointing"
        lines += ["", f"Fits in {gb(first.gpu_memory)} GB ({setting}):"]
        for lp in result.layouts:
            verdict = "yes" if lp.fits() else "no"
            lines.append(f"  {lp.layout.name}: {verdict} (peak {gb(lp.peak())} GB)")
    return "\n".join(lines)


def _tokens(n: int) -> str:
    return f"{n // 2**20}M" if n >= 2**20 and n % 2**20 == 0 else f"{n // 1024}k" if n % 1024 == 0 else str(n)


# ---------------------------------------------------------------------------------------------------- presets
README_PRESETS = ("mythos_1b", "mythos_3b", "mythos_10b", "mythos_50b", "mythos_100b", "mythos_500b", "mythos_1t")
README_GPU_MEMORY = 80 * 10**9


def smallest_fit(config, gpu_memory: int = README_GPU_MEMORY, max_gpus: int = 4096, seq_len: int | None = None,
                 **kwargs) -> LayoutPlan | None:
    """The first layout that fits, over GPU counts 1, 2, 4, ... and, at each count, the layouts in the order FSDP,
    FSDP+EP, FSDP+EP+TP (simplest first). If none fits up to ``max_gpus``, the micro-batch's sequence length is halved
    and the search runs again (gradient accumulation keeps the global batch). None if nothing fits at all."""
    groups = parameter_groups(config)
    seq_len = min(config.max_seq_len, 4096) if seq_len is None else seq_len
    while seq_len >= 1:
        gpus = 1
        while gpus <= max_gpus:
            result = plan(config, gpus, gpu_memory, groups=groups, seq_len=seq_len, **kwargs)
            for lp in result.layouts:
                if lp.fits():
                    return lp
            gpus *= 2
        seq_len //= 2
    return None


def preset_layout_table(gpu_memory: int = README_GPU_MEMORY) -> str:
    """README table: for each preset, the smallest power-of-two GPU count (and simplest layout there) whose training
    step fits in ``gpu_memory``, at the defaults of ``mythos plan`` (1 sequence of 4096 tokens per data-parallel
    rank, halved while nothing fits; the preset's loop count; bf16 + fp32 AdamW; activation checkpointing)."""
    from .configuration_mythos import PRESETS

    rows = ["| preset | GPUs | layout (tp x ep) | tokens per rank | params + grads | AdamW state | activations | "
            "gathered | peak | all-gather: loop once / per iteration | all-to-all | all-reduce |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in README_PRESETS:
        config = PRESETS[name]()
        lp = smallest_fit(config, gpu_memory)
        lo, traffic = lp.layout, lp.traffic
        rows.append(f"| {name} | {lo.gpus} | {lo.name} ({lo.tp} x {lo.ep}) | {lp.tokens} | "
                    f"{gb(lp.params + lp.grads)} GB | {gb(lp.optimizer['adamw'])} GB | "
                    f"{gb(lp.activations.peak(True))} GB | "
                    f"{gb(lp.gathered)} GB | {gb(lp.peak())} GB | {gb(traffic['once']['all_gather'])} / "
                    f"{gb(traffic['per-iteration']['all_gather'])} GB | {gb(traffic['once']['all_to_all'])} GB | "
                    f"{gb(traffic['once']['all_reduce'])} GB |")
    return "\n".join(rows)
