"""Loop statistics in the Trainer's logs: MythosLoopStatsCallback and the sums behind it."""

import math
from types import SimpleNamespace

import pytest
import torch

from openmythos.training import LoopStatsAccumulator
from openmythos.training.loop_stats import _budgets

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
    assert _budgets(n_loops, 4, torch.ones(2, 2, dtype=torch.long)).tolist() == expected
