"""The DPO loss over every ordered pair of a group, from per-candidate log-probabilities."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO sigmoid loss and TRL's reward metrics.

    policy_logps and ref_logps hold one summed completion log-probability per candidate;
    chosen[i] and rejected[i] index the candidates of pair i, so each candidate's forward
    pass is shared by every pair it belongs to.
    """
    rewards = beta * (policy_logps - ref_logps)
    chosen_rewards, rejected_rewards = rewards[chosen], rewards[rejected]
    margins = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(margins).mean()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": margins.mean(),
        "logps/chosen": policy_logps[chosen].mean(),
        "logps/rejected": policy_logps[rejected].mean(),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}
