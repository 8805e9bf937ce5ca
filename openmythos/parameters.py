"""Parameter counts of any config, computed on the meta device (no weights are allocated)."""

from dataclasses import dataclass

import torch

from .configuration_mythos import MythosConfig


@dataclass(frozen=True)
class ParameterCount:
    """``total`` counts every stored parameter once (a tied head is not counted twice; the looped block once).
    ``active`` counts what one token touches: everything except the routed experts it is not sent to."""

    total: int
    active: int


def meta_model(config: MythosConfig):
    """``MythosForCausalLM(config)`` on the meta device: every parameter's shape, no weights allocated."""
    from .modeling_mythos import MythosForCausalLM

    with torch.device("meta"):
        return MythosForCausalLM(config)


def count_parameters(config: MythosConfig) -> ParameterCount:
    """Total and active-per-token parameter counts of ``config`` without allocating weights."""
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    experts = model.model.recurrent.layer.mlp.experts
    per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // config.n_experts
    inactive = (config.n_experts - config.n_experts_per_tok) * per_expert
    return ParameterCount(total=total, active=total - inactive)


def format_count(n: int) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def preset_table() -> str:
    """Markdown table of every preset: the seed columns plus total and active parameters (computed, not typed)."""
    from .configuration_mythos import PRESET_MAX_OUTPUT, PRESETS

    def tokens(n: int) -> str:
        return f"{n // 2**20}M" if n >= 2**20 else f"{n // 1024}k" if n >= 1024 else str(n)

    rows = ["| preset | dim | experts | expert_dim | loop iters | context | max output | total params | active params |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, make in PRESETS.items():
        config = make()
        counts = count_parameters(config)
        max_out = PRESET_MAX_OUTPUT.get(name.removeprefix("mythos_"))
        rows.append(f"| {name} | {config.dim} | {config.n_experts} | {config.expert_dim} | {config.max_loop_iters} | "
                    f"{tokens(config.max_seq_len)} | {tokens(max_out) if max_out else '-'} | "
                    f"{format_count(counts.total)} | {format_count(counts.active)} |")
    return "\n".join(rows)
