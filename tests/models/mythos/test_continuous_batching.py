"""Continuous batching (transformers' ``generate_batch`` / ``init_continuous_batching`` over a paged cache).

The reference for every request is ``generate()`` on that request alone, with the same loop controls: the same greedy
tokens, and the same log-probability for each of them. A request's tokens must not depend on which other requests
share its batches, whatever their budgets and exit rules.
"""

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig
from transformers.generation.continuous_batching import PagedAttentionCache

from tests.conftest import make_model
from tests.models.mythos.test_adaptive_depth import clear_threshold

NEW_TOKENS = 6


def sharp_model(attn_type, **overrides):
    """A tiny random model whose greedy tokens depend on the context and on the depth. (At its initial scale the
    embedding dominates every state and greedy decoding repeats one token, which would hide a wrong cache.)"""
    model = make_model(attn_type, tie_word_embeddings=False, **overrides)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "proj" in name or "experts" in name:
                parameter.mul_(8)
    return model


@pytest.fixture
def model(attn_type):
    return sharp_model(attn_type)


@pytest.fixture
def prompts():
    torch.manual_seed(7)
    return [torch.randint(3, 512, (n,)).tolist() for n in (5, 9, 3, 12)]


def cb_config(**overrides):
    # a small cache and few tokens per step: several steps mix prefill and decode, and a long prompt is split
    values = dict(num_blocks=32, page_size=16, max_batch_tokens=24, return_logprobs=True)
    values.update(overrides)
    return ContinuousBatchingConfig(**values)


def greedy():
    return GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)


def batch(model, prompts, config=None, **loops):
    outputs = model.generate_batch(prompts, generation_config=greedy(),
                                   continuous_batching_config=config or cb_config(), **loops)
    assert len(outputs) == len(prompts)
    for output in outputs.values():
        assert output.error is None, output.error
    return [(output.generated_tokens, output.logprobs) for output in outputs.values()]


def alone(model, prompt, **loops):
    """generate() on one request: its tokens and each one's log-probability."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **loops)
    tokens = out.sequences[0, len(prompt):]
    logprobs = torch.stack([score[0].log_softmax(-1)[token] for score, token in zip(out.scores, tokens)])
    return tokens.tolist(), logprobs


def assert_same(got, expected):
    (tokens, logprobs), (ref_tokens, ref_logprobs) = got, expected
    assert tokens == ref_tokens
    torch.testing.assert_close(torch.tensor(logprobs), ref_logprobs, atol=1e-4, rtol=0)


def test_generate_batch_matches_generate(model, prompts):
    results = batch(model, prompts)
    for prompt, result in zip(prompts, results):
        assert_same(result, alone(model, prompt))


def test_eager_attention_matches_generate(model, prompts):
    """Continuous batching runs an eager model through transformers' "paged|eager" kernel, and restores "eager"."""
    model.set_attn_implementation("eager")
    budgets = [2, 4, 1, 3]
    results = batch(model, prompts, n_loops=budgets)
    assert model.config._attn_implementation == "eager"
    for prompt, budget, result in zip(prompts, budgets, results):
        assert_same(result, alone(model, prompt, n_loops=budget))


def test_generate_batch_depth_from_the_generation_config_or_the_call(model, prompts):
    """One depth for every request, given as the generate_batch argument or a generation config field."""
    config = greedy()
    config.n_loops = 2
    outputs = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb_config())
    from_config = [(o.generated_tokens, o.logprobs) for o in outputs.values()]
    from_call = batch(model, prompts, n_loops=2)
    for prompt, result, other in zip(prompts, from_config, from_call):
        expected = alone(model, prompt, n_loops=2)
        assert_same(result, expected)
        assert_same(other, expected)
    assert [tokens for tokens, _ in from_call] != [tokens for tokens, _ in batch(model, prompts)]  # depth matters


def test_per_request_budgets_match_generate(model, prompts):
    budgets = [1, 4, 2, 3]
    results = batch(model, prompts, n_loops=budgets)
    for prompt, budget, result in zip(prompts, budgets, results):
        assert_same(result, alone(model, prompt, n_loops=budget))


def test_request_tokens_do_not_depend_on_the_batch(model, prompts):
    """A request alone and in mixed batches (other budgets, other prompts, another order) gives the same tokens."""
    target = prompts[1]
    by_itself = batch(model, [target], n_loops=[3])[0]
    mixed = batch(model, [prompts[0], target, prompts[3], prompts[2]], n_loops=[1, 3, 4, 2])[1]
    reordered = batch(model, [target, prompts[3], prompts[0]], n_loops=[3, 1, 4], config=cb_config(max_batch_tokens=64))
    assert_same(mixed, (by_itself[0], torch.tensor(by_itself[1])))
    assert_same(reordered[0], (by_itself[0], torch.tensor(by_itself[1])))


def test_per_request_delta_criterion_matches_generate(model, prompts):
    """Requests with their own delta thresholds, beside requests with none, stop where generate() stops them."""
    ids = torch.tensor([prompts[3]])
    threshold = clear_threshold(model, ids, "delta", n_loops=4)
    criteria = [None, "delta", "delta", None]
    thresholds = [None, threshold, threshold * 1.5, None]
    budgets = [4, 4, 3, 2]
    results = batch(model, prompts, n_loops=budgets, exit_criterion=criteria, exit_threshold=thresholds)
    for prompt, budget, criterion, value, result in zip(prompts, budgets, criteria, thresholds, results):
        extra = {} if criterion is None else dict(exit_criterion=criterion, exit_threshold=value)
        assert_same(result, alone(model, prompt, n_loops=budget, **extra))


@pytest.mark.parametrize("attn_type", ["mla"])  # the halting rule does not depend on the attention type
def test_per_request_act_thresholds_match_generate(attn_type, prompts):
    """Every request halting by ACT, each at its own threshold and budget, stops where generate() stops it."""
    model = sharp_model(attn_type, use_act=True)
    with torch.no_grad():  # spread-out halting probabilities (zero-initialised, it would halt nowhere early)
        model.model.recurrent.halt.weight.normal_(0, 0.5)
        model.model.recurrent.halt.bias.fill_(-1.0)
    # each request's threshold clear of the halting masses of its own prompt
    thresholds = [clear_threshold(model, torch.tensor([prompt]), "act", n_loops=4) for prompt in prompts]
    assert len(set(thresholds)) > 1
    budgets = [4, 3, 4, 2]
    results = batch(model, prompts, n_loops=budgets, exit_criterion="act", exit_threshold=thresholds)
    for prompt, budget, value, result in zip(prompts, budgets, thresholds, results):
        assert_same(result, alone(model, prompt, n_loops=budget, exit_criterion="act", exit_threshold=value))


def run_manager(model, controls: dict, prompts, before_start=None) -> dict:
    """init_continuous_batching + add_request, each request's loop controls set through ``model.request_loops``
    (``controls``: request id -> keyword arguments); ``before_start()`` runs once they are registered. Every request's
    finished result, by id."""
    manager = model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb_config())
    for request_id, loops in controls.items():
        model.request_loops.set(request_id, **loops)
    if before_start is not None:
        before_start()
    manager.start()
    try:
        for request_id, prompt in zip(controls, prompts):
            manager.add_request(prompt, request_id=request_id, max_new_tokens=NEW_TOKENS)
        results = {}
        while len(results) < len(controls):
            result = manager.get_result(timeout=30)
            assert result is not None, "the manager stopped before every request finished"
            if result.is_finished():
                results[result.request_id] = result
    finally:
        manager.stop(block=True, timeout=10)
        for request_id in controls:
            model.request_loops.pop(request_id)
    return results


def test_manager_takes_per_request_loops(model, prompts):
    """init_continuous_batching + add_request: ``model.request_loops.set`` gives a request its own depth."""
    budgets = {"a": 1, "b": 3}
    results = run_manager(model, {request_id: {"n_loops": n} for request_id, n in budgets.items()}, prompts)
    for (request_id, budget), prompt in zip(budgets.items(), prompts):
        assert results[request_id].error is None
        assert_same((results[request_id].generated_tokens, results[request_id].logprobs),
                    alone(model, prompt, n_loops=budget))


@pytest.mark.parametrize("attn_type", ["gqa"])
def test_a_request_registered_before_exit_scope_became_prefix_is_refused(model, prompts):
    """``exit_scope="prefix"`` would make a request wait for other requests' tokens in the packed row: a request whose
    exit rule was accepted under "position" is refused once the scope changes, not run with a rule that spans requests."""
    loops = {"n_loops": 4, "exit_criterion": "delta", "exit_threshold": 0.1}
    results = run_manager(model, {"a": loops, "b": loops}, prompts,
                          before_start=lambda: setattr(model.config, "exit_scope", "prefix"))
    assert len(results) == 2
    assert all("exit_scope" in str(result.error) for result in results.values()), results


@pytest.mark.parametrize("attn_type", ["mla"])
def test_mla_paged_cache_keeps_the_latent(model, prompts, monkeypatch):
    """An MLA layer writes its normalised latent and its one shared rope key per token to the paged cache (packed
    into the token's key and value rows), not keys and values expanded per head."""
    writes = {}
    update = PagedAttentionCache.update

    def recording_update(self, keys, values, layer_idx, kwargs):
        writes.setdefault(layer_idx, (keys.clone(), values.clone()))
        return update(self, keys, values, layer_idx, kwargs)

    monkeypatch.setattr(PagedAttentionCache, "update", recording_update)
    prompt = prompts[1]
    assert_same(batch(model, [prompt])[0], alone(model, prompt))
    keys, values = writes[0]  # slot 0: the prelude layer, first written by the prefill of the whole prompt
    flat = torch.cat([x[0].transpose(0, 1).flatten(1) for x in (keys, values)], dim=-1)  # [tokens, row numbers]
    inner = model.model
    embeds = inner.embed_tokens(torch.tensor([prompt]))
    position_embeddings = inner.rotary_emb(embeds, torch.arange(len(prompt))[None])
    layer = inner.prelude[0]
    latent, k_rope = layer.self_attn._latent(layer.input_layernorm(embeds), position_embeddings)
    rank, rope = model.config.kv_lora_rank, model.config.qk_rope_head_dim
    torch.testing.assert_close(flat[:, :rank], latent[0, 0])
    torch.testing.assert_close(flat[:, rank:rank + rope], k_rope[0, 0])
    assert not flat[:, rank + rope:].any()  # the rest of the rows stays unused


@pytest.mark.parametrize(
    "loops, match",
    [
        (dict(n_loops=[1, 2]), "one per input"),
        (dict(n_loops=[1, 2, 3, 9]), "n_loops.*max_loop_iters=4"),
        (dict(n_loops=0), "n_loops"),
        (dict(exit_criterion="kl", exit_threshold=0.1), "exit_criterion='kl'"),
        (dict(exit_criterion=["delta", "delta", "delta", "bad"], exit_threshold=0.1), "exit_criterion"),
        (dict(exit_criterion=[None, "delta", None, None]), "exit_threshold"),
    ],
)
@pytest.mark.parametrize("attn_type", ["mla"])
def test_bad_loop_controls_are_refused_before_any_work(model, prompts, loops, match):
    with pytest.raises(ValueError, match=match):
        model.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config(), **loops)


@pytest.mark.parametrize("bad, match", [
    ([5, 900], r"`inputs\[1\]` must hold token ids in \[0, vocab_size=512\), got values from 5 to 900"),
    ([], r"`inputs\[1\]` must be a non-empty list of int token ids"),
    ([5, 1.5], r"`inputs\[1\]` must be a non-empty list of int token ids"),
])
@pytest.mark.parametrize("attn_type", ["mla"])
def test_one_bad_prompt_is_refused_before_any_request_starts(model, prompts, bad, match):
    """Inside the batch loop it failed every request beside it."""
    with pytest.raises(ValueError, match=match):
        model.generate_batch([prompts[0], bad], generation_config=greedy(), continuous_batching_config=cb_config())
    with pytest.raises(ValueError, match=match):
        model.generate_batch([prompts[0], bad], generation_config=greedy(), continuous_batching_config=cb_config(),
                             n_loops=[1, 2])


def test_act_cannot_share_a_batch_with_other_rules(prompts):
    model = sharp_model("mla", use_act=True)
    with pytest.raises(ValueError, match="exit_criterion"):
        batch(model, prompts, exit_criterion=["act", None, "act", "act"], exit_threshold=0.5)


@pytest.mark.parametrize("attn_type", ["mla"])
def test_unsupported_paged_features_are_refused(model, prompts):
    with pytest.raises(ValueError, match="use_cuda_graph"):
        model.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config(
            use_cuda_graph=True))
    narrow = sharp_model("mla", n_kv_heads=1)  # paged rows of 2 * 1 * 16 numbers; MLA caches 32 + 8
    with pytest.raises(ValueError, match="n_kv_heads"):
        narrow.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config())
    shared = sharp_model("mla", loop_kv_sharing="first")
    with pytest.raises(ValueError, match="loop_kv_sharing"):
        shared.generate_batch(prompts, generation_config=greedy(), continuous_batching_config=cb_config())
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        model.init_continuous_batching(generation_config=greedy(), continuous_batching_config=cb_config())
