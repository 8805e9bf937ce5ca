"""Loop statistics in the Trainer's logs: MythosLoopStatsCallback and the sums behind it."""

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_model
from transformers import Trainer, TrainerCallback, TrainingArguments

from openmythos import MythosForCausalLM, mythos_tiny
from openmythos.training import (LoopStatsAccumulator, MythosLoopStatsCallback, MythosTrainingCallback, loop_budgets,
                                 sample_n_loops)

NAN = float("nan")


def fake_stats(loops_used, state_change, expert_counts, longest, halting=None, rho=0.5):
    """A MythosLoopStats for ``loops_used`` [batch, seq]: every position ran its first loops_used loops."""
    active = torch.arange(longest)[:, None, None] < loops_used[None]
    change = torch.where(active, torch.as_tensor(state_change, dtype=torch.float32), NAN)
    return SimpleNamespace(active=active, state_change=change, halting_probs=halting, kl=None,
                           expert_counts=torch.as_tensor(expert_counts), spectral_radius=rho)


def test_the_accumulator_counts_only_positions_the_attention_mask_keeps():
    loops_used = torch.tensor([[3, 2, 1], [3, 3, 1]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # the last position of row 1 is padding
    change = torch.tensor([[[0.4, 0.4, 0.4], [0.4, 0.4, 100.0]],
                           [[0.2, 0.1, 9.0], [0.2, 0.2, 9.0]],
                           [[0.1, 9.0, 9.0], [0.1, 0.1, 9.0]]])  # [L, batch, seq]; 9.0 and 100.0 must not count
    counts = [[4, 4, 4, 4], [2, 6, 4, 4], [0, 0, 0, 0]]
    acc = LoopStatsAccumulator()
    acc.add(loops_used, fake_stats(loops_used, change, counts, 3, rho=0.75), torch.full_like(loops_used, 3), mask)
    stats = acc.summary()
    # counted: (3, 2, 1) and (3, 3); the padded 1 is not
    assert stats["loops/hist_1"] == pytest.approx(1 / 5) and stats["loops/hist_2"] == pytest.approx(1 / 5)
    assert stats["loops/hist_3"] == pytest.approx(3 / 5)
    assert stats["loops/mean"] == pytest.approx((3 + 2 + 1 + 3 + 3) / 5)
    assert stats["loops/saturation"] == pytest.approx(3 / 5)
    assert stats["loops/state_change_0"] == pytest.approx(0.4)
    assert stats["loops/state_change_1"] == pytest.approx((0.2 + 0.1 + 0.2 + 0.2) / 4)
    assert stats["loops/state_change_2"] == pytest.approx(0.1)
    assert stats["loops/expert_cv_0"] == 0.0
    assert stats["loops/expert_cv_1"] == pytest.approx(math.sqrt(2) / 4)
    assert "loops/expert_cv_2" not in stats and not any("halt_prob" in key for key in stats)
    assert stats["loops/rho"] == 0.75
    acc.reset()
    assert not acc and acc.summary() == {}


def test_forwards_with_different_budgets_add_up():
    acc = LoopStatsAccumulator()
    short = torch.tensor([[2, 2]])
    acc.add(short, fake_stats(short, torch.full((2, 1, 2), 0.5), [[1, 1], [1, 1]], 2), torch.full_like(short, 2))
    long = torch.tensor([[4, 1]])
    halting = torch.where(torch.arange(4)[:, None, None] < long, 0.25, NAN)
    acc.add(long, fake_stats(long, torch.full((4, 1, 2), 0.1), [[1, 3]] * 4, 4, halting=halting),
            torch.full_like(long, 4))
    stats = acc.summary("eval_loops/")
    assert [stats[f"eval_loops/hist_{k}"] for k in (1, 2, 3, 4)] == pytest.approx([0.25, 0.5, 0.0, 0.25])
    assert stats["eval_loops/saturation"] == pytest.approx(3 / 4)
    assert stats["eval_loops/state_change_0"] == pytest.approx((0.5 + 0.5 + 0.1 + 0.1) / 4)
    assert stats["eval_loops/state_change_3"] == pytest.approx(0.1)
    assert stats["eval_loops/halt_prob_0"] == 0.25 and "eval_loops/halt_prob_1" in stats
    # expert counts add up per loop: loop 0 saw [1+1, 1+3]
    assert stats["eval_loops/expert_cv_0"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("n_loops, expected", [(None, [[4, 4], [4, 4]]), (3, [[3, 3], [3, 3]]),
                                               ([2, 5], [[2, 2], [5, 5]]),
                                               (torch.tensor([[1, 2], [3, 4]]), [[1, 2], [3, 4]])])
def test_budgets_follow_every_form_of_n_loops(n_loops, expected):
    assert loop_budgets(n_loops, 4, torch.ones(2, 2, dtype=torch.long)).tolist() == expected


# ------------------------------------------------------------------------------------------------- with the model
def padded_rows(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(4, 260, (n,), generator=generator).tolist()} for n in lengths]


def pad_collator(examples):
    """Right-pads to the longest row: attention_mask 0 and labels -100 on the padding."""
    longest = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, example in enumerate(examples):
        ids[row, : len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, : len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tiny_trainer(tmp_path, callbacks, max_steps=4):
    torch.manual_seed(0)
    model = MythosForCausalLM(mythos_tiny(vocab_size=260, loop_sampling="poisson_lognormal", mean_train_loops=3,
                                          backprop_loops=2))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=4,
                             per_device_eval_batch_size=2, learning_rate=3e-3, logging_steps=1, save_strategy="no",
                             seed=0, report_to="none", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=padded_rows([24] * 16),
                   eval_dataset=padded_rows([20, 7, 13], seed=1), data_collator=pad_collator, callbacks=callbacks)


class RecordLogs(TrainerCallback):
    """Stands in for a report integration (TensorBoard, W&B): keeps what on_log showed it, and rho(A) at the start
    of every step (what that step's forward sees)."""

    def __init__(self):
        self.seen, self.rho = [], []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.rho.append(model.spectral_radius())

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs))


def count_positions(monkeypatch) -> list[float]:
    """The positions each summary was taken over."""
    counted, summary = [], LoopStatsAccumulator.summary

    def spy(self, prefix="loops/"):
        counted.append(float(self.positions))
        return summary(self, prefix)

    monkeypatch.setattr(LoopStatsAccumulator, "summary", spy)
    return counted


def test_training_logs_the_loop_statistics_of_every_logged_step(tmp_path, monkeypatch):
    reporter = RecordLogs()
    trainer = tiny_trainer(tmp_path, [reporter, MythosTrainingCallback(balance_router=False)])
    callback = MythosLoopStatsCallback().attach(trainer)  # first, so the reporter sees the stats
    counted = count_positions(monkeypatch)
    trainer.train()
    config = trainer.model.config
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [1, 2, 3, 4]
    for entry in logged:
        # one forward per step, run with the loop count the recipe drew for it; no exit criterion: all of it
        n = sample_n_loops(config, entry["step"] - 1)
        assert entry["loops/mean"] == n and entry["loops/saturation"] == 1.0
        hist = {k: v for k, v in entry.items() if k.startswith("loops/hist_")}
        assert sum(hist.values()) == pytest.approx(1.0) and hist[f"loops/hist_{n}"] == 1.0
        for t in range(n):
            assert 0 < entry[f"loops/state_change_{t}"] < 10 and entry[f"loops/expert_cv_{t}"] >= 0
        assert f"loops/state_change_{n}" not in entry and not any("halt_prob" in key for key in entry)
    assert len({entry["loops/mean"] for entry in logged}) > 1  # the draws really differ
    assert [entry["loops/rho"] for entry in logged] == pytest.approx(reporter.rho, rel=1e-6)
    assert counted[:4] == [4 * 24] * 4
    assert all("loops/mean" in logs for logs in reporter.seen if "loss" in logs)
    assert not callback.train  # reset after each log


def test_evaluation_metrics_count_only_real_tokens_and_generate_is_left_alone(tmp_path, monkeypatch):
    callback = MythosLoopStatsCallback()
    trainer = tiny_trainer(tmp_path, [callback])  # evaluate without training: hooked at on_init_end
    counted = count_positions(monkeypatch)
    metrics = trainer.evaluate()
    n = trainer.model.config.max_loop_iters  # eval forwards run the config's default
    assert metrics["eval_loops/mean"] == n and metrics["eval_loops/saturation"] == 1.0
    assert metrics[f"eval_loops/hist_{n}"] == 1.0 and "eval_loops/rho" in metrics
    assert all(f"eval_loops/state_change_{t}" in metrics for t in range(n))
    assert counted == [20 + 7 + 13]  # the padding of the shorter rows is not counted
    assert trainer.state.log_history[-1]["eval_loops/mean"] == n
    trainer.model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert not callback.eval and not callback.train


def test_early_exit_shows_in_saturation_and_the_histogram():
    model = make_model("gqa")
    ids = torch.randint(4, 260, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(ids, attention_mask=mask, n_loops=[3, 6], exit_criterion="delta", exit_threshold=0.3,
                output_loop_stats=True)
    acc = LoopStatsAccumulator()
    acc.add(out.loops_used, out.loop_stats, loop_budgets([3, 6], 4, out.loops_used), mask)
    stats = acc.summary()
    real = out.loops_used[mask.bool()]
    budgets = torch.tensor([3, 6])[:, None].expand(2, 10)[mask.bool()]
    assert stats["loops/mean"] == pytest.approx(real.double().mean().item())
    assert stats["loops/saturation"] == pytest.approx((real == budgets).double().mean().item())
    assert stats["loops/saturation"] < 1.0, "the threshold is loose enough that some positions exit early"
    assert sum(v for k, v in stats.items() if k.startswith("loops/hist_")) == pytest.approx(1.0)


@pytest.mark.parametrize("criterion, threshold, key, config", [("act", 0.5, "halt_prob", {"use_act": True}),
                                                               ("kl", 0.01, "kl", {})])
def test_the_criterions_own_signal_is_averaged_per_loop(criterion, threshold, key, config):
    model = make_model("gqa", **config)
    ids = torch.randint(4, 260, (2, 8), generator=torch.Generator().manual_seed(0))
    out = model(ids, n_loops=4, exit_criterion=criterion, exit_threshold=threshold, output_loop_stats=True)
    acc = LoopStatsAccumulator()
    acc.add(out.loops_used, out.loop_stats, loop_budgets(4, 4, out.loops_used))
    stats = acc.summary()
    values = out.loop_stats.halting_probs if key == "halt_prob" else out.loop_stats.kl
    for t in range(4):
        ran = values[t][out.loop_stats.active[t] & ~values[t].isnan()]
        if ran.numel():
            assert stats[f"loops/{key}_{t}"] == pytest.approx(ran.double().mean().item())
        else:
            assert f"loops/{key}_{t}" not in stats
    assert any(k.startswith(f"loops/{key}_") for k in stats)
