"""torch.compile readiness: no graph breaks, and compiled static-cache generation equal to eager."""

import pytest
import torch
from transformers import CompileConfig, DynamicCache, StaticCache

from openmythos.modeling_mythos import MythosLinear, MythosModel, grouped_decode_attention


def graph_breaks(fn, *args):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_break_count, [b.reason.splitlines()[0] for b in explained.break_reasons]


@torch.no_grad()
def test_forward_and_static_decode_step_have_no_graph_breaks(model, input_ids):
    assert graph_breaks(lambda ids: model(ids, use_cache=False).logits, input_ids) == (0, [])
    dynamic = DynamicCache(config=model.config)
    model(input_ids, cache=dynamic)
    assert graph_breaks(lambda ids: model(ids, cache=dynamic).logits, input_ids[:, :2]) == (0, [])
    static = StaticCache(config=model.config, max_cache_len=32)
    model(input_ids, cache=static)
    mask = torch.ones(2, input_ids.shape[1] + 1, dtype=torch.long)
    assert graph_breaks(lambda ids: model(ids, cache=static, attention_mask=mask).logits, input_ids[:, :1]) == (0, [])
    # generate without padding hands the step no mask: the causal mask is built from the cache position
    assert graph_breaks(lambda ids: model(ids, cache=static).logits, input_ids[:, :1]) == (0, [])


@torch.no_grad()
def test_loop_state_norm_forward_has_no_graph_breaks(input_ids):
    from conftest import make_model

    model = make_model("gqa", loop_state_norm=True)
    assert graph_breaks(lambda ids: model(ids, use_cache=False).logits, input_ids) == (0, [])


def compile_config(backend: str) -> CompileConfig:
    """The README's CPU recipe: with inductor, the step's wrapper is C++ (``cpp_wrapper``)."""
    options = {"cpp_wrapper": True} if backend == "inductor" else None
    config = CompileConfig(fullgraph=True, backend=backend, mode=None, options=options)
    config._compile_all_devices = True  # transformers compiles on CPU only when told to
    return config


def compiled_equals_eager(model, input_ids, backend):
    kwargs = dict(max_new_tokens=5, do_sample=False, n_loops=3, cache_implementation="static")
    eager = model.generate(input_ids, **kwargs)
    torch._dynamo.reset()
    compiled = model.generate(input_ids, compile_config=compile_config(backend), **kwargs)
    assert hasattr(model, "_compiled_call")  # the decode steps really ran compiled (fullgraph: a break would raise)
    assert torch.equal(eager, compiled)


def test_compiled_static_generate_equals_eager(model, input_ids):
    """aot_eager traces the whole step as inductor does (functionalised, fullgraph) without generating code."""
    compiled_equals_eager(model, input_ids, "aot_eager")


def test_inductor_static_generate_equals_eager(input_ids):
    """One real inductor compile (about 70 s on a 2-core CPU): the decode step as it runs in production."""
    from conftest import make_model

    compiled_equals_eager(make_model("mla"), input_ids, "inductor")


def test_generate_checks_the_prompt_once_and_not_each_step(model, input_ids, monkeypatch):
    from openmythos import modeling_mythos

    calls = []
    check = modeling_mythos._check_token_ids
    monkeypatch.setattr(modeling_mythos, "_check_token_ids", lambda *a: calls.append(1) or check(*a))
    model.generate(input_ids, max_new_tokens=4, do_sample=False)
    assert len(calls) == 1
    model(input_ids)  # a forward outside generate checks its input
    assert len(calls) == 2 and model.model._generating == 0


def test_generate_refuses_a_bad_prompt_and_a_static_cache_too_small_before_any_step(model, input_ids, monkeypatch):
    monkeypatch.setattr(MythosModel, "forward", lambda *a, **k: pytest.fail("a step ran"))
    bad = input_ids.clone()
    bad[0, 3] = model.config.vocab_size
    with pytest.raises(ValueError, match="input_ids"):
        model.generate(bad, max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        model.generate(input_ids, attention_mask=torch.full_like(input_ids, 2), max_new_tokens=2)
    small = StaticCache(config=model.config, max_cache_len=14)
    with pytest.raises(ValueError, match="max_cache_len=14"):
        model.generate(input_ids, past_key_values=small, max_new_tokens=4)
    assert model.model._generating == 0


@pytest.mark.parametrize("sharing", ["first", "last"])
def test_compiled_static_generate_with_kv_sharing_equals_eager(sharing, input_ids):
    """With sharing the static cache has one loop slot, and the step stays one graph."""
    from conftest import make_model

    compiled_equals_eager(make_model("gqa", loop_kv_sharing=sharing), input_ids, "aot_eager")


def test_training_forward_and_loss_have_no_graph_breaks(model, input_ids):
    """Expert-load counting is a fixed-shape scatter-add (bincount and boolean indexing broke the graph 6 times)."""
    model.train()
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    assert graph_breaks(lambda ids: model(ids, labels=ids, attention_mask=mask, n_loops=2, use_cache=False).loss,
                        input_ids) == (0, [])


def test_expert_counts_leave_out_padding_and_match_a_bincount(model, input_ids):
    gate = model.model.recurrent.layer.mlp.gate
    gate.expert_load.zero_()
    index = torch.randint(0, gate.n_experts, (input_ids.numel(), gate.top_k))
    mask = torch.ones_like(input_ids)
    mask[1, 4:] = 0
    gate.record_load(index, 1, mask)
    kept = index[mask.reshape(-1).bool()].flatten()
    assert torch.equal(gate.expert_load[1], torch.bincount(kept, minlength=gate.n_experts))
    assert gate.expert_load[0].sum() == 0 and gate.expert_load[1].sum() == kept.numel() < index.numel()


def test_gathered_experts_equal_the_plain_path(model):
    """The compiled decode path (a gather and a reduction) against the plain per-expert loop, repeats included."""
    experts = model.model.recurrent.layer.mlp.experts
    torch.manual_seed(2)
    for tokens in (1, 2, 3):
        hidden = torch.randn(tokens, experts.hidden_dim)
        index = torch.randint(0, experts.num_experts, (tokens, 2))
        index[0] = index[0, 0]  # one token routed twice to the same expert
        weights = torch.rand(tokens, 2)
        torch.testing.assert_close(experts.gathered_forward(hidden, index, weights),
                                   experts.plain_forward(hidden, index, weights), atol=1e-6, rtol=1e-5)


def _graph_ops(fn, *args):
    """The call targets of every graph dynamo makes for ``fn`` (backend: run the graph as it is)."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return targets


@torch.no_grad()
def test_compiled_decode_gathers_experts_and_a_compiled_prefill_keeps_grouped_mm(model, input_ids):
    experts = model.model.recurrent.layer.mlp.experts
    decode = torch.randn(2, experts.hidden_dim)  # 2 tokens x top-2 = 4 routed rows <= 8 experts: gather
    index = torch.tensor([[0, 1], [1, 5]])
    weights = torch.rand(2, 2)
    ops = _graph_ops(experts, decode, index, weights)
    assert ops and not [op for op in ops if "mm" in op or "linear" in op], ops  # no matmul kernel, no host sync
    eager = experts(decode, index, weights)  # eager keeps the grouped_mm kernel
    torch.testing.assert_close(torch.compile(experts, backend="aot_eager", fullgraph=True)(decode, index, weights),
                               eager, atol=1e-6, rtol=1e-5)
    prefill = torch.randn(24, experts.hidden_dim)  # 48 routed rows: transformers' grouped_mm as before
    ops = " ".join(_graph_ops(experts, prefill, torch.randint(0, 8, (24, 2)), torch.rand(24, 2)))
    assert "grouped_mm" in ops


@torch.no_grad()
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_few_row_linear_streams_the_weight_and_equals_nn_linear(bias):
    """A compiled CPU call on 2-4 rows multiplies as weight @ x^T (one mm, no linear); 1 row, 5 rows and eager calls
    stay nn.Linear's. Every form gives nn.Linear's values."""
    torch.manual_seed(0)
    layer = MythosLinear(32, 48, bias=bias)
    reference = torch.nn.Linear(32, 48, bias=bias)
    reference.load_state_dict(layer.state_dict())
    for shape, streams in (((2, 1, 32), True), ((4, 32), True), ((1, 3, 32), True), ((1, 1, 32), False),
                           ((5, 32), False), ((2, 8, 32), False)):
        x = torch.randn(shape)
        ops = _graph_ops(layer, x)
        assert any("method mm " in op for op in ops) == streams, (shape, ops)
        assert any("linear" in op for op in ops) != streams, (shape, ops)
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
        assert compiled.shape == (*shape[:-1], 48)
        torch.testing.assert_close(compiled, reference(x), atol=1e-6, rtol=1e-5)
        assert torch.equal(layer(x), reference(x))  # eager: nn.Linear's own kernel


@torch.no_grad()
def test_streamed_linear_takes_its_sizes_from_the_tensors_and_keeps_the_autocast_dtype():
    """A tensor-parallel shard keeps the full in/out_features with a smaller weight; under CPU bf16 autocast the
    streamed output has nn.Linear's dtype, bias included."""
    torch.manual_seed(0)
    shard = MythosLinear(32, 48, bias=False)
    shard.weight = torch.nn.Parameter(torch.randn(24, 32))  # a column shard: half the outputs
    x = torch.randn(2, 1, 32)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(shard, backend="aot_eager", fullgraph=True)(x),
                               torch.nn.functional.linear(x, shard.weight), atol=1e-6, rtol=1e-5)
    layer = MythosLinear(32, 48, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = layer(x)
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    assert compiled.dtype == eager.dtype == torch.bfloat16
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)


@torch.no_grad()
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_decode_attention_equals_sdpa(kv_heads):
    """One query position against cached keys/values, without repeating them: sdpa's values for every group size
    and for no mask, a boolean mask and an additive one (padding hidden)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from conftest import make_model

    attention = make_model("gqa", n_kv_heads=kv_heads).model.prelude[0].self_attn
    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 1, 16), torch.randn(2, kv_heads, 9, 16), torch.randn(2, kv_heads, 9, 16)
    allowed = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    allowed[0, ..., :3] = False  # a left-padded row
    additive = torch.zeros(2, 1, 1, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)
    for mask in (None, allowed, additive):
        expected, _ = sdpa_attention_forward(attention, query, key, value, mask, scaling=0.25, is_causal=False)
        got, weights = grouped_decode_attention(attention, query, key, value, mask, scaling=0.25)
        assert got.shape == expected.shape == (2, 1, 4, 16) and weights is None
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    hidden = torch.zeros(2, 1, 1, 9, dtype=torch.bool)  # every key hidden: finite, never NaN
    assert grouped_decode_attention(attention, query, key, value, hidden, scaling=0.25)[0].isfinite().all()


@torch.no_grad()
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_compiled_gqa_decode_step_reads_the_cache_grouped_and_a_prefill_keeps_sdpa(kv_heads, input_ids):
    """Under compile a one-position GQA step multiplies the grouped queries by the cached keys (no sdpa, whose CPU
    form would recompute the rotated query per key); so does MHA (4 of 4 heads); a prefill keeps sdpa."""
    from conftest import make_model

    model = make_model("gqa", n_kv_heads=kv_heads)
    static = StaticCache(config=model.config, max_cache_len=32)
    prefill = " ".join(_graph_ops(lambda ids: model(ids, cache=static).logits, input_ids))
    assert "scaled_dot_product_attention" in prefill
    mask = torch.ones(2, input_ids.shape[1] + 1, dtype=torch.long)
    step = lambda ids: model(ids, cache=static, attention_mask=mask).logits  # noqa: E731
    decode = _graph_ops(step, input_ids[:, :1])
    assert not [op for op in decode if "scaled_dot_product" in op], decode
    # scores and values in each attention call: prelude, max_loop_iters loops, coda
    assert sum("matmul" in op for op in decode) == 2 * (2 + model.config.max_loop_iters)


def _sdpa_calls(fn, *args):
    """(is_causal, has a mask) of every sdpa call in the graphs dynamo makes for ``fn``."""
    calls = []

    def backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "scaled_dot_product_attention" in str(node.target):
                mask = node.kwargs.get("attn_mask", node.args[3] if len(node.args) > 3 else None)
                calls.append((bool(node.kwargs.get("is_causal", False)), mask is not None))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return calls


def test_compiled_forward_without_padding_is_causal_without_a_mask(model, input_ids):
    """A compiled call with no padding mask, no cache and default positions runs sdpa with is_causal and no mask, as
    eager calls do, with eager's values and gradients; a padding mask or given (packed) positions keep the mask."""
    plain = lambda ids: model(ids, use_cache=False).logits  # noqa: E731
    assert set(_sdpa_calls(plain, input_ids)) == {(True, False)}
    with torch.no_grad():
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(plain, backend="aot_eager", fullgraph=True)(input_ids),
                                   plain(input_ids), atol=1e-5, rtol=1e-4)
    padded = torch.ones_like(input_ids)
    padded[0, :3] = 0
    assert set(_sdpa_calls(lambda ids: model(ids, attention_mask=padded, use_cache=False).logits, input_ids)) == {
        (False, True)}
    packed = torch.cat((torch.arange(5), torch.arange(7)))[None].expand(2, -1)  # two sequences per row
    with_positions = lambda ids: model(ids, position_ids=packed, use_cache=False).logits  # noqa: E731
    assert set(_sdpa_calls(with_positions, input_ids)) == {(False, True)}
    with torch.no_grad():
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(with_positions, backend="aot_eager", fullgraph=True)(input_ids),
                                   with_positions(input_ids), atol=1e-5, rtol=1e-4)
    model.train()
    loss = lambda ids: model(ids, labels=ids, n_loops=2, use_cache=False).loss  # noqa: E731
    eager = torch.autograd.grad(loss(input_ids), model.model.embed_tokens.weight)[0]
    torch._dynamo.reset()
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(input_ids),
                                   model.model.embed_tokens.weight)[0]
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_rope_frequencies_are_constants_with_the_fp32_values_of_the_formula(model):
    """The RoPE tables equal the formula's fp32 values, a compiled call computes no pow (which inductor inlined into
    every kernel reading the tables), and eager calls reuse the frequencies' tensor."""
    rotary = model.model.rotary_emb
    exponent = torch.arange(0, rotary.rope_dim, 2, dtype=torch.float32) / rotary.rope_dim
    positions = torch.arange(40)[None]
    freqs = positions[..., None].float() * (1.0 / (rotary.theta**exponent))
    cos, sin = rotary(torch.zeros(1), positions)
    assert torch.equal(cos, torch.cat((freqs, freqs), dim=-1).cos())
    assert torch.equal(sin, torch.cat((freqs, freqs), dim=-1).sin())
    ops = _graph_ops(rotary, torch.zeros(1), positions)
    assert ops and not [op for op in ops if "pow" in op], ops
    cpu = torch.device("cpu")  # eager calls reuse one tensor per device (no host copy per GPU step)
    assert rotary.frequencies(cpu) is rotary.frequencies(cpu)
