"""Data-parallel training of OpenMythos: FSDP2 sharding and DDP.

FSDP2 (``apply_fsdp2``): one FSDP unit per prelude layer and per coda layer, one for the shared looped block, and the
root for the rest. The looped block is one unit, not one per iteration: it is one set of weights that runs
``n_loops`` times per forward, and the recurrence runs the whole loop inside one call. FSDP2 gathers a unit in its
pre-forward hook and again in its pre-backward hook, so the looped block is all-gathered once per forward and once
per backward whatever ``n_loops`` is (measured on 2 processes: 7 all-gathers per training step of ``mythos_tiny`` at
n_loops 1, 4 and 8). Every iteration's gradient is added into the same sharded gradient, so the sharded run computes
the gradients of an unsharded one (tests/training/test_distributed.py checks both on 2 processes).
``reshard_loop_after_forward=False`` keeps the gathered block from its forward to the end of its backward: one
all-gather per step instead of two, for the memory of the whole unsharded block during the coda's and the head's
forward and backward.

The router's buffers are not parameters, so FSDP leaves them whole on every rank: ``e_score_correction_bias`` stays
replicated, and ``expert_load`` counts this rank's tokens until ``openmythos.training.update_router_bias`` sums the
counts over all ranks and applies the same update everywhere.

DDP (``broadcast_buffers=True``, its default) copies rank 0's buffers to every rank at each forward that follows a
gradient-synchronising one, which would overwrite the other ranks' ``expert_load`` counts in the middle of a step.
``ddp_ignore_expert_counts`` exempts them.
"""

from torch import nn

from ..modeling_mythos import MythosForCausalLM, MythosModel, MythosRecurrence, MythosTopkRouter


def apply_fsdp2(model: nn.Module, mesh=None, *, reshard_loop_after_forward: bool | None = None,
                **fully_shard_kwargs) -> nn.Module:
    """Shard a :class:`MythosForCausalLM` or :class:`MythosModel` in place with ``torch.distributed.fsdp.fully_shard``.

    Call it after ``torch.distributed.init_process_group`` and before building the optimizer (the optimizer must
    see the sharded parameters). ``mesh`` (a 1-D ``DeviceMesh``; default: all ranks) and ``fully_shard_kwargs``
    (``mp_policy``, ``reshard_after_forward``, ``offload_policy``, ...) are passed to every ``fully_shard`` call.

    ``reshard_loop_after_forward`` is ``reshard_after_forward`` for the looped block alone (default ``None``: the
    same as the other units, that is FSDP's default ``True``):

    - ``True``: the block is gathered for its forward, freed, and gathered again for its backward: two all-gathers
      of the block per training step, whatever ``n_loops`` is. Its unsharded weights exist only while it runs.
    - ``False``: it stays gathered from its forward to the end of its backward: one all-gather per step, but the
      whole unsharded block (nearly all of a large preset's weights) is held while the coda and the head run forward
      and backward. In eval it stays gathered across forwards until the next backward.

    The embedding and ``lm_head`` stay in the root unit: with tied embeddings they are one parameter, and a
    parameter can belong to only one FSDP unit. Returns ``model``; for a full (unsharded) state dict use
    ``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with ``full_state_dict=True``.
    """
    from torch.distributed.fsdp import fully_shard  # absent from some torch builds; DDP users need not import it

    if isinstance(model, MythosForCausalLM):
        base = model.model
    elif isinstance(model, MythosModel):
        base = model
    else:
        raise ValueError(f"apply_fsdp2 expects a MythosForCausalLM or MythosModel, got {type(model).__name__}; "
                         "pass the Mythos model itself, not a wrapper around it.")
    if reshard_loop_after_forward is not None and not isinstance(reshard_loop_after_forward, bool):
        raise ValueError(f"reshard_loop_after_forward must be True, False or None, got {reshard_loop_after_forward!r}")
    kwargs = dict(fully_shard_kwargs, mesh=mesh)
    for layer in base.prelude:
        fully_shard(layer, **kwargs)
    # One unit for the whole looped block, halting head included (the block computes the halting probability). Its
    # inner decoder layer holds nearly all of the block's weights: a unit of its own would save no memory and would
    # add an all-gather per loop iteration, in forward and in backward.
    loop_kwargs = kwargs if reshard_loop_after_forward is None else dict(
        kwargs, reshard_after_forward=reshard_loop_after_forward)
    fully_shard(base.recurrent, **loop_kwargs)
    for layer in base.coda:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def set_loop_reshard_after_forward(model: nn.Module, reshard_after_forward: bool) -> nn.Module:
    """Set ``reshard_after_forward`` on a model's already-sharded looped block: ``apply_fsdp2``'s
    ``reshard_loop_after_forward`` for models that something else sharded (Accelerate, ``Trainer(fsdp=...)``, or
    ``MythosTrainingCallback(reshard_loop_after_forward=...)``, which calls this when training begins).

    ``model`` may be any module holding Mythos recurrences (a PEFT wrapper, a Trainer's model). Units nested inside
    the block follow it, so a block whose inner layer was wrapped separately is also gathered once. Raises a
    ``ValueError`` when no looped block is an FSDP2 unit (FSDP not applied, or FSDP1).
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(reshard_after_forward, bool):
        raise ValueError(f"reshard_after_forward must be True or False, got {reshard_after_forward!r}")
    loops = [m for m in model.modules() if isinstance(m, MythosRecurrence) and isinstance(m, FSDPModule)]
    if not loops:
        raise ValueError("set_loop_reshard_after_forward: no looped block (MythosRecurrence) of this model is an FSDP2 "
                         "unit; shard it first (apply_fsdp2, or Accelerate with fsdp_version: 2 wrapping "
                         "MythosRecurrence).")
    for loop in loops:
        loop.set_reshard_after_forward(reshard_after_forward, recurse=True)
    return model


def ddp_ignore_expert_counts(model: nn.Module) -> nn.Module:
    """Keep DDP from broadcasting the routers' per-rank expert counts; call it before DDP wraps ``model``.

    ``DistributedDataParallel(broadcast_buffers=True)`` (its default, and the Trainer's) copies rank 0's buffers to
    every rank at each forward that follows a gradient-synchronising forward. ``expert_load`` is the one buffer that
    differs by rank on purpose: each rank counts its own tokens, over every micro-batch of an optimizer step, until
    ``update_router_bias`` sums them. When micro-batches synchronise one by one, rank 0's counts would replace the
    others mid-step and the sum would be wrong (with ``no_sync()`` on all but the last, the copy lands just after the
    counts were reset).
    This lists those buffers in DDP's ignore list (``_ddp_params_and_buffers_to_ignore``, read when DDP is built),
    keeping any names already there; the other buffers are still broadcast. ``model`` is the module DDP will wrap
    (a PEFT wrapper included: the names are relative to it). ``MythosTrainingCallback`` calls this for the Trainer.
    """
    from torch.nn.parallel import DistributedDataParallel

    router_names = {name for name, module in model.named_modules() if isinstance(module, MythosTopkRouter)}
    counts = [f"{router}.expert_load" if router else "expert_load" for router in sorted(router_names)]
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, ignored + [name for name in counts if name not in ignored])
    return model
