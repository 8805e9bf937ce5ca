"""OpenMythos model configuration.

Field names follow the OpenMythos reference (``open_mythos.MythosConfig``) so that a reference user's config dict
loads unchanged; the usual Hugging Face names (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
``max_position_embeddings``) are accepted as aliases.

This module imports only ``transformers``, so it can be copied next to a checkpoint and loaded with
``trust_remote_code=True``.
"""

import functools
import math
import numbers
from dataclasses import field, fields

from transformers import PreTrainedConfig

# `strict` is huggingface_hub's, the decorator of transformers' own configs; taken from transformers (both 5.23 and
# 5.24 import it there) so that this file, which ships with checkpoints, imports only transformers.
from transformers.configuration_utils import strict
from transformers.utils import auto_docstring

# Bumped whenever a checkpoint written by this code can no longer be read by older code.
MYTHOS_FORMAT_VERSION = 1

ATTN_TYPES = ("mla", "gqa")
LOOP_SAMPLINGS = ("fixed", "poisson_lognormal")
LOOP_KV_SHARINGS = ("none", "first", "last")
EXIT_SCOPES = ("position", "prefix", "row")


# --------------------------------------------------------------------------------------------------------------------
# Field checks. Each returns a validator for one field (`@strict` runs it on every assignment); its message leaves
# the field's name out, and `MythosConfig.__setattr__` puts it in front: "`dim` must be an integer >= 1, got 'x'".
# Bad type -> TypeError, bad value -> ValueError.
# --------------------------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    # numbers.Integral admits numpy integers; bool is an int subclass but never means a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _wrong_type(value, accepted) -> TypeError:
    return TypeError(f"must be {accepted}, got {value!r} of type {type(value).__name__}")


def integer(minimum: int, optional: bool = False, below: int | None = None):
    accepted = f"an integer >= {minimum}" + (f" and < {below}" if below is not None else "")
    accepted += " or None" if optional else ""

    def check(value):
        if value is None and optional:
            return
        if not _is_int(value):
            raise _wrong_type(value, accepted)
        if value < minimum or (below is not None and value >= below):
            raise ValueError(f"must be {accepted}, got {value!r}")

    return check


def real(accepted: str, in_range, optional: bool = False):
    """A finite number (ints welcome, bools and strings not) for which ``in_range`` holds; NaN fails every test."""
    accepted = f"a finite number {accepted}" + (" or None" if optional else "")

    def check(value):
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _wrong_type(value, accepted)
        if not (math.isfinite(value) and in_range(value)):
            raise ValueError(f"must be {accepted}, got {value!r}")

    return check


def boolean(optional: bool = False):
    accepted = "True or False" + (" or None" if optional else "")

    def check(value):
        # a truthy string such as "no" would otherwise switch the feature on
        if not (isinstance(value, bool) or (value is None and optional)):
            raise _wrong_type(value, accepted)

    return check


def choice(accepted: tuple[str, ...]):
    def check(value):
        if not isinstance(value, str):
            raise _wrong_type(value, f"a str, one of {accepted}")
        if value not in accepted:
            raise ValueError(f"must be one of {accepted}, got {value!r}")

    return check


def token_ids(value):
    """The type of a special-token field (its range is checked against vocab_size by ``validate_token_ids``)."""
    accepted = "None, or a token id or non-empty list of token ids (integers)"
    if isinstance(value, list):
        for token in value:
            if not _is_int(token):
                raise TypeError(f"must be {accepted}, got {value!r} (element {token!r} is a {type(token).__name__})")
    elif value is not None and not _is_int(value):
        raise _wrong_type(value, accepted)


def _checked(check, default):
    """A dataclass field whose value ``check`` validates on every assignment."""
    return field(default=default, metadata={"validator": check})


def _plain(value):
    """numpy scalars as Python numbers (and tuples of ids as lists), so that the config stays JSON-serialisable."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if _is_int(value) and type(value) is not int:
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, int, float)):
        return float(value)
    return value



@auto_docstring
@strict
class MythosConfig(PreTrainedConfig):
    r"""
    Configuration of an OpenMythos Recurrent-Depth Transformer: ``prelude_layers`` standard blocks run once, one
    shared recurrent block looped ``n_loops`` times with stable input injection, then ``coda_layers`` standard blocks.

    vocab_size (`int`, defaults to 32000):
        Number of token ids.
    dim (`int`, defaults to 2048):
        Hidden size (alias ``hidden_size``).
    n_heads (`int`, defaults to 16):
        Attention heads (alias ``num_attention_heads``).
    n_kv_heads (`int`, defaults to 4):
        Key/value heads for GQA (alias ``num_key_value_heads``). MLA shares one
        compressed latent across all heads and does not use it.
    max_seq_len (`int`, defaults to 4096):
        Longest sequence, cache included (alias ``max_position_embeddings``).
    max_loop_iters (`int`, defaults to 16):
        The number of loop-indexed parameters (depth-wise LoRA scales, router-bias rows), and the loop count
        used when neither a call nor ``n_loops`` gives one. ``n_loops`` may exceed it at inference: loop indices past
        the last one reuse the last depth-wise LoRA scale (the loop-index signal is defined for every index).
    n_loops (`int`, *optional*):
        The default inference depth: the loop budget of a forward or ``generate`` call that passes none, in [1,
        ``loop_limit``]. It changes no parameter shape, so ``from_pretrained(path, n_loops=8)`` picks a depth for
        a loaded checkpoint (and ``generation_config.n_loops`` one for ``generate``). ``None`` (the default) means
        ``max_loop_iters``; read the effective value as ``config.default_n_loops``.
    prelude_layers (`int`, defaults to 2):
        Dense blocks run once before the loop.
    coda_layers (`int`, defaults to 2):
        Dense blocks run once after the loop.
    attn_type (`str`, defaults to ``"mla"``):
        ``"mla"`` (multi-head latent attention) or ``"gqa"``.
    kv_lora_rank (`int`, defaults to 512):
        MLA compressed key/value latent size (this is what the cache stores).
    q_lora_rank (`int`, defaults to 1536):
        MLA query compression rank; 0 projects queries directly.
    qk_rope_head_dim (`int`, defaults to 64):
        MLA rotary part of each query/key head (one shared rope key per token).
    qk_nope_head_dim (`int`, defaults to 128):
        MLA non-rotary part of each query/key head.
    v_head_dim (`int`, defaults to 128):
        MLA value head size.
    n_experts (`int`, defaults to 64):
        Routed experts in the recurrent block's MoE.
    n_shared_experts (`int`, defaults to 2):
        Always-on shared experts, each ``expert_dim * n_experts_per_tok`` wide.
    n_experts_per_tok (`int`, defaults to 4):
        Routed experts chosen per token (top-k).
    expert_dim (`int`, defaults to 512):
        Hidden width of each routed expert.
    act_threshold (`float`, defaults to 0.99):
        ACT halting threshold in (0, 1]; used when ``use_act`` is on.
    rope_theta (`float`, defaults to 5e5):
        RoPE base.
    lora_rank (`int`, defaults to 16):
        Rank of the depth-wise (per-loop) LoRA adapter; 0 disables it.
    dropout (`float`, defaults to 0.0):
        Dropout on attention probabilities and residual branches in training.
    dense_ffn_dim (`int`, *optional*):
        Width of the prelude/coda SwiGLU. Defaults to ``dim * 4 // 3`` (reference).
    mla_absorb (`bool`, defaults to `True`):
        When decoding against a cache, fold ``kv_b_proj`` into the query and
        output (DeepSeek-V2 weight absorption) so cached latents are never re-expanded. Exact; eager/sdpa only.
        It saves FLOPs at every size (re-expanding costs ``cache_len * kv_lora_rank * n_heads * (qk_nope + v)``
        multiply-adds a step, absorbing ``n_heads * kv_lora_rank * (qk_nope + v)`` plus a wider attention), so it
        is on by default (measurements: benchmarks/README.md); ``False`` always re-expands.
    loop_kv_sharing (`str`, defaults to ``"none"``):
        Which loop's keys/values a loop iteration reads for the tokens before it. ``"none"``: its own loop's (every
        loop has its own cache slot, so the cache grows with ``n_loops``). ``"first"``: the first loop's, for every
        loop (Mixture-of-Recursions' recursion-wise sharing). ``"last"``: the last loop each earlier token ran, i.e.
        its final state's (Huginn's cache reuse; tokens are then processed one at a time through the loop, so a
        no-cache forward or a prefill costs one loop step per token: meant for inference, train with ``"first"``).
        A position always sees its own keys/values of the current loop. With sharing the cache holds one loop slot,
        whatever ``n_loops`` is (a static cache serves any ``n_loops``), and the no-cache forward, training and
        cached decoding follow the same rule, so they agree exactly. Exit criteria and per-row budgets need
        ``"none"``.
    exit_scope (`str`, defaults to ``"position"``):
        What an exit criterion (``exit_criterion="delta"`` or ``"kl"``) must see before a position stops.
        ``"position"``: its own measure below the threshold. ``"prefix"``: that, and every earlier position of its row
        in the same call has stopped, stops now, has run its budget, or is padding. In a causal model a position's next
        loop reads the earlier positions' states, so while one of them still moves, a position that held still for a
        loop may move again; ``"prefix"`` stops it only once its whole context has settled. ``loops_used`` then never
        falls along a row's real tokens (for equal budgets; padding runs as its own measure says). ``"row"``: a position
        stops only at a loop where every position of its row is done, so a row's positions stop together (unless a
        budget ends one sooner): no state is frozen while another position of the row still reads it. Decoding a
        token at a time is unaffected by either (the past is cached and done). ``"act"`` and continuous batching
        (which packs requests into one row) need ``"position"``.
    use_act (`bool`, defaults to `False`):
        Adaptive Computation Time halting. The output is the ACT-weighted mix
        of the loop states; every loop still runs so that the KV cache stays complete.
    act_ponder_weight (`float`, defaults to 0.01):
        Weight of the ponder cost added to the loss when ``use_act``.
    loop_signal_scale (`float`, defaults to 0.1):
        RMS of the sinusoidal loop-index signal relative to the RMS of
        the state it is added to. Relative scaling means it can never swamp the hidden state.
    loop_state_norm (`bool`, defaults to `False`):
        Rescale the loop state after every iteration to the root-mean-square of the input it is injected with (per
        position, over the hidden size), so that the state keeps one scale whatever the loop count. Off, the state's
        size drifts with the loop count, and a map applied at a loop count training never reached sees states of a
        size it never saw. The pointer-chasing demo's ``--loop-state-norm`` turns it on; its default recipe does not
        (it met the goals on fewer seeds, ``docs/demo.md``).
    routed_scaling_factor (`float`, defaults to 1.0):
        Multiplier on the normalised top-k routing weights.
    loop_sampling (`str`, defaults to ``"fixed"``):
        How training picks ``n_loops`` when none is passed:
        ``"fixed"`` uses ``max_loop_iters``; ``"poisson_lognormal"`` draws a count per training forward
        (Huginn/Parcae: 1 + Poisson with a log-normal rate, mean ``mean_train_loops``). The draw is made on the
        training side (``openmythos.training.MythosTrainingCallback``); the model's forward itself always runs
        the ``n_loops`` it is given, or ``max_loop_iters``.
    mean_train_loops (`float`, *optional*):
        Mean of the training draw, in [1, ``loop_limit``]. Defaults to
        ``max_loop_iters``.
    loop_sampling_sigma (`float`, defaults to 0.5):
        Std of the log-normal rate.
    max_train_loops (`int`, *optional*):
        Largest training draw, in [1, ``loop_limit``]. Defaults to
        ``2 * ceil(mean_train_loops)``, and the draw is capped at ``loop_limit`` in any case.
    loop_sampling_seed (`int`, defaults to 0):
        Seed of the draws, in [0, 2**32) (the draw also depends on the
        step index).
    max_inference_loops (`int`, *optional*):
        Upper bound on ``n_loops`` for any call, and on training draws.
        Defaults to ``8 * max_loop_iters`` (read it as ``config.loop_limit``). A larger request is refused with an
        error that names this field, instead of running for hours. It must be at least ``max_loop_iters`` (the
        loop count used when none is given), and ``mean_train_loops`` / ``max_train_loops`` may not exceed it:
        raise it to train or run deeper.
    backprop_loops (`int`, *optional*):
        In training, only the last ``backprop_loops`` (>= 1) iterations build a
        graph; earlier ones run without grad (truncated backprop through depth). ``None`` backpropagates through
        all.
    router_bias_update_rate (`float`, defaults to 1e-3):
        Step of the aux-loss-free router-bias update
        (bias += rate * sign(mean load - load)), applied by ``openmythos.training.update_router_bias``.
    router_aux_loss_coef (`float`, defaults to 0.0):
        Weight of the optional sequence-level balance loss.
    rms_norm_eps (`float`, defaults to 1e-6):
        RMSNorm epsilon.
    initializer_range (`float`, defaults to 0.02):
        Std of the normal weight init.
    tie_word_embeddings (`bool`, defaults to `True`):
        Share ``lm_head`` with ``embed_tokens``.
    use_cache (`bool`, defaults to `True`):
        Whether forward returns a KV cache by default.
    mythos_format_version (`int`, defaults to 1):
        Checkpoint format. Code older than a checkpoint's format refuses it and says to upgrade.
    pad_token_id, bos_token_id, eos_token_id (`int`, *optional*):
        Special token ids, in [0, ``vocab_size``); ``eos_token_id`` may also be a non-empty list of them.

    Every field is checked when the config is built, loaded (``from_dict``, ``from_pretrained``, a hand-edited
    config.json), overridden at load time, or assigned later (``@strict``: each field's check runs on every
    assignment; ``validate_architecture``, ``validate_loop_bounds`` and ``validate_token_ids`` hold the rules that tie
    fields together). A value of the wrong type raises ``TypeError`` (integers are real
    integers, numpy's included, never bools, floats or strings; switches are ``True``/``False``, never ``"no"`` or
    ``0``; numbers may be ints but not bools or strings), a value out of range raises ``ValueError`` (every float
    must be finite: inf and NaN give NaN or all-zero logits). Both messages name the field, show the value and say
    what is accepted. numpy scalars are stored as Python numbers so that the config stays JSON-serialisable.

    ``num_hidden_layers`` is derived, not set: ``prelude_layers + coda_layers + max_loop_iters``, one KV-cache slot
    per prelude layer, per coda layer and per loop iteration (the loop slots come last so that a dynamic cache can
    grow when ``n_loops > max_loop_iters``); with ``loop_kv_sharing`` it is ``prelude_layers + coda_layers + 1``.
    """

    model_type = "mythos"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "dim",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_seq_len",
    }

    # Each field's own check runs on every assignment (`@strict`): at construction, at loading and afterwards.
    vocab_size: int = _checked(integer(1), 32000)
    dim: int = _checked(integer(1), 2048)
    n_heads: int = _checked(integer(1), 16)
    n_kv_heads: int = _checked(integer(1), 4)
    max_seq_len: int = _checked(integer(1), 4096)
    max_loop_iters: int = _checked(integer(1), 16)
    n_loops: int | None = _checked(integer(1, optional=True), None)
    prelude_layers: int = _checked(integer(0), 2)
    coda_layers: int = _checked(integer(0), 2)
    attn_type: str = _checked(choice(ATTN_TYPES), "mla")
    kv_lora_rank: int = _checked(integer(0), 512)
    q_lora_rank: int = _checked(integer(0), 1536)
    qk_rope_head_dim: int = _checked(integer(0), 64)
    qk_nope_head_dim: int = _checked(integer(0), 128)
    v_head_dim: int = _checked(integer(0), 128)
    n_experts: int = _checked(integer(1), 64)
    n_shared_experts: int = _checked(integer(0), 2)
    n_experts_per_tok: int = _checked(integer(1), 4)
    expert_dim: int = _checked(integer(1), 512)
    act_threshold: int | float = _checked(real("in (0, 1]", lambda x: 0 < x <= 1), 0.99)
    rope_theta: int | float = _checked(real("> 0", lambda x: x > 0), 500000.0)
    lora_rank: int = _checked(integer(0), 16)
    dropout: int | float = _checked(real("in [0, 1)", lambda x: 0 <= x < 1), 0.0)
    dense_ffn_dim: int | None = _checked(integer(1, optional=True), None)
    mla_absorb: bool = _checked(boolean(), True)
    loop_kv_sharing: str = _checked(choice(LOOP_KV_SHARINGS), "none")
    exit_scope: str = _checked(choice(EXIT_SCOPES), "position")
    use_act: bool = _checked(boolean(), False)
    act_ponder_weight: int | float = _checked(real(">= 0", lambda x: x >= 0), 0.01)
    loop_signal_scale: int | float = _checked(real(">= 0", lambda x: x >= 0), 0.1)
    loop_state_norm: bool = _checked(boolean(), False)
    routed_scaling_factor: int | float = _checked(real(">= 0", lambda x: x >= 0), 1.0)
    loop_sampling: str = _checked(choice(LOOP_SAMPLINGS), "fixed")
    mean_train_loops: int | float | None = _checked(real(">= 1", lambda x: x >= 1, optional=True), None)
    loop_sampling_sigma: int | float = _checked(real(">= 0", lambda x: x >= 0), 0.5)
    max_train_loops: int | None = _checked(integer(1, optional=True), None)
    loop_sampling_seed: int = _checked(integer(0, below=2**32), 0)
    max_inference_loops: int | None = _checked(integer(1, optional=True), None)
    backprop_loops: int | None = _checked(integer(1, optional=True), None)
    router_bias_update_rate: int | float = _checked(real(">= 0", lambda x: x >= 0), 1e-3)
    router_aux_loss_coef: int | float = _checked(real(">= 0", lambda x: x >= 0), 0.0)
    rms_norm_eps: int | float = _checked(real("> 0", lambda x: x > 0), 1e-6)
    initializer_range: int | float = _checked(real(">= 0", lambda x: x >= 0), 0.02)
    tie_word_embeddings: bool = _checked(boolean(), True)
    use_cache: bool = _checked(boolean(), True)
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    mythos_format_version: int = _checked(integer(1), MYTHOS_FORMAT_VERSION)

    def __post_init__(self, **kwargs):
        # `num_hidden_layers` is derived; a value saved by another tool is accepted only if it agrees.
        saved_layers = kwargs.pop("num_hidden_layers", None)
        super().__post_init__(**kwargs)
        if self.dense_ffn_dim is None:  # `dim` may have arrived through `hidden_size`
            self.dense_ffn_dim = self.dim * 4 // 3
        # the rules that tie fields together (`@strict` class validators; `save_pretrained` runs them again)
        self.validate_architecture()
        self.validate_loop_bounds()
        self.validate_token_ids()
        if saved_layers is not None and saved_layers != self.num_hidden_layers:
            raise ValueError(
                f"`num_hidden_layers` is derived ({self._slots_text} = {self.num_hidden_layers}) but the config "
                f"says {saved_layers}"
            )

    @property
    def loop_cache_slots(self) -> int:
        """KV-cache slots of the loop: one per loop iteration up to ``max_loop_iters``, or one with sharing."""
        return self.max_loop_iters if self.loop_kv_sharing == "none" else 1

    @property
    def _slots_text(self) -> str:
        loops = "max_loop_iters" if self.loop_kv_sharing == "none" else "1 (loop_kv_sharing)"
        return f"prelude_layers + coda_layers + {loops}"

    @property
    def num_hidden_layers(self) -> int:
        """KV-cache slots: one per prelude layer, per coda layer and per loop slot (``loop_cache_slots``)."""
        return self.prelude_layers + self.coda_layers + self.loop_cache_slots

    @num_hidden_layers.setter
    def num_hidden_layers(self, value):
        if value != self.num_hidden_layers:
            raise ValueError(
                f"`num_hidden_layers` is derived from {self._slots_text} ({self.num_hidden_layers}); set those "
                f"fields instead of num_hidden_layers={value}"
            )

    @property
    def default_n_loops(self) -> int:
        """The loop budget of a call that passes none: ``n_loops``, or ``max_loop_iters`` when it is unset."""
        return self.n_loops if self.n_loops is not None else self.max_loop_iters

    @property
    def loop_limit(self) -> int:
        """The most loops any call (or training draw) may run: ``max_inference_loops``, default
        ``8 * max_loop_iters``."""
        return self.max_inference_loops if self.max_inference_loops is not None else 8 * self.max_loop_iters

    @property
    def head_dim(self) -> int:
        """Per-head query/key size."""
        if self.attn_type == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Number of channels per head that RoPE rotates."""
        return self.qk_rope_head_dim if self.attn_type == "mla" else self.head_dim

    # ----------------------------------------------------------------------------------------------------------------
    # Parallel plans, read by transformers when loading with `from_pretrained(..., distributed_config=...)`. Keys are
    # module names inside `MythosModel`; `MythosForCausalLM` adds `lm_head`, and transformers shards `embed_tokens` by
    # vocabulary. They are properties, not class dicts as in transformers' own configs, because the module names
    # depend on the config (MLA or GQA, `q_lora_rank`, layers and shared experts present or not), and a rule that
    # names no module makes transformers warn on every load.
    # The looped block is one module (`recurrent.layer`), so its rules shard its weights once; every loop iteration
    # runs the same sharded modules. The injection (A, B), the depth-wise LoRA, the loop signal, the router and its
    # balancing bias act on the full hidden state after the row-parallel `o_proj` / experts have all-reduced it, so
    # they stay replicated: every rank computes the same values and receives the same, complete gradients.
    # ----------------------------------------------------------------------------------------------------------------

    @property
    def base_model_tp_plan(self) -> dict[str, str]:
        """Tensor-parallel plan: attention split by head, every FFN (dense, shared experts, each routed expert) split
        along its hidden width."""
        if self.attn_type == "gqa":
            attention = {"q_proj": "colwise", "k_proj": "colwise", "v_proj": "colwise", "o_proj": "rowwise"}
        else:
            # The latent (`kv_a_proj_with_mqa`) and the query compression (`q_a_proj`) are shared by every head and
            # stay whole; `mla_kv_a_proj` sums the gradient of the one rope key that all heads read.
            attention = {"q_b_proj" if self.q_lora_rank > 0 else "q_proj": "colwise",
                         "kv_a_proj_with_mqa": "mla_kv_a_proj", "kv_b_proj": "colwise", "o_proj": "rowwise"}
        dense = {"gate_proj": "colwise", "up_proj": "colwise", "down_proj": "rowwise"}
        plan = {}
        blocks = [("prelude.*", self.prelude_layers), ("coda.*", self.coda_layers), ("recurrent.layer", 1)]
        for block, count in blocks:
            if count == 0:
                continue
            plan.update({f"{block}.self_attn.{name}": style for name, style in attention.items()})
            if block != "recurrent.layer":
                plan.update({f"{block}.mlp.{name}": style for name, style in dense.items()})
        moe = "recurrent.layer.mlp"
        # Each expert's gate/up rows (packed as [gate; up]) and down columns are split; every rank routes the same
        # tokens with the whole router, runs its slice of every chosen expert, and `moe_tp_experts` sums the slices.
        plan.update({f"{moe}.experts.gate_up_proj": "packed_colwise", f"{moe}.experts.down_proj": "rowwise",
                     f"{moe}.experts": "moe_tp_experts"})
        if self.n_shared_experts > 0:
            plan.update({f"{moe}.shared_experts.{name}": style for name, style in dense.items()})
        return plan

    @property
    def base_model_ep_plan(self) -> dict[str, str]:
        """Expert-parallel plan: whole routed experts per rank (`n_experts / ep_size` each), tokens dispatched to them.
        The router, its bias and the shared experts are not split by it (they follow the tensor-parallel plan)."""
        experts = "recurrent.layer.mlp.experts"
        return {f"{experts}.gate_up_proj": "grouped_gemm", f"{experts}.down_proj": "grouped_gemm",
                experts: "ep_dispatch_experts"}

    @property
    def base_model_fsdp_plan(self) -> dict[str, str]:
        """FSDP2 units when a ``DistributedConfig`` has ``fsdp_size > 1``: the units of
        ``openmythos.training.apply_fsdp2`` (each prelude and coda layer; the looped block once, so it is gathered once
        per call, which runs every iteration), and the final norm kept gathered with the tied ``lm_head``."""
        plan = {"embed_tokens": "free_full_weight", "recurrent": "free_full_weight", "norm": "keep_full_weight"}
        plan.update({f"{block}.*": "free_full_weight" for block, count in
                     (("prelude", self.prelude_layers), ("coda", self.coda_layers)) if count})
        return plan

    # No `base_model_pp_plan`: transformers' pipeline parallelism splits `base_model.layers` into stages of whole
    # layers, and nearly all of a Mythos model is one block that runs `n_loops` times in sequence (see
    # `check_parallel_layout`).

    def check_parallel_layout(self, distributed_config) -> None:
        """Refuse a ``transformers.DistributedConfig`` layout this model cannot be split by, naming the field, before
        any weight is sharded or loaded (``MythosPreTrainedModel.maybe_distribute_model`` calls it)."""
        pp_size = getattr(distributed_config, "pp_size", 1) or 1
        tp_size = getattr(distributed_config, "tp_size", 1) or 1
        ep_size = getattr(distributed_config, "ep_size", 1) or 1
        if pp_size > 1:
            raise ValueError(
                f"pp_size={pp_size}: OpenMythos has no pipeline-parallel plan. Pipeline stages are whole layers, and "
                "nearly all of the model is one looped block that runs n_loops times in sequence, so it cannot be "
                "split into stages. Use pp_size=1 with tp_size / ep_size / fsdp_size.")
        tp_plan = getattr(distributed_config, "tp_plan", None)
        if tp_size > 1 and tp_plan != {}:
            # Widths (dense_ffn_dim, expert_dim, vocab_size) may split unevenly; heads may not.
            heads = {"n_heads": self.n_heads}
            if self.attn_type == "gqa":
                heads["n_kv_heads"] = self.n_kv_heads
            for name, value in heads.items():
                if value % tp_size:
                    raise ValueError(
                        f"`{name}` ({value}) must be divisible by tp_size ({tp_size}): tensor parallelism gives "
                        f"each rank whole heads. Pick a tp_size that divides {value}.")
        if ep_size > 1 and self.n_experts % ep_size:
            raise ValueError(
                f"`n_experts` ({self.n_experts}) must be divisible by ep_size ({ep_size}): expert parallelism gives "
                f"each rank n_experts / ep_size whole experts. Pick an ep_size that divides {self.n_experts}.")

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """``PreTrainedConfig.from_dict``, then the cross-field rules again: load-time overrides are assigned after
        ``__init__`` (each one is still checked on its own when assigned)."""
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config.validate_architecture()
        config.validate_loop_bounds()
        config.validate_token_ids()
        return result

    def validate_architecture(self):
        """Shapes the model can be built with."""
        if self.attn_type == "mla":
            for name in ("kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):  # GQA ignores them: any integer will do
                if getattr(self, name) < 1:
                    raise ValueError(
                        f"`{name}` must be an integer >= 1 for attn_type='mla', got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"`n_kv_heads` ({self.n_kv_heads}) must divide `n_heads` ({self.n_heads})")
        if self.attn_type == "gqa":
            if self.dim % self.n_heads != 0:
                raise ValueError(f"`dim` ({self.dim}) must be divisible by `n_heads` ({self.n_heads})")
            if (self.dim // self.n_heads) % 2 != 0:
                raise ValueError(f"GQA head size dim // n_heads ({self.dim // self.n_heads}) must be even for RoPE")
        elif self.qk_rope_head_dim % 2 != 0:
            raise ValueError(f"`qk_rope_head_dim` must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.n_experts_per_tok > self.n_experts:
            raise ValueError(
                f"`n_experts_per_tok` ({self.n_experts_per_tok}) cannot exceed `n_experts` ({self.n_experts})"
            )

    def validate_loop_bounds(self):
        """Every loop count the config can produce (the default, a training draw) stays within ``loop_limit``."""
        if self.max_inference_loops is not None and self.max_inference_loops < self.max_loop_iters:
            raise ValueError(
                f"`max_inference_loops` must be an integer >= `max_loop_iters` ({self.max_loop_iters}, the default "
                f"loop count), or None for 8 * max_loop_iters; got {self.max_inference_loops!r}"
            )
        bound = f"<= {self.loop_limit} (`max_inference_loops`, default 8 * max_loop_iters; raise it to allow more)"
        if self.n_loops is not None and self.n_loops > self.loop_limit:
            raise ValueError(f"`n_loops` must be an integer >= 1 and {bound}, or None for max_loop_iters; got "
                             f"{self.n_loops!r}")
        if self.mean_train_loops is not None and not 1 <= self.mean_train_loops <= self.loop_limit:
            raise ValueError(f"`mean_train_loops` must be a number >= 1 and {bound}, got {self.mean_train_loops!r}")
        if self.max_train_loops is not None and self.max_train_loops > self.loop_limit:
            raise ValueError(f"`max_train_loops` must be an integer >= 1 and {bound}, got {self.max_train_loops!r}")

    def validate_token_ids(self):
        """Special token ids lie in [0, vocab_size)."""
        for name in ("pad_token_id", "bos_token_id"):
            setattr(self, name, _check_token_id(name, getattr(self, name), self.vocab_size))
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)):
            if not eos:
                raise ValueError("`eos_token_id` must be None, a token id or a non-empty list of token ids, got []")
            # Checked as a whole so that the message shows the list, not one element of it.
            ids = [_check_token_id("eos_token_id", token, self.vocab_size, in_list=list(eos)) for token in eos]
            self.eos_token_id = ids
        else:
            self.eos_token_id = _check_token_id("eos_token_id", eos, self.vocab_size)


def _check_token_id(name, value, vocab_size, in_list=None):
    """Return a token id as a Python int in [0, vocab_size), or None. ``in_list``: the eos list ``value`` is from."""
    if value is None and in_list is None:
        return None
    shown = value if in_list is None else in_list
    accepted = f"None or a token id in [0, {vocab_size}) (vocab_size)"
    if name == "eos_token_id":
        accepted = f"None, or a token id or non-empty list of token ids in [0, {vocab_size}) (vocab_size)"
    if not _is_int(value) and in_list is not None:
        raise TypeError(f"`{name}` must be {accepted}, got {shown!r} (element {value!r} is a {type(value).__name__})")
    if not _is_int(value):
        raise TypeError(f"`{name}` {_wrong_type(value, accepted)}")
    if not 0 <= value < vocab_size:
        raise ValueError(f"`{name}` must be {accepted}, got {shown!r}")
    return int(value)


# --------------------------------------------------------------------------------------------------------------------
# Presets. The seed table fixes dim / experts / expert_dim / loop iters / context; the other fields are the
# reference's values for the same size (see reference-facts.md). All are MLA with ACT threshold 0.99.
# --------------------------------------------------------------------------------------------------------------------

_PRESETS = {
    # name: vocab, dim, heads, kv_heads, max_seq, loops, prelude, coda, kv_lora, q_lora, rope, nope, v,
    #       experts, shared, top_k, expert_dim, rope_theta, lora_rank
    "1b": (32000, 2048, 16, 4, 4096, 16, 2, 2, 256, 512, 32, 64, 64, 64, 2, 4, 2048, 5e5, 8),
    "3b": (32000, 3072, 24, 6, 4096, 16, 2, 2, 384, 768, 32, 96, 96, 64, 2, 4, 4096, 5e5, 8),
    "10b": (32000, 4096, 32, 8, 8192, 24, 2, 2, 512, 1024, 64, 128, 128, 128, 2, 4, 5632, 5e5, 16),
    "50b": (32000, 6144, 48, 8, 8192, 32, 3, 3, 512, 1536, 64, 128, 128, 256, 4, 4, 9728, 5e5, 32),
    "100b": (32000, 8192, 64, 8, 1048576, 32, 4, 4, 512, 2048, 64, 128, 128, 256, 4, 8, 13568, 1e6, 64),
    "500b": (100000, 12288, 96, 16, 1048576, 48, 4, 4, 1024, 3072, 64, 128, 128, 512, 8, 8, 23040, 1e6, 128),
    "1t": (100000, 16384, 128, 16, 1048576, 64, 6, 6, 1024, 4096, 64, 128, 128, 512, 8, 8, 34560, 2e6, 256),
}
# Our fields' checks, and checks for fields whose annotations strict cannot enforce: the base config's (string
# annotations) and the special tokens (range against vocab_size in `validate_token_ids`).
_EXTRA_CHECKS = dict(is_encoder_decoder=boolean(), output_attentions=boolean(), output_hidden_states=boolean(True),
                     return_dict=boolean(True), chunk_size_feed_forward=integer(0), pad_token_id=token_ids,
                     bos_token_id=token_ids, eos_token_id=token_ids)
_FIELD_CHECKS = {f.name: f.metadata["validator"] for f in fields(MythosConfig) if callable(f.metadata.get("validator"))}
_FIELD_CHECKS.update(_EXTRA_CHECKS)


def _named(name, error):
    return type(error)(f"`{name}` {error}")


def _errors_name_the_field(strict_setattr):
    """Wrap ``@strict``'s ``__setattr__``: values arrive as plain Python numbers, an alias checks its field, and a
    refused value raises our TypeError/ValueError naming the field before strict's own checks run."""

    @functools.wraps(strict_setattr)
    def __setattr__(self, name, value):
        name = MythosConfig.attribute_map.get(name, name)
        value = _plain(value)
        if name in _FIELD_CHECKS:  # first, so that a refusal is ours (strict's own error class is neither)
            try:
                _FIELD_CHECKS[name](value)
            except (TypeError, ValueError) as error:
                raise _named(name, error) from None
        strict_setattr(self, name, value)

    return __setattr__


def _check_aliases_and_format_first(init):
    """Wrap the generated ``__init__``. An HF alias and its reference field given together must agree (in
    ``__post_init__`` a field given at its default value would look like one not given). A checkpoint from a newer
    format says "upgrade" before any field is judged by today's rules."""

    @functools.wraps(init)
    def __init__(self, **kwargs):
        for alias, field_name in MythosConfig.attribute_map.items():
            if alias in kwargs and field_name in kwargs and kwargs[alias] != kwargs[field_name]:
                raise ValueError(f"`{alias}`={kwargs[alias]!r} contradicts `{field_name}`={kwargs[field_name]!r} "
                                 f"(`{alias}` is another name for `{field_name}`); give only one of them")
        version = kwargs.get("mythos_format_version", MYTHOS_FORMAT_VERSION)
        if _is_int(version) and version > MYTHOS_FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses OpenMythos format version {version}, but the installed code reads up to "
                f"version {MYTHOS_FORMAT_VERSION}. Upgrade with `pip install -U openmythos`.")
        init(self, **kwargs)

    return __init__


MythosConfig.__setattr__ = _errors_name_the_field(MythosConfig.__setattr__)
MythosConfig.__init__ = _check_aliases_and_format_first(MythosConfig.__init__)

_PRESET_FIELDS = ("vocab_size", "dim", "n_heads", "n_kv_heads", "max_seq_len", "max_loop_iters", "prelude_layers",
                  "coda_layers", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim",
                  "n_experts", "n_shared_experts", "n_experts_per_tok", "expert_dim", "rope_theta", "lora_rank")
# Longest generation each preset is meant for (seed table, "max output"); informational.
PRESET_MAX_OUTPUT = {"1b": 4096, "3b": 4096, "10b": 4096, "50b": 4096, "100b": 131072, "500b": 131072,
                     "1t": 131072}


def _preset(name: str, **overrides) -> MythosConfig:
    values = dict(zip(_PRESET_FIELDS, _PRESETS[name]))
    values.update(attn_type="mla", act_threshold=0.99)
    values.update(overrides)
    return MythosConfig(**values)


def mythos_tiny(**overrides) -> MythosConfig:
    """A few-hundred-thousand-parameter model for tests and CPU experiments (MLA by default)."""
    values = dict(vocab_size=512, dim=64, n_heads=4, n_kv_heads=2, max_seq_len=128, max_loop_iters=4,
                  prelude_layers=1, coda_layers=1, attn_type="mla", kv_lora_rank=32, q_lora_rank=48,
                  qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_experts=8, n_shared_experts=1,
                  n_experts_per_tok=2, expert_dim=32, lora_rank=4, rope_theta=10000.0)
    values.update(overrides)
    return MythosConfig(**values)


def mythos_1b(**overrides) -> MythosConfig:
    return _preset("1b", **overrides)


def mythos_3b(**overrides) -> MythosConfig:
    return _preset("3b", **overrides)


def mythos_10b(**overrides) -> MythosConfig:
    return _preset("10b", **overrides)


def mythos_50b(**overrides) -> MythosConfig:
    return _preset("50b", **overrides)


def mythos_100b(**overrides) -> MythosConfig:
    return _preset("100b", **overrides)


def mythos_500b(**overrides) -> MythosConfig:
    return _preset("500b", **overrides)


def mythos_1t(**overrides) -> MythosConfig:
    return _preset("1t", **overrides)


PRESETS = {
    "mythos_tiny": mythos_tiny,
    "mythos_1b": mythos_1b,
    "mythos_3b": mythos_3b,
    "mythos_10b": mythos_10b,
    "mythos_50b": mythos_50b,
    "mythos_100b": mythos_100b,
    "mythos_500b": mythos_500b,
    "mythos_1t": mythos_1t,
}

__all__ = ["MythosConfig", "PRESETS", "MYTHOS_FORMAT_VERSION"] + list(PRESETS)
