"""The training stack: everything a checkpoint does not need at inference time.

- ``recipe``: the loop-count schedule, aux-loss-free MoE balancing, expert-load statistics and the Trainer callback
  that applies them (``MythosTrainingCallback``).
- ``loop_stats``: loop statistics (loops used, halting saturation, state change, expert balance per loop) in the
  Trainer's logs (``MythosLoopStatsCallback``).
- ``optim``: Muon for hidden matrices plus AdamW for the rest (``MuonAdamW``).
- ``data``: streaming, tokenizing and packing pretraining text (``pretraining_dataset``).
- ``checkpoints``: Trainer checkpoints that survive a kill or a full disk (``AtomicCheckpointTrainer``).
- ``distributed``: FSDP2 sharding (``apply_fsdp2``) and DDP (``ddp_ignore_expert_counts``).

The public names are re-exported here, but each submodule is imported only when one of its names is first read
(PEP 562 ``__getattr__``). That keeps the cost of each import what it was when these were top-level modules:
``from openmythos.training import MuonAdamW`` does not import ``torch.distributed.fsdp`` (absent from some torch
builds) or the Trainer, and nothing here imports ``datasets`` until a data function runs.
"""

import importlib
from typing import TYPE_CHECKING

# public name -> submodule that defines it
_EXPORTS = {
    "MythosTrainingCallback": "recipe",
    "expert_load_stats": "recipe",
    "routers": "recipe",
    "sample_n_loops": "recipe",
    "update_router_bias": "recipe",
    "LoopStatsAccumulator": "loop_stats",
    "MythosLoopStatsCallback": "loop_stats",
    "loop_budgets": "loop_stats",
    "MuonAdamW": "optim",
    "split_parameters": "optim",
    "SAMPLE_CORPUS": "data",
    "causal_lm_collator": "data",
    "load_text_dataset": "data",
    "pack_documents": "data",
    "pretraining_dataset": "data",
    "AtomicCheckpointTrainer": "checkpoints",
    "CheckpointSaveError": "checkpoints",
    "checkpoint_problem": "checkpoints",
    "has_checkpoints": "checkpoints",
    "latest_complete_checkpoint": "checkpoints",
    "remove_partial_checkpoints": "checkpoints",
    "apply_fsdp2": "distributed",
    "ddp_ignore_expert_counts": "distributed",
    "set_loop_reshard_after_forward": "distributed",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ binds these names
    from .checkpoints import (AtomicCheckpointTrainer, CheckpointSaveError, checkpoint_problem, has_checkpoints,
                              latest_complete_checkpoint, remove_partial_checkpoints)
    from .data import SAMPLE_CORPUS, causal_lm_collator, load_text_dataset, pack_documents, pretraining_dataset
    from .distributed import apply_fsdp2, ddp_ignore_expert_counts, set_loop_reshard_after_forward
    from .loop_stats import LoopStatsAccumulator, MythosLoopStatsCallback, loop_budgets
    from .optim import MuonAdamW, split_parameters
    from .recipe import MythosTrainingCallback, expert_load_stats, routers, sample_n_loops, update_router_bias


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later reads skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = list(_EXPORTS)
