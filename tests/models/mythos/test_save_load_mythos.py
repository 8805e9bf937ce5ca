import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import make_model
from transformers import AutoModelForCausalLM

from openmythos import MythosForCausalLM, mythos_tiny


def test_save_load_round_trip_is_bit_exact(attn_type, input_ids, tmp_path):
    model = make_model(attn_type, use_act=True)
    with torch.no_grad():
        model.model.recurrent.injection.log_A.normal_()
        model.model.recurrent.halt.weight.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, MythosForCausalLM)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(loaded(input_ids, n_loops=3).logits, model(input_ids, n_loops=3).logits,
                               atol=1e-6, rtol=0)


def test_looped_block_state_dict_keys_are_unchanged():
    """Checkpoints saved by earlier versions must keep loading: the looped block's keys are pinned."""
    keys = [k for k in MythosForCausalLM(mythos_tiny(use_act=True)).state_dict() if k.startswith("model.recurrent.")]
    layer = ["input_layernorm.weight", "self_attn.q_a_proj.weight", "self_attn.q_a_layernorm.weight",
             "self_attn.q_b_proj.weight", "self_attn.kv_a_proj_with_mqa.weight", "self_attn.kv_a_layernorm.weight",
             "self_attn.kv_b_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
             "mlp.gate.weight", "mlp.gate.e_score_correction_bias", "mlp.experts.gate_up_proj",
             "mlp.experts.down_proj", "mlp.shared_experts.gate_proj.weight", "mlp.shared_experts.up_proj.weight",
             "mlp.shared_experts.down_proj.weight"]
    rest = ["injection.log_A", "injection.log_dt", "injection.B", "lora.down", "lora.up", "lora.scale",
            "halt.weight", "halt.bias"]
    assert keys == [f"model.recurrent.layer.{k}" for k in layer] + [f"model.recurrent.{k}" for k in rest]
    gqa = MythosForCausalLM(mythos_tiny(attn_type="gqa")).state_dict()
    assert {f"model.recurrent.layer.self_attn.{p}_proj.weight" for p in "qkvo"} <= gqa.keys()


def test_tied_head_is_not_stored_twice(tmp_path):
    make_model("mla").save_pretrained(tmp_path)
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])
    assert "lm_head.weight" not in header and "model.embed_tokens.weight" in header


def test_fresh_model_initialisation_survives_meta_device_loading(tmp_path):
    """from_pretrained builds on the meta device: custom parameters must come back with their saved values."""
    config = mythos_tiny(use_act=True)
    fresh = MythosForCausalLM(config)
    recurrent = fresh.model.recurrent
    assert torch.equal(recurrent.lora.up, torch.zeros_like(recurrent.lora.up))
    assert torch.equal(recurrent.lora.scale, torch.ones_like(recurrent.lora.scale))
    assert float(recurrent.halt.bias.detach()) == pytest.approx(-math.log(config.max_loop_iters - 1), rel=1e-6)
    assert torch.equal(recurrent.injection.B, torch.full_like(recurrent.injection.B, 0.1))
    fresh.save_pretrained(tmp_path)
    loaded = MythosForCausalLM.from_pretrained(tmp_path)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_init_weights_sets_every_parameter_and_buffer():
    """_init_weights is what from_pretrained runs for missing weights: it must cover every tensor of the model."""
    model = MythosForCausalLM(mythos_tiny(use_act=True))
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    fresh = {name: t.detach().clone() for name, t in tensors.items()}
    with torch.no_grad():
        for t in tensors.values():
            t.fill_(float("nan") if t.is_floating_point() else 12345)
            if hasattr(t, "_is_hf_initialized"):
                del t._is_hf_initialized
    for module in model.modules():
        module.__dict__.pop("_is_hf_initialized", None)
    model.initialize_weights()
    for name, t in tensors.items():
        assert torch.isfinite(t).all() and not (t == 12345).any(), name
        if (fresh[name] == fresh[name].flatten()[0]).all():  # a constant init (zeros, ones, B = 0.1, halting bias)
            assert torch.equal(t, fresh[name]), name
        else:
            assert t.std() > 0, name


def test_from_pretrained_in_a_fresh_process(tmp_path, input_ids):
    model = make_model("gqa")
    model.save_pretrained(tmp_path)
    torch.save(model(input_ids, n_loops=2).logits, tmp_path / "expected.pt")
    torch.save(input_ids, tmp_path / "ids.pt")
    script = f"""
import torch, openmythos
from transformers import AutoModelForCausalLM
from openmythos import mythos_tiny
AutoModelForCausalLM.from_config(mythos_tiny())
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
got = model(torch.load({str(tmp_path / 'ids.pt')!r}), n_loops=2).logits
torch.testing.assert_close(got, torch.load({str(tmp_path / 'expected.pt')!r}), atol=1e-6, rtol=0)
print("ok", type(model).__name__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok MythosForCausalLM" in result.stdout
