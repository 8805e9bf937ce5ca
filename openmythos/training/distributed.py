"""FSDP2 sharding for OpenMythos.

One FSDP unit per prelude layer and per coda layer, one for the shared looped block, and the root for the rest.
The looped block is sharded once, not once per iteration: it is one set of weights that runs ``n_loops`` times per
forward. FSDP2 all-gathers it before every call and accumulates the gradients of every call into the same sharded
gradient, so the sharded run computes the same gradients as an unsharded one (tests/training/test_distributed.py
checks this on 2 processes).

The router's buffers are not parameters, so FSDP leaves them whole on every rank: ``e_score_correction_bias`` stays
replicated, and ``expert_load`` counts this rank's tokens until ``openmythos.training.update_router_bias`` sums the
counts over all ranks and applies the same update everywhere.
"""

from torch import nn
from torch.distributed.fsdp import fully_shard

from ..modeling_mythos import MythosForCausalLM, MythosModel


def apply_fsdp2(model: nn.Module, mesh=None, **fully_shard_kwargs) -> nn.Module:
    """Shard a :class:`MythosForCausalLM` or :class:`MythosModel` in place with ``torch.distributed.fsdp.fully_shard``.

    Call it after ``torch.distributed.init_process_group`` and before building the optimizer (the optimizer must
    see the sharded parameters). ``mesh`` (a 1-D ``DeviceMesh``; default: all ranks) and ``fully_shard_kwargs``
    (``mp_policy``, ``reshard_after_forward``, ``offload_policy``, ...) are passed to every ``fully_shard`` call.
    With ``reshard_after_forward=True`` (FSDP's default for non-root units) the looped block is all-gathered once
    per loop iteration; ``False`` keeps it gathered through forward and backward, trading memory for traffic.

    The embedding and ``lm_head`` stay in the root unit: with tied embeddings they are one parameter, and a
    parameter can belong to only one FSDP unit. Returns ``model``; for a full (unsharded) state dict use
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict=True``.
    """
    if isinstance(model, MythosForCausalLM):
        base = model.model
    elif isinstance(model, MythosModel):
        base = model
    else:
        raise ValueError(f"apply_fsdp2 expects a MythosForCausalLM or MythosModel, got {type(model).__name__}; "
                         "pass the Mythos model itself, not a wrapper around it.")
    kwargs = dict(fully_shard_kwargs, mesh=mesh)
    for layer in base.prelude:
        fully_shard(layer, **kwargs)
    # One unit for the whole looped block, halting head included (the block computes the halting probability). Its
    # inner decoder layer holds nearly all of the block's weights: a unit of its own would save no memory and would
    # add a second all-gather per loop iteration.
    fully_shard(base.recurrent, **kwargs)
    for layer in base.coda:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model

