"""prefloop's group-wise DPO loss against TRL's formulas computed pair by pair."""

from __future__ import annotations

import math
import random

import pytest
import torch

from labeling.ranking import ordered_pairs
from tuning.losses import dpo_loss


def _pairwise_reference(policy, ref, pairs, beta):
    """TRL's sigmoid DPO, one pair at a time, in plain Python floats."""
    losses, chosen_r, rejected_r, wins, margins, lp_c, lp_r = [], [], [], [], [], [], []
    for c, r in pairs:
        rc = beta * (policy[c] - ref[c])
        rr = beta * (policy[r] - ref[r])
        losses.append(-math.log(1 / (1 + math.exp(-(rc - rr)))))
        chosen_r.append(rc)
        rejected_r.append(rr)
        wins.append(1.0 if rc > rr else 0.0)
        margins.append(rc - rr)
        lp_c.append(policy[c])
        lp_r.append(policy[r])
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "loss": mean(losses),
        "rewards/chosen": mean(chosen_r),
        "rewards/rejected": mean(rejected_r),
        "rewards/accuracies": mean(wins),
        "rewards/margins": mean(margins),
        "logps/chosen": mean(lp_c),
        "logps/rejected": mean(lp_r),
    }


def _random_rankings(rng: random.Random, n_groups: int, k: int) -> list[list[list[int]]]:
    rankings = []
    for _ in range(n_groups):
        order = list(range(k))
        rng.shuffle(order)
        tiers: list[list[int]] = []
        for item in order:
            if tiers and rng.random() < 0.25:
                tiers[-1].append(item)  # a tie
            else:
                tiers.append([item])
        rankings.append(tiers)
    return rankings


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_group_loss_equals_pairwise_trl_formulas(seed: int, beta: float) -> None:
    rng = random.Random(seed)
    k, n_groups = 4, 6
    rankings = _random_rankings(rng, n_groups, k)
    policy = torch.randn(n_groups * k, dtype=torch.float64) * 20 - 80
    ref = policy + torch.randn(n_groups * k, dtype=torch.float64) * 3
    # some exact ties in reward, so "strict wins" matters
    ref[1] = policy[1] - (policy[0] - ref[0])
    pairs = [(g * k + a, g * k + b) for g, rk in enumerate(rankings) for a, b in ordered_pairs(rk)]
    chosen = torch.tensor([c for c, _ in pairs])
    rejected = torch.tensor([r for _, r in pairs])

    loss, metrics = dpo_loss(policy, ref, chosen, rejected, beta)

    expected = _pairwise_reference(policy.tolist(), ref.tolist(), pairs, beta)
    assert float(loss) == pytest.approx(expected["loss"], abs=1e-6)
    for name, value in metrics.items():
        assert float(value) == pytest.approx(expected[name], abs=1e-6), name


def test_ties_form_no_pairs_and_every_strict_order_does() -> None:
    assert ordered_pairs([[0, 1], [2], [3]]) == [(0, 2), (1, 2), (0, 3), (1, 3), (2, 3)]
    assert ordered_pairs([[0, 1, 2, 3]]) == []
    assert len(ordered_pairs([[0], [1], [2], [3]])) == 6


def test_loss_gradient_flows_only_to_policy() -> None:
    policy = torch.tensor([-10.0, -12.0, -11.0], requires_grad=True)
    ref = torch.tensor([-11.0, -11.0, -11.0])
    loss, _ = dpo_loss(policy, ref, torch.tensor([0, 0]), torch.tensor([1, 2]), 0.1)
    loss.backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # raise chosen, lower rejected
