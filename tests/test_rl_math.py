"""The RL math of the online methods against hand-written loops and formulas, to 1e-6."""

from __future__ import annotations

import math

import pytest
import torch

from tuning.rl_math import (
    adaptive_beta,
    gae,
    grpo_advantages,
    k3_kl,
    mean_log_ratio,
    ppo_policy_loss,
    ppo_value_loss,
    rloo_advantages,
    whiten,
)

TOL = 1e-6


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)


def test_rloo_baseline_is_the_mean_of_the_others() -> None:
    groups = [torch.tensor([1.0, 0.0, 3.0, 2.0], dtype=torch.float64), torch.tensor([5.0, 5.0])]
    got = rloo_advantages(groups)
    want = []
    for r in groups:
        values = r.tolist()
        for i, ri in enumerate(values):
            others = [v for j, v in enumerate(values) if j != i]
            want.append(ri - sum(others) / len(others))
    assert got.tolist() == pytest.approx(want, abs=TOL)
    assert want[:4] == [1 - 5 / 3, 0 - 2, 3 - 1, 2 - 4 / 3]  # the hand computation itself
    assert rloo_advantages([torch.tensor([7.0])]).tolist() == [0.0]  # no others: no signal


def test_group_advantages_are_normalised_within_each_group() -> None:
    rewards = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 4.0, 4.0])]
    adv, zero = grpo_advantages(rewards, "group")
    std = math.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 2)  # Bessel-corrected
    want = [(1 - 2) / (std + 1e-4), 0.0, (3 - 2) / (std + 1e-4), 0.0, 0.0, 0.0]
    assert adv.tolist() == pytest.approx(want, abs=TOL)
    assert zero.tolist() == [False, True]


def test_k3_kl_per_token_matches_its_formula() -> None:
    logp, ref = _rand(3, 5, seed=1), _rand(3, 5, seed=2)
    got = k3_kl(logp, ref)
    for i in range(3):
        for t in range(5):
            r = math.exp(ref[i, t].item() - logp[i, t].item())
            assert got[i, t].item() == pytest.approx(r - math.log(r) - 1, abs=TOL)
    assert (got >= 0).all()


def test_mean_log_ratio_counts_only_response_tokens() -> None:
    logp, ref = _rand(3, 5, seed=3), _rand(3, 5, seed=4)
    total, n = 0.0, 0
    for i in range(3):
        for t in range(5):
            if MASK[i, t]:
                total += logp[i, t].item() - ref[i, t].item()
                n += 1
    assert mean_log_ratio(logp, ref, MASK) == pytest.approx(total / n, abs=TOL)


@pytest.mark.parametrize(
    ("kl", "target", "n", "horizon"),
    [(0.3, 0.1, 64, 1000), (0.05, 0.1, 8, 10), (0.101, 0.1, 32, 100), (0.0, 0.1, 5, 5)],
)
def test_adaptive_kl_controller_follows_ziegler(kl, target, n, horizon) -> None:
    beta = 0.05
    error = kl / target - 1
    error = 0.2 if error > 0.2 else -0.2 if error < -0.2 else error
    want = beta * (1 + error * n / horizon)
    assert adaptive_beta(beta, kl, target, n, horizon) == pytest.approx(want, abs=TOL)
    # above the target β grows, below it shrinks
    assert (adaptive_beta(beta, kl, target, n, horizon) > beta) == (kl > target)


def test_gae_matches_a_hand_written_loop() -> None:
    rewards, values = _rand(3, 5, seed=5), _rand(3, 5, seed=6)
    gamma, lam = 0.9, 0.8
    adv, ret = gae(rewards, values, MASK, gamma, lam)
    for i in range(3):
        length = int(MASK[i].sum())
        running = 0.0
        for t in reversed(range(length)):
            next_v = values[i, t + 1].item() if t + 1 < length else 0.0
            delta = rewards[i, t].item() + gamma * next_v - values[i, t].item()
            running = delta + gamma * lam * running
            assert adv[i, t].item() == pytest.approx(running, abs=TOL)
            assert ret[i, t].item() == pytest.approx(running + values[i, t].item(), abs=TOL)
        assert adv[i, length:].abs().sum().item() == 0.0


def test_whiten_gives_zero_mean_unit_variance_over_the_mask() -> None:
    x = _rand(3, 5, seed=7) * 3 + 2
    out = whiten(x, MASK)
    vals = [x[i, t].item() for i in range(3) for t in range(5) if MASK[i, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    for i in range(3):
        for t in range(5):
            want = (x[i, t].item() - mean) / math.sqrt(var + 1e-8) if MASK[i, t] else 0.0
            assert out[i, t].item() == pytest.approx(want, abs=TOL)
    kept = whiten(x, MASK, shift_mean=False)
    assert kept[0, 0].item() == pytest.approx(out[0, 0].item() + mean, abs=TOL)


def test_ppo_policy_loss_clips_on_both_sides() -> None:
    # ratios chosen to fall inside, above and below the clipping range, with both signs of A
    old = torch.zeros(2, 3, dtype=torch.float64)
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5], [1.1, 1.5, 0.5]], dtype=torch.float64))
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    eps = 0.2
    loss, metrics = ppo_policy_loss(logp, old, adv, mask, eps)
    terms, clipped, sq = [], 0, []
    for i in range(2):
        for t in range(3):
            rho = math.exp(logp[i, t].item())
            a = adv[i].item()
            u, c = -a * rho, -a * min(max(rho, 1 - eps), 1 + eps)
            terms.append(max(u, c))
            clipped += c > u
            sq.append(logp[i, t].item() ** 2)
    assert loss.item() == pytest.approx(sum(terms) / 6, abs=TOL)
    # A>0 clips ratio 1.5 (above); A<0 clips ratio 0.5 (below)
    assert clipped == 2
    assert metrics["clipfrac"].item() == pytest.approx(2 / 6, abs=TOL)
    assert metrics["approxkl"].item() == pytest.approx(0.5 * sum(sq) / 6, abs=TOL)


def test_ppo_value_loss_clips_on_both_sides() -> None:
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, -0.5, 0.1, 0.5]], dtype=torch.float64)
    returns = torch.tensor([[1.0, -1.0, 0.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    clip = 0.2
    loss, metrics = ppo_value_loss(values, old, returns, mask, clip)
    terms, clipped = [], 0
    for t in range(3):
        v, vo, r = values[0, t].item(), old[0, t].item(), returns[0, t].item()
        vc = vo + min(max(v - vo, -clip), clip)
        terms.append(max((v - r) ** 2, (vc - r) ** 2))
        clipped += (vc - r) ** 2 > (v - r) ** 2
    assert loss.item() == pytest.approx(0.5 * sum(terms) / 3, abs=TOL)
    assert clipped == 2  # clipped upward (0.5 → 0.2) and downward (−0.5 → −0.2)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 3, abs=TOL)
