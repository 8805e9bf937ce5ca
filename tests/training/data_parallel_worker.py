"""Worker for tests/training/test_data_parallel.py (not a test module itself): on 2 gloo processes,

- counts the all-gathers of FSDP2 training steps at n_loops 1, 4 and 8, with the looped block resharded after its
  forward (FSDP's default) and kept gathered (``reshard_loop_after_forward=False``), and with the block's inner layer
  made a unit of its own (what the default wrapping avoids);
- takes MuonAdamW steps on an FSDP2-sharded model, and the same steps on an unsharded replica fed the gathered
  gradients; saves and restores the optimizer state with torch.distributed.checkpoint;
- trains under DDP with gradient accumulation, with and without ``ddp_ignore_expert_counts``.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/training/data_parallel_worker.py OUT.pt

Rank 0 saves what the test compares with one process. Models, batches and loops come from fsdp_worker.
"""

import contextlib
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

import fsdp_worker
from fsdp_worker import EPS, LR, build_model, full_state, global_batches
from openmythos.training import MuonAdamW, ddp_ignore_expert_counts, update_router_bias
from openmythos.training.distributed import apply_fsdp2, set_loop_reshard_after_forward

LOOP_COUNTS = (1, 4, 8)
COUNT_STEPS = 2  # the first step also runs FSDP's lazy initialisation; both are counted
MUON_STEPS = 2
ACCUMULATION = 2  # DDP: micro-batches per optimizer step on each rank
DDP_STEPS = 2


class AllGatherCounter:
    """Counts the all-gather collectives FSDP2 issues (``torch.distributed.all_gather_single``, and
    ``all_gather_into_tensor`` for other torch versions), and those whose input is one given unit's shard."""

    NAMES = ("all_gather_single", "all_gather_into_tensor")

    def __init__(self):
        self.total = self.unit = 0
        self.unit_size = None

    @contextlib.contextmanager
    def hooked(self):
        originals = {name: getattr(dist, name) for name in self.NAMES if hasattr(dist, name)}

        def counting(original):
            def all_gather(output, input, *args, **kwargs):
                self.total += 1
                self.unit += input.numel() == self.unit_size
                return original(output, input, *args, **kwargs)
            return all_gather

        for name, original in originals.items():
            setattr(dist, name, counting(original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(dist, name, original)


def own_shard_size(unit: torch.nn.Module) -> int:
    """Elements of this rank's shard of ``unit``'s own parameters (those of nested units excluded): the size of
    the all-gather input FSDP2 builds for the unit. On rank 0 the shard is the padded one, of the same size."""
    nested = {id(p) for m in unit.modules() if m is not unit and isinstance(m, FSDPModule) for p in m.parameters()}
    return sum(p.to_local().numel() for p in unit.parameters() if id(p) not in nested)


def counted_training(model, batches, n_loops):
    """AdamW steps (with the router-bias update); for each, the loss and the all-gathers in forward and in backward:
    ``(total, of the looped block)``."""
    counter = AllGatherCounter()
    counter.unit_size = own_shard_size(model.model.recurrent)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=EPS)
    steps = []
    with counter.hooked():
        for ids in batches:
            counter.total = counter.unit = 0
            loss = model(input_ids=ids, labels=ids, n_loops=n_loops).loss
            forward = (counter.total, counter.unit)
            loss.backward()
            backward = (counter.total - forward[0], counter.unit - forward[1])
            optimizer.step()
            optimizer.zero_grad()
            update_router_bias(model)
            loss = loss.detach()
            dist.all_reduce(loss)
            steps.append(dict(loss=loss.item() / dist.get_world_size(), forward=forward, backward=backward))
    return steps


def gather_counts(rows):
    batches = [ids[rows] for ids in global_batches()[:COUNT_STEPS]]
    result = {}
    for n_loops in LOOP_COUNTS:
        result["resharded", n_loops] = counted_training(apply_fsdp2(build_model()), batches, n_loops)
        result["kept", n_loops] = counted_training(
            apply_fsdp2(build_model(), reshard_loop_after_forward=False), batches, n_loops)
        nested = build_model()
        fully_shard(nested.model.recurrent.layer)  # a nested unit: FSDP gathers it at every call, every iteration
        result["nested", n_loops] = counted_training(apply_fsdp2(nested), batches, n_loops)
        # Accelerate's FSDP2 wrapping under the example config, then the Trainer callback's setter; with activation
        # checkpointing, whose recomputation runs while the block is gathered
        accelerate_model = build_model()
        accelerate_model.activation_checkpointing_enable()
        accelerate_model = fsdp_worker.shard_like_accelerate(accelerate_model, fsdp_worker.ACCELERATE_CONFIG)
        result["accelerate", n_loops] = counted_training(accelerate_model, batches, n_loops)
        kept = build_model()
        kept.activation_checkpointing_enable()
        kept = set_loop_reshard_after_forward(
            fsdp_worker.shard_like_accelerate(kept, fsdp_worker.ACCELERATE_CONFIG), False)
        result["accelerate_kept", n_loops] = counted_training(kept, batches, n_loops)
    return result


def muon_steps(rows):
    """MuonAdamW on the FSDP2 model, and the same optimizer on an unsharded replica (same initial weights) given the
    sharded run's gradients, gathered: both must take the same steps."""
    sharded = apply_fsdp2(build_model())
    replica = build_model()
    optimizer = MuonAdamW.from_model(sharded, lr=LR, eps=EPS)
    replica_optimizer = MuonAdamW.from_model(replica, lr=LR, eps=EPS)
    replica_params = dict(replica.named_parameters())
    losses = []
    for ids in global_batches()[:MUON_STEPS]:
        loss = sharded(input_ids=ids[rows], labels=ids[rows], n_loops=fsdp_worker.N_LOOPS).loss
        loss.backward()
        for name, param in sharded.named_parameters():
            replica_params[name].grad = param.grad.full_tensor()
        optimizer.step()
        optimizer.zero_grad()
        replica_optimizer.step()
        replica_optimizer.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss)
        losses.append(loss.item() / dist.get_world_size())
    # the optimizer state by parameter name, as Accelerate saves FSDP2 checkpoints; then loaded into a new optimizer
    full = StateDictOptions(full_state_dict=True)
    saved = get_optimizer_state_dict(sharded, optimizer, options=full)
    restored = MuonAdamW.from_model(sharded, lr=LR, eps=EPS)
    set_optimizer_state_dict(sharded, restored, saved, options=full)
    return dict(muon_losses=losses, muon_state=full_state(sharded), muon_replica_state=replica.state_dict(),
                muon_optimizer_state=saved, muon_restored_optimizer_state=get_optimizer_state_dict(
                    sharded, restored, options=full),
                muon_replica_optimizer_state=get_optimizer_state_dict(replica, replica_optimizer))


def ddp_training(rank, world, ignore_counts: bool, sync_each_micro_batch: bool):
    """DDP (``broadcast_buffers=True``, its default), ``ACCUMULATION`` micro-batches per rank per optimizer step, the
    router-bias update after each step. Each rank takes its rows of the global batch, one micro-batch at a time.

    DDP broadcasts the buffers at a forward that follows a gradient-synchronising forward. With ``no_sync()`` on all
    but the last micro-batch (the Trainer's way) that is the first micro-batch of a step, when the counts were just
    reset; synchronising every micro-batch (Accelerate's ``sync_each_batch``, or a plain loop) broadcasts at every
    micro-batch after the first, over counts already made."""
    model = build_model()
    if ignore_counts:
        ddp_ignore_expert_counts(model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=LR, weight_decay=0.1, eps=EPS)
    per_rank = fsdp_worker.GLOBAL_BATCH // world
    micro = per_rank // ACCUMULATION
    for ids in global_batches()[:DDP_STEPS]:
        mine = ids[rank * per_rank:(rank + 1) * per_rank]
        for i in range(ACCUMULATION):
            last = i == ACCUMULATION - 1
            sync = contextlib.nullcontext() if last or sync_each_micro_batch else ddp.no_sync()
            with sync:
                chunk = mine[i * micro:(i + 1) * micro]
                loss = ddp(input_ids=chunk, labels=chunk, n_loops=fsdp_worker.N_LOOPS).loss / ACCUMULATION
                loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        update_router_bias(model)
    bias = model.model.recurrent.layer.mlp.gate.e_score_correction_bias
    biases = [torch.empty_like(bias) for _ in range(world)]
    dist.all_gather(biases, bias)
    return dict(state={k: v.clone() for k, v in model.state_dict().items()}, bias_per_rank=biases)


def main(out_path: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * fsdp_worker.GLOBAL_BATCH // world, (rank + 1) * fsdp_worker.GLOBAL_BATCH // world)
    result = dict(gathers=gather_counts(rows))
    result.update(muon_steps(rows))
    for sync_each in (False, True):
        result["ddp", sync_each] = ddp_training(rank, world, ignore_counts=True, sync_each_micro_batch=sync_each)
        result["ddp_broadcast_counts", sync_each] = ddp_training(rank, world, ignore_counts=False,
                                                                 sync_each_micro_batch=sync_each)
    if rank == 0:
        torch.save(result, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter teardown (see fsdp_worker: torch 2.13 with gloo sometimes aborts there after all work is done).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
