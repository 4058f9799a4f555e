"""The RL pieces of the online methods as small pure torch functions, one formula each.

Tensors of per-token values are [N, T] with a boolean (or 0/1) mask of the response tokens.
"""

from __future__ import annotations

import torch

from tuning.losses import grpo_advantages

__all__ = [
    "adaptive_beta",
    "gae",
    "grpo_advantages",
    "k3_kl",
    "mean_log_ratio",
    "masked_mean",
    "ppo_policy_loss",
    "ppo_value_loss",
    "rloo_advantages",
    "whiten",
]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the positions where mask is set."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def rloo_advantages(rewards: list[torch.Tensor]) -> torch.Tensor:
    """RLOO: each sample's reward minus the mean reward of the other K−1 samples of its group.

    A group of one sample has no baseline and gets advantage 0.
    """
    out = []
    for r in rewards:
        k = r.numel()
        if k < 2:
            out.append(torch.zeros_like(r))
            continue
        baseline = (r.sum() - r) / (k - 1)
        out.append(r - baseline)
    return torch.cat(out)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(π‖π_ref) per token: exp(δ) − δ − 1, δ = log π_ref − log π."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def mean_log_ratio(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor) -> float:
    """The KL the adaptive controller reads: mean of log π − log π_ref over response tokens."""
    return float(masked_mean(logps - ref_logps, mask))


def adaptive_beta(beta: float, kl: float, target: float, n: int, horizon: float) -> float:
    """Ziegler et al.'s controller: β · (1 + clip(KL/target − 1, −0.2, 0.2) · n/horizon).

    kl: the measured KL per token; n: samples in the batch just trained on.
    """
    error = max(-0.2, min(0.2, kl / target - 1))
    return beta * (1 + error * n / horizon)


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; returns (advantages, returns).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, with V and A zero past the last
    response token; returns = A + V. Positions outside the mask get 0.
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    n, t = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = rewards.new_zeros(n)
    for i in reversed(range(t)):
        next_value = values[:, i + 1] * m[:, i + 1] if i + 1 < t else rewards.new_zeros(n)
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        running = (delta + gamma * lam * running) * m[:, i]
        advantages[:, i] = running
    return advantages, (advantages + values) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """x scaled to unit variance (and zero mean, unless shift_mean is off) over the mask."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    m = mask.to(x.dtype)
    # Bessel's correction, as TRL and verl do
    count = m.sum()
    if count > 1:
        var = var * count / (count - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, per token: mean of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = π/π_old.

    advantages: [N, T] per token (or [N] per sequence). Metrics: clipfrac (share of tokens where
    the clipped term is the larger) and approxkl (½·mean((log π − log π_old)²)), as TRL logs them.
    """
    adv = advantages if advantages.dim() == logps.dim() else advantages[:, None]
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - epsilon, 1 + epsilon)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).to(logps.dtype), mask),
        "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
    }
    return loss, {k: v.detach() for k, v in metrics.items()}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss: ½·mean(max((V − R)², (V_old + clip(V − V_old, ±c) − R)²)).

    Metric clipfrac: the share of tokens where the clipped error is the larger.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    clipfrac = masked_mean((err_clipped > err).to(values.dtype), mask)
    return loss, {"clipfrac": clipfrac.detach()}
