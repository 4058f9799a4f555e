"""Preference losses: the DPO family, Plackett–Luce and GRPO over log-probabilities, and the
reward model's pairwise and listwise losses over scalar rewards."""

from __future__ import annotations

import torch
import torch.nn.functional as F

DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust")
GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo")


def preference_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO-family loss over pairs of candidates, and TRL's reward metrics.

    policy_logps and ref_logps hold one summed completion log-probability per candidate;
    chosen[i] and rejected[i] index the candidates of pair i, so each candidate's forward pass is
    shared by every pair it belongs to. targets[i] is the probability that chosen beats rejected
    (1 for a hard label; the annotators' agreement for soft labels).

    - sigmoid: -[p·log σ(βh) + (1-p)·log σ(-βh)] with p = targets·(1-ε) + (1-targets)·ε
    - robust:  [-(1-ε)·log σ(βh) + ε·log σ(-βh)] / (1-2ε)   (Chowdhury et al. 2024)
    - hinge:   max(0, 1 - βh)
    - ipo:     (h - 1/(2β))²                                   (Azar et al. 2023)
    where h = (log πθ(y+) - log πref(y+)) - (log πθ(y-) - log πref(y-)) and ε = label_smoothing.
    """
    rewards = beta * (policy_logps - ref_logps)
    chosen_rewards, rejected_rewards = rewards[chosen], rewards[rejected]
    margins = chosen_rewards - rejected_rewards
    h = margins / beta
    p = torch.ones_like(margins) if targets is None else targets.to(margins.dtype)
    eps = label_smoothing
    if loss_type == "sigmoid":
        p = p * (1 - eps) + (1 - p) * eps
        losses = -(p * F.logsigmoid(margins) + (1 - p) * F.logsigmoid(-margins))
    elif loss_type == "robust":
        if not 0 <= eps < 0.5:
            raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
        losses = (-(1 - eps) * F.logsigmoid(margins) + eps * F.logsigmoid(-margins)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - margins)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use one of {DPO_LOSSES}")
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": margins.mean(),
        "logps/chosen": policy_logps[chosen].mean(),
        "logps/rejected": policy_logps[rejected].mean(),
    }
    return losses.mean(), {k: v.detach() for k, v in metrics.items()}


def dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's sigmoid loss with hard labels (see preference_loss)."""
    return preference_loss(policy_logps, ref_logps, chosen, rejected, beta)


def plackett_luce_loss(rewards: torch.Tensor, ranking: list[list[int]]) -> torch.Tensor:
    """Negative log-likelihood of a tiered ranking under Plackett–Luce with these rewards.

    Each candidate is chosen from the candidates not placed above its tier (tied candidates
    share their tier's choice set, Breslow's handling of ties); for K=2 this is DPO's sigmoid loss.
    """
    loss = rewards.new_zeros(())
    remaining = [i for tier in ranking for i in tier]
    for tier in ranking[:-1]:
        pool = rewards[torch.tensor(remaining)]
        denom = torch.logsumexp(pool, 0)
        for i in tier:
            loss = loss - (rewards[i] - denom)
        remaining = [i for i in remaining if i not in tier]
    return loss


def grpo_advantages(
    gains: list[torch.Tensor], scale: str = "group"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate advantages from per-group gains, and a mask of groups with zero spread.

    scale: "group" divides by each group's std (Bessel-corrected, as TRL), "batch" by the std
    over all candidates, "none" only centres within the group.
    """
    centred, zero = [], []
    for g in gains:
        std = g.std() if g.numel() > 1 else g.new_zeros(())
        zero.append(bool(std < 1e-8))
        a = g - g.mean()
        if scale == "group":
            a = a / (std + 1e-4)
        centred.append(a)
    adv = torch.cat(centred)
    if scale == "batch":
        adv = adv / (torch.cat(gains).std() + 1e-4)
    elif scale not in ("group", "none"):
        raise ValueError(f"unknown reward scaling {scale!r}; use group, batch or none")
    return adv, torch.tensor(zero)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.04,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate with a k3 KL penalty, over per-token log-probs [N, T].

    ratio = πθ/πold per token; loss per token = -min(ratio·A, clip(ratio, 1-ε, 1+ε_high)·A)
    + β·(πref/πθ - log(πref/πθ) - 1). Aggregation as TRL: grpo averages tokens within each
    sequence then sequences; bnpo averages over all tokens of the batch; dr_grpo divides the
    token sum by N·max_completion_length.
    """
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logps.dtype)
    adv = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    metrics: dict[str, torch.Tensor] = {}
    if ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        if beta:
            per_token = per_token + beta * kl
        metrics["kl"] = (kl * mask).sum() / mask.sum().clamp(min=1)
    if entropy is not None and entropy_coef:
        per_token = per_token - entropy_coef * entropy
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        length = max_completion_length or logps.shape[1]
        loss = (per_token * mask).sum() / (logps.shape[0] * length)
    else:
        raise ValueError(f"unknown GRPO loss type {loss_type!r}; use one of {GRPO_LOSSES}")
    low = (ratio < 1 - epsilon) & (adv < 0)
    high = (ratio > 1 + eps_high) & (adv > 0)
    n = mask.sum().clamp(min=1)
    metrics["clip_ratio/low_mean"] = (low.to(mask.dtype) * mask).sum() / n
    metrics["clip_ratio/high_mean"] = (high.to(mask.dtype) * mask).sum() / n
    metrics["clip_ratio"] = ((low | high).to(mask.dtype) * mask).sum() / n
    metrics["logps/policy"] = ((logps * mask).sum(-1)).mean()
    if entropy is not None:
        metrics["entropy"] = (entropy * mask).sum() / n
    return loss, {k: v.detach() for k, v in metrics.items()}


def best_nll(logps: torch.Tensor, mask: torch.Tensor, scores: list[torch.Tensor]) -> torch.Tensor:
    """Mean NLL per token of each group's best-scored candidates (ties: all of them), over
    per-token log-probs [N, T] whose rows are the groups' candidates in order."""
    rows = []
    start = 0
    for s in scores:
        top = torch.nonzero(s >= s.max() - 1e-6).flatten()
        rows.extend((start + top).tolist())
        start += len(s)
    idx = torch.tensor(rows, device=logps.device)
    m = mask[idx].to(logps.dtype)
    return -((logps[idx] * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()


def reward_pairwise_loss(
    rewards: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    targets: torch.Tensor | None = None,
    margin: float = 0.0,
    center: float = 0.0,
) -> torch.Tensor:
    """Bradley–Terry loss of a reward model over pairs (TRL's reward-trainer formula).

    rewards holds one scalar per candidate; pair i is (chosen[i], rejected[i]) with target
    p_i, the probability that chosen wins (1 for the consensus; the annotators' share with soft
    labels). Per pair: −p·log σ(r₊ − r₋ − m) − (1 − p)·log σ(r₋ − r₊ − m), i.e. whichever side
    wins must win by the margin m; plus C·mean((r₊ + r₋)²) over pairs when centring (C > 0).
    """
    r_pos, r_neg = rewards[chosen], rewards[rejected]
    p = torch.ones_like(r_pos) if targets is None else targets.to(r_pos.dtype)
    gap = r_pos - r_neg
    losses = -(p * F.logsigmoid(gap - margin) + (1 - p) * F.logsigmoid(-gap - margin))
    loss = losses.mean()
    if center:
        loss = loss + center * ((r_pos + r_neg) ** 2).mean()
    return loss


def reward_listwise_loss(
    rewards: torch.Tensor,
    groups: list[tuple[int, list[list[list[int]]], list[float]]],
    center: float = 0.0,
) -> torch.Tensor:
    """Plackett–Luce loss of a reward model over whole rankings, averaged over groups.

    Each group is (offset of its first candidate in rewards, rankings, weights): a group's loss
    is Σ_a w_a · NLL(ranking_a), with weights summing to 1 (one ranking with weight 1 for the
    consensus; each annotator's ranking weighted equally with soft labels). Ties, Breslow's way:
    every member of a tier is chosen from the same pool, the candidates not placed above the
    tier (its tied peers included): P(tier) = Π_{i∈tier} e^{r_i} / (Σ_{j∈pool} e^{r_j})^|tier|.
    The last tier is left out: what remains says nothing about order. Plus C·mean(r²) over
    every candidate when centring.
    """
    per_group = []
    for offset, rankings, weights in groups:
        size = sum(len(tier) for tier in rankings[0])
        r = rewards[offset : offset + size]
        pairs = zip(rankings, weights, strict=True)
        per_group.append(sum(w * plackett_luce_loss(r, ranking) for ranking, w in pairs))
    loss = torch.stack(per_group).mean()
    if center:
        loss = loss + center * (rewards**2).mean()
    return loss


def reward_metrics(
    rewards: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor
) -> dict[str, torch.Tensor]:
    """TRL's reward-model metrics: accuracy counts only strict wins (r₊ > r₋) of the preferred
    answer, margin is the mean r₊ − r₋, and the mean/min/max reward over every candidate."""
    gap = rewards[chosen] - rewards[rejected]
    metrics = {
        "accuracy": (gap > 0).float().mean(),
        "margin": gap.mean(),
        "mean_reward": rewards.mean(),
        "min_reward": rewards.min(),
        "max_reward": rewards.max(),
    }
    return {k: v.detach() for k, v in metrics.items()}
