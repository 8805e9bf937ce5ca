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


def count_parameters(config: MythosConfig) -> ParameterCount:
    """Total and active-per-token parameter counts of ``config`` without allocating weights."""
    from .modeling_mythos import MythosForCausalLM

    with torch.device("meta"):
        model = MythosForCausalLM(config)
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
