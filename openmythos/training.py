"""Training helpers: aux-loss-free MoE balancing, expert-load statistics and the Trainer callback.

The recurrence recipe itself (loop-count sampling, truncated backprop) lives in the model and is switched on by
config fields (``loop_sampling``, ``backprop_loops``); this module keeps its draws in step with the Trainer.
"""

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from .modeling_mythos import MythosTopkRouter


def routers(model: torch.nn.Module) -> list[MythosTopkRouter]:
    """Every MoE router in ``model`` (works through PEFT, FSDP and DDP wrappers)."""
    return [m for m in model.modules() if isinstance(m, MythosTopkRouter)]


@torch.no_grad()
def expert_load_stats(model: torch.nn.Module) -> dict[str, float]:
    """Share statistics of the tokens routed since the last balancing update (this rank's counts).

    ``moe/load_max_min_ratio`` is max over min expert load (inf when an expert got nothing), ``moe/load_cv`` the
    coefficient of variation of the loads, and ``moe/loop{t}_max_share`` the largest expert share at loop depth t.
    """
    stats = {}
    for i, router in enumerate(routers(model)):
        prefix = "moe/" if i == 0 else f"moe{i}/"
        per_loop = router.expert_load.float()
        total = per_loop.sum(0)
        if total.sum() == 0:
            continue
        stats[prefix + "load_max_min_ratio"] = float(total.max() / total.min()) if total.min() > 0 else float("inf")
        stats[prefix + "load_cv"] = float(total.std(unbiased=False) / total.mean())
        for t, row in enumerate(per_loop):
            if row.sum() > 0:
                stats[prefix + f"loop{t}_max_share"] = float(row.max() / row.sum())
    return stats


@torch.no_grad()
def update_router_bias(model: torch.nn.Module, rate: float | None = None) -> None:
    """DeepSeek-V3 aux-loss-free balancing step, per loop depth: bias[t] += rate * sign(mean load[t] - load[t]).

    Call it once after every optimizer step; it resets the counts. Expert counts are summed over all ranks first
    (when torch.distributed is initialised), so every rank applies the same update and the replicated bias stays
    identical everywhere. Depths that routed no token keep their bias. ``rate`` defaults to
    ``config.router_bias_update_rate``.
    """
    step = rate if rate is not None else _config_of(model).router_bias_update_rate
    for router in routers(model):
        load = router.expert_load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)
        load = load.float()
        active = (load.sum(-1, keepdim=True) > 0).float()
        delta = step * torch.sign(load.mean(-1, keepdim=True) - load) * active
        bias = router.e_score_correction_bias
        bias.copy_((bias.float() + delta.to(bias.device)).to(bias.dtype))
        router.expert_load.zero_()


def _config_of(model):
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


class MythosTrainingCallback(TrainerCallback):
    """Keeps OpenMythos' training recipe in step with ``transformers.Trainer``.

    - Before each optimizer step, sets the loop-count draw index from the global step, so all ranks and a resumed
      run draw the same ``n_loops`` sequence.
    - After each optimizer step, applies the aux-loss-free router-bias update (counts all-reduced across ranks).
    - Adds expert-load statistics (overall and per loop) to the logged metrics (``trainer.state.log_history``).
    """

    def __init__(self, balance_router: bool = True):
        self.balance_router = balance_router
        self._stats = {}

    @staticmethod
    def _base(model):
        for module in model.modules():
            if hasattr(module, "loop_draw_step"):
                return module
        return None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        base = self._base(model) if model is not None else None
        if base is not None:
            base.loop_draw_step = state.global_step * args.gradient_accumulation_steps

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        stats = expert_load_stats(model)
        if stats:
            self._stats = stats
        if self.balance_router:
            update_router_bias(model)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._stats and ("loss" in logs or "train_loss" in logs):
            logs.update(self._stats)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(self._stats)
