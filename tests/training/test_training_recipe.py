"""Training recipe: loop-count sampling, truncated backprop, MoE balancing, Muon+AdamW."""

import statistics

import pytest
import torch
from conftest import make_model

from openmythos import MythosForCausalLM, mythos_tiny
from openmythos.modeling_mythos import sequence_balance_loss
from openmythos.training.optim import MuonAdamW, split_parameters
from openmythos.training import MythosTrainingCallback, expert_load_stats, sample_n_loops, update_router_bias


def test_loop_count_draws_have_the_configured_mean_and_are_reproducible():
    config = mythos_tiny(loop_sampling="poisson_lognormal", mean_train_loops=6, max_train_loops=24)
    draws = [sample_n_loops(config, step) for step in range(3000)]
    assert statistics.mean(draws) == pytest.approx(6, abs=0.3)
    assert min(draws) >= 1 and max(draws) <= 24
    assert len(set(draws)) > 8  # a real spread, not a constant
    assert draws == [sample_n_loops(config, step) for step in range(3000)]  # same on every rank, every run
    other_seed = mythos_tiny(loop_sampling="poisson_lognormal", mean_train_loops=6, loop_sampling_seed=1)
    assert draws[:50] != [sample_n_loops(other_seed, step) for step in range(50)]


def loops_run(model, *args, **kwargs) -> int:
    """How many loop iterations one forward ran (the injection runs once per iteration)."""
    counts = []
    hook = model.model.recurrent.injection.register_forward_hook(lambda *a: counts.append(1))
    model(*args, **kwargs)
    hook.remove()
    return len(counts)


def test_forward_is_stateless_in_training():
    """Two identical training calls run the same depth, give the same output and write no module attribute."""
    model = make_model("mla", use_act=True, loop_sampling="poisson_lognormal", mean_train_loops=3).train()
    ids = torch.randint(0, 512, (2, 8))

    def attributes():
        return {(name, key): value for name, m in model.named_modules() for key, value in vars(m).items()
                if key not in ("_parameters", "_buffers", "_modules")}

    before = attributes()
    first = model(ids, n_loops=3, labels=ids)
    second = model(ids, n_loops=3, labels=ids)
    after = attributes()
    assert after.keys() == before.keys()
    changed = [key for key in before if after[key] is not before[key]]
    assert changed == []
    torch.testing.assert_close(first.logits, second.logits, rtol=0, atol=0)
    torch.testing.assert_close(first.loss, second.loss, rtol=0, atol=0)
    # without n_loops, training runs config.max_loop_iters: drawing a count is the training side's job
    assert loops_run(model, ids) == model.config.max_loop_iters == loops_run(model, ids)


def test_training_callback_draws_loops_for_training_forwards_only():
    model = make_model("gqa", loop_sampling="poisson_lognormal", mean_train_loops=3, max_loop_iters=4).train()
    ids = torch.randint(0, 512, (2, 8))
    callback = MythosTrainingCallback()

    class Args:
        gradient_accumulation_steps = 2

    class State:
        global_step = 0

    callback.on_train_begin(Args, State, None, model=model)
    for step in range(4):
        State.global_step = step
        callback.on_step_begin(Args, State, None, model=model)
        for micro in range(2):  # every micro-batch of an optimizer step gets its own draw
            assert loops_run(model, ids) == sample_n_loops(model.config, 2 * step + micro)
    assert loops_run(model, ids, n_loops=2) == 2  # an explicit n_loops wins
    model.eval()
    assert loops_run(model, ids) == model.config.max_loop_iters
    callback.on_train_end(Args, State, None)
    model.train()
    assert loops_run(model, ids) == model.config.max_loop_iters  # the hook is gone


def test_truncated_backprop_builds_no_graph_for_early_loops():
    model = make_model("mla", backprop_loops=2).train()
    ids = torch.randint(0, 512, (2, 16))
    tracked = []
    hook = model.model.recurrent.injection.register_forward_hook(lambda m, a, out: tracked.append(out.requires_grad))
    model(ids, labels=ids, n_loops=5).loss.backward()
    hook.remove()
    assert tracked == [False, False, False, True, True]
    assert all(p.grad is not None for p in model.model.recurrent.parameters())
    # eval is never truncated, and so never changes the answer
    model.eval()
    full = make_model("mla").eval()
    torch.testing.assert_close(model(ids, n_loops=5).logits, full(ids, n_loops=5).logits)


def test_router_bias_update_balances_a_skewed_start():
    torch.manual_seed(0)
    model = MythosForCausalLM(mythos_tiny(n_experts=8, n_experts_per_tok=2)).train()
    router = model.model.recurrent.layer.mlp.gate
    with torch.no_grad():
        router.weight[:2] += 0.2  # experts 0 and 1 win for most tokens
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (4, 32), generator=generator) for _ in range(4)]
    ratios = []
    for step in range(60):
        with torch.no_grad():
            model(batches[step % 4], n_loops=2)
        if step % 4 == 0:
            stats = expert_load_stats(model)
            ratios.append(stats["moe/load_max_min_ratio"])
        update_router_bias(model, rate=0.01)
    assert router.expert_load.sum() == 0  # counts reset after each update
    assert ratios[0] > 5  # really skewed at the start
    assert ratios[-1] < ratios[0] / 3 and ratios[-1] < 3
    used = router.e_score_correction_bias[:2]  # the two loop depths that ran
    assert used[:, :2].max() < 0 < used[:, 2:].max(-1).values.min()
    assert (router.e_score_correction_bias[2:] == 0).all()  # depths that never ran are untouched


@pytest.mark.parametrize("cast", ["to_bfloat16", "half"])
def test_router_bias_stays_fp32_in_a_half_precision_model(cast):
    """A 1e-3 balancing step on a bias of 0.5 would round away in bf16 (whose spacing there is 2^-8)."""
    model = make_model("gqa")
    router = model.model.recurrent.layer.mlp.gate
    before = router.e_score_correction_bias.clone()
    model = model.to(torch.bfloat16) if cast == "to_bfloat16" else model.half()
    assert router.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(router.e_score_correction_bias, before)  # not rounded through half precision either
    assert model.lm_head.weight.dtype != torch.float32
    with torch.no_grad():
        router.e_score_correction_bias.fill_(0.5)
    ids = torch.randint(0, 512, (2, 15))  # 60 choices over 8 experts: no load equals the mean of 7.5
    out = model.train()(ids, labels=ids, n_loops=2)
    assert torch.isfinite(out.loss) and out.logits.dtype == model.lm_head.weight.dtype
    update_router_bias(model, rate=1e-3)
    steps = (router.e_score_correction_bias[:2] - 0.5).abs()
    torch.testing.assert_close(steps, torch.full_like(steps, 1e-3))  # every expert of the two depths that ran moved


def test_expert_load_is_counted_per_loop_only_in_training():
    model = make_model("gqa")
    ids = torch.randint(0, 512, (2, 10))
    model(ids, n_loops=3)
    assert model.model.recurrent.layer.mlp.gate.expert_load.sum() == 0
    model.train()(ids, n_loops=3)
    load = model.model.recurrent.layer.mlp.gate.expert_load
    k = model.config.n_experts_per_tok
    assert load[:3].sum(1).tolist() == [20 * k] * 3 and load[3:].sum() == 0
    stats = expert_load_stats(model)
    assert {"moe/load_cv", "moe/loop0_max_share", "moe/loop2_max_share"} <= stats.keys()


def test_padding_is_not_counted_in_expert_load_balance_loss_or_ponder_cost():
    model = make_model("gqa", use_act=True, router_aux_loss_coef=0.5).train()
    with torch.no_grad():
        model.model.recurrent.halt.weight.normal_(0, 50.0)  # positions halt at different loops
    router = model.model.recurrent.layer.mlp.gate
    ids = torch.randint(3, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    short = ids[0, :7]
    batch = torch.stack([torch.cat([torch.zeros(5, dtype=torch.long), short]), ids[1]])  # left-padded
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    padded = model(batch, attention_mask=mask, n_loops=3)
    padded_load = router.expert_load.clone()
    router.expert_load.zero_()
    alone = [model(short[None], n_loops=3), model(ids[1:], n_loops=3)]
    assert padded_load.sum() == 3 * 19 * model.config.n_experts_per_tok
    assert torch.equal(padded_load, router.expert_load)
    torch.testing.assert_close(padded.ponder_cost, (7 * alone[0].ponder_cost + 12 * alone[1].ponder_cost) / 19)
    torch.testing.assert_close(padded.aux_loss, (alone[0].aux_loss + alone[1].aux_loss) / 2)


def test_sequence_balance_loss_is_one_when_balanced_and_larger_when_skewed():
    n_experts, top_k, tokens = 4, 2, 8
    uniform_logits = torch.zeros(tokens, n_experts)
    balanced = torch.tensor([[0, 1], [2, 3]] * (tokens // 2))
    assert float(sequence_balance_loss(uniform_logits, balanced, 1, n_experts)) == pytest.approx(1.0)
    skewed_logits = torch.tensor([[4.0, 4.0, -4.0, -4.0]]).expand(tokens, -1)
    skewed = torch.tensor([[0, 1]] * tokens)
    assert float(sequence_balance_loss(skewed_logits, skewed, 1, n_experts)) > 1.5


def test_aux_loss_is_added_to_the_training_loss():
    ids = torch.randint(0, 512, (2, 16))
    plain = make_model("mla").train()
    with_aux = make_model("mla", router_aux_loss_coef=0.5).train()
    a, b = plain(ids, labels=ids, n_loops=2), with_aux(ids, labels=ids, n_loops=2)
    assert a.aux_loss is None and b.aux_loss is not None
    torch.testing.assert_close(b.loss, a.loss + 0.5 * b.aux_loss)


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = make_model("mla", use_act=True)
    muon, decay, no_decay = split_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for p in muon}
    assert all(p.ndim == 2 for p in muon)
    assert "model.prelude.0.self_attn.q_a_proj.weight" in muon_names
    assert "model.recurrent.layer.mlp.shared_experts.down_proj.weight" in muon_names
    adamw_names = {names[id(p)] for p in decay + no_decay}
    assert {"model.embed_tokens.weight", "model.recurrent.layer.mlp.gate.weight",
            "model.recurrent.layer.mlp.experts.gate_up_proj", "model.recurrent.injection.log_A"} <= adamw_names
    assert len(muon) + len(decay) + len(no_decay) == len(list(model.parameters()))


def test_muon_adamw_trains_follows_a_scheduler_and_round_trips_its_state():
    model = make_model("gqa").train()
    optimizer = MuonAdamW.from_model(model, lr=1e-3, muon_lr=0.02)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    ids = torch.randint(0, 512, (4, 32))
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids, n_loops=2).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5 ** 8)
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 8)
    restored = MuonAdamW.from_model(model, lr=1e-3, muon_lr=0.02)
    state = optimizer.state_dict()
    assert sorted(state) == ["param_groups", "state"]  # torch's layout, which torch.distributed.checkpoint reads
    restored.load_state_dict(state)
    assert len(restored.state) == len(optimizer.state) > 0
    some = next(iter(optimizer.adamw.state.values()))["exp_avg"]
    again = next(iter(restored.adamw.state.values()))["exp_avg"]
    assert torch.equal(some, again)
    muon_buffer = next(iter(optimizer.muon.state.values()))["momentum_buffer"]
    assert torch.equal(next(iter(restored.muon.state.values()))["momentum_buffer"], muon_buffer)
    # checkpoints written before, one state dict per inner optimizer, still load
    earlier = MuonAdamW.from_model(model, lr=1e-3, muon_lr=0.02)
    earlier.load_state_dict({"muon": optimizer.muon.state_dict(), "adamw": optimizer.adamw.state_dict()})
    assert torch.equal(next(iter(earlier.muon.state.values()))["momentum_buffer"], muon_buffer)
    assert earlier.muon.param_groups[0]["lr"] == optimizer.muon.param_groups[0]["lr"]


def test_each_loop_depth_has_its_own_balancing_bias():
    model = make_model("gqa")
    router = model.model.recurrent.layer.mlp.gate
    x = torch.randn(32, model.config.dim)
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[1, 5] = 10.0  # only depth 1 is pushed toward expert 5
    assert (router(x, loop_idx=1)[2] == 5).any(-1).all()
    assert not (router(x, loop_idx=0)[2] == 5).any(-1).all()
    last = model.config.max_loop_iters - 1
    with torch.no_grad():
        router.e_score_correction_bias[last, 6] = 10.0
    assert torch.equal(router(x, loop_idx=last + 3)[2], router(x, loop_idx=last)[2])  # deeper loops use the last row
