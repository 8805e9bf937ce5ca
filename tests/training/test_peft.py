"""PEFT LoRA on Mythos: default targets, expert adapters, save/load, merge and cached generation."""

import importlib
import sys

import pytest
import torch
from conftest import make_model

import openmythos
import openmythos.peft_support
from openmythos import MythosForCausalLM
from openmythos.modeling_mythos import MythosExperts

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer, ParamWrapper  # noqa: E402

N_LOOPS = 2
FFN = {"gate_proj", "up_proj", "down_proj"}
ATTENTION = {
    "gqa": {"q_proj", "k_proj", "v_proj", "o_proj"},
    "mla": {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
    "mla_without_q_lora": {"q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"},
}
MODEL_KWARGS = {
    "gqa": dict(attn_type="gqa"),
    "mla": dict(attn_type="mla"),
    "mla_without_q_lora": dict(attn_type="mla", q_lora_rank=0),
}
BLOCKS = ("model.prelude.0", "model.recurrent.layer", "model.coda.0")
DENSE_FFNS = ("model.prelude.0.mlp", "model.recurrent.layer.mlp.shared_experts", "model.coda.0.mlp")
EXPERTS = "model.recurrent.layer.mlp.experts"


@pytest.fixture(autouse=True)
def peft_defaults():
    # openmythos/__init__ registers these on import; registering again must be harmless.
    assert openmythos.peft_support.register_peft_defaults()


def lora_module_names(peft_model) -> dict[str, type]:
    """Every LoRA-wrapped module, by its name in the base model (a nested wrapper counts once, at the outside)."""
    names = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and not name.endswith(".base_layer"):
            names[name] = type(module)
    return names


def randomize_adapters(peft_model, seed=0, std=0.05):
    """lora_B starts at zero (an exact no-op); give it values so the adapter really changes the model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids, n_loops=N_LOOPS).logits


# ------------------------------------------------------------------------------------------- default targets
def test_register_peft_defaults_is_idempotent_and_keeps_an_existing_entry():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    assert openmythos.peft_support.register_peft_defaults()
    assert openmythos.peft_support.register_peft_defaults()
    assert mapping["mythos"] == list(openmythos.peft_support.DEFAULT_LORA_TARGET_MODULES)
    custom = ["q_proj"]
    mapping["mythos"] = custom
    try:
        assert openmythos.peft_support.register_peft_defaults()
        assert mapping["mythos"] is custom
    finally:
        mapping["mythos"] = list(openmythos.peft_support.DEFAULT_LORA_TARGET_MODULES)


def test_without_peft_registration_is_a_no_op(monkeypatch):
    # A None entry makes `import peft...` raise ImportError; loaded submodules need one each, or they are reused.
    for name in [name for name in sys.modules if name == "peft" or name.startswith("peft.")]:
        monkeypatch.setitem(sys.modules, name, None)
    module = importlib.reload(openmythos.peft_support)  # the module itself must import without peft
    assert module.register_peft_defaults() is False
    with pytest.raises(ImportError, match="peft"):
        module.expert_lora_config()


@pytest.mark.parametrize("variant", list(ATTENTION))
def test_default_lora_config_targets_attention_and_dense_ffn_only(variant):
    peft_model = get_peft_model(make_model(**MODEL_KWARGS[variant]), LoraConfig(task_type="CAUSAL_LM"))
    wrapped = lora_module_names(peft_model)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == ATTENTION[variant] | FFN
    expected = ({f"{block}.self_attn.{proj}" for block in BLOCKS for proj in ATTENTION[variant]}
                | {f"{ffn}.{proj}" for ffn in DENSE_FFNS for proj in FFN})
    assert set(wrapped) == expected  # so: no experts, no router, no lm_head, no embeddings
    assert all(cls is peft.tuners.lora.Linear for cls in wrapped.values())


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_only_adapter_parameters_are_trainable(attn_type, input_ids):
    peft_model = get_peft_model(make_model(attn_type), openmythos.peft_support.expert_lora_config(r=4))
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    assert trainable, "no trainable parameters"
    assert all(".lora_A." in name or ".lora_B." in name for name in trainable), sorted(trainable)
    assert any(f"{EXPERTS}.lora_A" in name for name in trainable)  # the expert adapters train too
    assert not any("recurrent.lora." in name for name in trainable)  # the model's own depth-wise LoRA is frozen

    frozen = {name: param.detach().clone() for name, param in peft_model.named_parameters()
              if not param.requires_grad}
    adapters = {name: param.detach().clone() for name, param in peft_model.named_parameters() if param.requires_grad}
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        peft_model(input_ids=input_ids, labels=input_ids, n_loops=N_LOOPS).loss.backward()
        if step == 0:
            grads = {name: param.grad for name, param in peft_model.named_parameters()}
            assert all(grads[name] is None for name in frozen)
            assert all(grads[name] is not None for name in adapters)
        optimizer.step()
        optimizer.zero_grad()
    after = dict(peft_model.named_parameters())
    assert all(torch.equal(after[name], value) for name, value in frozen.items())
    assert all(not torch.equal(after[name], value) for name, value in adapters.items())


# ------------------------------------------------------------------------------------- save, load and merge
@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_adapter_round_trip_and_merge_reproduce_the_adapted_model(attn_type, input_ids, tmp_path):
    base_logits = logits(make_model(attn_type), input_ids)
    peft_model = get_peft_model(make_model(attn_type), LoraConfig(task_type="CAUSAL_LM")).eval()
    randomize_adapters(peft_model)
    adapted = logits(peft_model, input_ids)
    assert (adapted - base_logits).abs().max() > 1e-2, "the adapter should change the model"

    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(attn_type), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, input_ids), adapted, atol=0, rtol=0)

    merged = peft_model.merge_and_unload()
    assert type(merged) is MythosForCausalLM
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    assert merged.state_dict().keys() == make_model(attn_type).state_dict().keys()
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------- experts
def test_expert_lora_config_adapts_expert_parameters_not_dense_down_proj():
    peft_model = get_peft_model(make_model("mla"), openmythos.peft_support.expert_lora_config())
    wrapped = lora_module_names(peft_model)
    assert wrapped[EXPERTS] is ParamWrapper
    for ffn in DENSE_FFNS:
        assert wrapped[f"{ffn}.down_proj"] is peft.tuners.lora.Linear

    experts = peft_model.base_model.model.model.recurrent.layer.mlp.experts
    config = peft_model.base_model.model.config
    adapted = {}
    while isinstance(experts, ParamWrapper):
        adapted[experts.parameter_name] = (experts.num_experts, experts.in_features, experts.out_features)
        experts = experts.base_layer
    assert type(experts) is MythosExperts
    # one adapter per expert, with the weights' own [E, out, in] orientation
    assert adapted == {"gate_up_proj": (config.n_experts, config.dim, 2 * config.expert_dim),
                       "down_proj": (config.n_experts, config.expert_dim, config.dim)}


def test_expert_lora_config_rejects_dropout():
    with pytest.raises(ValueError, match="lora_dropout"):
        openmythos.peft_support.expert_lora_config(lora_dropout=0.05)


@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_expert_adapter_changes_output_and_merges(attn_type, input_ids, tmp_path):
    base_logits = logits(make_model(attn_type), input_ids)
    config = openmythos.peft_support.expert_lora_config(target_modules=[])  # the experts and nothing else
    peft_model = get_peft_model(make_model(attn_type), config).eval()
    assert set(lora_module_names(peft_model)) == {EXPERTS}
    randomize_adapters(peft_model)
    adapted = logits(peft_model, input_ids)
    assert (adapted - base_logits).abs().max() > 1e-2, "the expert adapter should change the model"

    # the adapter reaches the experts whichever kernel runs them
    peft_model.base_model.model.set_experts_implementation("eager")
    torch.testing.assert_close(logits(peft_model, input_ids), adapted, atol=1e-5, rtol=0)
    peft_model.base_model.model.set_experts_implementation("grouped_mm")

    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(attn_type), tmp_path).eval()
    torch.testing.assert_close(logits(loaded, input_ids), adapted, atol=0, rtol=0)

    merged = peft_model.merge_and_unload()
    assert type(merged) is MythosForCausalLM
    assert type(merged.model.recurrent.layer.mlp.experts) is MythosExperts
    assert not any(isinstance(module, LoraLayer) for module in merged.modules())
    torch.testing.assert_close(logits(merged, input_ids), adapted, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("attn_type", ["mla", "gqa"])
def test_cached_generate_with_adapter_matches_uncached(attn_type, input_ids):
    model = make_model(attn_type)
    if attn_type == "mla":
        # Cached MLA decoding normally folds kv_b_proj's weight into the query (absorbed attention). That folded
        # weight would miss the adapter on kv_b_proj, so the model must take the expanded path when it is wrapped.
        assert model.config.mla_absorb
    peft_model = get_peft_model(model, openmythos.peft_support.expert_lora_config()).eval()
    randomize_adapters(peft_model)
    kwargs = dict(max_new_tokens=6, do_sample=False, n_loops=N_LOOPS, output_logits=True,
                  return_dict_in_generate=True)
    cached = peft_model.generate(input_ids=input_ids, **kwargs)
    plain = peft_model.generate(input_ids=input_ids, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, plain.sequences)
    for a, b in zip(cached.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------- training
def test_adapter_gradients_are_unchanged_by_gradient_checkpointing(input_ids):
    grads = []
    for checkpointing in (False, True):
        model = make_model("mla")
        if checkpointing:
            model.gradient_checkpointing_enable()
        peft_model = get_peft_model(model, openmythos.peft_support.expert_lora_config())
        randomize_adapters(peft_model)
        peft_model.train()
        peft_model(input_ids=input_ids, labels=input_ids, n_loops=N_LOOPS).loss.backward()
        grads.append({name: param.grad for name, param in peft_model.named_parameters() if param.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5,
                                   msg=lambda message, name=name: f"{name}: {message}")
