import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_model
from transformers import AutoModel, AutoModelForCausalLM

from openmythos import MythosForCausalLM, MythosModel, mythos_tiny
from openmythos.modeling_mythos import A_MAX, A_MIN, MythosRMSNorm, loop_signal


def test_auto_classes_build_mythos_models():
    config = mythos_tiny()
    assert isinstance(AutoModelForCausalLM.from_config(config), MythosForCausalLM)
    assert isinstance(AutoModel.from_config(config), MythosModel)


def test_n_loops_changes_the_output(model, input_ids):
    one = model(input_ids, n_loops=1).logits
    four = model(input_ids, n_loops=4).logits
    assert (one - four).abs().max() > 1e-3


def test_default_n_loops_is_max_loop_iters(model, input_ids):
    assert torch.equal(model(input_ids).logits, model(input_ids, n_loops=model.config.max_loop_iters).logits)


def test_more_loops_than_trained_depth_works_and_keeps_changing(model, input_ids):
    depth = model.config.max_loop_iters
    deep = model(input_ids, n_loops=3 * depth).logits
    assert torch.isfinite(deep).all()
    assert (deep - model(input_ids, n_loops=depth).logits).abs().max() > 1e-5


def test_loop_update_is_a_h_plus_b_e_plus_block_delta(model):
    """One loop is A*h + B*e + F, where F is only what the shared block adds: h is not added a second time."""
    recurrent, config = model.model.recurrent, model.config
    h, e = torch.randn(2, 5, config.dim), torch.randn(2, 5, config.dim)
    position_embeddings = model.model.rotary_emb(h, torch.arange(5)[None])
    A, B = recurrent.injection.get_A(), recurrent.injection.B
    # F is the layer's residual delta (plus depth-wise LoRA) on h + e + the loop signal
    x = h + e + loop_signal(h + e, 2, config.loop_signal_scale)
    delta, _ = recurrent.layer(x, position_embeddings=position_embeddings, loop_idx=2)
    delta = delta + recurrent.lora(delta, 2)
    out, _ = recurrent.step(h, e, 2, position_embeddings=position_embeddings)
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(out - (A * h + B * e), delta)
    # with every output projection zeroed, the block adds nothing and one loop is exactly A*h + B*e
    zero_block_delta(model)
    out, _ = recurrent.step(h, e, 2, position_embeddings=position_embeddings)
    assert torch.equal(out, A * h + B * e)


@pytest.mark.parametrize("value", [-30.0, -17.5, 0.0, 17.5, 30.0, 1e4, -1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_injection_a_strictly_inside_unit_interval_for_adversarial_parameters(value, dtype):
    model = make_model("gqa").to(dtype)
    injection = model.model.recurrent.injection
    with torch.no_grad():
        injection.log_A.fill_(value)
        injection.log_dt.fill_(value)
    A = injection.get_A()
    assert A.dtype == torch.float32
    for as_dtype in (A, A.to(dtype)):  # the value the loop actually multiplies by
        assert (as_dtype > 0).all() and (as_dtype < 1).all()
    assert 0 < model.spectral_radius() < 1
    assert A_MIN <= float(A.detach().min()) and float(A.detach().max()) <= A_MAX


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["log_A", "log_dt"])
def test_injection_a_stays_inside_its_bounds_for_non_finite_parameters(input_ids, name, value):
    """NaN and +-inf in either parameter still give A in [A_MIN, A_MAX], so the loop never multiplies by NaN."""
    model = make_model("gqa")
    injection = model.model.recurrent.injection
    with torch.no_grad():
        getattr(injection, name)[0] = value
        A = injection.get_A()
    assert A_MIN <= float(A.min()) and float(A.max()) <= A_MAX
    expected = {"nan": A_MIN + (A_MAX - A_MIN) * float(torch.exp(torch.tensor(-1.0))), "inf": A_MIN, "-inf": A_MAX}
    assert float(A[0]) == pytest.approx(expected[str(value)], rel=1e-6)
    assert torch.isfinite(model(input_ids, n_loops=3).logits).all()


def test_spectral_radius_is_the_largest_entry_of_a(model):
    with torch.no_grad():
        model.model.recurrent.injection.log_A.copy_(torch.linspace(-3, 3, model.config.dim))
    assert model.spectral_radius() == pytest.approx(float(model.model.recurrent.injection.get_A().max()))


def test_loop_signal_is_small_relative_to_the_state():
    for scale_of_state in (1e-3, 0.45, 30.0):
        x = torch.randn(4, 7, 256) * scale_of_state
        for t in (0, 1, 15, 100):
            signal = loop_signal(x, t, 0.1)
            ratio = signal.pow(2).mean(-1).sqrt() / x.pow(2).mean(-1).sqrt()
            torch.testing.assert_close(ratio, torch.full_like(ratio, 0.1), rtol=1e-3, atol=1e-4)
    assert not torch.equal(loop_signal(x, 1, 0.1), loop_signal(x, 2, 0.1))


def test_loop_state_norm_keeps_the_state_at_the_input_scale_at_every_loop(input_ids):
    """With ``loop_state_norm`` every loop's state has the RMS of the injected input at each position; without it the
    size drifts with the loop count."""
    sizes = {}
    for norm in (False, True):
        model = make_model("gqa", loop_state_norm=norm)
        with torch.no_grad():
            model.model.recurrent.injection.B.fill_(2.0)  # a large injection, so that the size really drifts
        states = []
        hook = model.model.recurrent.injection.register_forward_hook(lambda m, args, out: states.append((args[1], out)))
        model(input_ids, n_loops=6, use_cache=False)
        hook.remove()
        rms = [(out.pow(2).mean(-1).sqrt() / e.pow(2).mean(-1).sqrt()) for e, out in states]
        sizes[norm] = torch.stack([r.mean() for r in rms])
        if norm:
            for r in rms:
                torch.testing.assert_close(r, torch.ones_like(r), rtol=0, atol=5e-3)  # eps 1e-6 against e^2 ~ 4e-4
    assert sizes[False].max() / sizes[False].min() > 1.25  # the drift the option removes (2.5 to 3.4 here)


@pytest.mark.parametrize("sharing", ["none", "last"])
@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_loop_state_norm_cached_decoding_equals_the_full_forward(attn_type, sharing, input_ids):
    from transformers import DynamicCache

    model = make_model(attn_type, loop_state_norm=True, loop_kv_sharing=sharing)
    full = model(input_ids, n_loops=5, use_cache=False).logits
    cache = DynamicCache(config=model.config)
    steps = [model(input_ids[:, i:i + 1], past_key_values=cache, n_loops=5).logits for i in range(input_ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-4)
    plain = make_model(attn_type, loop_kv_sharing=sharing)
    assert not torch.allclose(full, plain(input_ids, n_loops=5, use_cache=False).logits)


def test_loop_state_norm_with_an_exit_criterion_generates_the_same_with_and_without_a_cache(attn_type, input_ids):
    """The adaptive path (positions stop at their own loop) runs the same rescale: cached and uncached agree."""
    model = make_model(attn_type, loop_state_norm=True)
    kwargs = dict(max_new_tokens=5, do_sample=False, n_loops=6, exit_criterion="delta", exit_threshold=0.2)
    assert torch.equal(model.generate(input_ids, **kwargs), model.generate(input_ids, use_cache=False, **kwargs))


def test_router_does_not_collapse_at_initialisation():
    """The reference's loop signal made 2 of 8 experts take ~95% of tokens; here load stays spread out."""
    model = MythosForCausalLM(mythos_tiny(n_experts=8, n_experts_per_tok=2)).eval()
    ids = torch.randint(0, 512, (4, 64))
    logits = model(ids, n_loops=4, output_router_logits=True).router_logits
    assert len(logits) == 4
    for per_loop in logits:
        chosen = per_loop.sigmoid().topk(2, dim=-1).indices.flatten()
        share = torch.bincount(chosen, minlength=8).float() / chosen.numel()
        assert share.max() < 0.35, share
        assert (share > 0).sum() >= 7, share


def test_depth_lora_index_past_trained_depth_reuses_last_scale(model):
    lora = model.model.recurrent.lora
    with torch.no_grad():
        lora.scale.normal_()
    x = torch.randn(2, 3, model.config.dim)
    last = model.config.max_loop_iters - 1
    assert torch.equal(lora(x, last + 5), lora(x, last))
    assert not torch.equal(lora(x, 0), lora(x, last))


def test_labels_give_shifted_cross_entropy(model, input_ids):
    out = model(input_ids, labels=input_ids, n_loops=2)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)


def test_num_items_in_batch_reaches_the_loss(model, input_ids):
    out = model(input_ids, labels=input_ids, n_loops=2, num_items_in_batch=torch.tensor(100))
    summed = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), input_ids[:, 1:].reshape(-1),
                             reduction="sum")
    torch.testing.assert_close(out.loss, summed / 100)


def test_loss_is_cross_entropy_plus_weighted_ponder_cost(input_ids):
    model = make_model("mla", use_act=True, act_ponder_weight=0.3)
    out = model(input_ids, labels=input_ids, n_loops=3)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    assert float(out.ponder_cost) > 1
    torch.testing.assert_close(out.loss, ce + 0.3 * out.ponder_cost)


def test_accumulated_micro_batch_losses_add_up_to_the_full_batch_loss():
    """With num_items_in_batch (gradient accumulation), the ponder and balance terms are weighted like the CE."""
    model = make_model("mla", use_act=True, act_ponder_weight=0.3, router_aux_loss_coef=0.5).train()
    ids = torch.randint(0, 512, (4, 10), generator=torch.Generator().manual_seed(0))
    full = model(ids, labels=ids, n_loops=3).loss
    total = torch.tensor(4 * 9)
    parts = [model(ids[rows], labels=ids[rows], n_loops=3, num_items_in_batch=total).loss
             for rows in (slice(0, 2), slice(2, 4))]
    torch.testing.assert_close(parts[0] + parts[1], full)
    # a micro-batch's extra terms count with its share of the label tokens; ignored labels do not count
    labels = ids[:2].clone()
    labels[0, :6] = -100
    out = model(ids[:2], labels=labels, n_loops=3, num_items_in_batch=total)
    ce_sum = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), reduction="sum")
    counted = 2 * 9 - 5
    torch.testing.assert_close(out.loss, ce_sum / 36 + counted / 36 * (0.3 * out.ponder_cost + 0.5 * out.aux_loss))


def test_optional_outputs(model, input_ids):
    config = model.config
    out = model(input_ids, n_loops=3, output_hidden_states=True, output_router_logits=True)
    assert len(out.hidden_states) == 1 + config.prelude_layers + 3 + config.coda_layers
    assert len(out.router_logits) == 3 and out.router_logits[0].shape == (input_ids.numel(), config.n_experts)
    eager = make_model(config.attn_type)
    eager.set_attn_implementation("eager")
    attn = eager(input_ids, n_loops=3, output_attentions=True).attentions
    assert len(attn) == config.prelude_layers + 3 + config.coda_layers
    assert attn[0].shape == (2, config.n_heads, input_ids.shape[1], input_ids.shape[1])
    torch.testing.assert_close(attn[0].sum(-1), torch.ones_like(attn[0].sum(-1)))


def test_eager_and_sdpa_agree(attn_type, input_ids):
    sdpa = make_model(attn_type)
    eager = make_model(attn_type)
    sdpa.set_attn_implementation("sdpa")
    eager.set_attn_implementation("eager")
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        real = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)  # padded queries are don't-care
        torch.testing.assert_close(eager(input_ids, n_loops=3, **kwargs).logits[real],
                                   sdpa(input_ids, n_loops=3, **kwargs).logits[real], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("v_head_dim", [4, 24])  # narrower than q/k (sdpa pads v to 16) and wider (no padding)
def test_mla_sdpa_with_other_value_width_matches_eager(input_ids, v_head_dim):
    sdpa = make_model("mla", v_head_dim=v_head_dim).train()
    eager = make_model("mla", v_head_dim=v_head_dim, attn_implementation="eager").train()
    sdpa.set_attn_implementation("sdpa")
    mask = torch.ones_like(input_ids)
    mask[0, :4] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        real = mask.bool() if kwargs else torch.ones_like(mask, dtype=torch.bool)
        losses = []
        for m in (eager, sdpa):
            m.zero_grad()
            logits = m(input_ids, n_loops=2, use_cache=False, **kwargs).logits
            logits[real].square().mean().backward()
            losses.append(logits[real])
        torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-4)
        for (name, a), b in zip(eager.named_parameters(), sdpa.parameters()):
            if a.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_grouped_mm_experts_match_the_plain_path(attn_type, input_ids):
    fast = make_model(attn_type)
    plain = make_model(attn_type)
    fast.set_experts_implementation("grouped_mm")
    plain.set_experts_implementation("eager")
    torch.testing.assert_close(fast(input_ids, n_loops=3).logits, plain(input_ids, n_loops=3).logits,
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_eager_grouped_mm_gathers_rows_by_index_select_with_transformers_values(dtype, tokens, monkeypatch):
    """``sorted_forward`` (what an eager CPU grouped_mm call runs) equals transformers' grouped_mm experts function bit
    for bit, outputs and gradients, also when some experts get no rows; and the eager dispatch really runs it."""
    from transformers.integrations.moe import grouped_mm_experts_forward

    from openmythos.modeling_mythos import MythosExperts

    model = make_model()
    model.set_experts_implementation("grouped_mm")
    experts = model.model.recurrent.layer.mlp.experts.to(dtype)
    gen = torch.Generator().manual_seed(tokens)
    hidden = torch.randn(tokens, experts.hidden_dim, generator=gen).to(dtype)
    # experts 0..2 only when there are few tokens, so most groups are empty
    index = torch.randint(0, 3 if tokens < 10 else experts.num_experts, (tokens, 2), generator=gen)
    weights = torch.rand(tokens, 2, generator=gen).to(dtype)
    results = []
    for forward in (grouped_mm_experts_forward, MythosExperts.sorted_forward):
        experts.zero_grad()
        x = hidden.clone().requires_grad_()
        out = forward(experts, x, index, weights)
        out.float().square().sum().backward()
        results.append((out, x.grad, experts.gate_up_proj.grad, experts.down_proj.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)

    calls = []
    sorted_forward = MythosExperts.sorted_forward
    monkeypatch.setattr(MythosExperts, "sorted_forward", lambda *a: calls.append(1) or sorted_forward(*a))
    with torch.no_grad():
        assert torch.equal(experts(hidden, index, weights), results[0][0])
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim, expert_dim", [(30, 32), (64, 34), (36, 36)])
def test_grouped_mm_with_misaligned_sizes_falls_back_to_the_plain_path(dtype, dim, expert_dim):
    """torch's grouped_mm needs row strides of a multiple of 16 bytes (4 fp32 or 8 bf16 numbers); sizes that are not
    (36 is fine in fp32 but not in bf16) run the plain experts loop instead of crashing, with equal outputs and
    gradients."""
    overrides = dict(dim=dim, expert_dim=expert_dim)  # MLA: any dim
    fast, plain = make_model(**overrides).train().to(dtype), make_model(**overrides).train().to(dtype)
    fast.set_experts_implementation("grouped_mm")
    plain.set_experts_implementation("eager")
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for m in (fast, plain):
        loss = m(ids, labels=ids, n_loops=2).loss
        loss.backward()
        losses.append(loss)
    assert fast.config._experts_implementation == "grouped_mm"
    torch.testing.assert_close(losses[0], losses[1])
    for (name, a), b in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_grouped_mm_alignment_rule():
    from openmythos.modeling_mythos import grouped_mm_fits

    for dtype, good, bad in ((torch.float32, (32, 36), (34, 30)), (torch.bfloat16, (32, 64), (36, 34))):
        experts = make_model(dim=good[0], expert_dim=good[1]).to(dtype).model.recurrent.layer.mlp.experts
        assert grouped_mm_fits(experts)
        for dim, expert_dim in ((bad[0], good[1]), (good[0], bad[1])):
            experts = make_model(dim=dim, expert_dim=expert_dim)
            assert not grouped_mm_fits(experts.to(dtype).model.recurrent.layer.mlp.experts), (dtype, dim, expert_dim)


def test_router_bias_changes_selection_but_not_gate_weights(model):
    router = model.model.recurrent.layer.mlp.gate
    x = torch.randn(16, model.config.dim)
    with torch.no_grad():
        router.e_score_correction_bias.zero_()
    _, _, before = router(x)
    with torch.no_grad():
        router.e_score_correction_bias[:, 3] = 10.0  # force expert 3 into every top-k
    logits, weights, after = router(x)
    assert (after == 3).any(-1).all() and not (before == 3).any(-1).all()
    scores = logits.sigmoid().gather(-1, after)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_conversion_keeps_rope_and_stays_close(attn_type, input_ids, dtype):
    reference = make_model(attn_type)
    half = make_model(attn_type).to(dtype)
    expected = reference(input_ids, n_loops=3).logits
    got = half(input_ids, n_loops=3).logits
    assert got.dtype == dtype and torch.isfinite(got).all()
    # fp16 rounding can flip a near-tied top-k routing choice for a token, hence not a tighter bound
    tolerance = 0.05 if dtype == torch.bfloat16 else 0.02
    assert (got.float() - expected).abs().max() < tolerance * expected.abs().max()
    # RoPE still works: moving a token changes its logits in the half model too.
    shifted = torch.roll(input_ids, 1, dims=1)
    assert not torch.equal(half(shifted, n_loops=3).logits[:, -1], got[:, -1])
    # the precise test of RoPE: half-precision rotary tables equal the fp32 ones rounded
    pos = torch.arange(100)[None]
    cos32, _ = reference.model.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
    cos16, _ = half.model.rotary_emb(torch.zeros(1, dtype=dtype), pos)
    torch.testing.assert_close(cos16, cos32.to(dtype))


def test_gradient_reaches_every_trainable_parameter(attn_type):
    model = make_model(attn_type, use_act=True).train()
    ids = torch.randint(0, 512, (4, 48))
    model(ids, labels=ids, n_loops=3).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_gradient_checkpointing_gives_the_same_gradients(attn_type):
    ids = torch.randint(0, 512, (2, 24))
    grads = []
    for checkpointing in (False, True):
        model = make_model(attn_type).train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids, n_loops=3).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_gradient_checkpointing_recomputes_the_looped_layer_once_and_not_the_cheap_loop_parts():
    """With checkpointing, a training step runs the looped block's inner layer twice per loop (forward, and the
    backward recompute): it is not checkpointed inside another checkpoint. Injection and depth-LoRA run once."""
    n_loops = 3
    model = make_model("mla").train()
    model.activation_checkpointing_enable()
    recurrent = model.model.recurrent
    calls = {"attention": 0, "moe": 0, "injection": 0, "lora": 0}
    # pre-hooks: the recompute stops early once it has every saved tensor back, inside the MoE's forward
    hooks = [module.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, module in (("attention", recurrent.layer.self_attn), ("moe", recurrent.layer.mlp),
                                  ("injection", recurrent.injection), ("lora", recurrent.lora))]
    ids = torch.randint(0, 512, (2, 16))
    model(ids, labels=ids, n_loops=n_loops).loss.backward()
    for hook in hooks:
        hook.remove()
    assert calls == {"attention": 2 * n_loops, "moe": 2 * n_loops, "injection": n_loops, "lora": n_loops}


def test_halting_is_never_a_no_op_at_initialisation(attn_type, input_ids):
    """At initialisation every n_loops, also past the trained depth, changes the ACT output."""
    model = MythosForCausalLM(mythos_tiny(attn_type=attn_type, use_act=True, max_loop_iters=4)).eval()
    outputs = {n: model(input_ids, n_loops=n).logits for n in (2, 4, 8, 16)}
    for a, b in ((2, 4), (4, 8), (8, 16)):
        assert (outputs[a] - outputs[b]).abs().max() > 1e-4, (a, b)


def test_halting_prior_is_one_over_the_loop_budget():
    model = make_model("gqa", use_act=True, max_loop_iters=4)
    h = torch.randn(2, 3, model.config.dim)
    for n_loops in (1, 2, 4, 8, 16):
        p = model.model.recurrent.halt(h, n_loops)
        expected = 0.5 if n_loops == 1 else 1 / n_loops  # one loop takes everything anyway
        torch.testing.assert_close(p, torch.full_like(p, expected))
    single = make_model("gqa", use_act=True, max_loop_iters=1).model.recurrent.halt
    torch.testing.assert_close(single(h, 5), torch.full((2, 3), 1 / 5))


def zero_block_delta(model):
    """Zero every output projection of the shared block, so that its residual delta F is exactly zero."""
    layer = model.model.recurrent.layer
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.experts.down_proj.zero_()
        layer.mlp.shared_experts.down_proj.weight.zero_()
        model.model.recurrent.lora.up.zero_()


def test_halting_weights_sum_to_one(attn_type, input_ids):
    """When every loop state is the same vector, the ACT mix equals that vector only if the weights sum to 1."""
    model = make_model(attn_type, use_act=True)
    zero_block_delta(model)
    injection = model.model.recurrent.injection
    with torch.no_grad():
        injection.B.copy_(1 - injection.get_A())  # h_0 = e, so h_t = A*e + (1-A)*e = e for every t
        model.model.recurrent.halt.weight.normal_(0, 50.0)  # positions halt at different loops
    halt = model.model.recurrent.halt
    for n_loops in (1, 3, 9):
        probs = []
        hook = halt.register_forward_hook(lambda m, a, p: probs.append(p))
        with_act = model(input_ids, n_loops=n_loops).logits
        hook.remove()
        assert torch.stack(probs).std(-1).min() > 0.1  # the halting probabilities really differ per position
        model.model.recurrent.halt = None
        without = model(input_ids, n_loops=n_loops).logits
        model.model.recurrent.halt = halt
        torch.testing.assert_close(with_act, without, atol=1e-5, rtol=1e-5)


def test_halting_extremes_and_ponder_cost(input_ids):
    model = make_model("mla", use_act=True)
    halt = model.model.recurrent.halt
    with torch.no_grad():
        halt.bias.fill_(10.0)  # halts at the first loop
    first = model(input_ids, n_loops=1).logits
    torch.testing.assert_close(model(input_ids, n_loops=5).logits, first)
    assert float(model.model(input_ids, n_loops=5).ponder_cost) == pytest.approx(2.0, abs=1e-3)  # 1 step + remainder 1
    with torch.no_grad():
        halt.bias.fill_(-30.0)  # never reaches the threshold: the last loop takes the remainder
    assert float(model.model(input_ids, n_loops=4).ponder_cost) == pytest.approx(5.0, abs=1e-3)  # 4 steps + ~1


def test_resize_token_embeddings_keeps_the_head_tied(model, input_ids):
    model.resize_token_embeddings(600)
    assert model.config.vocab_size == 600
    assert model.lm_head.weight.shape[0] == 600
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model(torch.tensor([[599, 1, 2]]), n_loops=1).logits.shape == (1, 3, 600)


class TestBadInput:
    def test_token_id_out_of_range(self, model):
        with pytest.raises(ValueError, match="vocab_size=512"):
            model(torch.tensor([[1, 2, 512]]))
        with pytest.raises(ValueError, match="input_ids"):
            model(torch.tensor([[1, -1, 2]]))

    @pytest.mark.parametrize("n_loops", [0, -2, 1.5, "3", True, np.float64(2.0), np.bool_(True), torch.tensor(2.0),
                                         torch.tensor(True), torch.tensor([2, 3, 4, 5, 6]), torch.tensor(0)])
    def test_bad_n_loops(self, model, input_ids, n_loops):
        with pytest.raises(ValueError, match="n_loops"):
            model(input_ids, n_loops=n_loops)

    def test_input_longer_than_max_seq_len(self, model):
        with pytest.raises(ValueError, match="max_seq_len=128"):
            model(torch.ones(1, 129, dtype=torch.long))

    def test_generation_past_max_seq_len(self, model):
        with pytest.raises(ValueError, match="max_seq_len"):
            model.generate(torch.ones(1, 120, dtype=torch.long), max_new_tokens=20, do_sample=False, n_loops=1)

    def test_attention_mask_of_the_wrong_shape(self, model, input_ids):
        with pytest.raises(ValueError, match="attention_mask"):
            model(input_ids, attention_mask=torch.ones(2, 5, dtype=torch.long))
        with pytest.raises(ValueError, match="attention_mask"):
            model(input_ids, attention_mask=torch.ones(12, dtype=torch.long))

    def test_empty_input(self, model):
        with pytest.raises(ValueError, match="Empty input"):
            model(torch.ones(1, 0, dtype=torch.long))
        with pytest.raises(ValueError, match="Empty input"):
            model(torch.ones(0, 4, dtype=torch.long))

    def test_float_ids_and_missing_input(self, model):
        with pytest.raises(ValueError, match="integer"):
            model(torch.ones(1, 4))
        with pytest.raises(ValueError, match="exactly one"):
            model()


def test_n_loops_accepts_any_integer_type(model, input_ids):
    expected = model(input_ids, n_loops=2).logits
    for n_loops in (np.int64(2), np.int32(2), torch.tensor(2), torch.tensor(2, dtype=torch.int32)):
        assert torch.equal(model(input_ids, n_loops=n_loops).logits, expected), repr(n_loops)
    assert torch.equal(model.generate(input_ids, max_new_tokens=2, do_sample=False, n_loops=np.int64(2)),
                       model.generate(input_ids, max_new_tokens=2, do_sample=False, n_loops=2))


@pytest.mark.skipif(not __import__("transformers").utils.is_flash_attn_2_available(),
                    reason="flash-attn 2 is not installed (it needs a CUDA GPU)")
@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_flash_attention_2_matches_sdpa_on_gpu(attn_type, input_ids):
    sdpa = make_model(attn_type).to("cuda", torch.bfloat16)
    flash = make_model(attn_type).to("cuda", torch.bfloat16)
    flash.set_attn_implementation("flash_attention_2")
    ids = input_ids.cuda()
    expected = sdpa(ids, n_loops=3).logits.float()
    got = flash(ids, n_loops=3).logits.float()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_its_formula(dtype):
    # fp32 takes a single fused call with the weight inside; other dtypes normalise in fp32 and cast back
    norm = MythosRMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16)
    expected = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    torch.testing.assert_close(norm(x), expected, atol=1e-6, rtol=1e-5)
    norm.to(dtype)
    out = norm(x.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)
