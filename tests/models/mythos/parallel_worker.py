"""Worker for tests/models/mythos/test_parallel_plans.py (not a test module itself).

Each rank loads the same saved ``mythos_tiny`` checkpoints (MLA and GQA) with
``from_pretrained(dir, distributed_config=DistributedConfig(...))`` in every layout two processes allow, and records
what the test compares with one unsharded process: the logits, one training step's loss and full gradients, and the
greedy tokens of a cached ``generate``. It also loads checkpoints that cannot be split and records the errors:

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/models/mythos/parallel_worker.py DIR OUT.pt

``DIR`` holds ``mla/``, ``gqa/`` and the refused checkpoints written by ``save_checkpoints``; ``reference`` computes
the single-process side from the same files, with the same inputs.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from openmythos import MythosForCausalLM, mythos_tiny
from openmythos.training import update_router_bias

ATTN_TYPES = ("mla", "gqa")
N_LOOPS = 3  # fewer than max_loop_iters (4): the loop-indexed tables are read at several rows, not all
# The adaptive-depth path (positions stop early; stopped ones still write keys/values): at this threshold about half
# the positions of each row stop after 2 of the 3 loops, in both checkpoints.
EXIT = dict(exit_criterion="delta", exit_threshold=0.5)
SEQ_LEN, NEW_TOKENS = 10, 6
# Layouts of two processes. `ep_size` must be a multiple of `tp_size` and divide `fsdp_size * tp_size`, so with two
# ranks expert parallelism runs over the tensor-parallel group; `tp_plan={}` keeps everything but the experts whole.
# Layouts of two processes. `ep_size` must be a multiple of `tp_size` and divide `fsdp_size * tp_size`, so with two
# ranks expert parallelism runs over the tensor-parallel group (both ranks hold the same batch) or over the FSDP group
# (each rank holds half of the batch). transformers refuses `tp_size=2` with an empty `tp_plan`, so experts-only
# parallelism over a shared batch is not a layout of its own.
LAYOUTS = {
    "tp": dict(tp_size=2),
    "tp_ep": dict(tp_size=2, ep_size=2),
    "fsdp_ep": dict(fsdp_size=2, ep_size=2),
    "fsdp": dict(fsdp_size=2),  # the FSDP plan alone (each rank its half of the batch), for comparison
}
# Checkpoints no two-rank layout can split, the layout tried, and the field the error must name.
REFUSED = {
    "heads3": (dict(attn_type="mla", n_heads=3, n_kv_heads=1), dict(tp_size=2), "`n_heads` (3)"),
    "kv_heads1": (dict(attn_type="gqa", n_kv_heads=1), dict(tp_size=2), "`n_kv_heads` (1)"),
    "experts5": (dict(n_experts=5), dict(tp_size=2, ep_size=2), "`n_experts` (5)"),
}
# Widths may split unevenly: an odd expert_dim gives each rank 16 or 15 of every expert's 31 gate/up/down columns.
UNEVEN = dict(expert_dim=31)
# loop_kv_sharing="last" runs positions one at a time: under FSDP x EP every rank must pass the same length.
LAST = dict(attn_type="gqa", loop_kv_sharing="last")


def tiny(**overrides):
    # dense_ffn_dim = 64 * 4 // 3 = 85 is odd: the prelude/coda FFNs split unevenly (43 + 42) in every checkpoint
    return mythos_tiny(**overrides)


def save_checkpoints(root: Path) -> None:
    """Seeded checkpoints with every weight random (the depth-wise LoRA's up and the balancing bias are zero at init,
    which would leave their paths untested)."""
    for name, overrides in [(attn, dict(attn_type=attn)) for attn in ATTN_TYPES] + \
                           [(name, spec[0]) for name, spec in REFUSED.items()] + [("uneven", UNEVEN), ("last", LAST)]:
        torch.manual_seed(0)
        model = MythosForCausalLM(tiny(**overrides))
        with torch.no_grad():
            model.model.recurrent.lora.up.normal_(0, 0.02)
            model.model.recurrent.layer.mlp.gate.e_score_correction_bias.normal_(0, 0.01)
        model.save_pretrained(root / name)


def inputs() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(4, 512, (2, SEQ_LEN), generator=generator)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a DTensor shard (a collective: every rank calls it), or a copy of a plain one."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.detach().clone()


def gathered(tensor: torch.Tensor, data_parallel: bool) -> torch.Tensor:
    """The whole batch's rows: the ranks' halves concatenated when each rank holds its own half."""
    if not data_parallel:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def run(model: MythosForCausalLM, data_parallel: bool = False, exit_refused: bool = False) -> dict:
    """Logits, one training step's loss and gradients, and cached greedy tokens of the whole batch. Under data
    parallelism each rank runs its half of the batch: the halves are gathered, the loss is the ranks' mean (equal
    token counts), and the gradients come out of FSDP averaged over the ranks."""
    ids = inputs()
    if data_parallel:
        ids = ids.chunk(dist.get_world_size())[dist.get_rank()]
    model.eval()
    with torch.no_grad():
        logits = gathered(model(input_ids=ids, n_loops=N_LOOPS).logits, data_parallel)
    generate = dict(max_new_tokens=NEW_TOKENS, do_sample=False, n_loops=N_LOOPS, pad_token_id=0)
    tokens = gathered(model.generate(ids, **generate), data_parallel)
    static_tokens = gathered(model.generate(ids, cache_implementation="static", **generate), data_parallel)
    outcome = dict(logits=logits, tokens=tokens, static_tokens=static_tokens)
    if exit_refused:  # experts exchanging tokens between different batches: refused (see the test), on each rank
        try:
            model(input_ids=ids, n_loops=N_LOOPS, **EXIT)
        except ValueError as error:
            outcome["adaptive_error"] = str(error)
    else:
        with torch.no_grad():
            adaptive = model(input_ids=ids, n_loops=N_LOOPS, **EXIT)
        outcome.update(adaptive_logits=gathered(adaptive.logits, data_parallel),
                       loops_used=gathered(adaptive.loops_used, data_parallel),
                       adaptive_tokens=gathered(model.generate(ids, **generate, **EXIT), data_parallel))
    model.train()
    loss = model(input_ids=ids, labels=ids, n_loops=N_LOOPS).loss
    loss.backward()
    loss = loss.detach()
    if data_parallel:
        dist.all_reduce(loss)
        loss = loss / dist.get_world_size()
    grads = {name: full(param.grad) for name, param in model.named_parameters()}
    # The balancing bias is replicated: each rank counts the tokens it routed, the update sums the counts over all
    # ranks, so the bias stays identical everywhere (under tensor parallelism both ranks count the same tokens, and
    # the doubled counts give the same sign(mean - load) step).
    update_router_bias(model)
    bias = model.model.recurrent.layer.mlp.gate.e_score_correction_bias.clone()
    return dict(outcome, loss=loss, grads=grads, bias=bias)


def last_sharing(model: MythosForCausalLM) -> dict:
    """loop_kv_sharing="last" under FSDP x EP: the logits of equal-length halves, then halves of 8 and 10 positions,
    which every rank must refuse with the same error rather than wait in the experts' all-to-all."""
    ids = inputs().chunk(dist.get_world_size())[dist.get_rank()]
    with torch.no_grad():
        logits = gathered(model(input_ids=ids, n_loops=N_LOOPS).logits, data_parallel=True)
        try:
            model(input_ids=ids[:, :8] if dist.get_rank() == 0 else ids, n_loops=N_LOOPS)
            error = ""
        except ValueError as refused:
            error = str(refused)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return dict(logits=logits, errors=errors)


def reference(root: Path, name: str) -> dict:
    """The single-process results for checkpoint ``root / name``."""
    return run(MythosForCausalLM.from_pretrained(root / name))


def main(root: str, out_path: str):
    from transformers.distributed import DistributedConfig

    torch.set_num_threads(1)
    # gloo on CPU (the tests); benchmarks/gpu_check.sh sets MYTHOS_TEST_BACKEND=nccl on a GPU box (not yet run there)
    backend = os.environ.get("MYTHOS_TEST_BACKEND", "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        torch.set_default_device(f"cuda:{torch.cuda.current_device()}")
    dist.init_process_group(backend)
    root = Path(root)
    result = {}
    for attn_type in ATTN_TYPES:
        for layout, sizes in LAYOUTS.items():
            model = MythosForCausalLM.from_pretrained(root / attn_type, distributed_config=DistributedConfig(**sizes))
            sharded = {name: str(param.placements) for name, param in model.named_parameters()
                       if hasattr(param, "placements")}
            print(f"rank {dist.get_rank()}: {attn_type} {layout}", flush=True)
            outcome = run(model, data_parallel=sizes.get("fsdp_size", 1) > 1,
                          exit_refused=sizes.get("ep_size", 1) > sizes.get("tp_size", 1))
            outcome.update(sharded=sharded, tied=model.lm_head.weight is model.model.embed_tokens.weight)
            result[(attn_type, layout)] = outcome
    result[("uneven", "tp")] = run(MythosForCausalLM.from_pretrained(root / "uneven",
                                                                     distributed_config=DistributedConfig(tp_size=2)))
    result[("last", "fsdp_ep")] = last_sharing(
        MythosForCausalLM.from_pretrained(root / "last", distributed_config=DistributedConfig(**LAYOUTS["fsdp_ep"])))
    for name, (_, sizes, _) in REFUSED.items():
        try:
            MythosForCausalLM.from_pretrained(root / name, distributed_config=DistributedConfig(**sizes))
            result[name] = None
        except ValueError as error:
            result[name] = str(error)
    if dist.get_rank() == 0:
        to_cpu = lambda x: x.cpu() if isinstance(x, torch.Tensor) else x  # noqa: E731 (a NCCL run's tensors)
        torch.save(torch.utils._pytree.tree_map(to_cpu, result), out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    # Skip interpreter teardown (as tests/training/fsdp_worker.py does): torch 2.13 with gloo sometimes aborts there
    # after all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
