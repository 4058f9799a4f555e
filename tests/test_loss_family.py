"""DPO variants, Plackett–Luce and GRPO against independent element-by-element computations."""

from __future__ import annotations

import math
import random

import pytest
import torch

from labeling.ranking import mean_gains, pair_preferences, place_gains, ranking_gains
from tuning.losses import (
    best_nll,
    grpo_advantages,
    grpo_loss,
    plackett_luce_loss,
    preference_loss,
)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _pairs_data(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = 12
    policy = torch.randn(n, generator=g, dtype=torch.float64) * 10 - 60
    ref = policy + torch.randn(n, generator=g, dtype=torch.float64) * 4
    rng = random.Random(seed)
    pairs = [tuple(rng.sample(range(n), 2)) for _ in range(15)]
    targets = [rng.choice([1.0, 0.75, 2 / 3, 1.0]) for _ in pairs]
    return policy, ref, pairs, targets


def _expected(loss_type, policy, ref, pairs, targets, beta, eps):
    out = []
    for (c, r), p in zip(pairs, targets, strict=True):
        h = (policy[c] - ref[c]) - (policy[r] - ref[r])
        m = beta * h
        if loss_type == "sigmoid":
            q = p * (1 - eps) + (1 - p) * eps
            out.append(-(q * logsig(m) + (1 - q) * logsig(-m)))
        elif loss_type == "robust":
            out.append((-(1 - eps) * logsig(m) + eps * logsig(-m)) / (1 - 2 * eps))
        elif loss_type == "hinge":
            out.append(max(0.0, 1 - m))
        else:
            out.append((h - 1 / (2 * beta)) ** 2)
    return sum(out) / len(out)


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_variants_match_pairwise_formulas(loss_type: str, seed: int) -> None:
    policy, ref, pairs, targets = _pairs_data(seed)
    beta, eps = 0.1, 0.1
    soft = loss_type == "sigmoid"
    loss, metrics = preference_loss(
        policy,
        ref,
        torch.tensor([c for c, _ in pairs]),
        torch.tensor([r for _, r in pairs]),
        beta,
        loss_type,
        label_smoothing=eps,
        targets=torch.tensor(targets, dtype=torch.float64) if soft else None,
    )
    used = targets if soft else [1.0] * len(pairs)
    expected = _expected(loss_type, policy.tolist(), ref.tolist(), pairs, used, beta, eps)
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    wins = [beta * ((policy[c] - ref[c]) - (policy[r] - ref[r])) > 0 for c, r in pairs]
    assert float(metrics["rewards/accuracies"]) == pytest.approx(sum(wins) / len(wins))


def test_plackett_luce_with_two_candidates_is_sigmoid_dpo() -> None:
    policy = torch.tensor([-20.0, -25.0], dtype=torch.float64)
    ref = torch.tensor([-22.0, -21.0], dtype=torch.float64)
    beta = 0.3
    pl = plackett_luce_loss(beta * (policy - ref), [[1], [0]])
    dpo, _ = preference_loss(policy, ref, torch.tensor([1]), torch.tensor([0]), beta)
    assert float(pl) == pytest.approx(float(dpo), abs=1e-9)


def test_plackett_luce_matches_the_product_of_choices() -> None:
    r = torch.tensor([0.3, -1.2, 0.8, 0.1], dtype=torch.float64)
    order = [2, 0, 3, 1]
    e = [math.exp(x) for x in r.tolist()]
    nll = -sum(math.log(e[order[k]] / sum(e[j] for j in order[k:])) for k in range(3))
    assert float(plackett_luce_loss(r, [[i] for i in order])) == pytest.approx(nll, abs=1e-9)
    # a tie: both tied items are chosen from the same pool
    tied = -(math.log(e[2] / sum(e)) + math.log(e[0] / sum(e))) - math.log(e[3] / (e[3] + e[1]))
    assert float(plackett_luce_loss(r, [[2, 0], [3], [1]])) == pytest.approx(tied, abs=1e-9)


def test_gain_schedules_and_ties() -> None:
    assert place_gains("linear", 4) == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    assert place_gains("dcg", 3) == pytest.approx([1.0, 1 / math.log2(3), 0.5])
    assert place_gains("1,0.6,0.3,0", 4) == [1.0, 0.6, 0.3, 0.0]
    with pytest.raises(ValueError, match="has 3 values"):
        place_gains("1,0.5,0", 4)
    assert ranking_gains([[2], [0, 3], [1]], 4) == pytest.approx([0.5, 0.0, 1.0, 0.5])
    assert mean_gains([[[0], [1]], [[1], [0]]], 2) == [0.5, 0.5]
    prefs = pair_preferences([[[0], [1], [2]], [[1], [0], [2]], [[0], [1, 2]]])
    assert prefs == {(0, 1): pytest.approx(2 / 3), (0, 2): 1.0, (1, 2): pytest.approx(5 / 6)}


def test_advantages_normalise_within_group_and_tied_groups_are_zero() -> None:
    gains = [torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]), torch.tensor([0.5, 0.5, 0.5, 0.5])]
    adv, zero = grpo_advantages(gains, "group")
    g = gains[0]
    assert adv[:4].tolist() == pytest.approx(
        ((g - g.mean()) / (g.std(unbiased=True) + 1e-4)).tolist()
    )
    assert adv[4:].abs().max() == 0 and zero.tolist() == [False, True]
    adv_b, _ = grpo_advantages(gains, "batch")
    assert adv_b[:4].tolist() == pytest.approx(
        ((g - g.mean()) / (torch.cat(gains).std() + 1e-4)).tolist()
    )
    adv_n, _ = grpo_advantages(gains, "none")
    assert adv_n[:4].tolist() == pytest.approx((g - g.mean()).tolist())


def _grpo_reference(logps, old, ref, mask, adv, eps_lo, eps_hi, beta, loss_type, max_len):
    n, t = len(logps), len(logps[0])
    per_seq, total, count = [], 0.0, 0
    for i in range(n):
        seq_sum, seq_n = 0.0, 0
        for j in range(t):
            if not mask[i][j]:
                continue
            ratio = math.exp(logps[i][j] - old[i][j])
            clipped = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
            term = -min(ratio * adv[i], clipped * adv[i])
            d = ref[i][j] - logps[i][j]
            term += beta * (math.exp(d) - d - 1)
            seq_sum += term
            seq_n += 1
        per_seq.append(seq_sum / seq_n)
        total += seq_sum
        count += seq_n
    if loss_type == "grpo":
        return sum(per_seq) / n
    if loss_type == "bnpo":
        return total / count
    return total / (n * max_len)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_grpo_loss_matches_token_by_token_formula(loss_type, eps_high) -> None:
    g = torch.Generator().manual_seed(7)
    n, t = 6, 9
    old = -torch.rand(n, t, generator=g, dtype=torch.float64) * 3
    logps = old + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.4  # ratios both sides
    ref = old + torch.randn(n, t, generator=g, dtype=torch.float64) * 0.2
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[0, 5:] = False
    mask[3, 2:] = False
    adv = torch.tensor([1.2, -0.7, 0.0, -1.5, 0.9, 0.3], dtype=torch.float64)
    loss, metrics = grpo_loss(
        logps,
        old,
        ref,
        mask,
        adv,
        epsilon=0.2,
        epsilon_high=eps_high,
        beta=0.04,
        loss_type=loss_type,
        max_completion_length=12,
    )
    expected = _grpo_reference(
        logps.tolist(),
        old.tolist(),
        ref.tolist(),
        mask.tolist(),
        adv.tolist(),
        0.2,
        eps_high or 0.2,
        0.04,
        loss_type,
        12,
    )
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    ratio = torch.exp(logps - old)
    assert float(metrics["clip_ratio/low_mean"]) > 0 and float(metrics["clip_ratio/high_mean"]) > 0
    low = ((ratio < 0.8) & (adv[:, None] < 0) & mask).sum() / mask.sum()
    assert float(metrics["clip_ratio/low_mean"]) == pytest.approx(float(low))
    d = (ref - logps)[mask]
    assert float(metrics["kl"]) == pytest.approx(float((torch.exp(d) - d - 1).mean()), abs=1e-9)


def test_grpo_ratio_one_gives_the_policy_gradient_of_the_advantage() -> None:
    logps = torch.tensor([[-1.0, -2.0], [-1.5, -0.5]], requires_grad=True)
    loss, _ = grpo_loss(
        logps, logps.detach(), None, torch.ones(2, 2), torch.tensor([1.0, -1.0]), beta=0.0
    )
    loss.backward()
    assert (logps.grad[0] < 0).all() and (logps.grad[1] > 0).all()


def test_best_nll_averages_the_top_scored_candidates_per_token() -> None:
    # two groups: scores [1, 3, 3] (a tie at the top) and [0.5, -1]
    logps = torch.tensor(
        [[-9.0, -9.0, 0.0], [-1.0, -3.0, 0.0], [-2.0, -2.0, -2.0], [-0.5, 0.0, 0.0], [-7.0, 0, 0]]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 0, 0]]).bool()
    scores = [torch.tensor([1.0, 3.0, 3.0]), torch.tensor([0.5, -1.0])]
    # rows 1 (2 per token), 2 (2 per token) and 3 (0.5 per token); padding ignored
    assert float(best_nll(logps, mask, scores)) == pytest.approx((2 + 2 + 0.5) / 3)
