"""The seed's usage example, on the Hugging Face API (``mythos quickstart``)."""

import tempfile

import torch
from transformers import AutoModelForCausalLM

from .configuration_mythos import MythosConfig


def readme_config(attn_type: str) -> MythosConfig:
    """The reference README's example configuration."""
    base = dict(vocab_size=1000, dim=256, n_heads=8, max_seq_len=128, max_loop_iters=4, prelude_layers=1,
                coda_layers=1, n_experts=8, n_shared_experts=1, n_experts_per_tok=2, expert_dim=64, lora_rank=8,
                attn_type=attn_type)
    if attn_type == "gqa":
        return MythosConfig(**base, n_kv_heads=2)
    return MythosConfig(**base, n_kv_heads=8, kv_lora_rank=32, q_lora_rank=64, qk_rope_head_dim=16,
                        qk_nope_head_dim=16, v_head_dim=16)


def run(attn_types=("mla", "gqa"), n_loops=(1, 4, 8), seed=0):
    for attn_type in attn_types:
        torch.manual_seed(seed)
        tag = f"[{attn_type.upper()}]"
        model = AutoModelForCausalLM.from_config(readme_config(attn_type)).eval()
        print(f"{tag} Parameters: {model.num_parameters():,}")
        ids = torch.randint(0, model.config.vocab_size, (2, 16))
        with torch.no_grad():
            logits = model(ids, n_loops=4).logits
        print(f"{tag} Logits shape: {tuple(logits.shape)}")
        for n in n_loops:
            out = model.generate(ids, max_new_tokens=8, do_sample=False, n_loops=n)
            print(f"{tag} n_loops={n}: generated {tuple(out.shape)}, new tokens of row 0: {out[0, 16:].tolist()}")
        print(f"{tag} Spectral radius rho(A): {model.spectral_radius():.4f} (always < 1)")
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
            same = torch.equal(reloaded.generate(ids, max_new_tokens=8, do_sample=False, n_loops=4),
                               model.generate(ids, max_new_tokens=8, do_sample=False, n_loops=4))
        print(f"{tag} save_pretrained -> from_pretrained gives the same tokens: {same}")
