"""Bad input gets a named error before any work is done: one class of bad input per test.

Each test asserts the error type, that the message names the argument (and the accepted bound), and, where it
matters, that no layer ran before the error.
"""

import math

import numpy as np
import pytest
import torch
from conftest import make_model
from transformers import DynamicCache, StaticCache

from openmythos import mythos_tiny
from openmythos.training import sample_n_loops


def count_layer_calls(model):
    """Forward pre-hook on the first prelude layer; returns the list that records each call."""
    calls = []
    model.model.prelude[0].register_forward_pre_hook(lambda module, args: calls.append(1))
    return calls


class TestLoopCountBound:
    def test_n_loops_past_the_default_bound_is_refused_before_any_layer_runs(self, model, input_ids):
        limit = 8 * model.config.max_loop_iters
        assert model.config.loop_limit == limit
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match="n_loops") as error:
            model(input_ids, n_loops=limit + 1)
        assert "max_inference_loops" in str(error.value) and str(limit) in str(error.value)
        assert calls == []
        with pytest.raises(ValueError, match="max_inference_loops"):
            model(input_ids, n_loops=10**6)
        assert model(input_ids[:, :2], n_loops=limit, use_cache=False).logits.shape == (2, 2, 512)

    def test_max_inference_loops_sets_the_bound(self, input_ids):
        model = make_model("gqa", max_inference_loops=5)
        model(input_ids, n_loops=5)
        with pytest.raises(ValueError, match="max_inference_loops=5"):
            model(input_ids, n_loops=6)
        with pytest.raises(ValueError, match="max_inference_loops"):
            model.generate(input_ids, max_new_tokens=2, do_sample=False, n_loops=6)

    def test_training_draws_are_capped_at_the_loop_limit(self):
        # The config refuses such values when it is built; the draw is capped anyway, for a config edited afterwards.
        config = mythos_tiny(loop_sampling="poisson_lognormal", max_inference_loops=12)
        config.mean_train_loops = 1e12
        draws = [sample_n_loops(config, step) for step in range(200)]
        assert max(draws) == 12 and min(draws) >= 1
        # the cap applies to an explicit max_train_loops too
        config = mythos_tiny(loop_sampling="poisson_lognormal", mean_train_loops=30)
        config.max_train_loops = 1000
        draws = [sample_n_loops(config, step) for step in range(200)]
        assert max(draws) == config.loop_limit == 32


class TestSpectralRadius:
    @pytest.mark.parametrize("name", ["log_A", "log_dt"])
    def test_nan_parameter_is_refused_by_name(self, model, name):
        with torch.no_grad():
            getattr(model.model.recurrent.injection, name)[0] = math.nan
        with pytest.raises(ValueError, match=name) as error:
            model.spectral_radius()
        assert "NaN" in str(error.value)

    @pytest.mark.parametrize("log_A, log_dt", [(math.inf, 0.0), (-math.inf, 0.0), (0.0, math.inf),
                                               (0.0, -math.inf), (math.inf, -math.inf), (-math.inf, math.inf)])
    def test_infinite_parameters_keep_rho_below_one(self, model, log_A, log_dt):
        injection = model.model.recurrent.injection
        with torch.no_grad():
            injection.log_A.fill_(log_A)
            injection.log_dt.fill_(log_dt)
        assert 0 < model.spectral_radius() < 1


class TestCache:
    def test_dynamic_cache_from_another_batch_size(self, model, input_ids):
        cache = model(input_ids, n_loops=2).past_key_values  # batch 2
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match="cache") as error:
            model(input_ids[:1, :1], past_key_values=cache, n_loops=2)
        assert "batch size 2" in str(error.value) and "batch size 1" in str(error.value)
        assert calls == []

    def test_static_cache_from_another_batch_size(self, model, input_ids):
        cache = StaticCache(config=model.config, max_cache_len=32)
        model(input_ids, past_key_values=cache, n_loops=2)
        with pytest.raises(ValueError, match="cache") as error:
            model(torch.cat([input_ids, input_ids])[:, :1], past_key_values=cache, n_loops=2)
        assert "batch size 2" in str(error.value) and "batch size 4" in str(error.value)

    def test_static_cache_overflow(self, model, input_ids):
        cache = StaticCache(config=model.config, max_cache_len=16)
        model(input_ids, past_key_values=cache, n_loops=2)  # 12 of 16 tokens
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match="max_cache_len=16") as error:
            model(input_ids[:, :5], past_key_values=cache, n_loops=2)
        assert "12 cached + 5 new" in str(error.value) and "StaticCache" in str(error.value)
        assert calls == []
        model(input_ids[:, :4], past_key_values=cache, n_loops=2)  # exactly full is fine


class TestLabels:
    def test_labels_of_the_wrong_shape(self, model, input_ids):
        for labels in (input_ids[:, :-1], input_ids[:1], input_ids.flatten()):
            with pytest.raises(ValueError, match="labels") as error:
                model(input_ids, labels=labels, n_loops=1)
            assert str(tuple(input_ids.shape)) in str(error.value)

    @pytest.mark.parametrize("bad", [512, -1, -101])
    def test_labels_out_of_range(self, model, input_ids, bad):
        labels = input_ids.clone()
        labels[1, 3] = bad
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match="labels") as error:
            model(input_ids, labels=labels, n_loops=1)
        assert "vocab_size=512" in str(error.value) and str(bad) in str(error.value)
        assert calls == []

    def test_ignore_index_and_integer_dtype(self, model, input_ids):
        labels = input_ids.clone()
        labels[:, :4] = -100  # the ignore index is fine
        assert torch.isfinite(model(input_ids, labels=labels, n_loops=1).loss)
        with pytest.raises(ValueError, match="labels"):
            model(input_ids, labels=input_ids.float(), n_loops=1)
        with pytest.raises(TypeError, match="labels"):
            model(input_ids, labels=input_ids.tolist(), n_loops=1)


class TestAttentionMaskValues:
    @pytest.mark.parametrize("bad", [2, -1, 0.5])
    def test_values_other_than_zero_and_one(self, model, input_ids, bad):
        mask = torch.ones_like(input_ids, dtype=torch.float if isinstance(bad, float) else torch.long)
        mask[0, 0] = bad
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match="attention_mask") as error:
            model(input_ids, attention_mask=mask, n_loops=1)
        assert str(bad) in str(error.value)
        assert calls == []

    def test_zero_one_masks_of_any_dtype_are_accepted(self, model, input_ids):
        mask = torch.ones_like(input_ids)
        mask[0, :3] = 0
        expected = model(input_ids, attention_mask=mask, n_loops=1).logits
        for dtype in (torch.bool, torch.float32, torch.int32):
            torch.testing.assert_close(model(input_ids, attention_mask=mask.to(dtype), n_loops=1).logits, expected)


class TestPositionIds:
    def test_position_ids_batch_must_be_one_or_the_input_batch(self, model):
        ids = torch.randint(0, 512, (3, 5))
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match="position_ids") as error:
            model(ids, position_ids=torch.arange(5).repeat(2, 1), n_loops=1)
        assert "batch size 2" in str(error.value) and "3" in str(error.value)
        assert calls == []
        expected = model(ids, n_loops=1).logits
        torch.testing.assert_close(model(ids, position_ids=torch.arange(5)[None], n_loops=1).logits, expected)
        torch.testing.assert_close(model(ids, position_ids=torch.arange(5).repeat(3, 1), n_loops=1).logits, expected)

    def test_one_dimensional_position_ids_are_one_row_for_every_sequence(self, model):
        ids = torch.randint(0, 512, (3, 5))
        expected = model(ids, position_ids=torch.arange(2, 7)[None], n_loops=1).logits
        torch.testing.assert_close(model(ids, position_ids=torch.arange(2, 7), n_loops=1).logits, expected)
        with pytest.raises(ValueError, match="position_ids"):
            model(ids, position_ids=torch.arange(5)[None, None], n_loops=1)


class TestGenerationLength:
    @pytest.mark.parametrize("kwargs", [dict(max_new_tokens=20), dict(max_length=140)])
    def test_too_many_new_tokens_is_refused_before_the_first_step(self, model, kwargs):
        calls = count_layer_calls(model)
        prompt = torch.ones(1, 120, dtype=torch.long)
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=name) as error:
            model.generate(prompt, do_sample=False, n_loops=1, **kwargs)
        message = str(error.value)
        assert "120" in message and "max_seq_len=128" in message
        assert calls == []

    def test_generation_config_max_new_tokens_counts_too(self, model):
        model.generation_config.max_new_tokens = 30
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match="max_new_tokens"):
            model.generate(torch.ones(1, 100, dtype=torch.long), do_sample=False, n_loops=1)
        assert calls == []

    def test_generation_up_to_max_seq_len_is_fine(self, model):
        out = model.generate(torch.ones(1, 120, dtype=torch.long), max_new_tokens=8, do_sample=False, n_loops=1)
        assert out.shape == (1, 128)


class TestInputTypes:
    @pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int8])
    def test_token_ids_of_a_dtype_the_embedding_cannot_take(self, model, dtype):
        """uint8 once failed with a message contradicting itself ('values from 1 to 3' outside [0, 512)), the others
        inside the embedding."""
        calls = count_layer_calls(model)
        ids = torch.tensor([[1, 2, 3]], dtype=dtype)
        with pytest.raises(ValueError, match=r"`input_ids` must hold integer token ids of dtype torch.int64"):
            model(ids, n_loops=1)
        with pytest.raises(ValueError, match=r"`input_ids` must hold integer token ids of dtype torch.int64"):
            model.generate(ids, max_new_tokens=2, do_sample=False)
        assert calls == []
        expected = model(ids.long(), n_loops=1).logits
        torch.testing.assert_close(model(ids.int(), n_loops=1).logits, expected)

    @pytest.mark.parametrize("name", ["input_ids", "attention_mask", "position_ids"])
    def test_a_list_instead_of_a_tensor_is_named(self, model, input_ids, name):
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      position_ids=torch.arange(input_ids.shape[1])[None])
        kwargs[name] = kwargs[name].tolist()
        with pytest.raises(TypeError, match=f"`{name}` must be a torch.Tensor, got list"):
            model(**kwargs, n_loops=1)

    @pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.int64])
    def test_inputs_embeds_of_another_dtype_than_the_model(self, model, input_ids, dtype):
        """float64 once failed inside `linear`; under autocast, float32/16 and bfloat16 are the user's choice."""
        embeds = model.get_input_embeddings()(input_ids)
        expected = model(inputs_embeds=embeds, n_loops=1).logits
        with pytest.raises(ValueError, match=r"`inputs_embeds` must be a floating-point tensor of the model's dtype "
                                             rf"torch.float32.*got dtype {dtype}"):
            model(inputs_embeds=embeds.to(dtype), n_loops=1)
        if dtype == torch.bfloat16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(inputs_embeds=embeds.to(dtype), n_loops=1).logits
            torch.testing.assert_close(logits.float(), expected, atol=0.15, rtol=0.05)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="under torch.autocast"):
                model(inputs_embeds=embeds.to(dtype), n_loops=1)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
    def test_position_ids_must_be_integers(self, model, input_ids, dtype):
        positions = torch.arange(input_ids.shape[1])[None].to(dtype)
        with pytest.raises(ValueError, match=r"`position_ids` must hold integer positions"):
            model(input_ids, position_ids=positions, n_loops=1)


class TestPreparedMasks:
    def test_a_4d_mask_of_the_wrong_shape_is_named(self, model, input_ids):
        batch, seq = input_ids.shape
        calls = count_layer_calls(model)
        for shape in [(batch, 1, seq - 1, seq - 1), (batch + 1, 1, seq, seq), (batch, 3, seq, seq),
                      (batch, 1, seq, seq + 2)]:
            with pytest.raises(ValueError, match=r"A prepared 4-D `attention_mask` must have shape") as error:
                model(input_ids, attention_mask=torch.ones(shape), n_loops=1)
            assert str(shape) in str(error.value)
        assert calls == []

    def test_a_4d_mask_of_the_right_shape_equals_the_2d_mask(self, model, input_ids):
        batch, seq = input_ids.shape
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None, None].expand(batch, 1, seq, seq)
        expected = model(input_ids, n_loops=2, use_cache=False).logits
        torch.testing.assert_close(model(input_ids, attention_mask=causal, n_loops=2, use_cache=False).logits,
                                   expected)


class TestGeneratePrompt:
    """generate checks the prompt itself, before transformers' own code reads it."""

    @pytest.mark.parametrize("prompt, match", [
        (torch.tensor([5, 6, 7]), r"shape \[batch, seq_len\].*\(3,\)"),
        (torch.zeros(2, 0, dtype=torch.long), r"shape \[batch, seq_len\].*\(2, 0\)"),
    ])
    def test_a_prompt_of_the_wrong_shape(self, model, prompt, match):
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match=match):
            model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert calls == []

    def test_a_list_prompt(self, model):
        with pytest.raises(TypeError, match="`input_ids` must be a torch.Tensor"):
            model.generate([[5, 6, 7]], max_new_tokens=2, do_sample=False)

    @pytest.mark.parametrize("length", [4, 6, 9])
    def test_a_mask_of_another_length_than_the_prompt(self, model, length):
        """A shorter mask was blamed on `position_ids`; an all-ones longer one was silently accepted."""
        prompt = torch.randint(3, 512, (2, 5))
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match=r"`attention_mask` must have the shape of `input_ids` \(2, 5\)"):
            model.generate(prompt, attention_mask=torch.ones(2, length, dtype=torch.long), max_new_tokens=2,
                           do_sample=False)
        assert calls == []

    def test_a_one_dimensional_mask(self, model):
        with pytest.raises(ValueError, match=r"`attention_mask` in generate must be a 2-D tensor"):
            model.generate(torch.randint(3, 512, (1, 5)), attention_mask=torch.ones(5, dtype=torch.long),
                           max_new_tokens=2, do_sample=False)

    @pytest.mark.parametrize("n_loops, match", [
        ([1, 2, 3], r"got shape \(3,\) for an input of batch size 2$"),
        ([0, 2], "got values from 0 to 2"),
        ([True, 2], "a bool"),
    ])
    def test_per_row_budgets_are_checked_against_the_prompt_before_the_prefill(self, model, n_loops, match):
        """The message offers what generate takes: per-position budgets (once described as a [2, 1] tensor) are not
        among them."""
        calls = count_layer_calls(model)
        with pytest.raises(ValueError, match=r"`n_loops` must be an int or one per row \(a list or 1-D tensor of 2 "
                                             r"ints\), each from 1 to 32") as error:
            model.generate(torch.randint(3, 512, (2, 5)), n_loops=n_loops, max_new_tokens=2, do_sample=False)
        assert error.match(match) and "per position" not in str(error.value)
        assert calls == []

    def test_numpy_budgets_are_budgets(self, model):
        """A numpy array of budgets once got the single-int message; it runs as the same list would."""
        prompt = torch.randint(3, 512, (2, 5))
        expected = model.generate(prompt, n_loops=[1, 3], max_new_tokens=3, do_sample=False)
        assert torch.equal(model.generate(prompt, n_loops=np.array([1, 3]), max_new_tokens=3, do_sample=False),
                           expected)
        torch.testing.assert_close(model(prompt, n_loops=np.array([1, 3])).logits,
                                   model(prompt, n_loops=[1, 3]).logits)
        torch.testing.assert_close(model(prompt, n_loops=np.array(2)).logits, model(prompt, n_loops=2).logits)
        with pytest.raises(ValueError, match="positive integer"):
            model(prompt, n_loops=np.array(2.5))

    def test_per_position_budgets_are_refused_before_the_prefill(self, model):
        prompt = torch.randint(3, 512, (2, 5))
        calls = count_layer_calls(model)
        for use_cache in (True, False):
            with pytest.raises(ValueError, match=r"`n_loops` per position .* is for a forward without a cache"):
                model.generate(prompt, n_loops=torch.full((2, 5), 2), max_new_tokens=3, do_sample=False,
                               use_cache=use_cache)
        assert calls == []


def test_output_loop_stats_must_be_a_bool(model, input_ids):
    with pytest.raises(ValueError, match=r"`output_loop_stats` must be True or False, got 'no'"):
        model(input_ids, n_loops=2, output_loop_stats="no")


def test_a_halting_model_trained_on_a_batch_of_padding_only_gets_a_finite_loss():
    """The ponder cost averaged over no token was NaN, and so was the loss."""
    model = make_model("gqa", use_act=True).train()
    ids = torch.randint(3, 512, (2, 6))
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    out = model(ids, attention_mask=mask, labels=labels, n_loops=3)
    assert torch.isfinite(out.loss)
