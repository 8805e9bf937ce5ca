"""Worker for tests/training/test_distributed.py (not a test module itself).

Each rank builds the same seeded ``mythos_tiny`` model, shards it (with ``apply_fsdp2``, and as Accelerate does with
examples/accelerate_fsdp.yaml) and trains it on its half of a fixed global batch; rank 0 saves what the test compares
with a single-process run over the whole batch:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/training/fsdp_worker.py OUT.pt

``build_model``, ``global_batches`` and ``train`` are shared with that single-process reference, so both runs start
from the same weights and see the same tokens.
"""

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from openmythos import MythosForCausalLM, MythosModel, mythos_tiny
from openmythos.training import update_router_bias
from openmythos.training.distributed import apply_fsdp2

ACCELERATE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "accelerate_fsdp.yaml"
SEED = 0
STEPS = 4
N_LOOPS = 3  # fewer than max_loop_iters (4), so one depth row of every loop-indexed table stays unused
GLOBAL_BATCH, SEQ_LEN = 4, 16
LR = 1e-3
# Adam turns the rounding noise of a gradient entry near zero into a sizeable update when eps is tiny; gradients here
# are ~1e-4 to 1e-2, so eps=1e-6 changes nothing else and keeps the comparison tight.
EPS = 1e-6
# The Accelerate run: halting, and the first loop truncated (no graph for its update, one for its halting probability).
ACCELERATE_MODEL = dict(use_act=True, backprop_loops=N_LOOPS - 1)


def build_model(**overrides) -> MythosForCausalLM:
    torch.manual_seed(SEED)
    # A fast bias update, so that the balancing bias visibly moves (and changes routing) within a few steps.
    model = MythosForCausalLM(mythos_tiny(router_bias_update_rate=0.01, **overrides)).train()
    with torch.no_grad():
        model.model.recurrent.lora.up.normal_(0, 0.02)  # zero at init, which would leave the LoRA path untested
    return model


def global_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(SEED + 1)
    return [torch.randint(4, 512, (GLOBAL_BATCH, SEQ_LEN), generator=generator) for _ in range(STEPS)]


def train(model, batches, n_loops: int = N_LOOPS) -> list[float]:
    """AdamW steps, each followed by the router-bias update; returns the loss of every step.

    Under torch.distributed each rank holds an equal number of tokens (no padding), so the mean of the ranks'
    mean losses is the mean loss over the global batch, and FSDP's averaged gradients are its gradients.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, eps=EPS)
    losses = []
    for ids in batches:
        loss = model(input_ids=ids, labels=ids, n_loops=n_loops).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        update_router_bias(model)
        loss = loss.detach()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss = loss / dist.get_world_size()
        losses.append(loss.item())
    return losses


def fsdp_units(model) -> list[str]:
    return sorted(name for name, module in model.named_modules() if isinstance(module, FSDPModule))


def full_state(model) -> dict[str, torch.Tensor]:
    """The state dict with every sharded tensor gathered (a collective: every rank must call it)."""
    return {name: value.full_tensor() if hasattr(value, "full_tensor") else value.clone()
            for name, value in model.state_dict().items()}


def accelerate_launch_env(config_file: Path) -> dict[str, str]:
    """The environment that ``accelerate launch --config_file config_file`` gives each process, computed by
    Accelerate's own launcher code. ``FullyShardedDataParallelPlugin()`` reads its settings from the FSDP_* part."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "examples/pretrain.py"])
    args, _, _ = _validate_launch_command(args)
    if not args.use_fsdp:
        raise ValueError(f"{config_file} does not select distributed_type FSDP")
    return prepare_multi_gpu_env(args)


def shard_like_accelerate(model, config_file: Path):
    """Shard ``model`` with Accelerate's FSDP2 preparation under the plugin ``config_file`` configures. Accelerate
    switches FSDP off on CPU, so its preparation function is called with the few accelerator fields it reads
    (fp32: this checks the wrapping, not bf16)."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.utils import fsdp2_prepare_model

    os.environ.update({k: v for k, v in accelerate_launch_env(config_file).items() if k.startswith("FSDP_")})
    plugin = FullyShardedDataParallelPlugin()
    accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"),
                                  mixed_precision="no", is_main_process=dist.get_rank() == 0, torch_device_mesh=None)
    return fsdp2_prepare_model(accelerator, model)


def main(out_path: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)

    model = apply_fsdp2(build_model())
    result = dict(units=fsdp_units(model), losses=train(model, [ids[rows] for ids in global_batches()]))
    result["tied"] = model.lm_head.weight is model.model.embed_tokens.weight
    result["state"] = full_state(model)
    router = model.model.recurrent.layer.mlp.gate
    result["expert_load_after_update"] = router.expert_load.clone()
    biases = [torch.empty_like(router.e_score_correction_bias) for _ in range(world)]
    dist.all_gather(biases, router.e_score_correction_bias)
    result["bias_per_rank"] = biases

    # Halting (ACT): the looped block's unit holds the halting head too.
    act_model = apply_fsdp2(build_model(use_act=True))
    result["act_units"] = fsdp_units(act_model)
    result["act_losses"] = train(act_model, [ids[rows] for ids in global_batches()[:2]])
    result["act_state"] = full_state(act_model)

    # Activation checkpointing recomputes each loop iteration in backward, which re-gathers the looped block.
    checkpointed = build_model()
    checkpointed.activation_checkpointing_enable()
    result["checkpointed_losses"] = train(apply_fsdp2(checkpointed), [ids[rows] for ids in global_batches()[:2]])

    # Accelerate's FSDP2 wrapping with the example config (the `accelerate launch` path of the README); with
    # activation checkpointing on top.
    accelerate_model = build_model(**ACCELERATE_MODEL)
    accelerate_model.activation_checkpointing_enable()
    accelerate_model = shard_like_accelerate(accelerate_model, ACCELERATE_CONFIG)
    result["accelerate_units"] = fsdp_units(accelerate_model)
    result["accelerate_losses"] = train(accelerate_model, [ids[rows] for ids in global_batches()[:2]])

    torch.manual_seed(SEED)
    result["base_units"] = fsdp_units(apply_fsdp2(MythosModel(mythos_tiny())))

    if rank == 0:
        torch.save(result, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # Skip interpreter teardown: with torch 2.13 on gloo, about one run in ten aborted there ("terminate called
    # without an active exception"), after the process group was destroyed and all work was done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
