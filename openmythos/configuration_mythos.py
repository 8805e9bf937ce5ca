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

from transformers import PreTrainedConfig

# Bumped whenever a checkpoint written by this code can no longer be read by older code.
MYTHOS_FORMAT_VERSION = 1

ATTN_TYPES = ("mla", "gqa")
LOOP_SAMPLINGS = ("fixed", "poisson_lognormal")


class MythosConfig(PreTrainedConfig):
    r"""
    Configuration of an OpenMythos Recurrent-Depth Transformer: ``prelude_layers`` standard blocks run once, one
    shared recurrent block looped ``n_loops`` times with stable input injection, then ``coda_layers`` standard blocks.

    Args:
        vocab_size (`int`, defaults to 32000): Number of token ids.
        dim (`int`, defaults to 2048): Hidden size (alias ``hidden_size``).
        n_heads (`int`, defaults to 16): Attention heads (alias ``num_attention_heads``).
        n_kv_heads (`int`, defaults to 4): Key/value heads for GQA (alias ``num_key_value_heads``). MLA shares one
            compressed latent across all heads and does not use it.
        max_seq_len (`int`, defaults to 4096): Longest sequence, cache included (alias ``max_position_embeddings``).
        max_loop_iters (`int`, defaults to 16): Loop iterations used when ``n_loops`` is not given, and the number of
            loop-indexed parameters (depth-wise LoRA scales). ``n_loops`` may exceed it at inference: loop indices past
            the last one reuse the last depth-wise LoRA scale (the loop-index signal is defined for every index).
        prelude_layers (`int`, defaults to 2): Dense blocks run once before the loop.
        coda_layers (`int`, defaults to 2): Dense blocks run once after the loop.
        attn_type (`str`, defaults to ``"mla"``): ``"mla"`` (multi-head latent attention) or ``"gqa"``.
        kv_lora_rank (`int`, defaults to 512): MLA compressed key/value latent size (this is what the cache stores).
        q_lora_rank (`int`, defaults to 1536): MLA query compression rank; 0 projects queries directly.
        qk_rope_head_dim (`int`, defaults to 64): MLA rotary part of each query/key head (one shared rope key per token).
        qk_nope_head_dim (`int`, defaults to 128): MLA non-rotary part of each query/key head.
        v_head_dim (`int`, defaults to 128): MLA value head size.
        n_experts (`int`, defaults to 64): Routed experts in the recurrent block's MoE.
        n_shared_experts (`int`, defaults to 2): Always-on shared experts, each ``expert_dim * n_experts_per_tok`` wide.
        n_experts_per_tok (`int`, defaults to 4): Routed experts chosen per token (top-k).
        expert_dim (`int`, defaults to 512): Hidden width of each routed expert.
        act_threshold (`float`, defaults to 0.99): ACT halting threshold in (0, 1]; used when ``use_act`` is on.
        rope_theta (`float`, defaults to 5e5): RoPE base.
        lora_rank (`int`, defaults to 16): Rank of the depth-wise (per-loop) LoRA adapter; 0 disables it.
        dropout (`float`, defaults to 0.0): Dropout on attention probabilities and residual branches in training.
        dense_ffn_dim (`int`, *optional*): Width of the prelude/coda SwiGLU. Defaults to ``dim * 4 // 3`` (reference).
        mla_absorb (`bool`, defaults to `True`): When decoding against a cache, fold ``kv_b_proj`` into the query and
            output (DeepSeek-V2 weight absorption) so cached latents are never re-expanded. Exact; eager/sdpa only.
            It saves FLOPs at every size (re-expanding costs ``cache_len * kv_lora_rank * n_heads * (qk_nope + v)``
            multiply-adds a step, absorbing ``n_heads * kv_lora_rank * (qk_nope + v)`` plus a wider attention), and
            on CPU it measured as fast as re-expanding on a 1.5M-parameter model (per-op overhead dominates) and
            faster on a 14M one (benchmarks/README.md), so it is on by default; ``False`` always re-expands.
        use_act (`bool`, defaults to `False`): Adaptive Computation Time halting. The output is the ACT-weighted mix
            of the loop states; every loop still runs so that the KV cache stays complete.
        act_ponder_weight (`float`, defaults to 0.01): Weight of the ponder cost added to the loss when ``use_act``.
        loop_signal_scale (`float`, defaults to 0.1): RMS of the sinusoidal loop-index signal relative to the RMS of
            the state it is added to. Relative scaling means it can never swamp the hidden state.
        routed_scaling_factor (`float`, defaults to 1.0): Multiplier on the normalised top-k routing weights.
        loop_sampling (`str`, defaults to ``"fixed"``): How training picks ``n_loops`` when none is passed:
            ``"fixed"`` uses ``max_loop_iters``; ``"poisson_lognormal"`` draws a count per forward (Huginn/Parcae:
            1 + Poisson with a log-normal rate, mean ``mean_train_loops``). Never used in eval mode.
        mean_train_loops (`float`, *optional*): Mean of the training draw, in [1, ``loop_limit``]. Defaults to
            ``max_loop_iters``.
        loop_sampling_sigma (`float`, defaults to 0.5): Std of the log-normal rate.
        max_train_loops (`int`, *optional*): Largest training draw, in [1, ``loop_limit``]. Defaults to
            ``2 * ceil(mean_train_loops)``, and the draw is capped at ``loop_limit`` in any case.
        loop_sampling_seed (`int`, defaults to 0): Seed of the draws, in [0, 2**32) (the draw also depends on the
            step index).
        max_inference_loops (`int`, *optional*): Upper bound on ``n_loops`` for any call, and on training draws.
            Defaults to ``8 * max_loop_iters`` (read it as ``config.loop_limit``). A larger request is refused with an
            error that names this field, instead of running for hours. It must be at least ``max_loop_iters`` (the
            loop count used when none is given), and ``mean_train_loops`` / ``max_train_loops`` may not exceed it:
            raise it to train or run deeper.
        backprop_loops (`int`, *optional*): In training, only the last ``backprop_loops`` (>= 1) iterations build a
            graph; earlier ones run without grad (truncated backprop through depth). ``None`` backpropagates through
            all.
        router_bias_update_rate (`float`, defaults to 1e-3): Step of the aux-loss-free router-bias update
            (bias += rate * sign(mean load - load)), applied by ``openmythos.training.update_router_bias``.
        router_aux_loss_coef (`float`, defaults to 0.0): Weight of the optional sequence-level balance loss.
        rms_norm_eps (`float`, defaults to 1e-6): RMSNorm epsilon.
        initializer_range (`float`, defaults to 0.02): Std of the normal weight init.
        tie_word_embeddings (`bool`, defaults to `True`): Share ``lm_head`` with ``embed_tokens``.
        use_cache (`bool`, defaults to `True`): Return a KV cache from forward by default.
        pad_token_id, bos_token_id, eos_token_id (`int`, *optional*): Special token ids, in [0, ``vocab_size``);
            ``eos_token_id`` may also be a non-empty list of them.

    Every field is checked when the config is built, loaded (``from_dict``, ``from_pretrained``, a hand-edited
    config.json) or overridden at load time. A value of the wrong type raises ``TypeError`` (integers are real
    integers, numpy's included, never bools, floats or strings; switches are ``True``/``False``, never ``"no"`` or
    ``0``; numbers may be ints but not bools or strings), a value out of range raises ``ValueError`` (every float
    must be finite: inf and NaN give NaN or all-zero logits). Both messages name the field, show the value and say
    what is accepted. numpy scalars are stored as Python numbers so that the config stays JSON-serialisable.

    ``num_hidden_layers`` is derived, not set: ``prelude_layers + coda_layers + max_loop_iters``, one KV-cache slot
    per prelude layer, per coda layer and per loop iteration (the loop slots come last so that a dynamic cache can
    grow when ``n_loops > max_loop_iters``).
    """

    model_type = "mythos"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "dim",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "max_position_embeddings": "max_seq_len",
    }

    vocab_size: int = 32000
    dim: int = 2048
    n_heads: int = 16
    n_kv_heads: int = 4
    max_seq_len: int = 4096
    max_loop_iters: int = 16
    prelude_layers: int = 2
    coda_layers: int = 2
    attn_type: str = "mla"
    kv_lora_rank: int = 512
    q_lora_rank: int = 1536
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    n_experts: int = 64
    n_shared_experts: int = 2
    n_experts_per_tok: int = 4
    expert_dim: int = 512
    act_threshold: float = 0.99
    rope_theta: float = 500000.0
    lora_rank: int = 16
    dropout: float = 0.0
    dense_ffn_dim: int | None = None
    mla_absorb: bool = True
    use_act: bool = False
    act_ponder_weight: float = 0.01
    loop_signal_scale: float = 0.1
    routed_scaling_factor: float = 1.0
    loop_sampling: str = "fixed"
    mean_train_loops: float | None = None
    loop_sampling_sigma: float = 0.5
    max_train_loops: int | None = None
    loop_sampling_seed: int = 0
    max_inference_loops: int | None = None
    backprop_loops: int | None = None
    router_bias_update_rate: float = 1e-3
    router_aux_loss_coef: float = 0.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    mythos_format_version: int = MYTHOS_FORMAT_VERSION

    def __post_init__(self, **kwargs):
        # `num_hidden_layers` is derived; a value saved by another tool is accepted only if it agrees.
        saved_layers = kwargs.pop("num_hidden_layers", None)
        super().__post_init__(**kwargs)
        # A newer format may use fields differently: say "upgrade" before judging any field by today's rules.
        version = _check_int("mythos_format_version", self.mythos_format_version, 1)
        if version > MYTHOS_FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses OpenMythos format version {version}, but the installed code "
                f"reads up to version {MYTHOS_FORMAT_VERSION}. Upgrade with `pip install -U openmythos`."
            )
        if self.dense_ffn_dim is None and _is_int(self.dim):  # `dim` may have arrived through `hidden_size`
            self.dense_ffn_dim = self.dim * 4 // 3
        self._validate()
        if saved_layers is not None and saved_layers != self.num_hidden_layers:
            raise ValueError(
                f"`num_hidden_layers` is derived (prelude_layers + coda_layers + max_loop_iters = "
                f"{self.num_hidden_layers}) but the config says {saved_layers}"
            )

    @property
    def num_hidden_layers(self) -> int:
        """KV-cache slots: one per prelude layer, per coda layer and per loop iteration up to ``max_loop_iters``."""
        return self.prelude_layers + self.coda_layers + self.max_loop_iters

    @num_hidden_layers.setter
    def num_hidden_layers(self, value):
        if value != self.num_hidden_layers:
            raise ValueError(
                f"`num_hidden_layers` is derived from prelude_layers + coda_layers + max_loop_iters "
                f"({self.num_hidden_layers}); set those fields instead of num_hidden_layers={value}"
            )

    @property
    def loop_limit(self) -> int:
        """The most loops any call (or training draw) may run: ``max_inference_loops``, default ``8 * max_loop_iters``."""
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

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """``PreTrainedConfig.from_dict``, then validation again: it sets load-time overrides after ``__init__``."""
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        config._validate()
        return result

    def _validate(self):
        """Refuse a config the model cannot run: each field's type (TypeError) and range (ValueError), then the
        rules that tie fields together."""
        for name, accepted in _CHOICES.items():
            _check_choice(name, getattr(self, name), accepted)
        for name, minimum in _INT_MINIMUMS.items():
            if self.attn_type != "mla" and name in _MLA_ONLY_FIELDS:
                minimum = 0  # unused by GQA: any integer will do
            self._set_plain(name, _check_int(name, getattr(self, name), minimum, optional=name in _OPTIONAL))
        for name, (accepted, in_range) in _FLOAT_RANGES.items():
            self._set_plain(name, _check_float(name, getattr(self, name), accepted, in_range,
                                               optional=name in _OPTIONAL))
        for name in _BOOL_FIELDS:
            _check_bool(name, getattr(self, name), optional=name in _OPTIONAL)
        self._validate_shapes()
        self._validate_loop_bounds()
        self._validate_token_ids()

    def _set_plain(self, name, value):
        # numpy scalars are accepted but stored as Python numbers, so that the config stays JSON-serialisable.
        if value is not None and type(value) is not type(getattr(self, name)):
            setattr(self, name, value)

    def _validate_shapes(self):
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

    def _validate_loop_bounds(self):
        # Every loop count the config can produce (the default, a training draw) must stay within `loop_limit`.
        if self.max_inference_loops is not None and self.max_inference_loops < self.max_loop_iters:
            raise ValueError(
                f"`max_inference_loops` must be an integer >= `max_loop_iters` ({self.max_loop_iters}, the default "
                f"loop count), or None for 8 * max_loop_iters; got {self.max_inference_loops!r}"
            )
        bound = f"<= {self.loop_limit} (`max_inference_loops`, default 8 * max_loop_iters; raise it to allow more)"
        if self.mean_train_loops is not None and not 1 <= self.mean_train_loops <= self.loop_limit:
            raise ValueError(f"`mean_train_loops` must be a number >= 1 and {bound}, got {self.mean_train_loops!r}")
        if self.max_train_loops is not None and self.max_train_loops > self.loop_limit:
            raise ValueError(f"`max_train_loops` must be an integer >= 1 and {bound}, got {self.max_train_loops!r}")
        if self.loop_sampling_seed >= 2**32:
            raise ValueError(f"`loop_sampling_seed` must be an integer in [0, 2**32), got {self.loop_sampling_seed!r}")

    def _validate_token_ids(self):
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


# Validation tables. `_OPTIONAL` fields also accept None (meaning "derive the default").
_CHOICES = {"attn_type": ATTN_TYPES, "loop_sampling": LOOP_SAMPLINGS}
# Smallest accepted value of each integer field; `dim` comes before `dense_ffn_dim`, which is derived from it.
_INT_MINIMUMS = {
    "vocab_size": 1, "dim": 1, "n_heads": 1, "n_kv_heads": 1, "max_seq_len": 1, "max_loop_iters": 1,
    "prelude_layers": 0, "coda_layers": 0, "kv_lora_rank": 1, "q_lora_rank": 0, "qk_rope_head_dim": 1,
    "qk_nope_head_dim": 0, "v_head_dim": 1, "n_experts": 1, "n_shared_experts": 0, "n_experts_per_tok": 1,
    "expert_dim": 1, "lora_rank": 0, "dense_ffn_dim": 1, "max_train_loops": 1, "loop_sampling_seed": 0,
    "max_inference_loops": 1, "backprop_loops": 1, "mythos_format_version": 1, "chunk_size_feed_forward": 0,
}
_MLA_ONLY_FIELDS = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
# name: (accepted values in words, test). NaN fails every comparison, so it is refused with the rest.
_FLOAT_RANGES = {
    "act_threshold": ("in (0, 1]", lambda x: 0 < x <= 1),
    "rope_theta": ("> 0", lambda x: x > 0),
    "dropout": ("in [0, 1)", lambda x: 0 <= x < 1),
    "act_ponder_weight": (">= 0", lambda x: x >= 0),
    "loop_signal_scale": (">= 0", lambda x: x >= 0),
    "routed_scaling_factor": (">= 0", lambda x: x >= 0),
    "mean_train_loops": (">= 1", lambda x: x >= 1),
    "loop_sampling_sigma": (">= 0", lambda x: x >= 0),
    "router_bias_update_rate": (">= 0", lambda x: x >= 0),
    "router_aux_loss_coef": (">= 0", lambda x: x >= 0),
    "rms_norm_eps": ("> 0", lambda x: x > 0),
    "initializer_range": (">= 0", lambda x: x >= 0),
}
# Our switches, and the base config's output switches (a truthy string such as "no" would turn them on).
_BOOL_FIELDS = ("mla_absorb", "use_act", "tie_word_embeddings", "use_cache", "is_encoder_decoder",
                "output_attentions", "output_hidden_states", "return_dict")
_OPTIONAL = {"dense_ffn_dim", "max_train_loops", "max_inference_loops", "backprop_loops", "mean_train_loops",
             "output_hidden_states", "return_dict"}


def _type_error(name, value, accepted):
    return TypeError(f"`{name}` must be {accepted}, got {value!r} of type {type(value).__name__}")


def _is_int(value) -> bool:
    # numbers.Integral admits numpy integers; bool is an int subclass but never means a count.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name, value, minimum, optional=False):
    """Return ``value`` as a Python int (or None when optional); refuse other types and values below ``minimum``."""
    accepted = f"an integer >= {minimum}" + (" or None" if optional else "")
    if value is None and optional:
        return None
    if not _is_int(value):
        raise _type_error(name, value, accepted)
    if value < minimum:
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}")
    return int(value)


def _check_float(name, value, accepted, in_range, optional=False):
    """Return ``value`` as a Python number (int stays int); refuse non-numbers, inf, NaN and out-of-range values."""
    accepted = f"a finite number {accepted}" + (" or None" if optional else "")
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _type_error(name, value, accepted)
    if not (math.isfinite(value) and in_range(value)):
        raise ValueError(f"`{name}` must be {accepted}, got {value!r}")
    return value if type(value) in (int, float) else float(value)


def _check_bool(name, value, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, bool):
        raise _type_error(name, value, "True or False" + (" or None" if optional else ""))


def _check_choice(name, value, accepted):
    if not isinstance(value, str):
        raise _type_error(name, value, f"a str, one of {accepted}")
    if value not in accepted:
        raise ValueError(f"`{name}` must be one of {accepted}, got {value!r}")


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
        raise _type_error(name, value, accepted)
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
def _refuse_alias_conflicts(init):
    """Wrap the generated ``__init__``: an HF alias and its reference field given together must agree.

    This cannot live in ``__post_init__``: there a field given at its default value looks like one not given at all.
    """

    @functools.wraps(init)
    def __init__(self, **kwargs):
        for alias, field in MythosConfig.attribute_map.items():
            if alias in kwargs and field in kwargs and kwargs[alias] != kwargs[field]:
                raise ValueError(f"`{alias}`={kwargs[alias]!r} contradicts `{field}`={kwargs[field]!r} (`{alias}` is "
                                 f"another name for `{field}`); give only one of them")
        init(self, **kwargs)

    return __init__


MythosConfig.__init__ = _refuse_alias_conflicts(MythosConfig.__init__)

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
