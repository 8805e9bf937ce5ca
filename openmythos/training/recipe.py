"""Training helpers: the loop-count schedule, aux-loss-free MoE balancing, expert-load statistics and the Trainer
callback that applies them.

The model's forward is stateless: given ``n_loops`` it runs exactly that many loops, and without one it runs
``config.max_loop_iters``. Drawing a random loop count per training step (``config.loop_sampling``) is the training
side's job: :func:`sample_n_loops` is a pure function of (seed, draw index), and :class:`MythosTrainingCallback`
passes its draw to every training forward.
"""

import math

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..configuration_mythos import MythosConfig
from ..modeling_mythos import MythosTopkRouter
from .distributed import ddp_ignore_expert_counts, set_loop_reshard_after_forward


def sample_n_loops(config: MythosConfig, step: int) -> int:
    """Training-time loop count for draw number ``step`` (Huginn / Parcae recipe).

    n = 1 + Poisson(lambda), log(lambda) ~ Normal(log(mean - 1) - sigma^2 / 2, sigma), so E[n] = mean_train_loops;
    then clamped to [1, max_train_loops] and to ``config.loop_limit``. The draw depends only on
    (loop_sampling_seed, step): every rank draws the same count without communication, and a resumed run continues
    the same sequence.
    """
    mean = config.mean_train_loops if config.mean_train_loops is not None else config.max_loop_iters
    cap = config.max_train_loops if config.max_train_loops is not None else 2 * math.ceil(mean)
    cap = min(cap, config.loop_limit)
    if mean <= 1:
        return 1
    generator = torch.Generator().manual_seed(int(config.loop_sampling_seed) * 1_000_003 + int(step))
    sigma = float(config.loop_sampling_sigma)
    log_rate = math.log(mean - 1) - sigma**2 / 2 + sigma * torch.randn((), generator=generator).item()
    n = 1 + int(torch.poisson(torch.tensor(math.exp(log_rate)), generator=generator).item())
    return max(1, min(n, cap))


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
    """Keeps OpenMythos' training recipe in step with ``transformers.Trainer``: the stock Trainer plus this callback
    trains with loop sampling and balanced experts.

    - Loop sampling (``config.loop_sampling != "fixed"``): every training forward that is not given ``n_loops`` gets
      ``sample_n_loops(config, draw)``, with draw index ``global_step * gradient_accumulation_steps + micro-batch``.
      The draw is a function of the optimizer step alone, so every rank draws the same count and a resumed run
      continues the same sequence. It is passed through a forward pre-hook on the model the Trainer trains (installed
      at ``on_train_begin``, removed at ``on_train_end``); evaluation forwards (eval mode) are left alone.
    - After each optimizer step, applies the aux-loss-free router-bias update (counts all-reduced across ranks).
    - Adds expert-load statistics (overall and per loop) to the logged metrics (``trainer.state.log_history``).
    - Under DDP, keeps each rank's expert counts out of DDP's buffer broadcast (``ddp_ignore_expert_counts``, applied
      when the Trainer is built, before it wraps the model), so the all-reduced counts are the true ones.
    - ``reshard_loop_after_forward`` (``None``: leave FSDP's setting): under FSDP2 (Accelerate with
      ``fsdp_version: 2``), ``False`` keeps the looped block gathered from its forward to the end of its backward,
      one all-gather per step instead of two, at the memory cost described in ``apply_fsdp2``; set when training
      begins, after the Trainer sharded the model. It is an error when the looped block is not an FSDP2 unit.
    """

    def __init__(self, balance_router: bool = True, reshard_loop_after_forward: bool | None = None):
        if reshard_loop_after_forward is not None and not isinstance(reshard_loop_after_forward, bool):
            raise ValueError(
                f"reshard_loop_after_forward must be True, False or None, got {reshard_loop_after_forward!r}")
        self.balance_router = balance_router
        self.reshard_loop_after_forward = reshard_loop_after_forward
        self._stats = {}
        self._draw = 0
        self._hook = None

    def _inject_n_loops(self, module, args, kwargs):
        config = _config_of(module)
        if module.training and config.loop_sampling != "fixed" and kwargs.get("n_loops") is None:
            kwargs["n_loops"] = sample_n_loops(config, self._draw)
            self._draw += 1
        return args, kwargs

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            ddp_ignore_expert_counts(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and self.reshard_loop_after_forward is not None:
            set_loop_reshard_after_forward(model, self.reshard_loop_after_forward)
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._inject_n_loops, with_kwargs=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._draw = state.global_step * args.gradient_accumulation_steps

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
