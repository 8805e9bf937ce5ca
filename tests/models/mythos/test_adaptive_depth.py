"""Depth as a runtime resource: per-row and per-position loop budgets, exit criteria, and what they save.

The reference for every adaptive run is a plain one: a row run alone with its own budget, or a no-cache forward
replaying the loops an adaptive run used (``n_loops`` = its ``loops_used``, one budget per position).
"""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from openmythos import MythosLoopRecorder
from tests.conftest import make_model

BUDGETS = [1, 3, 6]


@pytest.fixture
def act_model(attn_type):
    """A halting model whose head gives spread-out probabilities (zero-initialised, it would halt nowhere early)."""
    model = make_model(attn_type, use_act=True)
    with torch.no_grad():
        model.model.recurrent.halt.weight.normal_(0, 0.5)
        model.model.recurrent.halt.bias.fill_(-1.0)
    return model


@pytest.fixture
def ids():
    torch.manual_seed(3)
    return torch.randint(3, 512, (3, 10))


def criterion_values(stats, criterion):
    """What each criterion compares with its threshold, per loop and position (NaN where nothing is compared)."""
    if criterion == "act":
        return stats.halting_probs.nan_to_num(0.0).cumsum(0).masked_fill(~stats.active, float("nan"))
    return stats.state_change if criterion == "delta" else stats.kl


def clear_threshold(model, ids, criterion, n_loops=6, check=None):
    """A threshold that stops some positions early and others late, with every value the criterion compares at least
    1% away from it: float noise (another batch shape, a cache) cannot flip a decision, so runs that should make the
    same decisions must make exactly the same ones. ``check(threshold)`` returns the stats of further runs to clear."""
    kwargs = dict(exit_criterion="kl", exit_threshold=1e-30) if criterion == "kl" else {}
    stats = model(ids, n_loops=n_loops, output_loop_stats=True, use_cache=False, **kwargs).loop_stats
    values = criterion_values(stats, criterion)
    values = values[values.isfinite() & (values > 0)].detach().sort().values
    middle = values[len(values) // 4: 3 * len(values) // 4]
    gaps = middle[1:] / middle[:-1]
    for i in gaps.argsort(descending=True)[:8].tolist():
        threshold = float((middle[i] * middle[i + 1]).sqrt())
        runs = [model(ids, n_loops=n_loops, exit_criterion=criterion, exit_threshold=threshold,
                      output_loop_stats=True, use_cache=False).loop_stats]
        runs += check(threshold) if check is not None else []
        compared = torch.cat([criterion_values(run, criterion).flatten() for run in runs])
        compared = compared[compared.isfinite()]
        if ((compared - threshold).abs() / threshold).min() > 0.01:
            return threshold
    pytest.fail(f"no {criterion} threshold clear of every compared value")


def delta_threshold(model, ids):
    return clear_threshold(model, ids, "delta")


class TestNoCriterion:
    def test_outputs_unchanged_by_statistics_and_equal_budgets(self, model, ids):
        plain = model(ids, n_loops=4, use_cache=False)
        with_stats = model(ids, n_loops=4, use_cache=False, output_loop_stats=True)
        equal_rows = model(ids, n_loops=[4, 4, 4], use_cache=False)
        assert torch.equal(plain.logits, with_stats.logits)
        assert torch.equal(plain.logits, equal_rows.logits)
        assert torch.equal(plain.loops_used, torch.full((3, 10), 4))
        assert with_stats.loop_stats.active.all() and with_stats.loop_stats.processed.tolist() == [30] * 4

    def test_statistics_are_consistent(self, model, ids):
        out = model(ids, n_loops=4, use_cache=False, output_loop_stats=True)
        stats = out.loop_stats
        assert stats.state_change.shape == (4, 3, 10) and (stats.state_change > 0).all()
        assert stats.halting_probs is None and stats.kl is None
        top_k = model.config.n_experts_per_tok
        assert stats.expert_counts.shape == (4, model.config.n_experts)
        assert stats.expert_counts.sum(1).tolist() == [30 * top_k] * 4
        assert stats.spectral_radius == pytest.approx(model.spectral_radius())

    def test_padding_leaves_expert_counts(self, model, ids):
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        stats = model(ids, attention_mask=mask, n_loops=2, use_cache=False, output_loop_stats=True).loop_stats
        assert stats.expert_counts.sum(1).tolist() == [26 * model.config.n_experts_per_tok] * 2


class TestPerRowBudgets:
    # ascending budgets leave the running rows one contiguous run (taken as slices), the second order does not
    # (taken by index: rows 0 and 2 run loops 1-2)
    @pytest.mark.parametrize("budgets", [BUDGETS, [3, 1, 6]])
    @pytest.mark.parametrize("halting", [False, True], ids=["plain", "act"])
    def test_forward_equals_each_row_alone(self, attn_type, ids, budgets, halting):
        model = make_model(attn_type, use_act=halting)
        if halting:  # a zero-initialised head would give every loop the same small halting probability
            with torch.no_grad():
                model.model.recurrent.halt.weight.normal_(0, 0.5)
        out = model(ids, n_loops=budgets, use_cache=False)
        for row, budget in enumerate(budgets):
            alone = model(ids[row:row + 1], n_loops=budget, use_cache=False)
            torch.testing.assert_close(out.logits[row:row + 1], alone.logits, atol=1e-5, rtol=0)
            assert (out.loops_used[row] == budget).all()
        # inference without statistics takes the lean row loop; with them, the general one: the same arithmetic
        bookkept = model(ids, n_loops=budgets, use_cache=False, output_loop_stats=True)
        assert torch.equal(out.logits, bookkept.logits) and torch.equal(out.loops_used, bookkept.loops_used)

    def test_tensor_budgets_and_padding(self, model, ids):
        mask = torch.ones_like(ids)
        mask[1, :3] = 0
        out = model(ids, attention_mask=mask, n_loops=torch.tensor(BUDGETS), use_cache=False)
        for row, budget in enumerate(BUDGETS):
            same = model(ids, attention_mask=mask, n_loops=budget, use_cache=False)
            torch.testing.assert_close(out.logits[row, mask[row].bool()], same.logits[row, mask[row].bool()],
                                       atol=1e-5, rtol=0)

    def test_cached_prefill_and_decode_equal_each_row_alone(self, model, ids):
        cache = DynamicCache(config=model.config)
        first = model(ids[:, :6], n_loops=BUDGETS, cache=cache, use_cache=True)
        second = model(ids[:, 6:], n_loops=BUDGETS, cache=first.past_key_values, use_cache=True)
        for row, budget in enumerate(BUDGETS):
            alone = model(ids[row:row + 1], n_loops=budget, use_cache=False)
            torch.testing.assert_close(first.logits[row], alone.logits[0, :6], atol=1e-5, rtol=0)
            torch.testing.assert_close(second.logits[row], alone.logits[0, 6:], atol=1e-5, rtol=0)

    @pytest.mark.parametrize("budgets", [BUDGETS, [3, 1, 6]])
    @pytest.mark.parametrize("mode", ["greedy", "beam"])
    def test_generate_equals_each_row_alone(self, model, ids, mode, budgets):
        kwargs = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True)
        if mode == "beam":
            kwargs.update(num_beams=2, output_scores=False)
        batch = model.generate(ids, n_loops=budgets, **kwargs)
        for row, budget in enumerate(budgets):
            alone = model.generate(ids[row:row + 1], n_loops=budget, **kwargs)
            assert torch.equal(batch.sequences[row], alone.sequences[0])
            if mode == "greedy":
                for step_batch, step_alone in zip(batch.scores, alone.scores):
                    torch.testing.assert_close(step_batch[row], step_alone[0], atol=1e-5, rtol=0)

    def test_generate_without_cache_equals_with_cache(self, model, ids):
        cached = model.generate(ids, n_loops=BUDGETS, max_new_tokens=4, do_sample=False)
        uncached = model.generate(ids, n_loops=BUDGETS, max_new_tokens=4, do_sample=False, use_cache=False)
        assert torch.equal(cached, uncached)

    def test_static_cache_equals_dynamic(self, model, ids):
        budgets = [1, 3, 4]  # a static cache has max_loop_iters (4) loop slots
        dynamic = model.generate(ids, n_loops=budgets, max_new_tokens=4, do_sample=False)
        static = model.generate(ids, n_loops=budgets, max_new_tokens=4, do_sample=False,
                                cache_implementation="static")
        assert torch.equal(dynamic, static)

    @pytest.mark.parametrize("budgets", [BUDGETS, [3, 1, 6]])
    def test_finished_rows_do_no_work(self, model, ids, budgets):
        """The rows the looped block's queries and MoE see at each loop, counted by hooks, with and without a cache
        and statistics (the lean row loop and the general one)."""
        seen = []
        attention = model.model.recurrent.layer.self_attn
        query_module = attention.q_proj if hasattr(attention, "q_proj") else attention.q_a_proj
        hooks = [module.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
                 for module in (query_module, model.model.recurrent.layer.mlp)]
        running = [sum(b > t for b in budgets) for t in range(max(budgets))]
        try:
            for kwargs in ({"use_cache": False}, {"use_cache": True}, {"use_cache": False, "output_loop_stats": True}):
                seen.clear()
                out = model(ids, n_loops=budgets, **kwargs)
                assert seen == [rows for rows in running for _ in range(2)], kwargs
        finally:
            for hook in hooks:
                hook.remove()
        assert out.loop_stats.processed.tolist() == [10 * rows for rows in running]

    def test_a_cache_refuses_other_budgets(self, model, ids):
        out = model(ids, n_loops=BUDGETS, use_cache=True)
        with pytest.raises(ValueError, match=r"n_loops=\[1, 3, 6\]"):
            model(ids[:, :1], n_loops=[6, 3, 1], cache=out.past_key_values, use_cache=True)
        model(ids[:, :1], n_loops=torch.tensor(BUDGETS), cache=out.past_key_values, use_cache=True)

    def test_training_backward_through_budgets(self, attn_type, ids):
        model = make_model(attn_type, router_aux_loss_coef=0.01).train()
        out = model(ids, labels=ids, n_loops=BUDGETS)
        out.loss.backward()
        grad = model.model.recurrent.layer.mlp.experts.gate_up_proj.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
        assert out.aux_loss is not None and torch.isfinite(out.aux_loss)


@pytest.mark.parametrize("n_loops, match", [
    ([1, 2], r"shape \(2,\)"), ([1, 0, 2], "from 0 to 2"), ([1, 2, 10**6], "max_inference_loops"),
    ([1.5, 2, 3], "dtype"), ([True, True, False], "a bool"), ([True, 2, 3], "a bool"), ([[1, 2], [3]], "n_loops"),
    (torch.ones(3, 4, dtype=torch.long), r"shape \(3, 4\)"),
])
def test_bad_budgets_name_n_loops(n_loops, match, ids):
    model = make_model()
    with pytest.raises(ValueError, match="n_loops") as error:
        model(ids, n_loops=n_loops)
    assert error.match(match)


def test_per_position_budgets_take_no_cache(ids):
    model = make_model()
    budget = torch.full((3, 10), 2)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(ids, n_loops=budget, use_cache=True)
    assert model(ids, n_loops=budget).past_key_values is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(exit_criterion="entropy", exit_threshold=0.1), "exit_criterion"),
    (dict(exit_criterion="delta"), "exit_threshold"),
    (dict(exit_criterion="delta", exit_threshold=-1.0), r"exit_threshold.*\[0, inf\) \(0: run the whole budget"),
    (dict(exit_criterion="kl", exit_threshold=-1e-9), r"exit_threshold.*\[0, inf\)"),
    (dict(exit_criterion="act", exit_threshold=0.0), r"\(0, 1.0\]"),
    (dict(exit_criterion="delta", exit_threshold=float("nan")), "exit_threshold"),
    (dict(exit_criterion="act", exit_threshold=1.5), r"\(0, 1.0\]"),
    (dict(exit_threshold=0.1), "needs an `exit_criterion`"),
    (dict(exit_criterion="act", exit_threshold=0.5), "use_act=False"),
])
def test_bad_exit_arguments(kwargs, match, ids):
    with pytest.raises(ValueError, match=match):
        make_model()(ids, **kwargs)


def test_act_needs_a_halting_head_built_with_the_model_not_a_config_flag_set_later(ids):
    """Setting use_act on a built model adds no head: "act" must still be refused, not run the whole budget."""
    model = make_model()
    model.config.use_act = True
    with pytest.raises(ValueError, match="set after the model was built"):
        model(ids, n_loops=4, exit_criterion="act", exit_threshold=0.5)
    with pytest.raises(ValueError, match="set after the model was built"):
        model.model.request_loops.set("r1", n_loops=2, exit_criterion="act", exit_threshold=0.5)


def test_kl_needs_the_head_and_a_dynamic_cache(ids):
    model = make_model()
    with pytest.raises(ValueError, match="MythosForCausalLM"):
        model.model(ids, exit_criterion="kl", exit_threshold=0.1)
    static = StaticCache(config=model.config, max_cache_len=32)
    with pytest.raises(ValueError, match="DynamicCache"):
        model(ids, exit_criterion="kl", exit_threshold=0.1, cache=static, use_cache=True)


class TestCriteria:
    """Each criterion stops a position at the first loop where it holds, and never before."""

    def test_delta(self, model, ids):
        threshold = delta_threshold(model, ids)
        out = model(ids, n_loops=6, exit_criterion="delta", exit_threshold=threshold, output_loop_stats=True,
                    use_cache=False)
        held = out.loop_stats.state_change < threshold  # NaN (not run) compares False
        self.assert_stops_where_first_held(out, held, budget=6)

    def test_act(self, act_model, ids):
        threshold = clear_threshold(act_model, ids, "act")
        out = act_model(ids, n_loops=6, exit_criterion="act", exit_threshold=threshold, output_loop_stats=True,
                        use_cache=False)
        mass = out.loop_stats.halting_probs.nan_to_num(0.0).cumsum(0)
        self.assert_stops_where_first_held(out, mass >= threshold, budget=6)

    def test_kl(self, model, ids):
        threshold = clear_threshold(model, ids, "kl")
        out = model(ids, n_loops=6, exit_criterion="kl", exit_threshold=threshold, output_loop_stats=True,
                    use_cache=False)
        assert out.loop_stats.kl[0].isnan().all()  # nothing to compare the first loop with
        self.assert_stops_where_first_held(out, out.loop_stats.kl < threshold, budget=6)

    @staticmethod
    def assert_stops_where_first_held(out, held, budget):
        loops = torch.arange(1, budget + 1)[:, None, None].expand_as(held)
        first = torch.where(held, loops, budget).amin(0)  # loops run when stopping at the first loop that held
        assert torch.equal(out.loops_used, first)
        assert 1 < out.loops_used.float().mean() < budget  # the test is not vacuous: some stop early, some not
        # a position runs exactly its first loops
        ran = out.loop_stats.active
        assert torch.equal(ran.sum(0), out.loops_used)
        assert torch.equal(ran, loops <= out.loops_used)


def test_threshold_zero_runs_the_whole_budget_even_where_the_loop_barely_moves_the_state(model, ids):
    """``exit_threshold=0`` records the measure and stops nothing. The KL of two distributions that agree up to
    rounding is 0, not -4e-7: a negative value would pass even that threshold (the demo's threshold search relies on
    seeing every loop)."""
    with torch.no_grad():
        for weight in model.model.recurrent.layer.parameters():
            weight.mul_(1e-3)
    for criterion in ("kl", "delta"):
        out = model(ids, n_loops=8, exit_criterion=criterion, exit_threshold=0, output_loop_stats=True,
                    use_cache=False)
        assert (out.loops_used == 8).all(), criterion
        measure = criterion_values(out.loop_stats, criterion)[1:]
        assert not measure.isnan().any() and measure.min() >= 0, criterion
        if criterion == "kl":  # the states barely move: rounding decides the sign of many of these
            assert (measure < 1e-6).sum() > measure.shape[1:].numel()


def test_stopped_positions_skip_the_block(model, ids):
    """Count the positions the looped block's queries and MoE actually process, by hooks on the modules."""
    seen = {"queries": [], "moe": []}
    attention = model.model.recurrent.layer.self_attn
    query_module = attention.q_proj if hasattr(attention, "q_proj") else attention.q_a_proj
    hooks = [query_module.register_forward_hook(lambda m, a, o: seen["queries"].append(a[0].shape[:-1].numel())),
             model.model.recurrent.layer.mlp.register_forward_hook(
                 lambda m, a, o: seen["moe"].append(a[0].shape[:-1].numel()))]
    threshold = delta_threshold(model, ids)
    seen["queries"].clear(), seen["moe"].clear()
    out = model(ids, n_loops=6, exit_criterion="delta", exit_threshold=threshold, output_loop_stats=True,
                use_cache=False)
    for hook in hooks:
        hook.remove()
    processed = [n for n in out.loop_stats.processed.tolist() if n > 0]
    assert seen["moe"] == processed
    # queries run on [rows, widest row] (shorter rows padded): at least the running positions, at most B*S
    assert all(p <= q <= 30 for p, q in zip(processed, seen["queries"]))
    assert sum(seen["moe"]) < 6 * 30 * 0.9


class TestCacheConsistencyUnderExit:
    """Cached generation (and chunked prefill) with an exit criterion equals a no-cache forward that replays its
    exit decisions, for both attention types."""

    @pytest.mark.parametrize("criterion", ["delta", "kl"])
    def test_generate_equals_replay(self, model, ids, criterion):
        """Replayed through per-position budgets: every criterion, "kl" included (its decode-time probe sees the
        past tokens' final states, so a full forward with the criterion would decide differently)."""
        threshold = clear_threshold(model, ids, criterion)
        recorder = MythosLoopRecorder()
        out = model.generate(ids, n_loops=6, exit_criterion=criterion, exit_threshold=threshold,
                             loop_recorder=recorder, max_new_tokens=6, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
        loops = torch.cat(recorder.calls, dim=1)  # every position of the final sequence but the last
        assert loops.shape == (3, 10 + 5) and recorder.token_loops().shape == (3, 6)
        assert (loops < 6).any(), "no position stopped early: the test would be vacuous"
        replay = model(out.sequences[:, :-1], n_loops=loops, use_cache=False).logits
        assert torch.equal(replay[:, 9:].argmax(-1), out.sequences[:, 10:])
        torch.testing.assert_close(replay[:, 9:], torch.stack(out.scores, 1), atol=1e-5, rtol=0)

    @pytest.mark.parametrize("criterion", ["act", "delta"])
    def test_generate_equals_a_full_forward_with_the_criterion(self, model, act_model, ids, criterion):
        """"act" and "delta" decide from each position's own state, which attends only to earlier positions, so a
        no-cache forward over the generated sequence makes the same decisions by itself."""
        model = act_model if criterion == "act" else model
        kwargs = dict(n_loops=6, exit_criterion=criterion, do_sample=False)

        def generated(threshold):
            recorder = MythosLoopRecorder(keep_stats=True)
            sequences = model.generate(ids, exit_threshold=threshold, loop_recorder=recorder, max_new_tokens=5,
                                       **kwargs)
            generated.result = sequences, recorder
            return recorder.stats

        threshold = clear_threshold(model, ids, criterion, check=generated)
        sequences, recorder = generated.result
        full = model(sequences[:, :-1], n_loops=6, exit_criterion=criterion, exit_threshold=threshold,
                     use_cache=False)
        assert torch.equal(full.loops_used, torch.cat(recorder.calls, dim=1))
        assert (full.loops_used < 6).any()
        assert torch.equal(full.logits[:, 9:].argmax(-1), sequences[:, 10:])

    def test_chunked_prefill_equals_one_shot_and_replay(self, model, ids):
        threshold = delta_threshold(model, ids)
        kwargs = dict(n_loops=6, exit_criterion="delta", exit_threshold=threshold)
        one_shot = model(ids, use_cache=False, **kwargs)
        first = model(ids[:, :4], use_cache=True, **kwargs)
        second = model(ids[:, 4:], cache=first.past_key_values, use_cache=True, **kwargs)
        loops = torch.cat([first.loops_used, second.loops_used], dim=1)
        assert torch.equal(loops, one_shot.loops_used)  # delta decisions are causal: chunking cannot change them
        chunked = torch.cat([first.logits, second.logits], dim=1)
        torch.testing.assert_close(chunked, one_shot.logits, atol=1e-5, rtol=0)
        replay = model(ids, n_loops=loops, use_cache=False)
        torch.testing.assert_close(replay.logits, one_shot.logits, atol=1e-5, rtol=0)

    @pytest.mark.parametrize("criterion", ["delta", "kl"])
    def test_exit_with_per_row_budgets(self, model, ids, criterion):
        """Unequal budgets leave loop slots that hold only some rows (``MythosRowsLayer``); "kl" reads them too."""
        threshold = delta_threshold(model, ids) if criterion == "delta" else clear_threshold(model, ids, "kl")
        recorder = MythosLoopRecorder()
        sequences = model.generate(ids, n_loops=BUDGETS, exit_criterion=criterion, exit_threshold=threshold,
                                   loop_recorder=recorder, max_new_tokens=4, do_sample=False)
        loops = torch.cat(recorder.calls, dim=1)
        assert (loops <= torch.tensor(BUDGETS)[:, None]).all()
        replay = model(sequences[:, :-1], n_loops=loops, use_cache=False).logits
        assert torch.equal(replay[:, 9:].argmax(-1), sequences[:, 10:])


def test_recorder_keeps_stats_and_refuses_other_types(model, ids):
    recorder = MythosLoopRecorder(keep_stats=True)
    model.generate(ids, n_loops=3, loop_recorder=recorder, max_new_tokens=3, do_sample=False)
    assert len(recorder.stats) == 3 and recorder.stats[0].active.shape == (3, 3, 10)
    assert recorder.prompt_loops.shape == (3, 10) and torch.equal(recorder.token_loops(), torch.full((3, 3), 3))
    with pytest.raises(TypeError, match="loop_recorder"):
        model(ids, loop_recorder=[])
    with pytest.raises(ValueError, match="no forward call"):
        MythosLoopRecorder().token_loops()


def test_hidden_states_are_full_size_under_exit(model, ids):
    threshold = clear_threshold(model, ids, "kl")
    model.set_attn_implementation("eager")  # attention weights come back from eager attention only
    out = model(ids, n_loops=6, exit_criterion="kl", exit_threshold=threshold, output_hidden_states=True,
                output_attentions=True, use_cache=False)
    # embeddings, prelude (1), one entry per loop that any position ran, coda (1); the KL probe's coda runs are not
    # recorded, neither as hidden states nor as attentions (prelude, loops, coda)
    loops = int(out.loops_used.max())
    assert loops < 6 and len(out.hidden_states) == 1 + 1 + loops + 1
    assert all(h.shape == (3, 10, model.config.dim) for h in out.hidden_states)
    assert len(out.attentions) == 1 + loops + 1


def test_frozen_loops_written_at_once_equal_loop_by_loop(model, ids, monkeypatch):
    """Once every position of a cached call has stopped, the loops left only write keys/values from frozen states;
    they are written in one projection. That equals running them one by one (statistics on: the loop-by-loop path)."""
    threshold = clear_threshold(model, ids, "delta")
    recurrence = type(model.model.recurrent)
    calls = []
    write = recurrence._write_frozen_loops
    monkeypatch.setattr(recurrence, "_write_frozen_loops", lambda self, *a: calls.append(a[2]) or write(self, *a))
    kwargs = dict(n_loops=6, exit_criterion="delta", exit_threshold=threshold, max_new_tokens=6, do_sample=False,
                  output_scores=True, return_dict_in_generate=True)
    at_once = model.generate(ids[:1], **kwargs)
    batched = len(calls)
    assert batched, "no call stopped every position before its budget: the test would be vacuous"
    one_by_one = model.generate(ids[:1], loop_recorder=MythosLoopRecorder(keep_stats=True), **kwargs)
    assert len(calls) == batched  # with statistics kept, every loop ran one by one
    assert torch.equal(at_once.sequences, one_by_one.sequences)
    for a, b in zip(at_once.scores, one_by_one.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_loop_slots_hold_only_the_rows_that_run_them(model, ids):
    """With per-row budgets, loop slot t of a new dynamic cache keeps keys/values for the rows whose budget passes t
    only: budgets [1, 3, 6] cache 3 + 2 + 2 + 1 + 1 + 1 = 10 row-slots, not 3 * 6 = 18."""
    cache = model(ids, n_loops=BUDGETS, use_cache=True).past_key_values
    slot = model.config.prelude_layers + model.config.coda_layers
    rows = [cache.layers[slot + t].keys.shape[0] for t in range(6)]
    assert rows == [3, 2, 2, 1, 1, 1]
    assert all(cache.layers[i].keys.shape[0] == 3 for i in range(slot))


class TestExitScopes:
    """``config.exit_scope="prefix"``: a position stops at the first loop where its own measure holds and every
    earlier position of its row is done; ``"row"``: where every position of the row is. Checked against those
    definitions, worked out from the run's own statistics."""

    @staticmethod
    def expected_loops(held, budget):
        """Left to right: position i stops at the first loop t <= its budget where ``held[t - 1, row, i]`` and every
        earlier position has stopped by t, or else at its budget (``held`` [loops, batch, seq], ``budget`` [batch,
        seq])."""
        loops, batch, seq = held.shape
        expected = budget.clone()
        for row in range(batch):
            context_done = 0  # the loop by which every earlier position has stopped
            for i in range(seq):
                for t in range(max(context_done, 1), int(budget[row, i]) + 1):
                    if held[t - 1, row, i]:
                        expected[row, i] = t
                        break
                context_done = max(context_done, int(expected[row, i]))
        return expected

    @staticmethod
    def runs(model, ids, criterion, threshold, n_loops=6, **kwargs):
        """The same call under "position" and under "prefix"."""
        kwargs = dict(n_loops=n_loops, exit_criterion=criterion, exit_threshold=threshold, output_loop_stats=True,
                      use_cache=False, **kwargs)
        model.config.exit_scope = "position"
        alone = model(ids, **kwargs)
        model.config.exit_scope = "prefix"
        return alone, model(ids, **kwargs)

    def threshold(self, model, ids, criterion, n_loops=6, **kwargs):
        """A threshold clear of every value compared under either scope (float noise cannot flip a decision) under
        which a later position stops before an earlier one on its own, so that "prefix" has something to change."""
        probe = dict(exit_criterion="kl", exit_threshold=0.0) if criterion == "kl" else {}
        stats = model(ids, n_loops=6, output_loop_stats=True, use_cache=False, **probe, **kwargs).loop_stats
        values = criterion_values(stats, criterion)
        values = values[values.isfinite() & (values > 0)].detach().sort().values
        for q in torch.linspace(0.2, 0.8, 25).tolist():
            i = int(q * (len(values) - 1))
            threshold = float((values[i] * values[i + 1]).sqrt())
            alone, out = self.runs(model, ids, criterion, threshold, n_loops, **kwargs)
            compared = torch.cat([criterion_values(run.loop_stats, criterion).flatten() for run in (alone, out)])
            compared = compared[compared.isfinite()]
            if ((compared - threshold).abs() / threshold).min() > 0.01 and (alone.loops_used.diff(dim=1) < 0).any():
                return threshold, alone, out
        pytest.fail(f"no {criterion} threshold that is clear and makes a later position stop first")

    @pytest.mark.parametrize("criterion", ["delta", "kl"])
    def test_stops_where_its_context_has_settled(self, attn_type, ids, criterion):
        model = make_model(attn_type)
        threshold, alone, out = self.threshold(model, ids, criterion)
        held = criterion_values(out.loop_stats, criterion) < threshold  # NaN (not run) compares False
        assert torch.equal(out.loops_used, self.expected_loops(held, torch.full_like(out.loops_used, 6)))
        assert (out.loops_used.diff(dim=1) >= 0).all()  # never fewer loops than an earlier position
        assert torch.equal(out.loop_stats.active.sum(0), out.loops_used)
        # the first position reads only itself, so it decides as under "position"; later ones wait for their context
        assert torch.equal(out.loops_used[:, 0], alone.loops_used[:, 0])
        assert (out.loops_used > alone.loops_used).any() and (out.loops_used < 6).any()

    def test_what_counts_as_done(self):
        """The rule on hand-made rows, after loop t = 1 (the second): an earlier position is done when it stopped
        before, stops now, ends its budget at this loop, or is padding; one that runs on holds every later one back."""
        from openmythos.modeling_mythos import MythosExitRule

        rule = MythosExitRule.__new__(MythosExitRule)
        yes, no = True, False
        rows = [  # (budget, padding, running, its own measure holds) -> stops
            ([2, 6, 6], [no, no, no], [yes, yes, yes], [no, yes, yes], [no, yes, yes]),  # ends its budget now
            ([3, 6, 6], [no, no, no], [yes, yes, yes], [no, yes, yes], [no, no, no]),  # runs on: holds them back
            ([6, 6, 6], [yes, no, no], [yes, yes, yes], [no, yes, yes], [no, yes, yes]),  # padding
            ([6, 6, 6], [no, no, no], [no, yes, yes], [no, yes, no], [no, yes, no]),  # stopped before
            ([6, 6, 6], [no, no, no], [yes, yes, yes], [yes, no, yes], [yes, no, no]),  # waits for the middle one
        ]
        budget, padding, run, stop, expected = (torch.tensor([row[i] for row in rows]) for i in range(5))
        rule.budget, rule.padding, rule.scope = budget, padding, "prefix"
        assert torch.equal(rule._after_context(1, run, stop & run), expected)
        # "row": only where every position of the row is done
        rule.scope = "row"
        assert torch.equal(rule._after_context(1, run, stop & run), (stop & run) & torch.tensor([[1], [0], [1], [0], [0]],
                                                                                                dtype=torch.bool))

    @pytest.mark.parametrize("criterion", ["delta", "kl"])
    def test_row_stops_together_where_every_position_holds(self, attn_type, ids, criterion):
        """``exit_scope="row"``: the row's positions stop at the first loop where every one of them holds."""
        model = make_model(attn_type)
        threshold, alone, _ = self.threshold(model, ids, criterion)
        model.config.exit_scope = "row"
        out = model(ids, n_loops=6, exit_criterion=criterion, exit_threshold=threshold, output_loop_stats=True,
                    use_cache=False)
        values = criterion_values(out.loop_stats, criterion)
        clear = values[values.isfinite()]
        assert ((clear - threshold).abs() / threshold).min() > 0.01
        every = (values < threshold).all(dim=2)  # [loops, batch]: every position held at that loop
        loops = torch.arange(1, 7)[:, None].expand_as(every)
        expected = torch.where(every, loops, 6).amin(0)
        assert torch.equal(out.loops_used, expected[:, None].expand_as(out.loops_used))
        assert torch.equal(out.loop_stats.active.sum(0), out.loops_used)
        # not vacuous: on their own the positions would stop at different loops, and some row stops early
        assert (alone.loops_used != alone.loops_used[:, :1]).any() and (expected < 6).any()

    def test_padding_does_not_hold_a_row_back(self, ids):
        """Left padding is done from the start: the padded row decides as the row alone, with padding tokens whose
        own measure would hold the row back for longer."""
        model = make_model(exit_scope="prefix")
        row = ids[1:2, 3:]
        threshold = clear_threshold(model, row, "delta")
        kwargs = dict(n_loops=6, exit_criterion="delta", exit_threshold=threshold, use_cache=False)
        alone = model(row, **kwargs).loops_used
        assert (alone < 6).any()
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(row)], dim=1)
        for pad in range(3, 100):
            padded = torch.cat([torch.full((1, 3), pad), row], dim=1)
            loops = model(padded, attention_mask=mask, **kwargs).loops_used
            if loops[:, :3].max() > alone.min():  # padding runs longer than some real token needs
                break
        else:
            pytest.fail("no padding token that runs longer than the row's tokens")
        assert torch.equal(loops[:, 3:], alone)

    @pytest.mark.parametrize("scope", ["prefix", "row"])
    def test_generate_equals_replay(self, ids, scope):
        model = make_model()
        threshold, alone, _ = self.threshold(model, ids, "kl")
        model.config.exit_scope = scope
        recorder = MythosLoopRecorder()
        out = model.generate(ids, n_loops=6, exit_criterion="kl", exit_threshold=threshold, loop_recorder=recorder,
                             max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
        prompt = recorder.calls[0]
        # the prefill waited: its decisions are not each position's own
        assert (prompt.diff(dim=1) >= 0).all() and not torch.equal(prompt, alone.loops_used)
        replay = model(out.sequences[:, :-1], n_loops=torch.cat(recorder.calls, dim=1), use_cache=False).logits
        assert torch.equal(replay[:, 9:].argmax(-1), out.sequences[:, 10:])
        torch.testing.assert_close(replay[:, 9:], torch.stack(out.scores, 1), atol=1e-5, rtol=0)

    def test_refused_where_it_cannot_apply(self, ids):
        with pytest.raises(ValueError, match="exit_scope"):
            make_model(exit_scope="whole")
        model = make_model(exit_scope="prefix", use_act=True)
        with pytest.raises(ValueError, match=r"exit_scope='position'"):
            model(ids, n_loops=4, exit_criterion="act", exit_threshold=0.5)
        with pytest.raises(ValueError, match="continuous batching"):
            model.model.request_loops.set("r1", n_loops=2, exit_criterion="delta", exit_threshold=0.1)
