"""Loop statistics during training and evaluation: how deep the model thinks, and how its loops behave.

:class:`MythosLoopStatsCallback` makes the forwards the Trainer runs return ``loop_stats`` (``output_loop_stats=True``),
sums them over the batches between two logs, and adds the means to the logged metrics. :class:`LoopStatsAccumulator`
does the summing and can be used on its own, outside a Trainer.

Every statistic counts real positions only: where the forward was given a 2-D ``attention_mask``, the positions where
it is 0 (padding) are left out. Loop indices ``t`` start at 0 (the first loop); the histogram's ``k`` counts loops.
"""

import math

import torch
from transformers import TrainerCallback

PREFIX = "loops/"


def _pad_rows(total: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """``total + rows`` along dim 0, the shorter one padded with zeros (budgets differ between forwards)."""
    if total is None:
        return rows.clone()
    if total.shape[0] < rows.shape[0]:
        total, rows = rows.clone(), total
    total[: rows.shape[0]] += rows.to(total.device)
    return total


def loop_budgets(n_loops, default: int, loops_used: torch.Tensor) -> torch.Tensor:
    """The loop budget of every position, [batch, seq], from the ``n_loops`` the forward was given (an int, one per
    row, or one per position; None: the config's default)."""
    if n_loops is None:
        n_loops = default
    budget = torch.as_tensor(n_loops, device=loops_used.device)
    if budget.dim() == 1:  # one budget per row
        budget = budget[:, None]
    return budget.expand_as(loops_used)


def _per_loop_mean(values: torch.Tensor | None, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(sum, count) per loop of ``values`` [L, batch, seq] over the kept positions that ran the loop (not NaN)."""
    if values is None:
        return None
    keep = keep & ~torch.isnan(values)
    sums = torch.where(keep, values.double(), 0.0).sum((1, 2))
    return sums, keep.sum((1, 2)).double()


class LoopStatsAccumulator:
    """Sums of the per-position loop statistics over forwards, until :meth:`summary` turns them into means.

    ``add(loops_used, loop_stats, budgets, mask)`` takes one forward's ``loops_used`` [batch, seq], its ``loop_stats``
    (a ``MythosLoopStats``, or None), the budget of every position [batch, seq] and the positions to count
    ([batch, seq], True = count; None counts all). The sums stay on the model's device, so adding never waits for it.
    """

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.positions = 0  # positions counted (a tensor once a forward was added)
        self.loops = None  # [longest budget + 1] positions per loops used
        self.saturated = 0  # positions that ran their whole budget
        self.per_loop = {}  # name -> (sums [L], counts [L])
        self.expert_counts = None  # [L, n_experts]
        self.spectral_radius = None

    def __bool__(self) -> bool:
        return bool(self.positions > 0)

    @torch.no_grad()
    def add(self, loops_used: torch.Tensor, loop_stats=None, budgets: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> None:
        keep = torch.ones_like(loops_used, dtype=torch.bool) if mask is None else mask.to(loops_used.device).bool()
        budgets = loops_used if budgets is None else budgets.to(loops_used.device)
        # the longest budget from the stats' shape where there are stats: no wait for the device
        longest = loop_stats.active.shape[0] if loop_stats is not None else int(budgets.max())
        counts = torch.zeros(longest + 1, dtype=torch.float64, device=loops_used.device)
        counts.scatter_add_(0, loops_used.flatten().clamp(0, longest), keep.flatten().double())
        self.loops = _pad_rows(self.loops, counts)
        self.positions = self.positions + keep.sum()
        self.saturated = self.saturated + ((loops_used >= budgets) & keep).sum()
        if loop_stats is not None:
            self._add_loop_stats(loop_stats, keep)

    def _add_loop_stats(self, loop_stats, keep: torch.Tensor) -> None:
        active = loop_stats.active & keep.to(loop_stats.active.device)
        for name, values in (("state_change", loop_stats.state_change), ("halt_prob", loop_stats.halting_probs),
                             ("kl", loop_stats.kl)):
            found = _per_loop_mean(values, active)
            if found is not None:
                sums, counts = self.per_loop.get(name, (None, None))
                self.per_loop[name] = (_pad_rows(sums, found[0]), _pad_rows(counts, found[1]))
        if loop_stats.expert_counts is not None:
            self.expert_counts = _pad_rows(self.expert_counts, loop_stats.expert_counts.detach())
        if loop_stats.spectral_radius is not None:
            self.spectral_radius = float(loop_stats.spectral_radius)

    def summary(self, prefix: str = PREFIX) -> dict[str, float]:
        """The means, keyed ``{prefix}mean``, ``hist_<k>``, ``saturation``, ``state_change_<t>``, ``halt_prob_<t>``,
        ``kl_<t>``, ``expert_cv_<t>`` and ``rho``; empty when nothing was counted."""
        if not self:
            return {}
        positions = float(self.positions)
        hist = self.loops.cpu() / positions
        stats = {prefix + "mean": float((hist * torch.arange(len(hist))).sum()),
                 prefix + "saturation": float(self.saturated) / positions}
        stats.update({f"{prefix}hist_{k}": float(hist[k]) for k in range(1, len(hist))})
        for name, (sums, counts) in self.per_loop.items():
            means = (sums / counts.clamp(min=1)).cpu()
            stats.update({f"{prefix}{name}_{t}": float(m) for t, (m, c) in enumerate(zip(means, counts)) if c > 0})
        if self.expert_counts is not None:
            for t, row in enumerate(self.expert_counts.double().cpu()):
                if row.sum() > 0:
                    stats[f"{prefix}expert_cv_{t}"] = float(row.std(unbiased=False) / row.mean())
        if self.spectral_radius is not None and math.isfinite(self.spectral_radius):
            stats[prefix + "rho"] = self.spectral_radius
        return stats


def _config_of(model):
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


def _attention_mask(args, kwargs):
    mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
    return mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


class MythosLoopStatsCallback(TrainerCallback):
    """Logs loop statistics with the Trainer's metrics: mean loops used, their histogram, halting saturation, the
    relative state change, halting probability and KL per loop, expert-load balance per loop, and rho(A).

    Training logs get ``loops/...`` (means over the training forwards since the previous log); evaluation metrics get
    ``eval_loops/...`` (over that evaluation's forwards; ``trainer.predict`` gives ``test_loops/...``). The keys:

    - ``loops/mean``: mean loops used per position; ``loops/hist_<k>``: share of positions that ran k loops.
    - ``loops/saturation``: share of positions that ran their whole budget (1.0 without an exit criterion).
    - ``loops/state_change_<t>``: mean ||h_{t+1} - h_t|| / ||h_{t+1}|| at loop t, over the positions that ran it.
    - ``loops/halt_prob_<t>`` (halting head only) and ``loops/kl_<t>`` (``exit_criterion="kl"`` only): their means.
    - ``loops/expert_cv_<t>``: coefficient of variation (std / mean) of the routed tokens per expert at loop t.
    - ``loops/rho``: rho(A) of the recurrent injection.

    Which forwards are counted: those in training mode, and eval-mode forwards that carry ``labels`` (the Trainer's
    evaluation batches); ``generate`` and other inference calls are left alone. They are asked for ``loop_stats`` by a
    forward pre-hook (``output_loop_stats=True`` unless the call sets it) and read by a forward hook, both on the
    model the Trainer was given (installed at ``on_init_end`` or ``on_train_begin``; :meth:`detach` removes them).
    Statistics are this rank's.

    Report integrations (TensorBoard, W&B) run their ``on_log`` before callbacks added later, so they see the stats
    only if this callback comes first: ``MythosLoopStatsCallback().attach(trainer)`` puts it there (and hooks the
    model, for a ``trainer.evaluate()`` without training). Passed in ``callbacks=[...]`` the stats still reach
    ``trainer.state.log_history`` and the metrics ``evaluate()`` returns.
    """

    def __init__(self):
        self.train = LoopStatsAccumulator()
        self.eval = LoopStatsAccumulator()
        self._model = None
        self._hooks = []

    # ------------------------------------------------------------------------------------------------------ hooks
    def attach(self, trainer) -> "MythosLoopStatsCallback":
        """Make this the first callback of ``trainer`` and hook its model; returns self."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._hook(trainer.model)
        return self

    def detach(self) -> None:
        """Remove the hooks from the model."""
        for hook in self._hooks:
            hook.remove()
        self._hooks, self._model = [], None

    def _hook(self, model) -> None:
        if model is None or model is self._model:
            return
        self.detach()
        self._model = model
        self._hooks = [model.register_forward_pre_hook(self._request_stats, with_kwargs=True),
                       model.register_forward_hook(self._record, with_kwargs=True)]

    @staticmethod
    def _counted(module, kwargs) -> bool:
        return module.training or kwargs.get("labels") is not None

    def _request_stats(self, module, args, kwargs):
        if self._counted(module, kwargs) and kwargs.get("output_loop_stats") is None:
            kwargs["output_loop_stats"] = True
        return args, kwargs

    def _record(self, module, args, kwargs, outputs):
        loops_used = getattr(outputs, "loops_used", None)
        if not self._counted(module, kwargs) or loops_used is None:
            return
        budgets = loop_budgets(kwargs.get("n_loops"), _config_of(module).default_n_loops, loops_used)
        mask = _attention_mask(args, kwargs)
        if mask is not None:
            mask = mask[:, -loops_used.shape[1]:]
        target = self.train if module.training else self.eval
        target.add(loops_used, getattr(outputs, "loop_stats", None), budgets, mask)

    # -------------------------------------------------------------------------------------------------- callbacks
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._hook(model)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._hook(model)
        self.train.reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if "loss" in logs:
            self._merge(self.train, logs, PREFIX, state, anchor="loss")
        elif _split(logs) not in (None, "train"):  # an evaluation's metrics, logged before on_evaluate
            self._merge(self.eval, logs, f"{_split(logs)}_{PREFIX}", state, anchor=f"{_split(logs)}_runtime")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        # on_log merged them already, unless evaluate() was overridden to log nothing
        self._merge(self.eval, metrics, f"{_split(metrics) or 'eval'}_{PREFIX}", state)

    def on_predict(self, args, state, control, metrics=None, **kwargs):
        self._merge(self.eval, metrics, f"{_split(metrics) or 'test'}_{PREFIX}", state)

    @staticmethod
    def _merge(accumulator: LoopStatsAccumulator, logs: dict | None, prefix: str, state, anchor=None) -> None:
        """Add the accumulator's means to ``logs`` and reset it. ``anchor``: a key whose value identifies the
        ``log_history`` entry made from ``logs`` (Trainer.log appends a copy before calling on_log), updated too."""
        if not accumulator or logs is None:
            return
        stats = accumulator.summary(prefix)
        accumulator.reset()
        logs.update(stats)
        last = state.log_history[-1] if state.log_history else None
        if anchor is not None and last is not None and last.get(anchor) == logs.get(anchor):
            last.update(stats)


def _split(metrics: dict | None) -> str | None:
    """The metric prefix of an evaluation's metrics (``eval``, ``test``, ``eval_<dataset>``) from its
    ``<prefix>_runtime`` key, or None."""
    return next((key[: -len("_runtime")] for key in metrics or () if key.endswith("_runtime")), None)
