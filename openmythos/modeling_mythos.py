"""OpenMythos Recurrent-Depth Transformer for Hugging Face Transformers.

Data flow:
    input_ids -> embed_tokens -> prelude (dense blocks, once) -> e
    h_0 = e
    for t in range(n_loops):  h_{t+1} = A * h_t + B * e + F_t(h_t, e)
    h -> coda (dense blocks, once) -> norm -> lm_head

F_t is the residual delta (attention + MoE, plus the depth-wise LoRA for loop t) of one shared block, evaluated on
``h_t + e`` plus a small loop-index signal. A is diagonal and strictly inside (0, 1) for any parameter values.

This module imports only torch, transformers and ``configuration_mythos``, so it can ship with a checkpoint and be
loaded with ``trust_remote_code=True``.
"""

import copy
import functools
import itertools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.generation import GenerationMixin
from transformers.generation import utils as generation_utils
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.integrations import use_experts_implementation
from transformers.masking_utils import create_causal_mask, create_masks_for_generate
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import (ModelOutput, TransformersKwargs, auto_docstring, can_return_tuple,
                                is_torch_greater_or_equal)
from transformers.utils import logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.import_utils import is_torchdynamo_compiling
from transformers.utils.output_capturing import OutputRecorder, _active_collector, capture_outputs

from .configuration_mythos import MythosConfig

logger = logging.get_logger(__name__)

# A = exp(-exp(x)) is squeezed into [A_MIN, A_MAX]. Both bounds are exactly representable in fp16, bf16 and fp32 and
# lie strictly inside (0, 1), so rounding A to any of those dtypes can never produce 0 or 1.
A_MIN = 2.0**-8
A_MAX = 1.0 - 2.0**-8

# transformers 5.24 renamed the cache argument and output field from `past_key_values` to `cache`. forward() takes
# `cache`, and `deprecate_kwarg` renames `past_key_values` silently (5.23's generate() passes that name); outputs use
# the installed version's field name, which is the one generate() reads back.
CACHE_NAME = "cache" if "cache" in generation_utils.ALL_CACHE_NAMES else "past_key_values"


class MythosRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # all fp32: the same math with the weight applied inside the kernel, two fewer ops per call (decode calls
            # this ~25 times a token)
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
        # x * rsqrt(mean(x^2) + eps) in fp32, as one fused kernel
        normed = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
        return self.weight * normed.to(hidden_states.dtype)


def _frequencies_tensor(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


_frequencies_tensor_cached = functools.lru_cache(maxsize=64)(_frequencies_tensor)


class MythosRotary(nn.Module):
    """RoPE cos/sin tables computed in fp32 from the config on every call.

    There is deliberately no frequency buffer: a buffer would be cast by ``model.to(torch.bfloat16)`` (losing
    precision) and would come back uninitialised from meta-device loading. The frequencies are kept as Python numbers
    instead (the fp32 values of ``1 / theta ** (2i / rope_dim)``, computed once by torch; see :meth:`frequencies`).
    """

    def __init__(self, config: MythosConfig):
        super().__init__()
        self.rope_dim = config.rope_dim
        self.theta = float(config.rope_theta)
        # on the CPU whatever device the model is built on (from_pretrained builds it on the meta device)
        exponent = torch.arange(0, self.rope_dim, 2, dtype=torch.float32, device="cpu") / self.rope_dim
        self.inv_freq = tuple((1.0 / (self.theta**exponent)).tolist())  # fp32 values, exact as Python floats

    def frequencies(self, device: torch.device) -> torch.Tensor:
        """The frequencies as an fp32 tensor on ``device``. A compiled graph holds them as a constant (computed from
        ``theta`` in the graph, inductor inlined the ``pow`` into every kernel reading the tables, once per element of
        every rotated query and key); eager calls reuse one tensor per device, so a GPU step copies nothing from the
        host."""
        if is_torchdynamo_compiling():
            return _frequencies_tensor(self.inv_freq, device)
        return _frequencies_tensor_cached(self.inv_freq, device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.frequencies(x.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, S, D] with cos/sin [B, S, D]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, kv_heads, seq, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None].expand(batch, kv_heads, n_rep, seq, head_dim)
    return hidden_states.reshape(batch, kv_heads * n_rep, seq, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def grouped_decode_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention of one query position, with each key/value head read once by its group of query heads.

    ``query`` [B, H, 1, d]; ``key``/``value`` [B, h, S, d] as cached (not repeated); ``attention_mask`` None, boolean
    (True attends) or additive, broadcastable to [B, 1, 1, S]. Returns ``([B, 1, H, d], None)`` like the attention
    interface. The same arithmetic as sdpa (tested). Used under ``torch.compile`` on the CPU only
    (:func:`decodes_grouped`): there, sdpa's one-query form becomes a reduction that recomputes the rotated query
    (its RoPE cos/sin included) for every block of cached keys and copies each key/value head ``H / h`` times; here
    the query groups are the rows of two batched matmuls, which read each cached key once.
    """
    batch, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)  # head i is group i // (H / h)
    if heads == kv_heads:
        # groups of one row (MHA): inductor lowers a one-row batched matmul on the CPU to the same per-key reduction;
        # a copy of the row keeps it a matmul kernel, for twice the (small) arithmetic
        grouped = torch.cat((grouped, grouped), dim=2)
    scores = torch.matmul(grouped, key.transpose(2, 3)).float() * scaling  # [B, h, H / h, S]
    if attention_mask is not None:
        mask = attention_mask.reshape(attention_mask.shape[0], 1, 1, attention_mask.shape[-1])
        # the dtype's lowest value, not -inf: a row with every key hidden gets finite weights, never NaN
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else (
            scores + mask.float())
    weights = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(weights, value)  # [B, h, H / h, d]
    if heads == kv_heads:
        out = out[:, :, :1]  # the copy's row
    return out.reshape(batch, 1, heads, head_dim), None


def decodes_grouped(query: torch.Tensor, config, training: bool) -> bool:
    """Whether :class:`MythosGQAttention` runs :func:`grouped_decode_attention` instead of sdpa: a compiled CPU call of
    one query position with sdpa chosen, in inference. Eager calls and other devices keep their kernel."""
    return (is_torchdynamo_compiling() and query.device.type == "cpu" and query.shape[2] == 1 and not training
            and config._attn_implementation == "sdpa")


def _attention_interface(config) -> Callable:
    # CODEPATH: "paged|eager" only under continuous batching of an eager model. The attention modules write the paged
    # cache themselves (MythosPagedBatch), and transformers 5.23's paged|eager kernel would write it a second time.
    if config._attn_implementation == "paged|eager":
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)


class MythosGQAttention(nn.Module):
    """Grouped-query attention: ``n_kv_heads`` key/value heads shared by groups of query heads.

    ``layer_idx`` is the KV-cache slot this module writes. The looped block's attention runs once per loop, so it has
    none of its own (``None``) and is given ``layer_idx = loop_cache_slot(config, t)`` on every call.
    """

    def __init__(self, config: MythosConfig, layer_idx: int | None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.dim // config.n_heads
        self.num_heads = config.n_heads
        self.num_key_value_heads = config.n_kv_heads
        self.num_key_value_groups = config.n_heads // config.n_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        self.q_proj = MythosLinear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.k_proj = MythosLinear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = MythosLinear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = MythosLinear(config.n_heads * self.head_dim, config.dim, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, layer_idx=None, active=None,
                shared=None, **kwargs):
        """``active`` (a :class:`MythosActivePositions`) runs the queries of some positions only; see there.
        ``shared`` (a :class:`MythosSharedKV`) gives the looped block's keys/values under ``loop_kv_sharing``."""
        slot = self.layer_idx if layer_idx is None else layer_idx
        if active is not None:
            return self._active_forward(hidden_states, position_embeddings, cache, slot, active, **kwargs)
        batch, seq = hidden_states.shape[:2]
        q = self._heads(self.q_proj(hidden_states), position_embeddings)
        k = self._heads(self.k_proj(hidden_states), position_embeddings)
        v = self._heads(self.v_proj(hidden_states))
        attention = _attention_interface(self.config)
        if shared is not None:
            k, v, attention_mask, attention = shared.keys_values(k, v, attention_mask, attention, q.dtype)
        elif cache is not None:
            k, v = cache.update(k, v, slot)
        # CODEPATH: compiled CPU decode of one position reads each cached key/value head once (grouped queries)
        if decodes_grouped(q, self.config, self.training):
            attention = grouped_decode_attention
        out, weights = attention(
            self, q, k, v, attention_mask,
            dropout=self.config.dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(out.reshape(batch, seq, -1)), weights

    def keys_values(self, hidden_states, position_embeddings):
        """What this attention caches for ``hidden_states`` (normalised): rotated keys and values."""
        return self._heads(self.k_proj(hidden_states), position_embeddings), self._heads(self.v_proj(hidden_states))

    def _heads(self, projected, position_embeddings=None):
        """[B, S, heads * head_dim] -> [B, heads, S, head_dim], rotated when given the cos/sin tables."""
        batch, seq = projected.shape[:2]
        x = projected.view(batch, seq, -1, self.head_dim).transpose(1, 2)
        return x if position_embeddings is None else apply_rotary(x, *position_embeddings)

    def _active_forward(self, hidden_states, position_embeddings, cache, slot, active, **kwargs):
        """Queries and the output projection for the running positions only: returns [running positions, dim]."""
        kv_in, kv_rope = active.kv_inputs(hidden_states, position_embeddings)
        k, v = active.cached(self._heads(self.k_proj(kv_in), kv_rope), self._heads(self.v_proj(kv_in)), cache, slot)
        if active.width == 0:
            return None, None
        q = self._heads(active.pad(self.q_proj(active.gather(hidden_states))), active.query_rope(position_embeddings))
        out, weights = active.attention(self.config)(
            self, q, k, v, active.mask(k.shape[2], q.dtype, self.config),
            dropout=self.config.dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        return self.o_proj(active.unpad(out.reshape(q.shape[0], q.shape[2], -1))), weights


class MythosMLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    The cache holds, per token, the normalised ``kv_lora_rank`` latent (as the "key") and one rope key of
    ``qk_rope_head_dim`` shared by all heads (as the "value"): ``kv_lora_rank + qk_rope_head_dim`` numbers per token
    and layer, independent of the head count. Keys and values are expanded from the latent with ``kv_b_proj``.
    ``layer_idx`` is the cache slot, as in :class:`MythosGQAttention`.
    """

    def __init__(self, config: MythosConfig, layer_idx: int | None):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.n_heads
        self.num_key_value_groups = 1  # keys/values are expanded per head before attention
        self.is_causal = True
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.scaling = self.qk_head_dim**-0.5
        if self.q_lora_rank > 0:
            self.q_a_proj = MythosLinear(config.dim, self.q_lora_rank, bias=False)
            self.q_a_layernorm = MythosRMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = MythosLinear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_proj = MythosLinear(config.dim, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = MythosLinear(config.dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = MythosRMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = MythosLinear(self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim),
                                      bias=False)
        self.o_proj = MythosLinear(self.num_heads * self.v_head_dim, config.dim, bias=False)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache=None, layer_idx=None, active=None,
                shared=None, **kwargs):
        """``active`` (a :class:`MythosActivePositions`) runs the queries of some positions only; see there.
        ``shared`` (a :class:`MythosSharedKV`) gives the looped block's keys/values under ``loop_kv_sharing``."""
        slot = self.layer_idx if layer_idx is None else layer_idx
        if active is not None:
            return self._active_forward(hidden_states, position_embeddings, cache, slot, active, **kwargs)
        q_nope, q_rope = self._queries(hidden_states, position_embeddings)
        latent, k_rope = self._latent(hidden_states, position_embeddings)
        if shared is not None:
            latent, k_rope, attention_mask, kwargs["attention"] = shared.keys_values(
                latent, k_rope, attention_mask, _attention_interface(self.config), q_nope.dtype)
        elif cache is not None:
            latent, k_rope = cache.update(latent, k_rope, slot)
        out, weights = self._attend(q_nope, q_rope, latent, k_rope, attention_mask, **kwargs)
        return self.o_proj(out), weights

    def _queries(self, hidden_states, position_embeddings, project=True):
        """[B, S, dim] states (or, with ``project=False``, their projected queries) -> rotated query heads."""
        batch, seq = hidden_states.shape[:2]
        q = hidden_states
        if project and self.q_lora_rank > 0:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        elif project:
            q = self.q_proj(hidden_states)
        # -1, not num_heads: under tensor parallelism each rank projects only its own heads
        q = q.view(batch, seq, -1, self.qk_head_dim).transpose(1, 2)
        q_nope, q_rope = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rotary(q_rope, *position_embeddings)

    def keys_values(self, hidden_states, position_embeddings):
        """What this attention caches for ``hidden_states`` (normalised): the latent and the rope key."""
        return self._latent(hidden_states, position_embeddings)

    def _latent(self, hidden_states, position_embeddings):
        """The cached pair: the normalised latent [B, 1, S, kv_lora_rank] and the rotated rope key."""
        batch, seq = hidden_states.shape[:2]
        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], -1)
        latent = self.kv_a_layernorm(latent).view(batch, 1, seq, self.kv_lora_rank)
        return latent, apply_rotary(k_rope.view(batch, 1, seq, self.qk_rope_head_dim), *position_embeddings)

    def _attend(self, q_nope, q_rope, latent, k_rope, attention_mask, attention=None, queries=None, **kwargs):
        """Attention output before ``o_proj`` [B, S, heads * v_head_dim]. ``queries``: the call's query count, which
        decides absorbed vs expanded (default: this one's; running positions only are fewer)."""
        batch, _, seq = q_nope.shape[:3]
        # No mask for several queries means SDPA's top-left causal alignment (prefill into an empty static cache);
        # the absorbed path folds heads into query rows, where that alignment would be wrong: expand instead.
        if (seq == 1 or attention_mask is not None) and self._absorb(queries or seq, latent.shape[2]):
            out, weights = self._absorbed_attention(q_nope, q_rope, latent, k_rope, attention_mask, **kwargs)
            return out.reshape(batch, seq, -1), weights

        kv_len = latent.shape[2]
        heads = q_nope.shape[1]  # this rank's heads under tensor parallelism (kv_b_proj is split by head too)
        kv = self.kv_b_proj(latent).view(batch, kv_len, heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        # torch's fused SDPA kernels (CPU flash included) need the value head size to equal the query/key one;
        # otherwise it falls back to the slower math path. Zero columns of v give zero output columns: pad, slice.
        # (flash-attn pads the same way itself, eager pays a few zero columns.)
        pad = self.qk_head_dim - self.v_head_dim
        if pad > 0:
            v = F.pad(v, (0, pad))
        out, weights = (attention or _attention_interface(self.config))(
            self, q, k, v, attention_mask,
            dropout=self.config.dropout if self.training else 0.0, scaling=self.scaling, **kwargs,
        )
        if pad > 0:
            out = out[..., :self.v_head_dim]
        return out.reshape(batch, seq, -1), weights

    def _active_forward(self, hidden_states, position_embeddings, cache, slot, active, **kwargs):
        """Queries and the output projection for the running positions only: returns [running positions, dim]."""
        kv_in, kv_rope = active.kv_inputs(hidden_states, position_embeddings)
        latent, k_rope = active.cached(*self._latent(kv_in, kv_rope), cache, slot)
        if active.width == 0:
            return None, None
        x = active.gather(hidden_states)
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank > 0 else self.q_proj(x)
        q_nope, q_rope = self._queries(active.pad(q), active.query_rope(position_embeddings), project=False)
        mask = active.mask(latent.shape[2], q_nope.dtype, self.config)
        out, weights = self._attend(q_nope, q_rope, latent, k_rope, mask, attention=active.attention(self.config),
                                    queries=hidden_states.shape[1], **kwargs)
        return self.o_proj(active.unpad(out)), weights

    def _absorb(self, q_len: int, kv_len: int) -> bool:
        """Decode against a cache in latent space instead of re-expanding every cached latent each step.

        Only for a plain ``MythosLinear`` or ``nn.Linear`` kv_b_proj: a PEFT-wrapped one carries an adapter delta that
        the folded weight would miss, so it keeps the expanded path.
        """
        return (self.config.mla_absorb and not self.training and q_len < kv_len
                and type(self.kv_b_proj) in (MythosLinear, nn.Linear)
                and self.config._attn_implementation in ("eager", "sdpa"))

    def _absorbed_attention(self, q_nope, q_rope, latent, k_rope, attention_mask, **kwargs):
        """Weight-absorbed MLA (DeepSeek-V2): fold kv_b_proj into the query and the output.

        score = q_nope . (W_uk c) + q_rope . k_rope = (W_uk^T q_nope) . c + q_rope . k_rope, and
        out = sum_j p_j W_uv c_j = W_uv (sum_j p_j c_j). Attention then runs over the cached latents (one shared
        "head" of size kv_lora_rank + qk_rope_head_dim), never expanding the cache.
        """
        batch, heads, seq = q_nope.shape[:3]
        w = self.kv_b_proj.weight
        # Tensor parallelism makes the weight a DTensor sharded by head; this rank's queries are its heads' queries
        # (the `colwise` q projection), so the local shard is exactly the slice to fold in.
        w = w.to_local() if hasattr(w, "to_local") else w
        w = w.view(heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q = torch.cat((torch.matmul(q_nope, w_uk), q_rope), dim=-1)  # [B, H, S, R + rope]
        k = torch.cat((latent, k_rope), dim=-1)  # [B, 1, T, R + rope]
        # Every head reads the same single latent head, so fold the heads into the query rows: one [H*S, T] score
        # matrix per sequence, with no repeat of the latent per head (which eager's repeat_kv would copy H times).
        q = q.reshape(batch, 1, heads * seq, q.shape[-1])
        if attention_mask is not None and seq > 1:
            mask = attention_mask[:, :, None].expand(-1, -1, heads, -1, -1)
            attention_mask = mask.reshape(batch, mask.shape[1], heads * seq, mask.shape[-1])
        # is_causal=False: rows are (head, position) pairs now, so SDPA's own causal alignment would be wrong; the
        # mask (or its absence, when every query may see the whole cache) already says what each row sees.
        out, weights = _attention_interface(self.config)(
            self, q, k, latent, attention_mask, dropout=0.0, scaling=self.scaling, is_causal=False, **kwargs)
        out = torch.matmul(out.reshape(batch, heads, seq, -1), w_uv.transpose(1, 2))  # [B, H, S, V]
        if weights is not None:
            weights = weights.reshape(batch, heads, seq, -1)
        return out.transpose(1, 2), weights


class MythosRowsLayer(DynamicLayer):
    """A loop slot's cache layer that holds only the rows whose loop budget reaches that loop.

    With per-row budgets a row never runs, and never reads, the loops past its budget, so their slots keep no keys
    or values for it: a batch with budgets [1, ..., 8] caches 36 loop slots' worth of rows, not 64. ``rows`` are the
    batch rows held, in batch order. Beam search reorders beams within a batch item, which share a budget, so a
    reorder maps held rows to held rows.
    """

    def __init__(self, rows: tuple[int, ...]):
        super().__init__()
        self.rows = rows

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        held = {row: i for i, row in enumerate(self.rows)}
        super().reorder_cache(torch.tensor([held[int(beam_idx[row])] for row in self.rows], device=beam_idx.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("A cache filled with per-row n_loops cannot be repeated along the batch")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("A cache filled with per-row n_loops cannot select batch rows")


def _rows_write(cache, keys, values, slot, kv_rows, batch, rows_tuple):
    """Write this loop's keys/values, computed for batch rows ``rows_tuple`` only, to loop slot ``slot``: directly
    into a :class:`MythosRowsLayer` that holds exactly those rows, else into the full batch with zeros for the other
    rows. ``kv_rows`` is those rows as an index tensor, or a callable that makes it (only the second way needs it).
    Returns the slot's keys/values for those rows."""
    layer = cache.layers[slot] if slot < len(getattr(cache, "layers", ())) else None
    if isinstance(layer, MythosRowsLayer) and layer.rows == rows_tuple:
        return cache.update(keys, values, slot)
    kv_rows = kv_rows() if callable(kv_rows) else kv_rows
    full_keys = keys.new_zeros((batch, *keys.shape[1:])).index_copy(0, kv_rows, keys)
    full_values = values.new_zeros((batch, *values.shape[1:])).index_copy(0, kv_rows, values)
    keys, values = cache.update(full_keys, full_values, slot)
    return keys.index_select(0, kv_rows), values.index_select(0, kv_rows)


class _RowsCache:
    """The cache as a subset of the batch rows sees it (the attention only calls ``update``)."""

    def __init__(self, cache: Cache, active: "MythosActiveRows", batch: int):
        self.cache, self.active, self.batch = cache, active, batch

    def update(self, keys, values, layer_idx, *args, **kwargs):
        active = self.active
        return _rows_write(self.cache, keys, values, layer_idx, lambda: active.index, self.batch, active.rows_tuple)


class MythosActiveRows:
    """Some batch rows run a loop iteration, all their positions (per-row budgets, no exit criterion): the block
    runs on them as a smaller batch, with their rows of the cos/sin tables, the mask and the cache.

    Rows that form one contiguous run (budgets sorted either way, or any set of neighbours) are taken as slices,
    which are views: no copy on the way in, one concatenation on the way out."""

    def __init__(self, rows: list[int], batch: int, seq: int, position_embeddings, attention_mask, cache, device):
        self.rows_tuple = tuple(rows)
        self.span = slice(rows[0], rows[-1] + 1) if rows[-1] + 1 - rows[0] == len(rows) else None
        self.device = device
        cos, sin = position_embeddings
        self.position_embeddings = (cos, sin) if cos.shape[0] == 1 else (self.take(cos), self.take(sin))
        self.attention_mask = attention_mask
        if attention_mask is not None and attention_mask.shape[0] > 1:
            self.attention_mask = self.take(attention_mask)
        self.cache = None if cache is None else _RowsCache(cache, self, batch)

    @classmethod
    def at_loop(cls, t: int, row_loops: tuple[int, ...], seq: int, position_embeddings, attention_mask, cache,
                device) -> "MythosActiveRows | None":
        """The rows whose budget (``row_loops``) reaches loop ``t``; None when every row does (the plain step)."""
        rows = [row for row, loops in enumerate(row_loops) if loops > t]
        if len(rows) == len(row_loops):
            return None
        return cls(rows, len(row_loops), seq, position_embeddings, attention_mask, cache, device)

    @functools.cached_property
    def index(self) -> torch.Tensor:
        """The running rows as an index tensor (built on first use: slices need none)."""
        return torch.tensor(self.rows_tuple, device=self.device)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The running rows of ``x`` (batch first)."""
        return x[self.span] if self.span is not None else x.index_select(0, self.index)

    def put(self, x: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        """``into`` with its running rows replaced by ``x`` (a new tensor; ``into`` is not written)."""
        x = x.to(into.dtype)
        if self.span is not None:
            return torch.cat([into[:self.span.start], x, into[self.span.stop:]])
        return into.index_copy(0, self.index, x)

    def scatter(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``x`` in the running rows, zeros in the others."""
        return self.put(x, like.new_zeros(like.shape))


class MythosActivePositions:
    """The positions that run one loop iteration when others have stopped (an exit criterion, or a smaller budget).

    The looped block runs queries, attention output and FFN/MoE for these positions only: they are gathered into
    ``[rows, width]`` (``rows`` with any running position, ``width`` the most running positions of one row, shorter
    rows padded and dropped again through ``valid``), run, and scattered back. A stopped position's state is frozen,
    and it still offers keys/values at every later loop, computed from its frozen state with that loop's input
    signal: ``kv_rows`` are the rows whose keys/values this loop writes (with a cache: every row whose budget reaches
    this loop, since later tokens may read them; without one: the rows that have running positions).

    The attention runs with an explicit mask built from cache indices (causal) and the 2-D padding mask, in SDPA (or
    eager, when the model is eager); flash-attention models use SDPA here.
    """

    def __init__(self, run: torch.Tensor, kv_rows: torch.Tensor | None, key_mask: torch.Tensor | None,
                 past_length: int, causal_mask: torch.Tensor | None = None):
        self.run = run
        self.batch = run.shape[0]
        self.flat = run.reshape(-1).nonzero().squeeze(1)  # running positions, row-major: the order of `valid`
        # one position per row (decoding): the running rows, and the call's own mask rows (None: see every key)
        self.decoding = run.shape[1] == 1
        if self.decoding:
            self.rows = self.flat
            self.width = min(1, self.rows.numel())
            self.cols = torch.zeros_like(self.rows)[:, None]
            self.padded_index = torch.arange(self.rows.numel(), device=run.device)
            self.causal_mask = causal_mask
        else:
            counts = run.sum(1)
            self.rows = counts.nonzero().squeeze(1)
            self.width = int(counts.max())
            # running positions first, each row's in position order (stable sort)
            order = torch.sort((~run[self.rows]).to(torch.int8), dim=1, stable=True).indices
            self.cols = order[:, :self.width]
            valid = torch.arange(self.width, device=run.device) < counts[self.rows, None]
            self.padded_index = valid.reshape(-1).nonzero().squeeze(1)  # where each running position sits padded
        self.kv_rows = kv_rows
        if kv_rows is not None:
            self.kv_rows_tuple = tuple(kv_rows.tolist())
            self.rows_in_kv = torch.searchsorted(kv_rows, self.rows)  # both sorted, rows within kv_rows
        self.key_mask = key_mask
        self.past_length = past_length

    def kv_inputs(self, hidden_states, position_embeddings):
        """The states and cos/sin tables of the rows whose keys/values this loop computes."""
        if self.kv_rows is None:
            return hidden_states, position_embeddings
        cos, sin = position_embeddings
        if cos.shape[0] > 1:
            cos, sin = cos[self.kv_rows], sin[self.kv_rows]
        return hidden_states[self.kv_rows], (cos, sin)

    def query_rope(self, position_embeddings):
        """The running positions' cos/sin tables, gathered to [rows, width, rope_dim]."""
        rows, cols = self.rows[:, None], self.cols
        return tuple(table.expand(self.batch, *table.shape[1:])[rows, cols] for table in position_embeddings)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Running positions' entries [n, ...] -> [rows, width, ...], zeros in the padding."""
        if self.decoding:
            return x[:, None]
        padded = x.new_zeros((self.rows.numel() * self.width, *x.shape[1:]))
        padded = padded.index_copy(0, self.padded_index, x)
        return padded.view(self.rows.numel(), self.width, *x.shape[1:])

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[rows, width, ...] -> the running positions' entries [n, ...]."""
        if self.decoding:
            return x[:, 0]
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.padded_index)

    def cached(self, keys, values, cache, slot):
        """Write this loop's keys/values (zeros for rows outside ``kv_rows``) and return those of the query rows."""
        if cache is None:
            return keys, values  # computed for exactly the query rows
        if self.kv_rows is None:
            keys, values = cache.update(keys, values, slot)
            if self.rows.numel() < self.batch:
                keys, values = keys.index_select(0, self.rows), values.index_select(0, self.rows)
            return keys, values
        keys, values = _rows_write(cache, keys, values, slot, self.kv_rows, self.batch, self.kv_rows_tuple)
        if self.rows.numel() < self.kv_rows.numel():  # the query rows' places among the written rows
            keys, values = keys.index_select(0, self.rows_in_kv), values.index_select(0, self.rows_in_kv)
        return keys, values

    def mask(self, kv_len: int, dtype: torch.dtype, config) -> torch.Tensor:
        """[rows, 1, width, kv_len]: the rows of a prepared 4-D mask (generate makes one for a static cache), or one
        built causal by cache index with padding keys hidden. A built mask lets a query always see itself, so no row
        is empty (an empty row gives NaN, and NaN keys would poison every later query)."""
        if self.decoding:
            mask = self.causal_mask
            return mask if mask is None or mask.shape[0] == 1 else mask.index_select(0, self.rows)
        if self.key_mask is not None and self.key_mask.dim() == 4:
            prepared = self.key_mask.expand(self.batch, *self.key_mask.shape[1:])
            return prepared[self.rows[:, None], 0, self.cols][:, None, :, :kv_len]
        query_pos = (self.past_length + self.cols)[..., None]
        keys = torch.arange(kv_len, device=self.cols.device)
        allowed = keys <= query_pos
        if self.key_mask is not None:
            key_mask = self.key_mask[self.rows]
            if key_mask.shape[1] < kv_len:  # a static cache's unused tail (after every query anyway)
                key_mask = F.pad(key_mask, (0, kv_len - key_mask.shape[1]), value=False)
            allowed = allowed & (key_mask[:, None, :kv_len] | (keys == query_pos))
        allowed = allowed[:, None]
        if config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return allowed

    @staticmethod
    def attention(config) -> Callable:
        # CODEPATH: eager or sdpa models run their own kernel here; others (flash-attention) take sdpa's mask path
        if config._attn_implementation in ("eager", "sdpa"):
            return _attention_interface(config)
        return ALL_ATTENTION_FUNCTIONS["sdpa"]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[batch, seq, ...] -> the running positions' entries [n, ...]."""
        return x.reshape(-1, *x.shape[2:])[self.flat]

    def scatter(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The running positions' entries [n, ...] -> zeros shaped ``like`` [batch, seq, ...] holding them."""
        flat = like.new_zeros((like.shape[0] * like.shape[1], *like.shape[2:]))
        return flat.index_copy(0, self.flat, x.to(like.dtype)).view_as(like)


class MythosSharedKV:
    """The keys/values the looped block's attention reads under ``config.loop_kv_sharing`` ("first" or "last").

    A position at loop t attends to the earlier positions' shared keys/values and to its own of loop t (never to its
    own of another loop): the columns are ``[shared (strictly earlier cache indices) | own (the diagonal)]``.

    - ``"first"``: loop 0 attends and writes as without sharing; every later loop reads what loop 0 wrote (the cache
      slot, or loop 0's keys/values when there is no cache).
    - ``"last"``: positions go through the loop one at a time (:meth:`MythosRecurrence._scan`), each reading the
      earlier positions' final keys/values, and writing its own after its last loop.

    ``key_mask`` is the 2-D padding mask [batch, past + seq] or a prepared 4-D mask; ``past_length`` the cached tokens
    before this call; ``offset`` the position within the call that runs now (the scan).
    """

    def __init__(self, config: MythosConfig, cache: Cache | None, key_mask, past_length, n_loops: int):
        self.mode, self.config, self.n_loops = config.loop_kv_sharing, config, n_loops
        self.slot = loop_cache_slot(config, 0)
        self.cache = cache
        self.local = DynamicLayer() if cache is None else None  # "last" without a cache keeps the finals here
        self.key_mask, self.past_length = key_mask, past_length
        self.loop, self.offset = 0, 0
        self.first = None  # "first": loop 0's keys/values (what the slot holds after loop 0)

    def keys_values(self, keys, values, attention_mask, attention, dtype):
        """This loop's ``(keys, values, mask, attention function)`` for the new ``keys``/``values`` [B, h, S, d]."""
        if self.mode == "first" and self.loop == 0:
            if self.cache is not None:
                keys, values = self.cache.update(keys, values, self.slot)
            self.first = (keys, values)
            return keys, values, attention_mask, attention
        if self.mode == "first":
            past_keys, past_values = self.first
        else:
            layer = self.local
            if layer is None:  # a lazy cache adds the slot on its first write
                layer = self.cache.layers[self.slot] if self.slot < len(self.cache.layers) else None
            ready = layer is not None and layer.is_initialized and layer.keys is not None
            past_keys = layer.keys if ready else keys[:, :, :0]
            past_values = layer.values if ready else values[:, :, :0]
        mask = self._mask(keys.shape[0], past_keys.shape[2], keys.shape[2], keys.device, dtype)
        own_keys, own_values = keys, values
        keys, values = torch.cat((past_keys, own_keys), dim=2), torch.cat((past_values, own_values), dim=2)
        if self.mode == "last" and self.loop == self.n_loops - 1:  # after reading the slot: it is updated in place
            if self.cache is not None:
                self.cache.update(own_keys, own_values, self.slot)
            else:
                self.local.update(own_keys, own_values)
        # CODEPATH: eager or sdpa models run their own kernel; others (flash-attention) cannot take this mask
        if self.config._attn_implementation not in ("eager", "sdpa"):
            attention = ALL_ATTENTION_FUNCTIONS["sdpa"]
        return keys, values, mask, attention

    def _mask(self, batch, shared_len, seq, device, dtype):
        """[batch, 1, seq, shared_len + seq]: shared keys at strictly earlier cache indices (padding hidden), then the
        diagonal of the own keys, so no row is ever empty."""
        queries = self.past_length + self.offset + torch.arange(seq, device=device)
        columns = torch.arange(shared_len, device=device)
        allowed = (columns < queries[:, None])[None, None]  # [1, 1, seq, shared_len]
        key_mask = self.key_mask
        if key_mask is not None and key_mask.dim() == 4:
            given = key_mask[:, :, self.offset:self.offset + seq]
            given = given if given.dtype == torch.bool else given == 0  # an additive mask: 0 is "attend"
            if given.shape[-1] < shared_len:
                given = F.pad(given, (0, shared_len - given.shape[-1]), value=False)
            allowed = allowed & given[..., :shared_len]
        elif key_mask is not None:
            if key_mask.shape[1] < shared_len:  # a static cache's unused tail (masked as later anyway)
                key_mask = F.pad(key_mask, (0, shared_len - key_mask.shape[1]), value=False)
            allowed = allowed & key_mask[:, None, None, :shared_len]
        own = torch.eye(seq, dtype=torch.bool, device=device)[None, None]
        allowed = torch.cat((allowed.expand(batch, 1, seq, shared_len), own.expand(batch, 1, seq, seq)), dim=-1)
        if self.config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed


# ------------------------------------------------------------------------------------------------ continuous batching
# transformers' continuous batching (`generate_batch`, `init_continuous_batching`) packs the requests of one step into
# a single row [1, tokens] and keeps their keys/values in a PagedAttentionCache. Everything the looped model needs for
# it lives here: the per-request loop controls (MythosRequestLoops), the paged cache as the attention modules see it
# (MythosPagedBatch) and the running positions of one loop in a packed row (MythosPagedPositions).

_request_calls = itertools.count()  # numbers generate_batch calls, for request ids that never collide

# the keyword arguments continuous batching passes to forward for its cache and kernels (MythosPagedBatch takes them)
PAGED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "read_index", "write_index",
                "block_table", "is_causal", "logits_indices", "logits_processor_args")


def is_paged_cache(cache) -> bool:
    return isinstance(cache, PagedAttentionCache)


def check_paged_support(config: MythosConfig, cb_config=None) -> None:
    """What continuous batching of this model needs, checked before any work: a loop slot per iteration, an explicit
    mask (sdpa or eager), and host-side loop decisions (no CUDA graphs or compile)."""
    if config.loop_kv_sharing != "none":
        raise ValueError(
            f"Continuous batching needs loop_kv_sharing='none' (a paged slot per loop iteration); this model has "
            f"loop_kv_sharing={config.loop_kv_sharing!r}. Use generate(), which supports it.")
    if config._attn_implementation not in ("sdpa", "eager", "paged|eager"):
        raise ValueError(
            f"Continuous batching of this model runs attn_implementation 'sdpa' or 'eager' (its loops choose the "
            f"running requests on the host and attend through an explicit mask); got "
            f"{config._attn_implementation!r}. Call model.set_attn_implementation('sdpa') first.")
    row = 2 * config.num_key_value_heads * config.head_dim  # numbers the paged cache keeps per token and layer
    if config.attn_type == "mla" and config.kv_lora_rank + config.qk_rope_head_dim > row:
        raise ValueError(
            f"The paged cache keeps 2 * n_kv_heads * head_dim = {row} numbers per token and layer, fewer than MLA's "
            f"kv_lora_rank + qk_rope_head_dim = {config.kv_lora_rank + config.qk_rope_head_dim}; raise `n_kv_heads` "
            f"(MLA does not use it otherwise), or use generate()")
    if cb_config is None:
        return
    for name in ("use_cuda_graph", "varlen_compile_config", "decode_compile_config", "default_compile_level",
                 "q_padding_interval_size", "kv_padding_interval_size"):
        if getattr(cb_config, name, None):
            raise ValueError(
                f"ContinuousBatchingConfig.{name}={getattr(cb_config, name)!r} is not supported by this model: each "
                f"loop picks its running requests on the host, which CUDA graphs and compiled steps cannot follow. "
                f"Leave {name} unset.")


class MythosRequestLoops:
    """The loop budget and exit rule of each continuous-batching request, by request id.

    ``default`` applies to every request without an entry; ``init_continuous_batching`` sets it from the generation
    config (``n_loops``, ``exit_criterion``, ``exit_threshold``, as ``generate`` reads them). ``set`` gives one request
    its own, before it is added to the manager::

        model.request_loops.set("r1", n_loops=2)
        manager.add_request(ids, request_id="r1")

    Forked children (``num_return_sequences``) use their parent's entry. Every value is checked when it is set, so a
    bad one is refused before any work.
    """

    def __init__(self, config: MythosConfig, has_halt: bool):
        self.config, self.has_halt = config, has_halt
        self.default: tuple = (None, None, None)
        self.requests: dict[str, tuple] = {}

    def checked(self, n_loops=None, exit_criterion=None, exit_threshold=None) -> tuple:
        """``(n_loops, exit_criterion, exit_threshold)`` checked for the paged cache (None: the model's default)."""
        if n_loops is not None:
            n_loops = _check_n_loops(n_loops, self.config)
            slots = self.config.loop_cache_slots
            if n_loops > slots:
                raise ValueError(
                    f"`n_loops`={n_loops} exceeds the paged cache's loop slots: continuous batching allocates one slot "
                    f"per loop up to max_loop_iters={slots} and cannot grow. Pass n_loops <= {slots}.")
        exit_threshold = _check_exit(exit_criterion, exit_threshold, self.config, True, None, self.has_halt)
        if exit_criterion == "kl":
            raise ValueError(
                "exit_criterion='kl' is not supported by continuous batching (it runs the coda once per loop against "
                "a cache it must not write, which the paged cache cannot do); use 'delta' or 'act', or generate()")
        self.check_scope([exit_criterion])
        return n_loops, exit_criterion, exit_threshold

    def check_scope(self, criteria) -> None:
        """Exit criteria under continuous batching need ``exit_scope="position"``: another scope would wait for other
        requests' tokens in the packed row."""
        if self.config.exit_scope != "position" and any(c is not None for c in criteria):
            raise ValueError(
                f"config.exit_scope={self.config.exit_scope!r} waits for other positions of a row, and "
                f"continuous batching packs many requests into one row; set config.exit_scope='position', or use "
                f"generate()")

    def set(self, request_id: str, n_loops=None, exit_criterion=None, exit_threshold=None) -> None:
        self.requests[request_id] = self.checked(n_loops, exit_criterion, exit_threshold)

    def pop(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def get(self, request_id: str | None) -> tuple:
        if request_id is not None and request_id not in self.requests and "__child#" in request_id:
            request_id = request_id.split("__child#")[0]
        return self.requests.get(request_id, self.default)


def check_request_mix(controls: list[tuple]) -> None:
    """The exit rules that may share a continuous batch: any budgets, and either no criterion, or one criterion kind
    (per-request thresholds). ``"delta"`` requests may share a batch with requests that have none; ``"act"`` requests
    may not (without a criterion the halting head still mixes the loop states, with the config's threshold)."""
    kinds = {criterion for _, criterion, _ in controls}
    if len(kinds - {None}) > 1 or ("act" in kinds and None in kinds):
        raise ValueError(
            f"`exit_criterion` values {sorted(map(str, kinds))} cannot share a continuous batch: requests may mix "
            f"'delta' with None, or all use 'act', with any budgets and thresholds. Run the others in another call.")


class MythosPagedBatch:
    """One forward of continuous batching: its requests packed into one row [1, tokens], over transformers'
    ``PagedAttentionCache``. It is the cache the attention modules call (``update``), and it turns each request's loop
    controls into the forward's :class:`MythosLoopPlan` (one budget per token when they differ).

    Each loop iteration has its own paged layer (``loop_cache_slot``), like every other cache. MLA keeps its latent
    cache: the latent and the rope key of a token are packed into the token's paged key and value rows (the paged
    cache sizes a row from ``num_key_value_heads * head_dim``; MLA uses ``kv_lora_rank + qk_rope_head_dim`` of the
    two rows' numbers, and the rest stays unused). A loop that only some requests run uses ``subset``: a smaller packed
    batch over the same cache.
    """

    def __init__(self, cache, paged_kwargs: dict, attention_mask, config: MythosConfig, cu_q=None, cu_k=None):
        self.paged, self.kwargs, self.mask, self.config = cache, paged_kwargs, attention_mask, config
        allocators = list(cache.cache_allocators.values())
        if len(allocators) != 1 or paged_kwargs.get("block_table") is not None or attention_mask is None:
            raise ValueError(
                "Mythos continuous batching runs full attention with an explicit mask (attn_implementation 'sdpa' or "
                "'eager', no CUDA graphs or compile); this batch came from another paged kernel path")
        self.allocator = allocators[0]
        self.layer_type = self.allocator.layer_type
        self.cu_q = paged_kwargs["cu_seq_lens_q"].tolist() if cu_q is None else cu_q
        self.cu_k = paged_kwargs["cu_seq_lens_k"][self.layer_type].tolist() if cu_k is None else cu_k
        self.rows = (self.allocator.num_key_value_heads, self.allocator.head_dim)  # a token's paged key (and value) row
        device = attention_mask.device
        # which packed sequence each new token and each key column belongs to (a loop selects sequences by these)
        self.token_sequence = self._owners(self.cu_q, device)
        self.key_sequence = self._owners(self.cu_k, device)

    @staticmethod
    def _owners(cu: list[int], device) -> torch.Tensor:
        lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:])], device=device)
        return torch.repeat_interleave(torch.arange(len(cu) - 1, device=device), lengths)

    @classmethod
    def from_forward(cls, cache, attention_mask, config: MythosConfig, kwargs: dict) -> "MythosPagedBatch":
        """Take continuous batching's arguments out of forward's ``kwargs`` (the blocks must not see them)."""
        paged_kwargs = {name: kwargs.pop(name) for name in PAGED_KWARGS if name in kwargs}
        return cls(cache, paged_kwargs, attention_mask, config)

    @property
    def sequences(self) -> int:
        return len(self.cu_q) - 1

    def request_ids(self) -> list[str | None]:
        """The request of each packed sequence: the owner of the cache block its first new token is written to."""
        owner = {block: rid for rid, blocks in self.allocator.block_table.items() for block in blocks}
        write_index = self.kwargs["write_index"][self.allocator.index]
        firsts = write_index[torch.tensor(self.cu_q[:-1], device=write_index.device)].tolist()
        return [owner.get(index // self.allocator.block_physical_stride) for index in firsts]

    def plan(self, requests: MythosRequestLoops, n_loops, criterion, threshold, output_stats) -> "MythosLoopPlan":
        """This forward's loop plan. A value passed to forward itself overrides the requests' defaults."""
        check_paged_support(self.config)
        default = requests.checked(*(given if given is not None else fallback for given, fallback in
                                     zip((n_loops, criterion, threshold), requests.default)))
        ids = self.request_ids() if requests.requests else [None] * self.sequences
        controls = [default if rid is None else requests.get(rid) for rid in ids]
        controls = [(n if n is not None else self.config.default_n_loops, c, t) for n, c, t in controls]
        budgets = [n for n, _, _ in controls]
        requests.checked(max(budgets))  # the config's default depth may exceed the paged loop slots
        check_request_mix(controls)
        requests.check_scope([c for _, c, _ in controls])  # also those registered before exit_scope was changed
        lengths = torch.tensor([self.cu_q[i + 1] - self.cu_q[i] for i in range(self.sequences)])
        kind = next((c for _, c, _ in controls if c is not None), None)
        most = max(budgets)
        budget = None
        if min(budgets) != most:
            budget = torch.repeat_interleave(torch.tensor(budgets), lengths)[None].to(self.mask.device)
        if kind is None:
            given = None
        elif len({t for _, c, t in controls}) == 1:
            given = controls[0][2]
        else:  # per-request thresholds; a request without a criterion never stops early ("delta": change < 0)
            values = [t if c is not None else 0.0 for _, c, t in controls]
            given = torch.repeat_interleave(torch.tensor(values), lengths)[None].to(self.mask.device)
        plan = MythosLoopPlan(most, budget, kind, given, bool(output_stats))
        plan.paged = self
        return plan

    # ------------------------------------------------------------------------------------------- the cache interface
    def update(self, keys, values, layer_idx, *args, **kwargs):
        """Write this call's keys/values [1, heads, tokens, dim] to paged layer ``layer_idx``; return those of every
        token the packed sequences see (cached + new), in the mask's key order."""
        kwargs = dict(self.kwargs)  # PagedAttentionCache.update rewrites the per-layer-type entries in place
        paged_keys, paged_values = self._pack(keys, values)
        paged_keys, paged_values = self.paged.update(paged_keys, paged_values, layer_idx, kwargs)
        return self._unpack(paged_keys, paged_values, keys, values)

    def _fits(self, keys, values) -> bool:
        heads, dim = self.rows
        return tuple(keys.shape[1::2]) == tuple(values.shape[1::2]) == (heads, dim)

    def _pack(self, keys, values):
        """MLA's (latent, rope key) per token -> the paged (key row, value row); GQA's keys/values already fit."""
        if self._fits(keys, values):
            return keys, values
        heads, dim = self.rows
        tokens = keys.shape[2]
        flat = torch.cat([x[0].transpose(0, 1).reshape(tokens, -1) for x in (keys, values)], dim=-1)
        if flat.shape[1] > 2 * heads * dim:
            raise ValueError(
                f"The paged cache holds {2 * heads * dim} numbers per token and layer (2 * num_key_value_heads * "
                f"head_dim), but this attention caches {flat.shape[1]}: raise n_kv_heads, or use generate()")
        flat = F.pad(flat, (0, 2 * heads * dim - flat.shape[1]))
        paged_keys, paged_values = flat.view(tokens, 2, heads, dim).unbind(1)
        return paged_keys.transpose(0, 1)[None], paged_values.transpose(0, 1)[None]

    def _unpack(self, paged_keys, paged_values, keys, values):
        if self._fits(keys, values):
            return paged_keys, paged_values
        tokens = paged_keys.shape[2]
        flat = torch.cat([x[0].transpose(0, 1).reshape(tokens, -1) for x in (paged_keys, paged_values)], dim=-1)
        out, start = [], 0
        for like in (keys, values):
            heads, dim = like.shape[1], like.shape[3]
            out.append(flat[:, start:start + heads * dim].reshape(tokens, heads, dim).transpose(0, 1)[None])
            start += heads * dim
        return tuple(out)

    # ---------------------------------------------------------------------------------------- some requests only
    def subset(self, sequences: list[int]) -> tuple["MythosPagedBatch", torch.Tensor, torch.Tensor]:
        """The same cache as seen by the packed sequences ``sequences`` alone (their write and read indices), and
        their new tokens' and key columns' indices in this batch."""
        chosen = torch.zeros(self.sequences, dtype=torch.bool, device=self.token_sequence.device)
        chosen[sequences] = True
        tokens = chosen[self.token_sequence].nonzero().squeeze(1)
        keys = chosen[self.key_sequence].nonzero().squeeze(1)
        kwargs = dict(self.kwargs)
        kwargs["write_index"] = [index[tokens] for index in kwargs["write_index"]]
        kwargs["read_index"] = [index[keys] if index.numel() else index for index in kwargs["read_index"]]
        cu_q, cu_k = [0], [0]
        for i in sequences:
            cu_q.append(cu_q[-1] + self.cu_q[i + 1] - self.cu_q[i])
            cu_k.append(cu_k[-1] + self.cu_k[i + 1] - self.cu_k[i])
        as_tensor = functools.partial(torch.tensor, dtype=torch.int32, device=tokens.device)
        kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"] = as_tensor(cu_q), {self.layer_type: as_tensor(cu_k)}
        kwargs["max_length_q"] = max(b - a for a, b in zip(cu_q, cu_q[1:]))
        kwargs["max_length_k"] = {self.layer_type: max(b - a for a, b in zip(cu_k, cu_k[1:]))}
        return MythosPagedBatch(self.paged, kwargs, self.mask, self.config, cu_q, cu_k), tokens, keys

    def active(self, run: torch.Tensor, kv_needed: torch.Tensor):
        """The loop's :class:`MythosPagedPositions` (None: every token runs; False: nothing to do). ``kv_needed``
        [1, tokens] is True for the tokens of the requests whose budget reaches this loop."""
        if bool(run.all()):
            return None
        kv_tokens = kv_needed[0, torch.tensor(self.cu_q[:-1], device=run.device)].tolist()
        sequences = [i for i, needed in enumerate(kv_tokens) if needed]
        if not sequences:
            return False
        return MythosPagedPositions(self, run, sequences)


class MythosPagedPositions(MythosActivePositions):
    """The running positions of one loop in a packed continuous batch (see :class:`MythosActivePositions` for what a
    stopped position still contributes). The packed row is one batch row: the running tokens are gathered into
    [1, running], and attend through the rows of the batch's mask; keys/values are written for every token of the
    requests whose budget reaches this loop (``sequences``), through the cache as those requests alone see it."""

    def __init__(self, paged: MythosPagedBatch, run: torch.Tensor, sequences: list[int]):
        # one packed row: none of the parent's per-row bookkeeping applies, so its __init__ is not called
        self.run, self.batch, self.decoding = run, 1, False
        self.flat = run[0].nonzero().squeeze(1)
        self.width = self.flat.numel()
        self.rows = torch.zeros(min(self.width, 1), dtype=torch.long, device=run.device)
        self.mask_rows = paged.mask[:, :, self.flat]
        if len(sequences) == paged.sequences:
            self.kv_cache, self.kv_tokens = paged, None
        else:
            self.kv_cache, self.kv_tokens, key_columns = paged.subset(sequences)
            self.mask_rows = self.mask_rows[..., key_columns]

    def kv_inputs(self, hidden_states, position_embeddings):
        if self.kv_tokens is None:
            return hidden_states, position_embeddings
        return hidden_states[:, self.kv_tokens], tuple(table[:, self.kv_tokens] for table in position_embeddings)

    def query_rope(self, position_embeddings):
        return tuple(table[:, self.flat] for table in position_embeddings)

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return x[None]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        return x[0]

    def cached(self, keys, values, cache, slot):
        return self.kv_cache.update(keys, values, slot)

    def mask(self, kv_len: int, dtype: torch.dtype, config) -> torch.Tensor:
        return self.mask_rows

    @staticmethod
    def attention(config) -> Callable:
        return _attention_interface(config)


def streams_weight(hidden_states: torch.Tensor) -> bool:
    """Whether :class:`MythosLinear` multiplies as ``weight @ x^T``: under ``torch.compile``, on the CPU, for 2-4 rows.

    A batched decode step multiplies a few rows by every weight, which it reads from memory, not from cache (a medium
    model's step reads 88 MB). For such calls MKL's ``x @ weight^T`` read cold weights at 5.6-8.8 GB/s on the
    benchmark's AMD EPYC (1 thread), against 13-19 GB/s for ``weight @ x^T``, which streams the row-major weight. From
    a warm cache the second form is 0-30% slower, and for 1 row or 8 and more they are about even
    (docs/benchmarks.md).
    """
    if not is_torchdynamo_compiling():  # eager calls pay only this check
        return False
    return hidden_states.device.type == "cpu" and 2 <= hidden_states.numel() // hidden_states.shape[-1] <= 4


class MythosLinear(nn.Linear):
    """``nn.Linear`` with the same parameters and checkpoint keys (``isinstance(m, nn.Linear)`` holds, so PEFT, the
    tensor-parallel plans and the optimizers treat it as one), whose compiled CPU forward on 2-4 rows runs
    ``(weight @ x^T)^T`` (:func:`streams_weight`). Tools that match the exact type, such as
    ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear})``, need ``MythosLinear`` named too."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # CODEPATH: compiled CPU decode of 2-4 rows streams the weight; every other call is nn.Linear's
        if streams_weight(input):
            # sizes from the tensors, not in/out_features: a tensor-parallel shard keeps the full sizes there
            flat = input.reshape(-1, input.shape[-1])
            out = torch.mm(self.weight, flat.t()).t()  # x^T as a transposed view: a contiguous copy is 2-7x slower
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)  # autocast runs mm in its dtype; keep the output there
            return out.reshape(*input.shape[:-1], -1)
        return F.linear(input, self.weight, self.bias)


class MythosMLP(nn.Module):
    """Dense SwiGLU feed-forward."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = MythosLinear(dim, hidden, bias=False)
        self.up_proj = MythosLinear(dim, hidden, bias=False)
        self.down_proj = MythosLinear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def loop_cache_slot(config: MythosConfig, loop_idx: int) -> int:
    """The KV-cache slot of loop iteration ``loop_idx``; every slot rule in the package uses this one function.

    Slots are ``[prelude..., coda..., loop 0, loop 1, ...]``: the loop slots come last, so a dynamic cache can simply
    grow when ``n_loops > max_loop_iters``. With ``loop_kv_sharing`` every loop uses the one loop slot.
    """
    # CODEPATH: loop_kv_sharing="none" by default (a slot per loop); "first" / "last" checkpoints share one slot
    return config.prelude_layers + config.coda_layers + (loop_idx if config.loop_kv_sharing == "none" else 0)


def loop_row(table: torch.Tensor, loop_idx: int) -> torch.Tensor:
    """Row ``loop_idx`` of a loop-indexed table (depth-wise LoRA scales, router bias, expert counts).

    Indices past the last row use the last row, so any ``n_loops`` works at inference.
    """
    return table[min(loop_idx, table.shape[0] - 1)]


class MythosTopkRouter(nn.Module):
    """DeepSeek-V3 style router: sigmoid affinities; the correction bias affects expert choice only.

    ``e_score_correction_bias`` is the aux-loss-free balancing bias, one row per loop depth: the router weights are
    shared by every iteration, but the states it sees drift with depth, so each depth is balanced on its own (depths
    past ``max_loop_iters - 1`` use the last row). Training nudges it toward balance after each optimizer step; it
    never receives gradients and never changes the gate weights.
    """

    def __init__(self, config: MythosConfig):
        super().__init__()
        self.top_k = config.n_experts_per_tok
        self.n_experts = config.n_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_experts, config.dim))
        self.e_score_correction_bias = nn.Buffer(torch.zeros(config.max_loop_iters, config.n_experts))
        # Tokens routed to each expert at each loop depth since the last balancing update (training only): the one
        # piece of state a training forward writes. The recurrence adds each loop's counts (`record_load`) outside any
        # checkpointed region, so recomputation never counts twice; `training.update_router_bias` reads and resets
        # it. Integer, so `model.to(dtype)` leaves it exact. Depths past max_loop_iters - 1 count in the last row.
        self.expert_load = nn.Buffer(torch.zeros(config.max_loop_iters, config.n_experts, dtype=torch.long),
                                     persistent=False)

    def _apply(self, fn, recurse=True):
        # `model.to(torch.bfloat16)` / `.half()` would cast the balancing bias too, and a 1e-3 update step rounds away
        # in bf16 once |bias| >= 0.25. Keep it fp32 (with its fp32 values) on whatever device the cast chose.
        bias = self.e_score_correction_bias
        super()._apply(fn, recurse)
        cast = self.e_score_correction_bias
        if bias.dtype == torch.float32 and cast.dtype != torch.float32:
            self.e_score_correction_bias = bias.to(cast.device)
        return self

    @torch.no_grad()
    def record_load(self, top_k_index: torch.Tensor, loop_idx: int, token_mask: torch.Tensor | None = None):
        """Count the routed tokens of loop ``loop_idx``, leaving out padding (``token_mask`` [batch, seq] is 0)."""
        # a scatter-add of fixed shape, not bincount or a boolean index (data-dependent shapes): one compiled graph
        load = loop_row(self.expert_load, loop_idx)
        if token_mask is None:
            counts = torch.ones(top_k_index.numel(), dtype=load.dtype, device=load.device)
        else:
            counts = (token_mask.reshape(-1, 1) != 0).expand(top_k_index.shape).reshape(-1).to(load.dtype)
        load.scatter_add_(0, top_k_index.reshape(-1), counts)

    def forward(self, hidden_states: torch.Tensor, loop_idx: int = 0):
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        scores = router_logits.sigmoid()
        bias = loop_row(self.e_score_correction_bias, loop_idx)
        top_k_index = torch.topk(scores + bias.float(), self.top_k, dim=-1, sorted=False)[1]
        top_k_weights = scores.gather(-1, top_k_index)
        top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, top_k_weights * self.routed_scaling_factor, top_k_index


def grouped_mm_fits(experts: nn.Module) -> bool:
    """Whether torch's ``grouped_mm`` can multiply by these experts' matrices.

    The kernel reads every matrix with a row stride that must be a multiple of 16 bytes: ``dim`` and ``expert_dim``
    must be multiples of 4 numbers in fp32, 8 in bf16/fp16 (the input is cast to the weights' dtype first). Other
    sizes are valid configs, so they fall back to the plain path instead of failing.
    """
    per_16_bytes = max(1, 16 // experts.gate_up_proj.element_size())
    return experts.hidden_dim % per_16_bytes == 0 and experts.intermediate_dim % per_16_bytes == 0


def gathers_under_compile(experts: nn.Module, top_k_index: torch.Tensor) -> bool:
    """Whether a compiled ``grouped_mm`` call runs :meth:`MythosExperts.gathered_forward` instead.

    Under ``torch.compile``, transformers' ``grouped_mm`` runs an opaque per-expert loop of matmuls (with a host
    sync) for weights other than bf16. When the call routes at most ``n_experts`` rows (a decode step, a short
    chunk), a gather of the chosen experts' rows and a reduction does the same arithmetic in code inductor fuses:
    measured on the benchmark's small MLA model (batch 2, 1 CPU thread), the compiled decode step went from 2.1 to
    1.0 ms, 0.57 ms of which had been the loop (docs/benchmarks.md).
    """
    return (is_torchdynamo_compiling() and experts.gate_up_proj.dtype != torch.bfloat16
            and top_k_index.numel() <= experts.num_experts)


# torch.nn.functional.grouped_mm exists, and its CPU kernel takes any alignment, from torch 2.11 on
_CPU_GROUPED_MM_TAKES_ANY_ALIGNMENT = hasattr(F, "grouped_mm") and is_torch_greater_or_equal("2.11", accept_dev=True)


def gathers_rows_by_index_select(experts: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether an eager ``grouped_mm`` call runs :meth:`MythosExperts.sorted_forward` instead of transformers' function.

    transformers sorts the routed rows by expert with ``hidden_states[rows]`` and restores their order with
    ``out[inverse]``. On the CPU that advanced indexing copies rows several times slower than ``index_select`` (a
    [256, 256] fp32 gather of 512 rows alone: 215 against 16 us, 1 thread). The benchmark's small experts call on 256
    tokens went from 1.72 to 1.42 ms (1.22x; 1.04x at the medium size, and 1.01-1.03x with the backward), an estimated
    4% of an eager forward, too little to show above noise in whole-model timings (docs/benchmarks.md). Compiled
    calls keep transformers' function (inductor writes its own gather), and so do expert-parallel shards, whose
    routed ids carry out-of-range sentinels, and torch before 2.11, whose CPU kernel needs 16-byte aligned tensors
    that transformers' function checks for.
    """
    return (not is_torchdynamo_compiling() and hidden_states.device.type == "cpu" and not experts._is_expert_parallel
            and _CPU_GROUPED_MM_TAKES_ANY_ALIGNMENT)


def _grouped_mm_falls_back_when_misaligned(experts_class):
    """Wrap the dispatching ``forward`` made by ``use_experts_implementation``: a ``grouped_mm`` call whose sizes the
    kernel cannot take (``grouped_mm_fits``) runs the plain path, with one warning; a compiled call that routes few
    rows runs the gathered path (``gathers_under_compile``); an eager CPU call runs transformers' arithmetic with
    ``index_select`` gathers (``gathers_rows_by_index_select``)."""
    dispatch = experts_class.forward

    @functools.wraps(dispatch)
    def forward(self, hidden_states, top_k_index, top_k_weights):
        # CODEPATH: compiled decode (few routed rows, non-bf16 weights) gathers; eager calls never do
        if self.config._experts_implementation == "grouped_mm" and gathers_under_compile(self, top_k_index):
            return self.gathered_forward(hidden_states, top_k_index, top_k_weights)
        # CODEPATH: grouped_mm is the default kernel; sizes it cannot take (e.g. dim=30) run the plain path
        if self.config._experts_implementation == "grouped_mm" and not grouped_mm_fits(self):
            logger.warning_once(
                f"grouped_mm needs dim ({self.hidden_dim}) and expert_dim ({self.intermediate_dim}) to be multiples "
                f"of {16 // self.gate_up_proj.element_size()} in {self.gate_up_proj.dtype}; the experts run the plain "
                f"(eager) path instead. Pick such sizes, or set_experts_implementation('eager') to silence this.")
            return self.plain_forward(hidden_states, top_k_index, top_k_weights)
        # CODEPATH: eager grouped_mm on the CPU gathers its routed rows with index_select (sorted_forward)
        if self.config._experts_implementation == "grouped_mm" and gathers_rows_by_index_select(self, hidden_states):
            return self.sorted_forward(hidden_states, top_k_index, top_k_weights)
        return dispatch(self, hidden_states, top_k_index, top_k_weights)

    experts_class.forward = forward
    return experts_class


@_grouped_mm_falls_back_when_misaligned
@use_experts_implementation
class MythosExperts(nn.Module):
    """Routed experts stored as 3-D tensors, so transformers' ``grouped_mm`` / ``batched_mm`` kernels apply.

    ``plain_forward`` is the plain ("eager") path that the fast kernels are tested against, and the one that
    ``grouped_mm`` falls back to for sizes its kernel cannot take.
    """

    def __init__(self, config: MythosConfig):
        super().__init__()
        self.num_experts = config.n_experts
        self.hidden_dim = config.dim
        self.intermediate_dim = config.expert_dim
        self.gate_up_proj = nn.Parameter(torch.empty(config.n_experts, 2 * config.expert_dim, config.dim))
        self.down_proj = nn.Parameter(torch.empty(config.n_experts, config.dim, config.expert_dim))
        self.act_fn = F.silu

    def plain_forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for expert in range(self.num_experts):
            token_idx, slot = torch.where(top_k_index == expert)
            if token_idx.numel() == 0:
                continue
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            expert_out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out.index_add_(0, token_idx, (expert_out * top_k_weights[token_idx, slot, None]).to(out.dtype))
        return out

    def gathered_forward(self, hidden_states, top_k_index, top_k_weights):
        """Each routed row times its own expert's matrices, as a gather and a reduction (no matmul kernel, no host
        sync). The same arithmetic as ``plain_forward`` (tested), and cheap for few rows: it reads
        ``top_k_index.numel()`` expert matrices. Used only under ``torch.compile``, where inductor fuses the gather into
        the reduction (``gathers_under_compile``)."""
        tokens, k = top_k_index.shape
        experts = top_k_index.reshape(-1)
        rows = hidden_states[:, None, :].expand(tokens, k, self.hidden_dim).reshape(tokens * k, self.hidden_dim)
        gate, up = (self.gate_up_proj[experts] * rows[:, None, :]).sum(-1).chunk(2, dim=-1)
        out = (self.down_proj[experts] * (self.act_fn(gate) * up)[:, None, :]).sum(-1)
        return (out.view(tokens, k, self.hidden_dim) * top_k_weights[..., None].to(out.dtype)).sum(1)

    def sorted_forward(self, hidden_states, top_k_index, top_k_weights):
        """transformers' ``grouped_mm`` experts (routed rows sorted by expert, one grouped matmul per projection), with
        the two row gathers as ``index_select`` (``gathers_rows_by_index_select`` says why). The same sort, kernels and
        summation order as transformers' function, so the same values bit for bit (tested, with gradients)."""
        tokens, k = top_k_index.shape
        expert_ids, order = torch.sort(top_k_index.reshape(-1))
        rows = hidden_states.index_select(0, order // k)
        # histc, as transformers counts: a float histogram on the CPU
        counts = torch.histc(expert_ids.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        out = F.grouped_mm(rows.to(self.gate_up_proj.dtype), self.gate_up_proj.transpose(-2, -1), offs=offsets)
        out = self._apply_gate(out)
        out = F.grouped_mm(out.to(self.down_proj.dtype), self.down_proj.transpose(-2, -1), offs=offsets)
        out = out * top_k_weights.reshape(-1).index_select(0, order).unsqueeze(-1)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=order.device)
        out = out.index_select(0, restore).view(tokens, k, -1).sum(dim=1)
        return out.to(hidden_states.dtype)

    forward = plain_forward  # what "eager" runs; use_experts_implementation wraps it into the kernel dispatch


class MythosMoE(nn.Module):
    """Fine-grained routed experts plus always-on shared experts (DeepSeekMoE)."""

    def __init__(self, config: MythosConfig):
        super().__init__()
        self.gate = MythosTopkRouter(config)
        self.experts = MythosExperts(config)
        shared_width = config.n_shared_experts * config.expert_dim * config.n_experts_per_tok
        self.shared_experts = MythosMLP(config.dim, shared_width) if shared_width > 0 else None

    def forward(self, hidden_states: torch.Tensor, loop_idx: int = 0):
        """Returns the FFN output and the routing (router logits [tokens, n_experts], chosen experts [tokens, k])."""
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        router_logits, weights, index = self.gate(flat, loop_idx)
        out = self.experts(flat, index, weights.to(flat.dtype)).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out, (router_logits, index)


class _MythosBlock(GradientCheckpointingLayer):
    """Pre-norm attention + feed-forward, the parts every block shares. Subclasses say what the block returns."""

    def __init__(self, config: MythosConfig, layer_idx: int | None, mlp: nn.Module):
        super().__init__()
        # CODEPATH: attn_type="mla" (every preset, mythos_tiny) or "gqa" (the reasoning demo's looped model)
        attention_cls = MythosMLAttention if config.attn_type == "mla" else MythosGQAttention
        self.input_layernorm = MythosRMSNorm(config.dim, eps=config.rms_norm_eps)
        self.self_attn = attention_cls(config, layer_idx)
        self.post_attention_layernorm = MythosRMSNorm(config.dim, eps=config.rms_norm_eps)
        self.mlp = mlp
        self.dropout = nn.Dropout(config.dropout)

    def _attention_delta(self, hidden_states, position_embeddings, attention_mask, cache, layer_idx, **kwargs):
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache,
                                 layer_idx, **kwargs)
        return self.dropout(attn)


class MythosDecoderLayer(_MythosBlock):
    """A prelude or coda block (dense SwiGLU), run once per forward; it writes KV-cache slot ``layer_idx``."""

    def __init__(self, config: MythosConfig, layer_idx: int):
        super().__init__(config, layer_idx, MythosMLP(config.dim, config.dense_ffn_dim))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        attn = self._attention_delta(hidden_states, position_embeddings, attention_mask, cache, None, **kwargs)
        ffn = self.dropout(self.mlp(self.post_attention_layernorm(hidden_states + attn)))
        return hidden_states + (attn + ffn)  # the block's whole delta, then the residual (as the looped layer adds it)


class MythosLoopLayer(_MythosBlock):
    """The attention + MoE of the shared looped block. It returns its residual delta F_t, never its input plus the
    delta: the injection adds the state (A * h), and adding it here too would count it twice.

    It has no fixed cache slot: the recurrence passes ``layer_idx = loop_cache_slot(config, t)`` on every call. It is
    a class of its own, not a ``MythosDecoderLayer``, so that wrapping by class (FSDP's ``_no_split_modules``) never
    makes it a unit nested inside the recurrence.
    """

    def __init__(self, config: MythosConfig):
        super().__init__(config, None, MythosMoE(config))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, layer_idx=None,
                loop_idx=0, active=None, **kwargs):
        """Returns ``(delta, routing)``; routing is (router logits [tokens, n_experts], chosen experts [tokens, k]).

        With ``active`` (:class:`MythosActivePositions`), only its running positions get a delta: ``delta`` is then
        [running positions, dim] in ``active.flat`` order, or None when none runs (the loop only wrote keys/values).
        """
        if active is None:
            attn = self._attention_delta(hidden_states, position_embeddings, attention_mask, cache, layer_idx,
                                         **kwargs)
            ffn, routing = self.mlp(self.post_attention_layernorm(hidden_states + attn), loop_idx)
            return attn + self.dropout(ffn), routing
        attn, _ = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, None, cache, layer_idx,
                                 active=active, **kwargs)
        if attn is None:
            return None, None
        attn = self.dropout(attn)
        ffn, routing = self.mlp(self.post_attention_layernorm(active.gather(hidden_states) + attn), loop_idx)
        return attn + self.dropout(ffn), routing


def write_frozen_keys_values(layer: "MythosLoopLayer", states, position_embeddings, cache, slots, rows) -> None:
    """Write the keys/values of stopped positions for several loop slots in one projection: ``states`` [loops, batch,
    seq, dim] are the block inputs of loops ``slots`` (frozen state + that loop's signal); ``rows[i]`` the batch rows
    slot ``slots[i]`` takes (None: all). This is what those loops would write one by one, when no position runs them.
    """
    loops, batch = states.shape[:2]
    cos, sin = position_embeddings
    if cos.shape[0] > 1:
        cos, sin = cos.repeat(loops, 1, 1), sin.repeat(loops, 1, 1)
    keys, values = layer.self_attn.keys_values(layer.input_layernorm(states.flatten(0, 1)), (cos, sin))
    for i, (slot, slot_rows) in enumerate(zip(slots, rows)):
        k, v = keys[i * batch:(i + 1) * batch], values[i * batch:(i + 1) * batch]
        if slot_rows is None:
            cache.update(k, v, slot)
        else:
            _rows_write(cache, k.index_select(0, slot_rows), v.index_select(0, slot_rows), slot, slot_rows, batch,
                        tuple(slot_rows.tolist()))


class MythosInjection(nn.Module):
    """Stable diagonal input injection (Parcae): A = exp(dt * A_c), A_c = -exp(log_A), dt = exp(log_dt).

    A is computed in fp32 and squeezed into [A_MIN, A_MAX] (both strictly inside (0, 1) in fp16/bf16/fp32), so the
    spectral radius is below 1 whatever values the parameters take, NaN and +-inf included: +-inf give the limits
    (A_MIN, A_MAX), and a NaN exponent (a NaN parameter, or inf - inf) counts as 0, i.e. A = exp(-1) squeezed.
    B is a learned diagonal. With ``state_norm`` (``config.loop_state_norm``) the next state is rescaled to the
    root-mean-square of ``e`` at each position, so its size does not drift with the loop count.
    """

    def __init__(self, dim: int, state_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        self.log_A = nn.Parameter(torch.zeros(dim))
        self.log_dt = nn.Parameter(torch.zeros(1))
        self.B = nn.Parameter(torch.full((dim,), 0.1))
        self.state_norm, self.eps = state_norm, eps

    def get_A(self) -> torch.Tensor:
        # clamp passes NaN through, so replace it first (+-inf are clamped like any large value)
        exponent = torch.nan_to_num(self.log_dt.float() + self.log_A.float(), nan=0.0)
        rate = torch.exp(exponent.clamp(-30.0, 30.0))
        decay = torch.exp(-rate)
        return (A_MIN + (A_MAX - A_MIN) * decay).clamp(A_MIN, A_MAX)

    def forward(self, h, e, delta, run=None):
        """The next state; positions where ``run`` [batch, seq] is False keep ``h`` (they have stopped)."""
        A = self.get_A().to(h.dtype)
        h_next = A * h + self.B.to(h.dtype) * e + delta
        # CODEPATH: loop_state_norm=False by default; the pointer-chasing demo's --loop-state-norm turns it on
        if self.state_norm:
            scale = (e.float().pow(2).mean(-1, keepdim=True) + self.eps).sqrt()
            h_next = (h_next.float() * torch.rsqrt(h_next.float().pow(2).mean(-1, keepdim=True) + self.eps)
                      * scale).to(h.dtype)
        return h_next if run is None else torch.where(run[..., None], h_next, h)


class MythosDepthLoRA(nn.Module):
    """Depth-wise LoRA (Relaxed Recursive Transformers): shared down/up projections with a per-loop scale vector.

    Loop indices past ``max_loop_iters - 1`` reuse the last scale, so any ``n_loops`` works at inference.
    ``up`` starts at zero, so the adapter is an exact no-op at initialisation.
    """

    def __init__(self, config: MythosConfig):
        super().__init__()
        self.down = nn.Parameter(torch.empty(config.lora_rank, config.dim))
        self.up = nn.Parameter(torch.zeros(config.dim, config.lora_rank))
        self.scale = nn.Parameter(torch.ones(config.max_loop_iters, config.lora_rank))

    def forward(self, x: torch.Tensor, loop_idx: int) -> torch.Tensor:
        scale = loop_row(self.scale, loop_idx)
        return F.linear(F.linear(x, self.down) * scale.to(x.dtype), self.up)


class MythosHalting(nn.Module):
    """ACT halting head: per-position probability of stopping after this loop, computed in fp32.

    The learned logit is read relative to the call's loop budget: the fixed offset
    ``log(max_loop_iters - 1) - log(n_loops - 1)`` is added, so the initial bias (p = 1/max_loop_iters) gives
    p = 1/n_loops for any ``n_loops``, and at ``n_loops = max_loop_iters`` the offset is zero. A fixed prior would
    exhaust the halting mass after about ``max_loop_iters`` loops and make every larger ``n_loops`` a no-op.
    """

    def __init__(self, config: MythosConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.dim))
        self.bias = nn.Parameter(torch.zeros(1))
        self.max_loop_iters = config.max_loop_iters

    def forward(self, h: torch.Tensor, n_loops: int | torch.Tensor) -> torch.Tensor:
        """``n_loops``: the budget, one int or one per position ([batch, seq])."""
        return self.probability(h, self.offset(n_loops))

    def offset(self, n_loops: int | torch.Tensor) -> float | torch.Tensor:
        """The logit offset for budget ``n_loops`` (see the class docstring)."""
        if isinstance(n_loops, torch.Tensor):
            return math.log(max(self.max_loop_iters - 1, 1)) - (n_loops - 1).clamp(min=1).float().log()
        return math.log(max(self.max_loop_iters - 1, 1)) - math.log(max(n_loops - 1, 1))

    def probability(self, h: torch.Tensor, offset: float | torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(h.float() @ self.weight.float() + self.bias.float() + offset)


def _loop_embedding(loop_idx: int, dim: int, device: torch.device) -> torch.Tensor:
    """Unit-RMS sinusoidal embedding of a loop index (fp32). It depends on nothing learned: eager calls reuse one
    tensor per (loop, dim, device); a compiled graph computes it from constants (dynamo refuses an lru_cache)."""
    if is_torchdynamo_compiling():
        return _loop_embedding_uncached(loop_idx, dim, device)
    return _loop_embedding_cached(loop_idx, dim, device)


def _loop_embedding_uncached(loop_idx: int, dim: int, device: torch.device) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / max(half, 1))
    angles = loop_idx * freqs
    emb = torch.cat((angles.sin(), angles.cos()), dim=-1)
    if emb.shape[-1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[-1]))
    return (emb / emb.pow(2).mean().sqrt()).float().to(device)


_loop_embedding_cached = functools.lru_cache(maxsize=256)(_loop_embedding_uncached)


def loop_signal(x: torch.Tensor, loop_idx: int, scale: float) -> torch.Tensor:
    """Sinusoidal embedding of the loop index, with RMS equal to ``scale`` times the RMS of ``x`` per position.

    The reference adds a fixed-norm signal that swamps a small hidden state (and collapses the MoE router); a signal
    relative to the state cannot.
    """
    rms = x.float().pow(2).mean(-1, keepdim=True).sqrt()
    return (scale * rms * _loop_embedding(loop_idx, x.shape[-1], x.device)).to(x.dtype)


class MythosHaltingState:
    """ACT bookkeeping over the loop, per position: the running mix of loop states, the halting mass spent, whether
    the position still runs, and the ponder cost (loops used plus the remainder).

    The last loop takes the remainder, so the mixing weights of every position sum to 1.
    """

    def __init__(self, h: torch.Tensor):
        self.mixed = torch.zeros_like(h)
        self.cumulative = torch.zeros(h.shape[:-1], device=h.device, dtype=torch.float32)
        self.running = torch.ones_like(self.cumulative)
        self.ponder = torch.zeros_like(self.cumulative)

    def update(self, h: torch.Tensor, p: torch.Tensor, threshold: float, last: bool | torch.Tensor) -> torch.Tensor:
        """Mix in loop state ``h``; ``last`` (one bool, or one per position) forces a halt. Returns the positions
        that halt at this loop (and were still running)."""
        remainder = 1.0 - self.cumulative
        halts_now = (self.cumulative + p >= threshold) | last
        weight = torch.where(halts_now, remainder, p) * self.running
        self.mixed = self.mixed + weight.unsqueeze(-1).to(h.dtype) * h
        self.ponder = self.ponder + self.running * torch.where(halts_now, 1.0 + remainder, torch.ones_like(p))
        self.cumulative = self.cumulative + weight
        halted = halts_now & self.running.bool()
        self.running = self.running * (~halts_now).float()
        return halted


EXIT_CRITERIA = ("act", "delta", "kl")
# forward's loop controls that a GenerationConfig may carry (see MythosForCausalLM._prepare_generation_config)
GENERATION_LOOP_FIELDS = ("n_loops", "exit_criterion", "exit_threshold")


class MythosLoopPlan:
    """How one forward loops (built by ``MythosModel.forward`` from its arguments, after they are checked).

    ``n_loops`` is the most loops any position may run. ``budget`` [batch, seq] gives each position its own (None:
    every position ``n_loops``). ``criterion`` / ``threshold`` stop a position earlier (see ``MythosExitRule``);
    ``probe`` maps a loop state [batch, seq, dim] and flat position indices to log-probabilities (the ``"kl"`` rule).
    ``key_mask`` is the 2-D padding mask [batch, past + seq] or a prepared 4-D mask, ``past_length`` the cached tokens
    before this call.
    """

    def __init__(self, n_loops: int, budget: torch.Tensor | None = None, criterion: str | None = None,
                 threshold: float | None = None, output_stats: bool = False, past_length: int = 0):
        self.n_loops, self.budget, self.criterion, self.threshold = n_loops, budget, criterion, threshold
        self.output_stats, self.past_length = output_stats, past_length
        self.probe: Callable | None = None
        self.key_mask: torch.Tensor | None = None
        self.row_loops: tuple[int, ...] | None = None  # per-row budgets, known on the host
        self.paged: MythosPagedBatch | None = None  # continuous batching: the packed requests and their cache

    @property
    def rows_only(self) -> bool:
        """Whole rows stop together (per-row budgets, no exit criterion): the block can run on a row subset."""
        return self.criterion is None and self.row_loops is not None

    @property
    def adaptive(self) -> bool:
        return self.budget is not None or self.criterion is not None


@auto_docstring
@dataclass
class MythosLoopStats(ModelOutput):
    r"""
    Per-loop statistics of one forward (``output_loop_stats=True``); L is the most loops any position could run.

    active (`torch.BoolTensor` of shape `(L, batch_size, sequence_length)`):
        Whether each position ran loop t.
    state_change (`torch.FloatTensor` of shape `(L, batch_size, sequence_length)`):
        Relative change of the state at loop t, ||h_{t+1} - h_t|| / ||h_{t+1}||; NaN where the position did not run.
    halting_probs (`torch.FloatTensor` of shape `(L, batch_size, sequence_length)`, *optional*):
        The halting head's probability at loop t (models with ``use_act``); NaN where the position did not run.
    kl (`torch.FloatTensor` of shape `(L, batch_size, sequence_length)`, *optional*):
        KL(p_t || p_{t-1}) of successive loops' next-token distributions (``exit_criterion="kl"`` only); NaN at
        t = 0 and where the position did not run.
    expert_counts (`torch.LongTensor` of shape `(L, n_experts)`):
        Routed (token, expert) choices at loop t, padding left out.
    processed (`torch.LongTensor` of shape `(L,)`):
        Positions whose query, attention and FFN/MoE ran at loop t.
    spectral_radius (`float`):
        rho(A) of the injection.
    """

    active: torch.BoolTensor | None = None
    state_change: torch.FloatTensor | None = None
    halting_probs: torch.FloatTensor | None = None
    kl: torch.FloatTensor | None = None
    expert_counts: torch.LongTensor | None = None
    processed: torch.LongTensor | None = None
    spectral_radius: float | None = None


def relative_change(h: torch.Tensor, h_next: torch.Tensor) -> torch.Tensor:
    """||h_next - h|| / ||h_next|| per position, in fp32."""
    return (h_next - h).float().norm(dim=-1) / h_next.float().norm(dim=-1).clamp_min(1e-12)


class MythosExitRule:
    """Decides, after each loop, which running positions stop, and keeps the per-loop statistics.

    - ``"act"``: the halting mass (ACT, :class:`MythosHaltingState`) reaches the threshold.
    - ``"delta"``: the relative state change of this loop falls below the threshold.
    - ``"kl"``: KL(p_t || p_{t-1}) between this and the previous loop's next-token distributions falls below the
      threshold (so it stops after 2 loops at the earliest). p_t comes from the coda, norm and head on the loop
      state: the distribution the model would give if the position stopped now.
    A position also stops at its budget. The halting head (``use_act`` models) mixes the loop states as in training,
    with every stop taking the remaining mass.
    """

    def __init__(self, recurrence, plan: MythosLoopPlan, budget: torch.Tensor, e: torch.Tensor, token_mask=None):
        self.halt, self.plan, self.budget = recurrence.halt, plan, budget
        # CODEPATH: exit_scope="position" by default; "prefix" / "row" wait for other positions of the row
        self.scope = recurrence.config.exit_scope if plan.criterion in ("delta", "kl") else "position"
        self.padding = None if token_mask is None else ~token_mask.bool()
        self.n_experts = recurrence.config.n_experts
        self.act_threshold = plan.threshold if plan.criterion == "act" else recurrence.config.act_threshold
        self.halting = MythosHaltingState(e) if self.halt is not None else None
        self.previous = None  # log-probabilities of the last loop (kl)
        self.records = {name: [] for name in ("active", "state_change", "halting_probs", "kl", "expert_counts")}

    def update(self, t: int, h, h_next, run, chosen, chosen_mask) -> torch.Tensor:
        """The positions (of those in ``run``) that stop after loop ``t``. ``chosen`` [n, k] are the experts picked
        at this loop (None when no position ran), ``chosen_mask`` [n] which of them count (not padding). None:
        nothing to decide or record (per-row budgets only)."""
        if self.plan.criterion is None and self.halting is None and not self.plan.output_stats:
            return None
        keeps_nan = self.plan.output_stats or self.plan.criterion == "kl"
        nan = torch.full(run.shape, float("nan"), device=run.device) if keeps_nan else None
        stop = torch.zeros_like(run)
        change = relative_change(h, h_next) if self.plan.criterion == "delta" or self.plan.output_stats else None
        if self.plan.criterion == "delta":
            stop = run & (change < self.plan.threshold)
        kl = self._kl(h_next, run, nan) if self.plan.criterion == "kl" else None
        if kl is not None:
            stop = run & (kl < self.plan.threshold)
        if self.scope != "position":
            stop = self._after_context(t, run, stop)
        p = None
        if self.halting is not None:
            p = self.halt(h_next, self.budget)
            halted = self.halting.update(h_next, p, self.act_threshold, (self.budget == t + 1) | stop)
            if self.plan.criterion == "act":
                stop = halted & run
        if self.plan.output_stats:
            records = self.records
            records["active"].append(run)
            records["state_change"].append(torch.where(run, change, nan))
            records["halting_probs"].append(None if p is None else torch.where(run, p, nan))
            records["kl"].append(kl)
            counts = torch.zeros(self.n_experts, dtype=torch.long, device=run.device)
            if chosen is not None:
                chosen = chosen if chosen_mask is None else chosen[chosen_mask]
                counts = torch.bincount(chosen.flatten(), minlength=self.n_experts)
            records["expert_counts"].append(counts)
        return stop

    def _after_context(self, t: int, run, stop):
        """Of ``stop``, the positions whose earlier positions (``exit_scope="prefix"``) or whose whole row (``"row"``)
        are done after loop ``t``: stopped before, stopping now, at the end of their budget, or padding."""
        done = ~run | stop | (self.budget <= t + 1)
        if self.padding is not None:
            done = done | self.padding
        if self.scope == "row":
            return stop & done.all(dim=1, keepdim=True)
        return stop & done.to(torch.uint8).cummin(dim=1).values.bool()

    def _kl(self, h_next, run, nan):
        flat = run.reshape(-1).nonzero().squeeze(1)
        if flat.numel() == 0:
            return nan
        logp = self.plan.probe(h_next, flat)
        kl = nan.clone()
        if self.previous is not None:
            # >= 0 exactly: rounding gave -4e-7 for equal distributions, which stopped even exit_threshold=0
            values = (logp.exp() * (logp - self.previous[flat])).sum(-1).clamp_min(0)
            kl.view(-1).index_copy_(0, flat, values.float())
        else:
            self.previous = logp.new_zeros(run.numel(), logp.shape[-1])
        self.previous.index_copy_(0, flat, logp)
        return kl

    def output(self, h):
        """The state handed to the coda: the ACT mix (``use_act`` models) or the final (frozen) states."""
        return h if self.halting is None else self.halting.mixed

    def stats(self, rho: float) -> MythosLoopStats | None:
        if not self.plan.output_stats:
            return None
        stack = {name: torch.stack(v) if v and v[0] is not None else None for name, v in self.records.items()}
        return MythosLoopStats(**stack, processed=stack["active"].flatten(1).sum(1), spectral_radius=rho)


@auto_docstring
@dataclass
class MythosRecurrenceOutput(ModelOutput):
    r"""
    What the loop hands to the coda.

    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        The final loop state (the ACT mix of the loop states when halting).
    ponder_cost (`torch.FloatTensor`, *optional*):
        Mean ACT ponder cost (loops used plus the remainder) when ``use_act`` is on.
    aux_loss (`torch.FloatTensor`, *optional*):
        Sequence-level expert-balance loss (training with ``router_aux_loss_coef > 0``).
    loops_used (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
        Loops each position ran.
    loop_stats (`MythosLoopStats`, *optional*):
        Per-loop statistics (``output_loop_stats=True``).
    """

    last_hidden_state: torch.FloatTensor | None = None
    ponder_cost: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    loops_used: torch.LongTensor | None = None
    loop_stats: MythosLoopStats | None = None


def token_exchange_group(config: MythosConfig, experts: nn.Module):
    """The process group whose ranks send tokens to each other's experts while each holds a batch of its own (expert
    parallelism with ``ep_size > tp_size``), or None. Every rank of it must join every expert call's all-to-all."""
    layout = getattr(config, "distributed_config", None)  # set by from_pretrained(distributed_config=...)
    if layout is None or layout.ep_size <= layout.tp_size:
        return None
    mesh = getattr(getattr(experts, "gate_up_proj", None), "device_mesh", None)  # the experts' DTensor mesh
    if mesh is None or "ep" not in (mesh.mesh_dim_names or ()):
        return None
    return mesh["ep"].get_group()


def check_scan_lengths_agree(config: MythosConfig, experts: nn.Module, seq: int, n_loops: int, device) -> None:
    """``loop_kv_sharing="last"`` runs a call's positions through the loop one at a time, so a rank calls the experts
    ``seq * n_loops`` times. Ranks that exchange tokens with each other's experts must make the same number of calls,
    or the all-to-all waits forever: every rank checks the group's lengths and loop counts first (one all-reduce),
    and all raise the same error."""
    group = token_exchange_group(config, experts)
    if group is None:
        return
    import torch.distributed as dist  # only reached under a distributed_config

    sizes = torch.tensor([seq, -seq, n_loops, -n_loops], device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
    longest, shortest, most, fewest = int(sizes[0]), -int(sizes[1]), int(sizes[2]), -int(sizes[3])
    if longest != shortest or most != fewest:
        layout = config.distributed_config
        raise ValueError(
            f"loop_kv_sharing='last' runs a call's positions through the loop one at a time, so every rank of the "
            f"expert-parallel group must pass inputs of one length and one n_loops; this model's ranks hold different "
            f"batches (ep_size={layout.ep_size} > tp_size={layout.tp_size}) and got {shortest} to {longest} positions "
            f"and n_loops {fewest} to {most}. Pad every rank's input_ids to the same length (for example "
            f"padding='max_length') and pass one n_loops, or use a model with loop_kv_sharing='first' or 'none'.")


class MythosRecurrence(nn.Module):
    """The loop, and everything about looping: h_{t+1} = A * h_t + B * e + F_t(h_t + e + signal_t), for t < n_loops.

    It owns the loop body and its order of operations (:meth:`step`), the binding of a KV cache to ``n_loops``
    (:meth:`bind_cache`), truncated backprop through depth, the halting state and per-loop routing statistics. The
    same weights serve every iteration; loop-indexed parameters use :func:`loop_row` and cache slots
    :func:`loop_cache_slot`.

    This module is one FSDP unit: its weights are gathered when it is called, once per forward, whatever ``n_loops``
    is. Activation checkpointing applies to the inner layer (attention + MoE, nearly all the compute); the cheap
    injection, depth-wise LoRA and loop signal are not recomputed.
    """

    def __init__(self, config: MythosConfig):
        super().__init__()
        self.config = config
        self.layer = MythosLoopLayer(config)
        self.injection = MythosInjection(config.dim, config.loop_state_norm, config.rms_norm_eps)
        # CODEPATH: lora_rank > 0 in every preset; lora_rank=0 checkpoints have no depth-wise LoRA
        self.lora = MythosDepthLoRA(config) if config.lora_rank > 0 else None
        # CODEPATH: use_act=False by default; use_act=True checkpoints carry the halting head (ACT)
        self.halt = MythosHalting(config) if config.use_act else None

    def bind_cache(self, cache: Cache, n_loops: int | tuple[int, ...]) -> None:
        """Bind ``cache`` to ``n_loops`` (one int, or one per row) and make sure it has a slot for every loop."""
        used = getattr(cache, "mythos_n_loops", None)
        # the cache's length last: a StaticCache's is a tensor, and reading it is a host sync
        if used is not None and _per_row(used, n_loops) != _per_row(n_loops, used) and cache.get_seq_length() > 0:
            raise ValueError(
                f"This cache was filled with n_loops={_loops_text(used)}; it cannot serve n_loops={_loops_text(n_loops)}"
                f" because loop iterations past a row's first budget would see a different history. Pass "
                f"n_loops={_loops_text(used)}, or start a new cache (cache=None).")
        most = max(n_loops) if isinstance(n_loops, tuple) else n_loops
        needed = loop_cache_slot(self.config, most - 1) + 1
        layers = getattr(cache, "layers", None)
        if layers is not None and getattr(cache, "layer_class_to_replicate", None) is None and len(layers) < needed:
            if not all(type(layer) is DynamicLayer for layer in layers):
                raise ValueError(
                    f"n_loops={most} needs {needed} cache slots but this {type(cache).__name__} has {len(layers)} "
                    f"(config.num_hidden_layers). Use a DynamicCache, or n_loops <= "
                    f"{len(layers) - loop_cache_slot(self.config, 0)}.")
            layers.extend(DynamicLayer() for _ in range(needed - len(layers)))
        if isinstance(n_loops, tuple) and layers is not None and cache.get_seq_length() == 0:
            self._hold_rows_per_loop(cache, n_loops)
        if used != n_loops:
            cache.mythos_n_loops = n_loops

    def _hold_rows_per_loop(self, cache: Cache, row_loops: tuple[int, ...]) -> None:
        """In a new dynamic cache, make each loop slot a :class:`MythosRowsLayer` holding only the rows that run it."""
        layers = cache.layers
        for t in range(max(row_loops)):
            slot = loop_cache_slot(self.config, t)
            rows = tuple(row for row, loops in enumerate(row_loops) if loops > t)
            while len(layers) <= slot and getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
                layers.append(DynamicLayer())
            if len(rows) < len(row_loops) and slot < len(layers) and type(layers[slot]) is DynamicLayer \
                    and not layers[slot].is_initialized:
                layers[slot] = MythosRowsLayer(rows)

    def step(self, h, e, loop_idx, position_embeddings=None, attention_mask=None, cache=None, active=None, shared=None,
             **kwargs):
        """One iteration: returns ``(h_next, routing)``. The block sees ``h + e`` plus the loop-index signal.

        With ``active`` (:class:`MythosActiveRows` or :class:`MythosActivePositions`) only its rows or positions
        move; routing then covers them alone (and is None when none runs).
        """
        x = h + e
        # CODEPATH: loop_signal_scale=0.1 by default; 0 turns the loop-index signal off (an ablation)
        if self.config.loop_signal_scale > 0:
            x = x + loop_signal(x, loop_idx, self.config.loop_signal_scale)
        if isinstance(active, MythosActiveRows):
            x, position_embeddings, attention_mask, cache = (
                active.take(x), active.position_embeddings, active.attention_mask, active.cache)
        # the hidden state positional and the rest by keyword, as GradientCheckpointingLayer requires
        delta, routing = self.layer(x, position_embeddings=position_embeddings, attention_mask=attention_mask,
                                    cache=cache, layer_idx=loop_cache_slot(self.config, loop_idx), loop_idx=loop_idx,
                                    active=active if isinstance(active, MythosActivePositions) else None,
                                    **({} if shared is None else {"shared": shared}), **kwargs)
        if delta is None:
            return h, None
        if self.lora is not None:
            delta = delta + self.lora(delta, loop_idx)
        if isinstance(active, MythosActiveRows):  # the finished rows keep their state
            return active.put(self.injection(active.take(h), active.take(e), delta), h), routing
        if active is not None:
            return self.injection(h, e, active.scatter(delta, h), run=active.run), routing
        return self.injection(h, e, delta), routing

    def forward(self, e, n_loops, position_embeddings=None, attention_mask=None, cache=None, token_mask=None,
                **kwargs) -> MythosRecurrenceOutput:
        """Run ``n_loops`` iterations from ``h_0 = e``. ``token_mask`` [batch, seq] (0 = padding) keeps padding out
        of the expert counts, the balance loss and the ponder cost. ``n_loops`` is an int or a
        :class:`MythosLoopPlan` (per-position budgets, an exit criterion, statistics).

        Truncated backprop (Huginn): in training with ``backprop_loops``, only the last ``backprop_loops`` iterations
        build a graph. The halting probability always builds one: the halting head's gradient is not truncated.
        """
        plan = n_loops if isinstance(n_loops, MythosLoopPlan) else MythosLoopPlan(n_loops)
        if plan.adaptive or plan.output_stats:
            return self._adaptive_forward(e, plan, position_embeddings, attention_mask, cache, token_mask, **kwargs)
        n_loops, shared = plan.n_loops, None
        # CODEPATH: loop_kv_sharing="none" by default; "first" / "last" read one shared loop slot
        if self.config.loop_kv_sharing != "none":
            shared = MythosSharedKV(self.config, cache, plan.key_mask, plan.past_length, n_loops)
            # CODEPATH: loop_kv_sharing="last" checkpoints check that ranks exchanging tokens pass one length
            if self.config.loop_kv_sharing == "last":
                check_scan_lengths_agree(self.config, self.layer.mlp.experts, e.shape[1], plan.n_loops, e.device)
            # CODEPATH: loop_kv_sharing="last" checkpoints run a call of several positions one position at a time
            if self.config.loop_kv_sharing == "last" and e.shape[1] > 1:
                return self._scan(e, shared, position_embeddings, token_mask, **kwargs)
        h, halting, routing = self._loops(e, n_loops, position_embeddings, attention_mask, cache, shared, **kwargs)
        aux_losses = self._count_routing(routing, token_mask, e.shape[0], self._no_grad_loops(n_loops))
        loops_used = torch.full(e.shape[:2], n_loops, dtype=torch.long, device=e.device)
        return self._output(h if halting is None else halting.mixed, halting, token_mask, aux_losses, loops_used)

    def _loops(self, e, n_loops, position_embeddings, attention_mask, cache, shared, **kwargs):
        """The fixed-depth loop: returns the last state, the halting state (or None) and, in training, every loop's
        routing (router logits, chosen experts)."""
        no_grad_loops = self._no_grad_loops(n_loops)
        halting = MythosHaltingState(e) if self.halt is not None else None
        routing = []
        h = e
        for t in range(n_loops):
            if shared is not None:
                shared.loop = t
            with torch.set_grad_enabled(t >= no_grad_loops and torch.is_grad_enabled()):
                h, route = self.step(h, e, t, position_embeddings, attention_mask, cache, shared=shared, **kwargs)
            if self.training:
                routing.append(route)
            if halting is not None:
                halting.update(h, self.halt(h, n_loops), self.config.act_threshold, last=t == n_loops - 1)
        return h, halting, routing

    def _count_routing(self, routing, token_mask, batch, no_grad_loops):
        """Training: each loop's expert load, and the balance losses of the loops that build a graph."""
        aux_losses = []
        for t, (router_logits, chosen) in enumerate(routing):
            self.layer.mlp.gate.record_load(chosen, t, token_mask)
            # CODEPATH: router_aux_loss_coef=0 by default (bias balancing only); > 0 adds the balance loss
            if self.config.router_aux_loss_coef > 0 and t >= no_grad_loops:
                aux_losses.append(
                    sequence_balance_loss(router_logits, chosen, batch, self.config.n_experts, token_mask))
        return aux_losses

    def _scan(self, e, shared, position_embeddings, token_mask, **kwargs):
        """``loop_kv_sharing="last"`` over several positions: each position runs all its loops before the next one
        starts, since it reads the earlier positions' final keys/values (what cached decoding reads)."""
        batch, seq = e.shape[:2]
        states, haltings, routings = [], [], []
        for p in range(seq):
            shared.offset = p
            h, halting, routing = self._loops(e[:, p:p + 1], shared.n_loops,
                                              tuple(table[:, p:p + 1] for table in position_embeddings), None,
                                              shared.cache, shared, **kwargs)
            states.append(h)
            haltings.append(halting)
            routings.append(routing)
        halting = None
        if haltings[0] is not None:
            halting = MythosHaltingState.__new__(MythosHaltingState)
            for name in ("mixed", "cumulative", "running", "ponder"):
                setattr(halting, name, torch.cat([getattr(state, name) for state in haltings], dim=1))
        routing = [  # each loop's routing over the whole call, rows in (batch, position) order as the plain loop's
            tuple(torch.stack([r[t][i].view(batch, -1) for r in routings], dim=1).flatten(0, 1) for i in range(2))
            for t in range(len(routings[0]))]
        aux_losses = self._count_routing(routing, token_mask, batch, self._no_grad_loops(shared.n_loops))
        loops_used = torch.full((batch, seq), shared.n_loops, dtype=torch.long, device=e.device)
        h = torch.cat(states, dim=1)
        return self._output(h if halting is None else halting.mixed, halting, token_mask, aux_losses, loops_used)

    def _no_grad_loops(self, n_loops: int) -> int:
        truncate = self.training and self.config.backprop_loops is not None and torch.is_grad_enabled()
        return max(0, n_loops - self.config.backprop_loops) if truncate else 0

    @staticmethod
    def _output(h, halting, token_mask, aux_losses, loops_used, loop_stats=None) -> MythosRecurrenceOutput:
        ponder = None
        if halting is not None:
            ponder = halting.ponder if token_mask is None else halting.ponder[token_mask]
            # a batch of padding only has no token to average over: its ponder cost is 0, not NaN
            ponder = ponder.mean() if ponder.numel() else halting.ponder.sum() * 0
        return MythosRecurrenceOutput(last_hidden_state=h, ponder_cost=ponder, loops_used=loops_used,
                                      aux_loss=torch.stack(aux_losses).mean() if aux_losses else None,
                                      loop_stats=loop_stats)

    def _adaptive_forward(self, e, plan, position_embeddings, attention_mask, cache, token_mask, **kwargs):
        """The loop when positions may stop early: only running positions do the block's work (see
        :class:`MythosActivePositions` for what a stopped position still contributes)."""
        if plan.rows_only and not self.training and not plan.output_stats:
            return self._rows_forward(e, plan, position_embeddings, attention_mask, cache, token_mask, **kwargs)
        batch, seq = e.shape[:2]
        budget = plan.budget if plan.budget is not None else torch.full(
            (batch, seq), plan.n_loops, dtype=torch.long, device=e.device)
        rule = MythosExitRule(self, plan, budget, e, token_mask)
        no_grad_loops = self._no_grad_loops(plan.n_loops)
        horizon = budget.amax(1)  # each row's cache horizon: later tokens of the row may run this deep
        stopped = torch.zeros_like(budget, dtype=torch.bool)
        loops_used = torch.zeros_like(budget)
        aux_losses = []
        h = e
        for t in range(plan.n_loops):
            run = (budget > t) & ~stopped
            if plan.rows_only:
                active = MythosActiveRows.at_loop(t, plan.row_loops, seq, position_embeddings, attention_mask, cache,
                                                  e.device)
            elif plan.paged is not None:  # a request's keys/values are needed up to its own budget
                active = plan.paged.active(run, budget > t)
            else:
                active = self._active_positions(run, horizon > t, cache, plan, attention_mask)
            h_next, routing = h, None
            if active is not False:
                with torch.set_grad_enabled(t >= no_grad_loops and torch.is_grad_enabled()):
                    h_next, routing = self.step(h, e, t, position_embeddings, attention_mask, cache, active=active,
                                                **kwargs)
            idle = active is False or (isinstance(active, MythosActivePositions) and active.width == 0)
            if idle and not plan.output_stats:
                continue  # no position ran (the loop only wrote keys/values): nothing to count or decide
            chosen, chosen_mask = self._account(routing, active, run, token_mask, t, t >= no_grad_loops, aux_losses)
            loops_used = loops_used + run.long()
            stop = rule.update(t, h, h_next, run, chosen, chosen_mask)
            stopped = stopped if stop is None else stopped | stop
            h = h_next
            if cache is not None and plan.paged is None and plan.criterion is not None and not plan.output_stats \
                    and t + 1 < plan.n_loops and not bool(((budget > t + 1) & ~stopped).any()):
                # every position has stopped: the loops left only write keys/values, all from the same frozen states
                self._write_frozen_loops(h, e, t + 1, plan.n_loops, horizon, cache, position_embeddings)
                break
        rho = float(self.injection.get_A().detach().max()) if plan.output_stats else None
        return self._output(rule.output(h), rule.halting, token_mask, aux_losses, loops_used, rule.stats(rho))

    def _rows_forward(self, e, plan, position_embeddings, attention_mask, cache, token_mask, **kwargs):
        """Per-row budgets in inference, the lean form of :meth:`_adaptive_forward`: whole rows stop at loops known
        before the call and nothing is decided on the way, so each loop just runs its rows as a smaller batch. A
        decode step is bound by per-op overhead, and per-position bookkeeping would cost more than the rows save."""
        seq = e.shape[1]
        halting = MythosHaltingState(e) if self.halt is not None else None
        offset = lasts = None
        if halting is not None:
            offset = self.halt.offset(plan.budget)
            lasts = plan.budget == torch.arange(1, plan.n_loops + 1, device=e.device)[:, None, None]  # [loop, b, s]
        h = e
        for t in range(plan.n_loops):
            active = MythosActiveRows.at_loop(t, plan.row_loops, seq, position_embeddings, attention_mask, cache,
                                              e.device)
            h = self.step(h, e, t, position_embeddings, attention_mask, cache, active=active, **kwargs)[0]
            if halting is not None:  # as MythosExitRule.update with no criterion: a row halts at its budget
                halting.update(h, self.halt.probability(h, offset), self.config.act_threshold, lasts[t])
        return self._output(h if halting is None else halting.mixed, halting, token_mask, [], plan.budget.clone())

    @torch.no_grad()
    def _write_frozen_loops(self, h, e, first, n_loops, horizon, cache, position_embeddings):
        """Loops ``first`` to ``n_loops - 1`` when no position runs them: their keys/values in one projection."""
        x = h + e
        loops = range(first, n_loops)
        # CODEPATH: loop_signal_scale=0.1 by default; 0 turns the loop-index signal off (an ablation)
        if self.config.loop_signal_scale > 0:
            states = torch.stack([x + loop_signal(x, t, self.config.loop_signal_scale) for t in loops])
        else:
            states = x.expand(len(loops), *x.shape)
        every_row = [bool((horizon > t).all()) for t in loops]
        rows = [None if full else (horizon > t).nonzero().squeeze(1) for t, full in zip(loops, every_row)]
        slots = [loop_cache_slot(self.config, t) for t in loops]
        write_frozen_keys_values(self.layer, states, position_embeddings, cache, slots, rows)

    @staticmethod
    def _active_positions(run, kv_needed, cache, plan, attention_mask):
        """None when every position runs (the plain step), False when this loop has nothing to do (no running
        position, and no keys/values a later token could read), else the :class:`MythosActivePositions`."""
        if bool(run.all()):
            return None
        kv = kv_needed if cache is not None else run.any(1)
        if not bool(kv.any()):
            return False
        kv_rows = None if bool(kv.all()) else kv.nonzero().squeeze(1)
        return MythosActivePositions(run, kv_rows, plan.key_mask, plan.past_length, attention_mask)

    def _balance_loss(self, router_logits, chosen, active, run, token_mask, rows_mask):
        """The sequence balance loss over the positions that ran this loop."""
        n_experts = self.config.n_experts
        if isinstance(active, MythosActiveRows):
            return sequence_balance_loss(router_logits, chosen, len(active.rows_tuple), n_experts, rows_mask)
        batch, seq = run.shape
        if active is not None:  # back to [batch * seq] rows, the stopped positions masked out
            router_logits = active.scatter(router_logits, router_logits.new_zeros(batch, seq, n_experts)).flatten(0, 1)
            chosen = active.scatter(chosen, chosen.new_zeros(batch, seq, chosen.shape[-1])).flatten(0, 1)
        mask = run if token_mask is None else run & token_mask
        return sequence_balance_loss(router_logits, chosen, batch, n_experts, mask)

    def _account(self, routing, active, run, token_mask, t, with_grad, aux_losses):
        """Expert counts and the balance loss of one adaptive loop; returns the chosen experts and which count."""
        if routing is None:
            return None, None
        router_logits, chosen = routing
        chosen_mask = rows_mask = token_mask
        if isinstance(active, MythosActiveRows):
            rows_mask = None if token_mask is None else active.take(token_mask)
            chosen_mask = rows_mask
        elif active is not None and token_mask is not None:
            chosen_mask = active.gather(token_mask)
        chosen_mask = None if chosen_mask is None else chosen_mask.reshape(-1)
        if self.training:
            self.layer.mlp.gate.record_load(chosen, t, chosen_mask)
            # CODEPATH: router_aux_loss_coef=0 by default (bias balancing only); > 0 adds the balance loss
            if self.config.router_aux_loss_coef > 0 and with_grad:
                aux_losses.append(self._balance_loss(router_logits, chosen, active, run, token_mask, rows_mask))
        return chosen, chosen_mask


def _per_row(loops, other) -> tuple[int, ...]:
    """``loops`` (an int or one per row) as one per row, as many rows as ``other`` has (an int has any number)."""
    if isinstance(loops, tuple):
        return loops
    return (loops,) * (len(other) if isinstance(other, tuple) else 1)


def _loops_text(loops) -> str:
    return str(list(loops)) if isinstance(loops, tuple) else str(loops)


@auto_docstring
class MythosPreTrainedModel(PreTrainedModel):
    config: MythosConfig
    config_class = MythosConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MythosDecoderLayer", "MythosRecurrence"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    # hidden_states: the embeddings, then the state after every prelude layer, every loop iteration (the injection's
    # output) and every coda layer, in the order they run (before the final norm).
    _can_record_outputs = {
        "hidden_states": [OutputRecorder(MythosDecoderLayer), OutputRecorder(MythosInjection)],
        "attentions": [OutputRecorder(MythosGQAttention, index=1), OutputRecorder(MythosMLAttention, index=1)],
        "router_logits": OutputRecorder(MythosTopkRouter, index=0),
    }

    @classmethod
    def maybe_distribute_model(cls, model, distributed_config, mesh_manager):
        # `from_pretrained(..., distributed_config=...)`: a layout the config cannot be split by is refused here,
        # naming the field, before any weight is sharded or loaded (transformers would fail deep inside torch).
        if distributed_config is not None and mesh_manager is not None:
            model.config.check_parallel_layout(distributed_config)
        return super().maybe_distribute_model(model, distributed_config, mesh_manager)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MythosTopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
            init.zeros_(module.expert_load)
        elif isinstance(module, MythosExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MythosInjection):
            init.zeros_(module.log_A)
            init.zeros_(module.log_dt)
            init.constant_(module.B, 0.1)
        elif isinstance(module, MythosDepthLoRA):
            init.normal_(module.down, mean=0.0, std=std)
            init.zeros_(module.up)
            init.ones_(module.scale)
        elif isinstance(module, MythosHalting):
            # p = 1 / max_loop_iters per step at n_loops = max_loop_iters, and 1 / n_loops for other budgets (see
            # MythosHalting): ACT spends about all n_loops loops at initialisation, so n_loops is never a no-op.
            init.zeros_(module.weight)
            init.constant_(module.bias, -math.log(max(self.config.max_loop_iters - 1, 1)))


@auto_docstring
@dataclass
class MythosModelOutput(MoeModelOutputWithPast):
    r"""
    ponder_cost (`torch.FloatTensor`, *optional*):
        Mean ACT ponder cost (loops used plus the remainder) when ``use_act`` is on.
    aux_loss (`torch.FloatTensor`, *optional*):
        Sequence-level expert-balance loss (training with ``router_aux_loss_coef > 0``).

    The cache field is ``cache`` on transformers >= 5.24, else ``past_key_values``. ``hidden_states`` holds the
    embeddings, then the state after every prelude layer, every loop iteration and every coda layer (before the final
    norm); ``router_logits`` one [tokens, n_experts] tensor per loop (only the positions that ran it, when some stop
    early).
    loops_used (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
        Loops each position ran.
    loop_stats (`MythosLoopStats`, *optional*):
        Per-loop statistics (``output_loop_stats=True``).
    """

    ponder_cost: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    loops_used: torch.LongTensor | None = None
    loop_stats: MythosLoopStats | None = None


@auto_docstring
@dataclass
class MythosCausalLMOutput(MoeCausalLMOutputWithPast):
    r"""
    ponder_cost (`torch.FloatTensor`, *optional*):
        Mean ACT ponder cost when ``use_act`` is on. ``loss`` includes it weighted by ``act_ponder_weight``, and the
        balance loss weighted by ``router_aux_loss_coef`` (with ``num_items_in_batch``, each scaled by this batch's
        share of the label tokens, like the cross-entropy).
    loops_used (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
        Loops each position ran.
    loop_stats (`MythosLoopStats`, *optional*):
        Per-loop statistics (``output_loop_stats=True``).
    """

    ponder_cost: torch.FloatTensor | None = None
    loops_used: torch.LongTensor | None = None
    loop_stats: MythosLoopStats | None = None


def sequence_balance_loss(router_logits: torch.Tensor, chosen: torch.Tensor, batch: int, n_experts: int,
                          token_mask: torch.Tensor | None = None):
    """DeepSeek-V3 complementary sequence-wise balance loss: sum_i f_i * P_i per sequence, averaged over the batch.

    f_i = n_experts / (k * T) * (tokens of the sequence routed to expert i), P_i = mean over the sequence of the
    normalised affinity s_i / sum_j s_j. It equals 1 for a perfectly balanced sequence. Positions where
    ``token_mask`` [batch, seq] is 0 (padding) are left out of T, f and P.
    """
    top_k = chosen.shape[-1]
    scores = router_logits.sigmoid().view(batch, -1, n_experts)
    mask = scores.new_ones(scores.shape[:2]) if token_mask is None else token_mask.to(scores.dtype)
    tokens = mask.sum(1, keepdim=True).clamp(min=1)
    probs = (scores / scores.sum(-1, keepdim=True) * mask[..., None]).sum(1) / tokens
    counts = (F.one_hot(chosen.view(batch, -1, top_k), n_experts).sum(2) * mask[..., None]).sum(1)
    fraction = counts * n_experts / (top_k * tokens)
    return (fraction * probs).sum(-1).mean()


def _check_n_loops(n_loops, config: MythosConfig) -> int:
    """Any integer (Python, numpy, or a 0-d integer tensor) in [1, config.loop_limit]; bools are refused.

    The upper bound keeps a typo (n_loops=10**6) from running for hours: every loop is a full block over every token.
    """
    if isinstance(n_loops, torch.Tensor) and n_loops.dim() == 0 and not (
            n_loops.is_floating_point() or n_loops.is_complex() or n_loops.dtype == torch.bool):
        n_loops = n_loops.item()
    elif not isinstance(n_loops, torch.Tensor) and hasattr(n_loops, "__array__") and getattr(n_loops, "ndim", 1) == 0:
        n_loops = n_loops.item()  # a 0-d numpy array; its bool and float items are refused below
    if isinstance(n_loops, bool) or not isinstance(n_loops, numbers.Integral) or n_loops < 1:
        raise ValueError(f"`n_loops` must be a positive integer (1, 2, ...), got {n_loops!r}")
    if n_loops > config.loop_limit:
        # CODEPATH: max_inference_loops unset (every preset) or set by the user
        bound = (f"max_inference_loops={config.max_inference_loops}" if config.max_inference_loops is not None
                 else f"max_inference_loops (unset: 8 * max_loop_iters = {config.loop_limit})")
        raise ValueError(
            f"`n_loops`={n_loops} exceeds the config's bound {bound}; accepted values are 1 to {config.loop_limit}. "
            f"To run more loops, raise the bound: `model.config.max_inference_loops = {n_loops}`.")
    return int(n_loops)


def _is_budget_list(n_loops) -> bool:
    """A list, tuple, tensor or numpy array of budgets (anything with dimensions), rather than one int."""
    return isinstance(n_loops, (list, tuple)) or (isinstance(n_loops, torch.Tensor) and n_loops.dim() > 0) or (
        not isinstance(n_loops, torch.Tensor) and hasattr(n_loops, "__array__") and getattr(n_loops, "ndim", 0) > 0)


def _check_loop_budgets(n_loops, config: MythosConfig, batch: int, seq: int | None):
    """Budgets per row (a list, a numpy array or a 1-D integer tensor of ``batch`` entries) or per position (a
    [batch, seq] integer tensor; ``seq=None``: per row only, as in generate), each in [1, config.loop_limit].
    Returns ``(most loops, budgets [batch, seq] or None)``; equal budgets give None, the plain loop."""
    per_row = f"one per row (a list or 1-D tensor of {batch} ints)"
    accepted = (f"an int or {per_row}" if seq is None else
                f"an int, {per_row} or one per position (a [{batch}, {seq}] integer tensor)")
    accepted += f", each from 1 to {config.loop_limit}"
    def holds_bool(value):
        return isinstance(value, bool) or (isinstance(value, (list, tuple)) and any(map(holds_bool, value)))

    if holds_bool(n_loops):  # torch.tensor([True, 2]) would read True as 1 loop
        raise ValueError(f"`n_loops` must be {accepted}; got a bool in {n_loops!r}")
    try:
        values = n_loops if isinstance(n_loops, torch.Tensor) else torch.as_tensor(n_loops)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"`n_loops` must be {accepted}; got {n_loops!r}") from None
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"`n_loops` must be {accepted}; got dtype {values.dtype}")
    if tuple(values.shape) not in ((batch,), (batch, seq)):
        given = f"an input of batch size {batch}" + ("" if seq is None else f" and {seq} positions")
        raise ValueError(f"`n_loops` must be {accepted}; got shape {tuple(values.shape)} for {given}")
    low, high = (int(v) for v in torch.aminmax(values))
    if low < 1 or high > config.loop_limit:
        raise ValueError(f"`n_loops` must be {accepted} (max_inference_loops bounds the top); got values from {low} "
                         f"to {high}")
    if low == high:
        return high, None
    budget = values.to(device=values.device, dtype=torch.long)
    return high, (budget[:, None].expand(batch, seq) if budget.dim() == 1 and seq is not None else budget)


def _check_exit(criterion, threshold, config: MythosConfig, has_head: bool, cache, has_halt: bool):
    """``exit_criterion`` is None or one of EXIT_CRITERIA, with a finite ``exit_threshold``: in (0, 1] for "act" (a
    halting mass), >= 0 for "delta" and "kl", whose measures are never negative, so 0 runs every loop of the budget and
    only records the measure (``output_loop_stats``); the model must have what the criterion reads: the LM head for
    "kl", the halting head (built when ``use_act`` was set at construction) for "act"."""
    if criterion is None:
        if threshold is not None:
            raise ValueError(f"`exit_threshold`={threshold!r} needs an `exit_criterion` (one of {EXIT_CRITERIA})")
        return None
    if criterion not in EXIT_CRITERIA:
        raise ValueError(f"`exit_criterion` must be None or one of {EXIT_CRITERIA}, got {criterion!r}")
    accepted = "(0, 1.0]" if criterion == "act" else "[0, inf) (0: run the whole budget, record only)"
    if (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)
            or not (0 < threshold <= 1.0 if criterion == "act" else 0 <= threshold)):
        raise ValueError(f"`exit_threshold` must be a number in {accepted} for exit_criterion={criterion!r}, got "
                         f"{threshold!r}")
    if criterion == "act" and config.exit_scope != "position":
        raise ValueError(f"exit_criterion='act' decides each position by its own halting mass, so it needs "
                         f"config.exit_scope='position', got {config.exit_scope!r}; use 'delta' or 'kl'")
    if criterion == "act" and not has_halt:
        # CODEPATH: use_act=True here only on a model whose config was edited after building (no checkpoint's)
        built = ("config.use_act was set after the model was built, which adds no head" if config.use_act
                 else "use_act=False")
        raise ValueError(f"exit_criterion='act' reads the halting head, and this model has none ({built}): use "
                         f"'delta' or 'kl', or a model built and trained with use_act=True")
    if criterion == "kl" and not has_head:
        raise ValueError("exit_criterion='kl' compares next-token distributions, so it needs the LM head: call "
                         "MythosForCausalLM, not MythosModel")
    if criterion == "kl" and cache is not None and not all(
            type(layer) in (DynamicLayer, MythosRowsLayer) for layer in getattr(cache, "layers", [])):
        raise ValueError(f"exit_criterion='kl' runs the coda once per loop without writing the cache, which only a "
                         f"DynamicCache supports; got a {type(cache).__name__}")
    return float(threshold)


class _ReadOnlyCache:
    """The coda's cache as the KL probe sees it: past keys/values plus this call's, nothing stored."""

    def __init__(self, cache: Cache):
        self.cache = cache

    def update(self, keys, values, layer_idx, *args, **kwargs):
        layer = self.cache.layers[layer_idx] if layer_idx < len(self.cache.layers) else None
        if layer is None or not layer.is_initialized or layer.keys.numel() == 0:
            return keys, values
        return torch.cat((layer.keys, keys), dim=-2), torch.cat((layer.values, values), dim=-2)


def _cache_layer(cache: Cache):
    """The cache's first slot (prelude, coda or loop: every forward writes it), or None for a cache without slots."""
    layers = getattr(cache, "layers", None)
    return layers[0] if layers else None


def _check_cache_fits(cache: Cache, batch: int, past_length: int | None, seq: int):
    """The cache must hold rows for this batch, and a static one room for the new tokens (``past_length`` None: the
    cached length is not known on the host, so that is not checked)."""
    layer = _cache_layer(cache)
    keys = getattr(layer, "keys", None)
    if isinstance(keys, torch.Tensor) and keys.dim() == 4 and keys.shape[0] != batch:
        raise ValueError(
            f"The cache (`cache` / `past_key_values`) holds batch size {keys.shape[0]}, but the input has batch size "
            f"{batch}. Pass a cache filled with the same batch, or none (cache=None) to start a new one.")
    capacity = getattr(layer, "max_cache_len", None)
    if capacity is not None and past_length is not None and not getattr(layer, "is_sliding", False) \
            and past_length + seq > capacity:
        raise ValueError(
            f"This {type(cache).__name__} holds at most max_cache_len={capacity} tokens, but this call needs "
            f"{past_length} cached + {seq} new = {past_length + seq}. Create it with a larger max_cache_len "
            f"(e.g. StaticCache(config=model.config, max_cache_len={past_length + seq})), or use a DynamicCache.")


def _check_attention_mask(attention_mask: torch.Tensor, batch: int, total: int | None, check_values: bool = True,
                          seq: int | None = None, heads: int | None = None, keys: int | None = None):
    """A 2-D mask is [batch, past + new tokens] of 1 (attend) / 0 (padding); a 4-D mask is taken as prepared, of
    shape [batch, 1 or heads, seq, keys] (``keys``: past + new tokens, or a static cache's length).
    ``total`` None: the cached length is not known on the host (a compiled step), so only the batch is checked."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"`attention_mask` must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() == 4:
        shape = tuple(attention_mask.shape)
        if shape[0] != batch or (heads is not None and shape[1] not in (1, heads)) or \
                (seq is not None and shape[2] != seq) or (keys is not None and shape[3] != keys):
            expected = (batch, "1" if heads is None else f"1 or {heads}", "seq" if seq is None else seq,
                        "keys" if keys is None else keys)
            raise ValueError(f"A prepared 4-D `attention_mask` must have shape [batch, 1 or heads, new tokens, past + "
                             f"new tokens (a static cache: its length)] = ({', '.join(map(str, expected))}), got "
                             f"{shape}")
        return
    if attention_mask.dim() != 2:
        raise ValueError(f"`attention_mask` must be 2-D [batch, past + new tokens] (or a prepared 4-D mask), "
                         f"got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[0] != batch or (total is not None and attention_mask.shape[1] != total):
        expected = (batch, "past + new tokens" if total is None else total)
        raise ValueError(f"`attention_mask` must have shape [batch, past + new tokens] = {expected}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool and check_values:
        # anything else (an additive 0/-inf mask, say) would be read as "attend" wherever it is non-zero
        bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)]
        if bad.numel() > 0:
            raise ValueError(f"A 2-D `attention_mask` must hold only 0 (padding) and 1 (token), or bools; got "
                             f"{bad.numel()} other values: {sorted(set(bad.unique().tolist()))[:5]}")


AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what autocast casts for the matrix products
TOKEN_ID_DTYPES = (torch.int64, torch.int32)


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int):
    low, high = torch.aminmax(input_ids)
    if low < 0 or high >= vocab_size:
        raise ValueError(f"`input_ids` must lie in [0, vocab_size={vocab_size}), got values from {int(low)} to "
                         f"{int(high)}")


def _check_batch_prompts(inputs, vocab_size: int) -> None:
    """generate_batch's prompts, each a non-empty list of token ids in [0, vocab_size): checked before any request
    starts, since one bad prompt inside the batch loop fails every request beside it."""
    if hasattr(inputs, "tolist") and not isinstance(inputs, (list, tuple)):  # a 2-D tensor or array of prompts
        inputs = inputs.tolist()
    if not isinstance(inputs, (list, tuple)):
        raise ValueError(f"`inputs` must be a list of prompts (each a list of token ids), got {type(inputs).__name__}")
    for i, prompt in enumerate(inputs):
        ids = prompt.tolist() if hasattr(prompt, "tolist") else prompt
        if not isinstance(ids, (list, tuple)) or not ids or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"`inputs[{i}]` must be a non-empty list of int token ids, got {prompt!r:.80}")
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab_size:
            raise ValueError(f"`inputs[{i}]` must hold token ids in [0, vocab_size={vocab_size}), got values from "
                             f"{low} to {high}")


def _check_position_ids(position_ids: torch.Tensor, batch: int, seq: int):
    """[batch, seq], [1, seq] (shared by every row) or [seq] integers: another batch size would broadcast wrongly or
    crash, and a float or bool position would be rotated by a position no token has."""
    if position_ids.dtype not in TOKEN_ID_DTYPES:
        raise ValueError(f"`position_ids` must hold integer positions of dtype torch.int64 (long) or torch.int32, got "
                         f"dtype {position_ids.dtype}")
    if position_ids.dim() not in (1, 2) or position_ids.shape[-1] != seq or (
            position_ids.dim() == 2 and position_ids.shape[0] not in (1, batch)):
        given = position_ids.shape[0] if position_ids.dim() == 2 else None
        raise ValueError(
            f"`position_ids` must have shape [1, {seq}] or [{batch}, {seq}] (batch size 1 or the input's batch size "
            f"{batch}, {seq} positions per row), got shape {tuple(position_ids.shape)}"
            + (f" (batch size {given})" if given is not None else ""))


def plainly_causal(config: MythosConfig, attention_mask, cache, default_positions: bool) -> bool:
    """Whether a compiled sdpa call attends plainly causally and needs no mask tensor: no padding mask, no cache and
    the default positions (given positions may pack several sequences into a row).

    Eager calls get no mask there from ``create_causal_mask``, and sdpa runs with ``is_causal``. While tracing it
    always builds a [batch, 1, seq, seq] mask (it cannot read a padding mask's values), and a kernel given a mask
    cannot skip the blocks above the diagonal: the compiled forward and train step did the attention's whole square.
    """
    return (is_torchdynamo_compiling() and attention_mask is None and cache is None and default_positions
            and config._attn_implementation == "sdpa")


@auto_docstring
class MythosModel(MythosPreTrainedModel):
    """Embeddings, prelude, the recurrence and the coda, returning the final normalised state."""

    def __init__(self, config: MythosConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim, config.pad_token_id)
        self.prelude = nn.ModuleList(MythosDecoderLayer(config, i) for i in range(config.prelude_layers))
        self.recurrent = MythosRecurrence(config)
        self.coda = nn.ModuleList(
            MythosDecoderLayer(config, config.prelude_layers + i) for i in range(config.coda_layers))
        self.norm = MythosRMSNorm(config.dim, eps=config.rms_norm_eps)
        self.rotary_emb = MythosRotary(config)
        self.gradient_checkpointing = False
        self._generating = 0  # generate() calls under way, which checked their prompt (see _validate_inputs)
        # continuous batching's per-request loop controls
        self.request_loops = MythosRequestLoops(config, self.recurrent.halt is not None)
        self.post_init()

    def spectral_radius(self) -> float:
        """rho(A) of the recurrent injection: the largest diagonal entry of A, always strictly below 1.

        NaN parameters raise a ValueError naming them instead: the loop still multiplies by an A inside (0, 1)
        (see ``MythosInjection``), but a NaN weight means the run diverged, and a tidy number would hide that.
        """
        injection = self.recurrent.injection
        for name in ("log_A", "log_dt"):
            values = getattr(injection, name)
            if torch.isnan(values).any():
                raise ValueError(
                    f"`recurrent.injection.{name}` has {int(torch.isnan(values).sum())} NaN entries of "
                    f"{values.numel()}, so rho(A) is undefined; the parameters must be finite or +-inf (training "
                    f"probably diverged: reload a checkpoint from before the NaN)")
        with torch.no_grad():
            return float(injection.get_A().max())

    # ---------------------------------------------------------------------------------------------------- checks
    def _validate_inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, past_length):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`")
        for name, value in (("input_ids", input_ids), ("inputs_embeds", inputs_embeds),
                            ("attention_mask", attention_mask), ("position_ids", position_ids)):
            if value is not None and not isinstance(value, torch.Tensor):
                raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must have shape [batch, seq_len], got {tuple(input_ids.shape)}")
            if input_ids.dtype not in TOKEN_ID_DTYPES:
                raise ValueError(f"`input_ids` must hold integer token ids of dtype torch.int64 (long) or torch.int32, "
                                 f"got dtype {input_ids.dtype}")
            shape = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.dim:
                raise ValueError(f"`inputs_embeds` must have shape [batch, seq_len, {self.config.dim}], "
                                 f"got {tuple(inputs_embeds.shape)}")
            wanted = self.embed_tokens.weight.dtype
            autocast = torch.is_autocast_enabled(inputs_embeds.device.type)
            if inputs_embeds.dtype != wanted and not (autocast and inputs_embeds.dtype in AUTOCAST_DTYPES):
                raise ValueError(f"`inputs_embeds` must be a floating-point tensor of the model's dtype {wanted} (or "
                                 f"float32/float16/bfloat16 under torch.autocast), got dtype {inputs_embeds.dtype}")
            shape = inputs_embeds.shape[:2]
        batch, seq = shape
        if batch == 0 or seq == 0:
            raise ValueError(f"Empty input: got shape {tuple(shape)}; batch size and sequence length must be >= 1")
        # Checks that read tensor values cost a host sync each. They run on every eager call, except the decode steps
        # of generate(), which checked the prompt once before its first step and feeds back only its own tokens; a
        # compiled call skips them too (a StaticCache's length is a tensor there).
        host_checks = not is_torchdynamo_compiling() and not self._generating
        known_past = past_length if isinstance(past_length, int) else int(past_length) if host_checks else None
        if known_past is not None and known_past + seq > self.config.max_seq_len:
            raise ValueError(
                f"Sequence too long: {known_past} cached + {seq} new = {known_past + seq} tokens exceeds "
                f"max_seq_len={self.config.max_seq_len}")
        if input_ids is not None and host_checks:
            _check_token_ids(input_ids, self.config.vocab_size)
        if cache is not None:
            _check_cache_fits(cache, batch, known_past, seq)
        if attention_mask is not None:
            total = None if known_past is None else known_past + seq
            layer = _cache_layer(cache) if cache is not None else None
            capacity = None if getattr(layer, "is_sliding", False) else getattr(layer, "max_cache_len", None)
            _check_attention_mask(attention_mask, batch, total, check_values=host_checks, seq=seq,
                                  heads=self.config.n_heads, keys=capacity if capacity is not None else total)
        if position_ids is not None:
            _check_position_ids(position_ids, batch, seq)

    @deprecate_kwarg("past_key_values", "5.23.0", new_name="cache", raise_if_both_names=True)
    @capture_outputs(tie_last_hidden_states=False)
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        n_loops: int | list[int] | torch.LongTensor | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        output_loop_stats: bool = False,
        exit_head: nn.Module | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MythosModelOutput:
        r"""
        cache (`Cache`, *optional*):
            The KV cache, one slot per prelude layer, coda layer and loop iteration (``past_key_values``, its name
            before transformers 5.24, is accepted too).
        n_loops (`int`, `list[int]` or `torch.LongTensor`, *optional*):
            The loop budget: the most loops any position runs; defaults to ``config.default_n_loops``. One int, one per
            row (a list or 1-D tensor), or one per position (a [batch, seq] tensor, e.g. a recorded ``loops_used``;
            no cache). A cache filled with one budget refuses another.
        exit_criterion (`str`, *optional*):
            Stop a position before its budget: ``"act"`` (halting mass), ``"delta"`` (relative state change) or
            ``"kl"`` (change of the next-token distribution; MythosForCausalLM only). See ``MythosExitRule``.
        exit_threshold (`float`, *optional*):
            The criterion's threshold: a position stops once its criterion falls below it (``"act"``: reaches it).
            In (0, 1] for ``"act"``; >= 0 for ``"delta"`` and ``"kl"``, where 0 stops nothing and only records.
        output_loop_stats (`bool`, *optional*, defaults to `False`):
            Whether to return per-loop statistics (`MythosLoopStats`) as ``loop_stats``.
        exit_head (`nn.Module`, *optional*):
            The LM head the ``"kl"`` criterion reads (MythosForCausalLM passes its own).
        """
        if output_loop_stats is not None and not isinstance(output_loop_stats, bool):
            raise ValueError(f"`output_loop_stats` must be True or False, got {output_loop_stats!r}")
        paged = None
        if is_paged_cache(cache):  # continuous batching: requests packed into one row, each with its loop controls
            self._validate_inputs(input_ids, inputs_embeds, None, position_ids, None, 0)
            cache = paged = MythosPagedBatch.from_forward(cache, attention_mask, self.config, kwargs)
            plan = paged.plan(self.request_loops, n_loops, exit_criterion, exit_threshold, output_loop_stats)
        else:
            if not _is_budget_list(n_loops):
                n_loops = _check_n_loops(self.config.default_n_loops if n_loops is None else n_loops, self.config)
            cache = self._cache_for(cache, use_cache, isinstance(n_loops, torch.Tensor) and n_loops.dim() == 2)
            past_length = cache.get_seq_length() if cache is not None else 0
            if isinstance(past_length, torch.Tensor):  # a StaticCache's own counter, which its writes advance in place
                past_length = past_length.clone()
            self._validate_inputs(input_ids, inputs_embeds, attention_mask, position_ids, cache, past_length)
            shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
            plan, row_loops = self._loop_plan(n_loops, exit_criterion, exit_threshold, output_loop_stats, exit_head,
                                              shape, attention_mask, cache, past_length)
            if cache is not None:
                self.recurrent.bind_cache(cache, row_loops)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        seq = inputs_embeds.shape[1]
        # padded positions (2-D attention_mask 0) count in neither the expert load, the balance loss nor the ponder cost
        token_mask = None
        if attention_mask is not None and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -seq:].bool()
        default_positions = position_ids is None
        if position_ids is None:
            # a StaticCache's length is a tensor: add it, so that no host sync (or graph break) reads it
            position_ids = (torch.arange(seq, device=inputs_embeds.device) + past_length).unsqueeze(0)
        elif position_ids.dim() == 1:  # [seq]: the same positions for every row
            position_ids = position_ids.unsqueeze(0)
        if paged is not None:
            mask = paged.mask
        elif plainly_causal(self.config, attention_mask, cache, default_positions):
            mask = None  # sdpa's is_causal, as create_causal_mask gives eager calls
        else:  # positional: the cache argument's name changed in transformers 5.24
            mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids=position_ids)
        shared = dict(position_embeddings=self.rotary_emb(inputs_embeds, position_ids), attention_mask=mask,
                      cache=cache)
        if plan.criterion == "kl":
            probe_shared = dict(shared, cache=None if cache is None else _ReadOnlyCache(cache))
            plan.probe = functools.partial(self._probe, exit_head, probe_shared, kwargs)

        hidden = inputs_embeds
        for layer in self.prelude:
            hidden = layer(hidden, **shared, **kwargs)
        loop = self.recurrent(hidden, plan, token_mask=token_mask, **shared, **kwargs)
        hidden = loop.last_hidden_state
        for layer in self.coda:
            hidden = layer(hidden, **shared, **kwargs)
        return MythosModelOutput(last_hidden_state=self.norm(hidden), **{CACHE_NAME: None if paged else cache},
                                 ponder_cost=loop.ponder_cost, aux_loss=loop.aux_loss, loops_used=loop.loops_used,
                                 loop_stats=loop.loop_stats)

    def _cache_for(self, cache, use_cache, per_position: bool):
        """The cache this call uses (a new DynamicCache by default at inference), or None."""
        if per_position and (cache is not None or use_cache):
            raise ValueError("Per-position `n_loops` (a [batch, seq] tensor) replays a recorded run's loops in one "
                             "forward without a cache: pass use_cache=False and no cache, or one budget per row")
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and not per_position
        use_cache = use_cache and not (self.gradient_checkpointing and self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        return cache if use_cache else None

    def _loop_plan(self, n_loops, criterion, threshold, output_stats, exit_head, shape, attention_mask, cache,
                   past_length):
        """The checked loop arguments as a :class:`MythosLoopPlan`, and the per-row budgets the cache binds to."""
        threshold = _check_exit(criterion, threshold, self.config, exit_head is not None, cache,
                                self.recurrent.halt is not None)
        budget, most = None, n_loops
        if _is_budget_list(n_loops):
            most, budget = _check_loop_budgets(n_loops, self.config, *shape)
        plan = MythosLoopPlan(most, budget, criterion, threshold, bool(output_stats), past_length=past_length)
        sharing = self.config.loop_kv_sharing
        if sharing != "none" and (plan.adaptive or plan.output_stats):
            given = ("exit_criterion" if criterion is not None else "per-row or per-position n_loops"
                     if budget is not None else "output_loop_stats")
            raise ValueError(
                f"{given} needs loop_kv_sharing='none'; this model has loop_kv_sharing={sharing!r}, where one n_loops "
                f"(an int) runs every position. Pass a single int n_loops, or use a model with loop_kv_sharing='none'.")
        layout = getattr(self.config, "distributed_config", None)  # set by from_pretrained(distributed_config=...)
        if plan.adaptive and layout is not None and layout.ep_size > layout.tp_size:
            given = "exit_criterion" if criterion is not None else "per-row or per-position n_loops"
            raise ValueError(
                f"{given} lets positions stop early, so each rank would run the experts a different number of times; "
                f"this model's experts exchange tokens between ranks that hold different batches (loaded with "
                f"ep_size={layout.ep_size} > tp_size={layout.tp_size}), where every rank must join every loop's "
                f"all-to-all. Pass a single int n_loops without exit_criterion, or load with ep_size == tp_size.")
        if (plan.adaptive or sharing != "none") and attention_mask is not None:
            plan.key_mask = attention_mask.bool() if attention_mask.dim() == 2 else attention_mask
        row_loops = most
        if budget is not None:
            row_loops = tuple(budget[:, 0].tolist())
            per_row = not (isinstance(n_loops, torch.Tensor) and n_loops.dim() == 2)
            plan.row_loops = row_loops if per_row else None
        return plan, row_loops

    @torch.no_grad()
    def _probe(self, head, shared, kwargs, h, flat):
        """The ``"kl"`` criterion's next-token log-probabilities [len(flat), vocab] if the loop stopped at ``h``.

        The coda runs on every position of the call (its attention needs them), reading the cache without writing
        it; the head runs on the positions ``flat`` (indices into batch * seq) only. Output recording
        (``output_hidden_states``, ``output_attentions``, router logits) is paused, so that it does not see the probe.
        """
        recording = _active_collector.get()
        _active_collector.set(None)  # transformers' capture hooks record nothing while it is None
        try:
            for layer in self.coda:
                h = layer.forward(h, **shared, **kwargs)
        finally:
            _active_collector.set(recording)  # by value: under torch.compile set() returns no token to reset
        return F.log_softmax(head(self.norm(h).flatten(0, 1)[flat]).float(), dim=-1)

def _check_labels(labels, input_ids, inputs_embeds, vocab_size: int, ignore_index: int):
    """Labels are integer token ids of the input's shape [batch, seq] (shifted inside), or the ignore index."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"`labels` must be a tensor of token ids, got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"`labels` must hold integer token ids, got dtype {labels.dtype}")
    inputs = input_ids if input_ids is not None else inputs_embeds
    if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 and tuple(labels.shape) != tuple(inputs.shape[:2]):
        raise ValueError(f"`labels` must have the input's shape [batch, seq_len] = {tuple(inputs.shape[:2])}, "
                         f"got {tuple(labels.shape)}")
    if not is_torchdynamo_compiling():
        bad = labels[((labels < 0) | (labels >= vocab_size)) & (labels != ignore_index)]
        if bad.numel() > 0:
            low, high = torch.aminmax(bad)
            raise ValueError(f"`labels` must lie in [0, vocab_size={vocab_size}) or equal the ignore index "
                             f"{ignore_index}; got {bad.numel()} values outside, from {int(low)} to {int(high)}")


@auto_docstring
class MythosForCausalLM(MythosPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # split by vocabulary like the tied embedding (both shard dim 0), and gathered so that every rank has all logits
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _fsdp_plan = {"lm_head": "keep_full_weight"}  # gathered once with the final norm (and the tied embedding)

    def __init__(self, config: MythosConfig):
        super().__init__(config)
        self.model = MythosModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = MythosLinear(config.dim, config.vocab_size, bias=False)
        self.post_init()

    def spectral_radius(self) -> float:
        """rho(A) of the recurrent injection (always strictly below 1; NaN parameters raise a ValueError)."""
        return self.model.spectral_radius()

    def generate(self, inputs=None, generation_config=None, *args, **kwargs):
        """``GenerationMixin.generate``, but a request for more tokens than ``max_seq_len`` holds is refused before
        the first step, instead of by the forward that reaches the limit (after decoding everything up to it)."""
        self._check_generation_length(inputs, generation_config, kwargs)
        self._check_prompt(inputs, kwargs)
        # the prompt is checked: the steps skip the checks that read tensor values (a host sync each, see
        # MythosModel._validate_inputs), since they see only the prompt again and the tokens generate picked
        self.model._generating += 1
        try:
            return super().generate(inputs, generation_config, *args, **kwargs)
        finally:
            self.model._generating -= 1

    def create_masks_for_generate(self, *args, attention_mask=None, block_sequence_ids=None, **kwargs):
        """The mask each static-cache generate step hands the forward (transformers calls this before every step).

        Without padding, generate drops its all-ones mask. transformers would then build a causal
        [batch, 1, new tokens, cache length] mask in Python on every step and pass it in. This model's forward
        builds that same mask itself from the positions and the cache, so it is given no mask. In a compiled
        step the mask then comes from the step's cache position, inside the graph: a small model's step measured
        1.08-1.16x faster, a medium one's the same within noise (docs/benchmarks.md, "Compiled decode builds its own
        causal mask"). A padding mask, or any other argument, goes to transformers' function as before.
        """
        if attention_mask is None and block_sequence_ids is None:
            return None
        return create_masks_for_generate(*args, attention_mask=attention_mask, block_sequence_ids=block_sequence_ids,
                                         **kwargs)

    # -------------------------------------------------------------------------------------------- continuous batching
    @property
    def request_loops(self) -> MythosRequestLoops:
        """Per-request loop controls for continuous batching (see :class:`MythosRequestLoops`)."""
        return self.model.request_loops

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        """transformers' ``init_continuous_batching``, after checking what this model needs (see
        ``check_paged_support``). The generation config's ``n_loops`` / ``exit_criterion`` / ``exit_threshold`` become
        every request's default (``request_loops.default``). Prefix sharing is turned off: a shared cache block holds
        every loop slot of its tokens, filled for one request's depth, and another depth would read it wrongly."""
        given = generation_config if generation_config is not None else self.generation_config
        cb_config = continuous_batching_config or getattr(given, "continuous_batching_config", None)
        cb_config = copy.deepcopy(cb_config) if cb_config is not None else ContinuousBatchingConfig()
        check_paged_support(self.config, cb_config)
        self.request_loops.default = self.request_loops.checked(
            *(getattr(given, name, None) for name in GENERATION_LOOP_FIELDS))
        cb_config.allow_block_sharing = False
        cb_config.auto_switch_to_flash = False  # flash kernels take no mask (see check_paged_support)
        return super().init_continuous_batching(generation_config, cb_config, workload_hints)

    def generate_batch(self, inputs, generation_config=None, continuous_batching_config=None, *, n_loops=None,
                       exit_criterion=None, exit_threshold=None, **kwargs):
        """transformers' ``generate_batch`` (continuous batching over a paged cache), with this model's loop controls.

        ``n_loops``, ``exit_criterion`` and ``exit_threshold`` are one value for every request (as in the generation
        config, which they override), or a list with one value per input: each request then runs its own depth, and
        its tokens do not depend on the other requests of its batch. Returns ``{request_id: GenerationOutput}`` in
        input order.
        """
        _check_batch_prompts(inputs, self.config.vocab_size)
        lists = [isinstance(v, (list, tuple)) for v in (n_loops, exit_criterion, exit_threshold)]
        if not any(lists):
            if (n_loops, exit_criterion, exit_threshold) != (None, None, None):
                generation_config = copy.deepcopy(generation_config or self.generation_config)
                for name, value in zip(GENERATION_LOOP_FIELDS, (n_loops, exit_criterion, exit_threshold)):
                    if value is not None:
                        setattr(generation_config, name, value)
            return super().generate_batch(inputs, generation_config, continuous_batching_config, **kwargs)
        given = generation_config if generation_config is not None else self.generation_config
        columns = []
        for name, value, is_list in zip(GENERATION_LOOP_FIELDS, (n_loops, exit_criterion, exit_threshold), lists):
            if is_list and len(value) != len(inputs):
                raise ValueError(f"`{name}` must be one value, or one per input ({len(inputs)}); got {len(value)}")
            columns.append(value if is_list else [getattr(given, name, None) if value is None else value] * len(inputs))
        controls = [self.request_loops.checked(*row) for row in zip(*columns)]
        check_request_mix(controls)
        return self._generate_requests(inputs, controls, generation_config, continuous_batching_config, **kwargs)

    def _generate_requests(self, inputs, controls, generation_config, continuous_batching_config, warmup=True,
                           max_new_tokens=None, **kwargs):
        """Requests with their own loop controls, through the manager's public API (``add_request`` with our ids)."""
        if kwargs:
            raise ValueError(f"generate_batch with per-request loop controls does not take {sorted(kwargs)}")
        call = next(_request_calls)
        ids = [f"mythos_{call}_{i}" for i in range(len(inputs))]
        given = generation_config if generation_config is not None else self.generation_config
        children = (getattr(given, "num_return_sequences", None) or 1) - 1  # forked requests: "<id>__child#<k>"
        # in transformers' order: each request's forked children, then the request itself
        expected = [name for rid in ids for name in (*(f"{rid}__child#{k}" for k in range(children)), rid)]
        results = {}
        try:
            for request_id, control in zip(ids, controls):
                self.request_loops.requests[request_id] = control
            with self.continuous_batching_context_manager(
                    generation_config=generation_config, continuous_batching_config=continuous_batching_config,
                    block=True, timeout=5, warmup=warmup) as manager:
                for request_id, prompt in zip(ids, inputs):
                    manager.add_request(prompt, request_id=request_id, max_new_tokens=max_new_tokens)
                while not all(request_id in results for request_id in expected):
                    result = manager.get_result(timeout=1)
                    if result is not None and result.is_finished():
                        results[result.request_id] = result
                    elif result is None and not manager.is_running():
                        break
        finally:
            for request_id in ids:
                self.request_loops.pop(request_id)
        return {request_id: results[request_id] for request_id in expected if request_id in results}

    def _prepare_generation_config(self, generation_config, **kwargs):
        """``GenerationMixin._prepare_generation_config``, then the loop controls move to the model kwargs.

        A generation config may carry ``n_loops``, ``exit_criterion`` and ``exit_threshold`` (``GenerationConfig``
        keeps unknown fields, and saves and loads them in ``generation_config.json``): that is how a server or an
        evaluation harness that only forwards a generation config chooses the depth of a request. A value passed to
        ``generate`` itself wins over the generation config's; the config's ``n_loops`` applies when neither gives
        one.
        """
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, **kwargs)
        for name in GENERATION_LOOP_FIELDS:
            if name in generation_config.__dict__:  # `update` absorbed a call's value into this (private) copy
                value = generation_config.__dict__.pop(name)
                if value is not None and name not in model_kwargs:
                    model_kwargs[name] = value
        n_loops = model_kwargs.get("n_loops")
        if _is_budget_list(n_loops) and not isinstance(n_loops, torch.Tensor):
            # a tensor, so that generate expands it with the batch (beams, num_return_sequences); _check_prompt
            # checked it against the prompt's batch size when it came with the call
            _check_loop_budgets(n_loops, self.config, len(n_loops), None)
            model_kwargs["n_loops"] = torch.as_tensor(n_loops, device=self.device)
        return generation_config, model_kwargs

    def _check_prompt(self, inputs, kwargs):
        """What the steps of generate no longer check: the prompt's token ids, its 2-D attention mask's values, and
        room for the whole generation in a StaticCache passed in."""
        prompt = kwargs.get("input_ids", inputs)
        if prompt is not None and "inputs_embeds" not in kwargs:
            if not isinstance(prompt, torch.Tensor):
                raise TypeError(f"`input_ids` must be a torch.Tensor of token ids [batch, seq_len], got "
                                f"{type(prompt).__name__}")
            if prompt.dim() != 2 or prompt.numel() == 0:
                raise ValueError(f"`input_ids` must have shape [batch, seq_len] with batch size and sequence length "
                                 f">= 1, got {tuple(prompt.shape)}")
            if prompt.dtype not in TOKEN_ID_DTYPES:
                raise ValueError(f"`input_ids` must hold integer token ids of dtype torch.int64 (long) or "
                                 f"torch.int32, got dtype {prompt.dtype}")
            _check_token_ids(prompt, self.config.vocab_size)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"`attention_mask` in generate must be a 2-D tensor [batch, seq_len] of 1 (token) / "
                                 f"0 (padding), got {shape}")
            if isinstance(prompt, torch.Tensor) and "inputs_embeds" not in kwargs and mask.shape != prompt.shape:
                raise ValueError(f"`attention_mask` must have the shape of `input_ids` {tuple(prompt.shape)}, got "
                                 f"{tuple(mask.shape)}")
            if mask.dtype != torch.bool:
                _check_attention_mask(mask, mask.shape[0], None)
        n_loops = kwargs.get("n_loops")
        if isinstance(n_loops, torch.Tensor) and n_loops.dim() == 2:
            raise ValueError(f"`n_loops` per position (a [batch, seq_len] tensor, got shape {tuple(n_loops.shape)}) "
                             f"is for a forward without a cache; generate takes an int, or one per row (a list or "
                             f"1-D tensor of batch size ints)")
        if _is_budget_list(n_loops) and isinstance(prompt, torch.Tensor) and "inputs_embeds" not in kwargs:
            _check_loop_budgets(n_loops, self.config, prompt.shape[0], None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        new_tokens = kwargs.get("max_new_tokens")
        if isinstance(cache, Cache) and isinstance(prompt, torch.Tensor) and prompt.dim() == 2 \
                and isinstance(new_tokens, numbers.Integral):
            layer = _cache_layer(cache)
            capacity, needed = getattr(layer, "max_cache_len", None), prompt.shape[1] + new_tokens - 1
            if capacity is not None and not getattr(layer, "is_sliding", False) and needed > capacity:
                raise ValueError(
                    f"This {type(cache).__name__} holds at most max_cache_len={capacity} tokens, but a prompt of "
                    f"{prompt.shape[1]} tokens and max_new_tokens={new_tokens} need {needed}. Create it with "
                    f"max_cache_len >= {needed}, or pass no cache (generate makes one).")

    def _check_generation_length(self, inputs, generation_config, kwargs):
        """Prompt + ``max_new_tokens`` (from the call, else the generation config in effect), or an explicit
        ``max_length``, must fit in ``max_seq_len``. A default ``max_length`` needs no check: generate caps it."""
        prompt = kwargs.get("inputs_embeds", kwargs.get("input_ids", inputs))
        prompt_len = prompt.shape[1] if isinstance(prompt, torch.Tensor) and prompt.dim() >= 2 else 0
        limit = self.config.max_seq_len
        new_tokens = kwargs.get("max_new_tokens")
        if new_tokens is None:
            new_tokens = (generation_config or self.generation_config).max_new_tokens
        if isinstance(new_tokens, numbers.Integral) and prompt_len + new_tokens > limit:  # bad types: generate says
            raise ValueError(
                f"`max_new_tokens`={new_tokens} with a prompt of {prompt_len} tokens asks for "
                f"{prompt_len + new_tokens} positions, but the model holds at most max_seq_len={limit}: pass "
                f"max_new_tokens <= {max(limit - prompt_len, 0)}"
                + (" (a shorter prompt first)" if prompt_len >= limit else ""))
        max_length = kwargs.get("max_length")
        if (new_tokens is None and isinstance(max_length, numbers.Integral) and "inputs_embeds" not in kwargs
                and max_length > limit):
            raise ValueError(
                f"`max_length`={max_length} (prompt of {prompt_len} tokens included) exceeds max_seq_len={limit}: "
                f"pass max_length <= {limit}, or max_new_tokens <= {max(limit - prompt_len, 0)}")

    @deprecate_kwarg("past_key_values", "5.23.0", new_name="cache", raise_if_both_names=True)
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        n_loops: int | list[int] | torch.LongTensor | None = None,
        exit_criterion: str | None = None,
        exit_threshold: float | None = None,
        output_loop_stats: bool = False,
        loop_recorder: "MythosLoopRecorder | None" = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MythosCausalLMOutput:
        r"""
        cache (`Cache`, *optional*):
            The KV cache, one slot per prelude layer, coda layer and loop iteration (``past_key_values``, its name
            before transformers 5.24, is accepted too).
        n_loops (`int`, `list[int]` or `torch.LongTensor`, *optional*):
            The loop budget: the most loops any position runs; defaults to ``config.default_n_loops``. One int, one per
            row (a list or 1-D tensor), or one per position (a [batch, seq] tensor, e.g. a recorded ``loops_used``;
            no cache). A cache filled with one budget refuses another.
        exit_criterion (`str`, *optional*):
            Stop a position before its budget: ``"act"`` (halting mass), ``"delta"`` (relative state change) or
            ``"kl"`` (change of the next-token distribution). See ``MythosExitRule``.
        exit_threshold (`float`, *optional*):
            The criterion's threshold: a position stops once its criterion falls below it (``"act"``: reaches it).
            In (0, 1] for ``"act"``; >= 0 for ``"delta"`` and ``"kl"``, where 0 stops nothing and only records.
        output_loop_stats (`bool`, *optional*, defaults to `False`):
            Whether to return per-loop statistics (`MythosLoopStats`) as ``loop_stats``.
        loop_recorder (`MythosLoopRecorder`, *optional*):
            Collects ``loops_used`` (and statistics) of every call; pass it to ``generate`` to read the loops of every
            generated token.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Token ids for the next-token loss (shifted inside; -100 is ignored).
        """
        if labels is not None:
            _check_labels(labels, input_ids, inputs_embeds, self.config.vocab_size, kwargs.get("ignore_index", -100))
        if loop_recorder is not None and not isinstance(loop_recorder, MythosLoopRecorder):
            raise TypeError(f"`loop_recorder` must be a MythosLoopRecorder, got {type(loop_recorder).__name__}")
        output_loop_stats = output_loop_stats or (loop_recorder is not None and loop_recorder.keep_stats)
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, n_loops=n_loops,
                             exit_criterion=exit_criterion, exit_threshold=exit_threshold,
                             output_loop_stats=output_loop_stats, exit_head=self.lm_head, **kwargs)
        if loop_recorder is not None:
            loop_recorder.record(outputs.loops_used, outputs.loop_stats)
        logits = self.lm_head(slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            loss = loss + self._extra_loss(outputs, labels, kwargs)
        return MythosCausalLMOutput(
            loss=loss, aux_loss=outputs.aux_loss, logits=logits, **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
            hidden_states=outputs.hidden_states, attentions=outputs.attentions, router_logits=outputs.router_logits,
            ponder_cost=outputs.ponder_cost, loops_used=outputs.loops_used, loop_stats=outputs.loop_stats)

    def _extra_loss(self, outputs: MythosModelOutput, labels: torch.Tensor, loss_kwargs: dict):
        """The weighted ponder cost plus the weighted balance loss, on the CE's scale.

        Under ``num_items_in_batch`` the CE is summed and divided by the label tokens of every accumulated
        micro-batch (and rank); the extra terms are means over this micro-batch, so they are weighted by its share of
        those tokens, and add up like the CE does.
        """
        extra = 0.0
        if outputs.ponder_cost is not None:
            extra = extra + self.config.act_ponder_weight * outputs.ponder_cost
        if outputs.aux_loss is not None:
            extra = extra + self.config.router_aux_loss_coef * outputs.aux_loss
        num_items = loss_kwargs.get("num_items_in_batch")
        if num_items is not None and torch.is_tensor(extra):
            counted = (labels[..., 1:] != loss_kwargs.get("ignore_index", -100)).sum()
            extra = extra * counted / torch.as_tensor(num_items, device=counted.device)
        return extra


class MythosLoopRecorder:
    """Collects the loops used by every forward call it is passed to; pass it to ``generate`` (``loop_recorder=``).

        recorder = MythosLoopRecorder()
        model.generate(input_ids, n_loops=8, exit_criterion="delta", exit_threshold=0.05, loop_recorder=recorder)
        recorder.prompt_loops   # [batch, prompt_len]: the prompt's positions (the first call)
        recorder.token_loops()  # [batch, new_tokens]: the position whose logits chose each generated token

    Under beam search the rows are the beams of each step, before generate reorders them. With
    ``keep_stats=True`` every call also returns and keeps its :class:`MythosLoopStats` (``stats``).
    """

    def __init__(self, keep_stats: bool = False):
        self.keep_stats = keep_stats
        self.calls: list[torch.Tensor] = []
        self.stats: list[MythosLoopStats] = []

    def record(self, loops_used: torch.Tensor, stats: MythosLoopStats | None = None) -> None:
        self.calls.append(loops_used.detach())
        if self.keep_stats and stats is not None:
            self.stats.append(stats)

    @property
    def prompt_loops(self) -> torch.Tensor | None:
        return self.calls[0] if self.calls else None

    def token_loops(self) -> torch.Tensor:
        """[batch, calls]: the last position's loops of every call, i.e. of each generated token's prediction."""
        if not self.calls:
            raise ValueError("The recorder has seen no forward call: pass it to generate(loop_recorder=...)")
        return torch.stack([loops[:, -1] for loops in self.calls], dim=1)

    def clear(self) -> None:
        self.calls.clear()
        self.stats.clear()


__all__ = ["MythosPreTrainedModel", "MythosModel", "MythosForCausalLM", "MythosLoopRecorder", "MythosLoopStats"]
