"""KV-cached generation across prelude, every loop iteration and coda."""

import functools

import pytest
import torch
from conftest import make_model
from transformers import DynamicCache, masking_utils

from openmythos.modeling_mythos import MythosForCausalLM

LOOPS = [1, 2, 4]  # 4 == mythos_tiny's max_loop_iters


def assert_cached_generate_matches_uncached(model, input_ids, n_loops):
    kwargs = dict(max_new_tokens=8, do_sample=False, n_loops=n_loops, output_logits=True,
                  return_dict_in_generate=True)
    cached = model.generate(input_ids, use_cache=True, **kwargs)
    plain = model.generate(input_ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.logits, plain.logits):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n_loops", LOOPS)
def test_cached_generate_matches_uncached(model, input_ids, n_loops):
    assert_cached_generate_matches_uncached(model, input_ids, n_loops)


@pytest.mark.parametrize("n_loops", [2, 7])  # 7 > max_loop_iters
def test_cached_generate_matches_uncached_with_halting(attn_type, input_ids, n_loops):
    model = make_model(attn_type, use_act=True)
    with torch.no_grad():
        model.model.recurrent.halt.weight.normal_(0, 50.0)  # positions halt at different loops
    assert_cached_generate_matches_uncached(model, input_ids, n_loops)


@pytest.mark.parametrize("n_loops", [1, 3])
def test_full_forward_logits_equal_token_by_token_decoding(model, input_ids, n_loops):
    full = model(input_ids, n_loops=n_loops, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    steps = [model(input_ids[:, i:i + 1], past_key_values=cache, n_loops=n_loops).logits
             for i in range(input_ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)


def test_chunked_prefill_equals_one_shot(model, input_ids):
    full = model(input_ids, n_loops=2, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    chunks = [model(input_ids[:, a:b], past_key_values=cache, n_loops=2).logits
              for a, b in ((0, 5), (5, 6), (6, 12))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-4)
    # and generation continues from the chunk-filled cache like from a fresh prompt
    nxt = full[:, -1].argmax(-1, keepdim=True)
    step = model(nxt, past_key_values=cache, n_loops=2).logits
    torch.testing.assert_close(step[:, -1], model(torch.cat([input_ids, nxt], 1), n_loops=2).logits[:, -1],
                               atol=1e-5, rtol=1e-4)


def test_left_padded_batch_matches_unpadded_rows(model, input_ids):
    short = input_ids[0, :7]
    batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), input_ids[1]])
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    padded = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, n_loops=2)
    alone = [model.generate(short[None], max_new_tokens=6, do_sample=False, n_loops=2),
             model.generate(input_ids[1:], max_new_tokens=6, do_sample=False, n_loops=2)]
    assert torch.equal(padded[0, 12:], alone[0][0, 7:])
    assert torch.equal(padded[1, 12:], alone[1][0, 12:])
    logits = model(batch, attention_mask=mask, n_loops=2).logits
    torch.testing.assert_close(logits[0, 5:], model(short[None], n_loops=2).logits[0], atol=1e-5, rtol=1e-4)


def test_beam_search_with_and_without_cache(model, input_ids):
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False, n_loops=2)
    with_cache = model.generate(input_ids, **kwargs)
    assert with_cache.shape == (2, 18)
    assert torch.equal(with_cache, model.generate(input_ids, use_cache=False, **kwargs))


def test_num_return_sequences_equals_sampling_from_repeated_prompts(model, input_ids):
    kwargs = dict(max_new_tokens=5, do_sample=True, n_loops=2)
    torch.manual_seed(0)
    out = model.generate(input_ids, num_return_sequences=3, **kwargs)
    assert out.shape == (6, 17)
    assert len({tuple(row) for row in out[:3, 12:].tolist()}) > 1  # really sampled: the returns differ
    for use_cache in (True, False):
        torch.manual_seed(0)
        assert torch.equal(out, model.generate(input_ids.repeat_interleave(3, dim=0), use_cache=use_cache, **kwargs))


def test_static_cache_matches_dynamic(model, input_ids):
    kwargs = dict(max_new_tokens=6, do_sample=False, n_loops=3)
    assert torch.equal(model.generate(input_ids, cache_implementation="static", **kwargs),
                       model.generate(input_ids, **kwargs))


def masks_given_to_steps(model, monkeypatch, **kwargs):
    """generate(**kwargs), and the attention_mask each of its forward calls was handed."""
    seen, forward = [], MythosForCausalLM.forward

    @functools.wraps(forward)  # generate reads the forward's signature
    def spy(self, *args, **kw):
        seen.append(kw.get("attention_mask"))
        return forward(self, *args, **kw)

    monkeypatch.setattr(MythosForCausalLM, "forward", spy)
    out = model.generate(**kwargs)
    monkeypatch.undo()
    return out, seen


@pytest.mark.parametrize("overrides", [dict(n_loops=3), dict(n_loops=6, loop_kv_sharing="last"),
                                       dict(n_loops=2, use_act=True)], ids=["loops", "kv-sharing", "halting"])
def test_static_generate_without_padding_hands_the_steps_no_mask(attn_type, input_ids, overrides, monkeypatch):
    """Without padding, a static-cache step gets no mask and builds the causal one itself (inside the graph when
    compiled), where transformers' create_masks_for_generate builds a 4-D one in Python every step: same logits."""
    overrides = dict(overrides)  # the parameter is shared by both attention types
    n_loops = overrides.pop("n_loops")
    model = make_model(attn_type, **overrides)
    kwargs = dict(input_ids=input_ids, max_new_tokens=5, do_sample=False, n_loops=n_loops,
                  cache_implementation="static", output_logits=True, return_dict_in_generate=True)
    own, own_masks = masks_given_to_steps(model, monkeypatch, **kwargs)
    model.create_masks_for_generate = masking_utils.create_masks_for_generate  # transformers' function
    given, given_masks = masks_given_to_steps(model, monkeypatch, **kwargs)
    assert own_masks == [None] * 5
    assert [m.shape for m in given_masks[1:]] == [(2, 1, 1, 16)] * 4  # the 4-D mask this replaces
    assert torch.equal(own.sequences, given.sequences)
    for a, b in zip(own.logits, given.logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert torch.equal(own.sequences, model.generate(**dict(kwargs, cache_implementation="dynamic")).sequences)


def test_static_generate_with_padding_keeps_the_prepared_mask(model, input_ids, monkeypatch):
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    kwargs = dict(input_ids=input_ids, attention_mask=mask, max_new_tokens=4, do_sample=False, n_loops=2)
    static, masks = masks_given_to_steps(model, monkeypatch, cache_implementation="static", **kwargs)
    assert [m.dim() for m in masks] == [4] * 4
    assert torch.equal(static, model.generate(**kwargs))  # the padding is still hidden: as with a dynamic cache


def test_static_cache_refuses_more_loops_than_slots(model, input_ids):
    with pytest.raises(ValueError, match="cache slots"):
        model.generate(input_ids, max_new_tokens=3, do_sample=False, n_loops=6, cache_implementation="static")


def test_dynamic_cache_grows_for_loops_past_training_depth(model, input_ids):
    kwargs = dict(max_new_tokens=5, do_sample=False, n_loops=7)
    assert torch.equal(model.generate(input_ids, **kwargs), model.generate(input_ids, use_cache=False, **kwargs))


def test_cache_filled_with_one_n_loops_refuses_another(model, input_ids):
    out = model(input_ids, n_loops=2)
    with pytest.raises(ValueError, match="n_loops=2"):
        model(input_ids[:, :1], past_key_values=out.past_key_values, n_loops=3)
    with pytest.raises(ValueError, match="n_loops=2"):
        model(input_ids[:, :1], past_key_values=out.past_key_values)  # default is max_loop_iters=4


def test_mla_cache_stores_latent_and_one_shared_rope_key(input_ids):
    model = make_model("mla")
    config = model.config
    cache = model(input_ids, n_loops=2).past_key_values
    latent, rope_key = cache.layers[0].keys, cache.layers[0].values
    assert latent.shape == (2, 1, 12, config.kv_lora_rank)
    assert rope_key.shape == (2, 1, 12, config.qk_rope_head_dim)
    gqa_cache = make_model("gqa")(input_ids, n_loops=2).past_key_values
    assert gqa_cache.layers[0].keys.shape == (2, config.n_kv_heads, 12, config.dim // config.n_heads)


def test_every_prelude_loop_and_coda_slot_is_written_once_per_forward(model, input_ids):
    config = model.config
    cache = model(input_ids, n_loops=3).past_key_values
    lengths = [layer.get_seq_length() for layer in cache.layers]
    used = config.prelude_layers + config.coda_layers + 3
    assert lengths[:used] == [12] * used
    assert lengths[used:] == [0] * (len(lengths) - used)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_absorbed_mla_decoding_matches_expanded(input_ids, attn_implementation):
    absorbed = make_model("mla", mla_absorb=True)
    expanded = make_model("mla", mla_absorb=False)
    for m in (absorbed, expanded):
        m.set_attn_implementation(attn_implementation)
    kwargs = dict(max_new_tokens=8, do_sample=False, n_loops=3, output_logits=True, return_dict_in_generate=True)
    a, b = absorbed.generate(input_ids, **kwargs), expanded.generate(input_ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)
    assert absorbed.model.prelude[0].self_attn._absorb(1, 13) and not expanded.model.prelude[0].self_attn._absorb(1, 13)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_absorbed_mla_chunk_against_cache_matches_expanded(input_ids, attn_implementation, monkeypatch):
    # Several new tokens against a cache (with left padding): absorbed attention folds the heads into the query rows,
    # so it must fold the causal + padding mask the same way.
    from openmythos.modeling_mythos import MythosMLAttention
    calls = []
    absorbed_attention = MythosMLAttention._absorbed_attention
    monkeypatch.setattr(MythosMLAttention, "_absorbed_attention",
                        lambda self, *a, **k: calls.append(a[0].shape[2]) or absorbed_attention(self, *a, **k))
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    logits = []
    for absorb in (True, False):
        model = make_model("mla", mla_absorb=absorb)
        model.set_attn_implementation(attn_implementation)
        cache = DynamicCache(config=model.config)
        model(input_ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, n_loops=2)
        logits.append(model(input_ids[:, 6:], attention_mask=mask, past_key_values=cache, n_loops=2).logits)
    assert calls and set(calls) == {input_ids.shape[1] - 6}  # the absorbed model took the absorbed path, per chunk
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=1e-4)
