"""Cross-loop KV sharing (config.loop_kv_sharing): cache == no-cache, flat cache size, the attention rule."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from conftest import make_model
from openmythos import MythosConfig, mythos_tiny

SHARINGS = ["first", "last"]


@pytest.fixture(params=SHARINGS)
def sharing(request):
    return request.param


@pytest.fixture
def shared_model(attn_type, sharing):
    return make_model(attn_type, loop_kv_sharing=sharing)


@torch.no_grad()
def test_chunked_and_token_by_token_decoding_equal_the_no_cache_forward(shared_model, input_ids):
    full = shared_model(input_ids, use_cache=False, n_loops=3).logits
    for cache in (DynamicCache(config=shared_model.config), StaticCache(config=shared_model.config, max_cache_len=16)):
        chunks = [shared_model(input_ids[:, :5], cache=cache, n_loops=3).logits]
        chunks += [shared_model(input_ids[:, 5:9], cache=cache, n_loops=3).logits]
        chunks += [shared_model(input_ids[:, i:i + 1], cache=cache, n_loops=3).logits for i in range(9, 12)]
        torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_left_padded_rows_equal_unpadded(shared_model, input_ids):
    padded = torch.cat((torch.zeros(1, 3, dtype=torch.long), input_ids[:1, :9]), dim=1)
    mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)), dim=1)
    alone = shared_model(input_ids[:1, :9], use_cache=False, n_loops=3).logits
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    together = shared_model(padded, attention_mask=mask, position_ids=position_ids, use_cache=False, n_loops=3).logits
    torch.testing.assert_close(together[:, 3:], alone, rtol=1e-5, atol=1e-5)


def test_generate_with_dynamic_static_and_no_cache_agree(shared_model, input_ids):
    kwargs = dict(max_new_tokens=5, do_sample=False, n_loops=6)  # 6 > max_loop_iters: a static cache still fits
    cached = shared_model.generate(input_ids, **kwargs)
    assert torch.equal(cached, shared_model.generate(input_ids, use_cache=False, **kwargs))
    assert torch.equal(cached, shared_model.generate(input_ids, cache_implementation="static", **kwargs))


@torch.no_grad()
def test_cache_bytes_per_token_stay_flat_in_n_loops(attn_type, input_ids):
    def cache_bytes(model, n_loops):
        cache = DynamicCache(config=model.config)
        model(input_ids, cache=cache, n_loops=n_loops)
        return sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers if layer.is_initialized)

    for sharing in SHARINGS:
        model = make_model(attn_type, loop_kv_sharing=sharing)
        assert model.config.num_hidden_layers == 3  # prelude + coda + one loop slot
        assert len({cache_bytes(model, n) for n in (1, 4, 16)}) == 1
    plain = make_model(attn_type)
    assert cache_bytes(plain, 16) == 6 * cache_bytes(plain, 1)  # 2 + 16 slots against 2 + 1


@torch.no_grad()
def test_first_reads_loop_zero_keys_and_differs_from_no_sharing(attn_type, input_ids):
    """One loop is the same model whatever the rule; more loops read different keys, so the rules differ."""
    logits = {s: make_model(attn_type, loop_kv_sharing=s)(input_ids, use_cache=False, n_loops=1).logits
              for s in ("none", "first", "last")}
    torch.testing.assert_close(logits["first"], logits["none"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits["last"], logits["none"], rtol=1e-5, atol=1e-5)
    deeper = {s: make_model(attn_type, loop_kv_sharing=s)(input_ids, use_cache=False, n_loops=3).logits
              for s in ("none", "first", "last")}
    assert (deeper["first"] - deeper["none"]).abs().max() > 1e-3
    assert (deeper["last"] - deeper["first"]).abs().max() > 1e-3


def test_first_position_never_reads_other_positions(attn_type, input_ids):
    """Position 0 has no earlier positions: only its own keys, under every rule, so changing later tokens leaves it."""
    model = make_model(attn_type, loop_kv_sharing="first")
    other = input_ids.clone()
    other[:, 1:] = 7
    with torch.no_grad():
        a, b = (model(x, use_cache=False, n_loops=3).logits[:, 0] for x in (input_ids, other))
    torch.testing.assert_close(a, b)


def test_training_step_runs_and_backpropagates(sharing, input_ids):
    model = make_model("mla", loop_kv_sharing=sharing, router_aux_loss_coef=0.01).train()
    out = model(input_ids, labels=input_ids, n_loops=2)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.aux_loss is not None
    assert model.model.recurrent.layer.self_attn.o_proj.weight.grad.abs().sum() > 0


def test_adaptive_controls_are_refused_with_sharing(shared_model, input_ids):
    for kwargs, named in ((dict(exit_criterion="delta", exit_threshold=0.1), "exit_criterion"),
                          (dict(n_loops=[1, 2]), "n_loops"), (dict(output_loop_stats=True), "output_loop_stats")):
        with pytest.raises(ValueError, match=named) as error:
            shared_model(input_ids, **kwargs)
        assert "loop_kv_sharing" in str(error.value)


def test_config_checks_and_saves_the_field(tmp_path):
    with pytest.raises(ValueError, match="loop_kv_sharing"):
        mythos_tiny(loop_kv_sharing="all")
    config = mythos_tiny(loop_kv_sharing="last")
    config.save_pretrained(tmp_path)
    loaded = MythosConfig.from_pretrained(tmp_path)
    assert loaded.loop_kv_sharing == "last" and loaded.num_hidden_layers == config.num_hidden_layers == 3
