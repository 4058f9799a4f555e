"""GRPO on human-ranked groups: ranks become gains, gains become group-normalised advantages,
and the clipped per-token surrogate against π_old (the version that sampled the group) is
optimised with a k3 KL penalty to π_ref (the base model, adapter disabled)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from labeling.bradley_terry import bt_gains
from labeling.ranking import mean_gains
from store.errors import PrefloopError
from store.records import TrainingGroup
from tuning.batching import GroupTokens, collate, per_candidate, token_logps
from tuning.config import GRPOConfig
from tuning.fluency import demote, demotions
from tuning.losses import best_nll, grpo_advantages, grpo_loss
from tuning.modeling import candidate_ids, load_tokenizer, prompt_ids
from tuning.train_loop import (
    Method,
    StepCallback,
    TrainResult,
    make_guard,
    policy_model,
    setup,
    train,
)

OLD = "pi_old"


@dataclass
class GRPOGroup:
    """A group ready for GRPO: tokens, per-candidate gains, who sampled it, fixed log-probs."""

    tokens: GroupTokens
    gains: torch.Tensor
    origin: str | None
    ref: list[torch.Tensor] | None = None  # per candidate, per token
    old: list[torch.Tensor] | None = None
    texts: list[str] = field(default_factory=list)
    rankings: list[list[list[int]]] = field(default_factory=list)  # every annotator's


def build_grpo_groups(rows: list[TrainingGroup], tokenizer, cfg: GRPOConfig) -> list[GRPOGroup]:
    """Tokenise snapshot rows and turn their rankings into gains: the schedule's gains averaged
    over annotators, or with cfg.gain_source="bt" Bradley–Terry gains fitted to the rankings."""
    groups = []
    for row in rows:
        tokens = GroupTokens(
            prompt_ids(tokenizer, row.prompt, row.messages),
            candidate_ids(tokenizer, row.texts, row.finish_reasons),
        )
        gains = _gains(row.rankings, len(row.texts), cfg)
        groups.append(
            GRPOGroup(tokens, gains, row.model_version, texts=row.texts, rankings=row.rankings)
        )
    return groups


def _gains(rankings: list[list[list[int]]], k: int, cfg: GRPOConfig) -> torch.Tensor:
    try:
        if cfg.gain_source == "bt":
            gains = bt_gains(rankings, k)
        else:
            gains = mean_gains(rankings, k, cfg.gains)
    except ValueError as exc:
        raise PrefloopError(str(exc)) from None
    return torch.tensor(gains, dtype=torch.float32)


def demote_broken(
    groups: list[GRPOGroup], reference_nll: list[float] | None, cfg: GRPOConfig
) -> dict[str, float]:
    """Rank each group's broken candidates below its fluent ones (tuning.fluency.demotions, on
    π_ref's log-probs) and recompute its gains; the counts, as run metrics."""
    nll = [[-float(t.sum()) / max(len(t), 1) for t in g.ref] for g in groups]
    bads, counts = demotions(
        nll, [g.texts for g in groups], [g.rankings for g in groups], reference_nll
    )
    for g, bad in zip(groups, bads, strict=True):
        if bad:
            g.rankings = [demote(r, bad) for r in g.rankings]
            g.gains = _gains(g.rankings, len(g.texts), cfg)
    return counts


def _padded(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in parts)
    out = torch.zeros(len(parts), width, dtype=parts[0].dtype, device=parts[0].device)
    mask = torch.zeros(len(parts), width, dtype=torch.bool, device=parts[0].device)
    for i, p in enumerate(parts):
        out[i, : len(p)] = p
        mask[i, : len(p)] = True
    return out, mask


@torch.no_grad()
def _fill(model, groups: list[GRPOGroup], attr: str, pad_id: int, cfg: GRPOConfig) -> None:
    """Store the current model's per-token log-probs of each group's candidates in attr."""
    for i in range(0, len(groups), cfg.groups_per_step):
        chunk = groups[i : i + cfg.groups_per_step]
        batch = collate([g.tokens for g in chunk], pad_id, cfg.max_length).to(model.device)
        parts = [p.cpu() for p in per_candidate(token_logps(model, batch)[0], batch)]
        for g, start in zip(chunk, batch.group_offsets, strict=True):
            setattr(g, attr, parts[start : start + len(g.tokens.completions)])


def fixed_logprobs(
    model, groups: list[GRPOGroup], pad_id: int, cfg: GRPOConfig, adapters: dict[str, Path]
) -> None:
    """π_ref for every group (adapter disabled) and π_old: the sampling version's adapter, the
    base model for base-sampled groups, and the starting policy for outside data."""
    model.eval()
    with model.disable_adapter():
        _fill(model, groups, "ref", pad_id, cfg)
    for g in groups:
        if g.origin == "base":
            g.old = g.ref
    unknown = [
        g for g in groups if g.origin is None or (g.origin != "base" and g.origin not in adapters)
    ]
    _fill(model, unknown, "old", pad_id, cfg)
    for version in sorted({g.origin for g in groups if g.origin in adapters}):
        model.load_adapter(str(adapters[version]), adapter_name=OLD)
        model.set_adapter(OLD)
        _fill(model, [g for g in groups if g.origin == version], "old", pad_id, cfg)
        model.set_adapter("default")
        model.delete_adapter(OLD)
    for p in model.parameters():  # set_adapter/delete_adapter reset flags: LoRA weights train
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)


def train_grpo(
    base: str,
    rows: list[TrainingGroup],
    cfg: GRPOConfig,
    out_dir: Path,
    *,
    adapters: dict[str, Path],
    init_adapter: Path | None = None,
    on_step: StepCallback | None = None,
    show_progress: bool = True,
    guard_prompts: list[list[int]] | None = None,
) -> TrainResult:
    """Train a LoRA adapter with GRPO on ranked groups and save it to out_dir."""
    accelerator = setup(cfg)
    tokenizer = load_tokenizer(base)
    groups = build_grpo_groups(rows, tokenizer, cfg)
    if not groups:
        raise PrefloopError("the dataset has no ranked groups to train on")
    model = policy_model(base, cfg, init_adapter)
    model.to(accelerator.device)
    pad = tokenizer.pad_token_id
    fixed_logprobs(model, groups, pad, cfg, adapters)
    guard = make_guard(model, tokenizer, guard_prompts, cfg)
    data = demote_broken(groups, guard.ref_nll if guard else None, cfg) if cfg.demote_broken else {}
    max_len = max(len(c) for g in groups for c in g.tokens.completions)
    dev = accelerator.device
    state = {"beta": cfg.beta}

    def loss(model, chunk: list[GRPOGroup]):
        batch = collate([g.tokens for g in chunk], pad, cfg.max_length).to(dev)
        adv, _ = grpo_advantages([g.gains for g in chunk], cfg.scale_rewards)
        old, mask = _padded([t for g in chunk for t in g.old])
        ref, _ = _padded([t for g in chunk for t in g.ref])
        flat, entropy = token_logps(
            model, batch, with_entropy=True, entropy_grad=bool(cfg.entropy_coef)
        )
        logps, _ = _padded(per_candidate(flat, batch))
        ent, _ = _padded(per_candidate(entropy, batch))
        loss, metrics = grpo_loss(
            logps, old.to(dev), ref.to(dev), mask.to(dev), adv.to(dev),
            epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=state["beta"],
            loss_type=cfg.loss_type, max_completion_length=max_len,
            entropy=ent, entropy_coef=cfg.entropy_coef,
        )  # fmt: skip
        if cfg.sft_weight:
            nll = best_nll(logps, mask.to(dev), [g.gains for g in chunk])
            metrics["nll_loss"] = nll.detach()
            loss = loss + cfg.sft_weight * nll
        return loss, metrics

    def batch_metrics(chunk: list[GRPOGroup]) -> dict[str, float]:
        adv, zero = grpo_advantages([g.gains for g in chunk], cfg.scale_rewards)
        return {
            "advantages/mean": float(adv.mean()),
            "advantages/std": float(adv.std()) if adv.numel() > 1 else 0.0,
            "frac_zero_std_groups": float(zero.float().mean()),
        }

    def after_step(logged: dict[str, float]) -> dict[str, float]:
        used = state["beta"]
        if cfg.target_kl:
            # adaptive KL controller: move beta so the KL per token tracks the target
            error = max(-0.2, min(0.2, logged["kl"] / cfg.target_kl - 1))
            state["beta"] = max(1e-6, used * (1 + 0.5 * error))
        return {"beta": used}

    method = Method(
        name="grpo",
        groups=groups,
        loss=loss,
        passes_per_batch=cfg.ppo_epochs,
        batch_metrics=batch_metrics,
        after_step=after_step,
        postfix=("loss", "kl"),
    )
    result = train(
        model,
        method,
        cfg,
        out_dir,
        accelerator=accelerator,
        guard=guard,
        on_step=on_step,
        show_progress=show_progress,
    )
    keys = ("loss", "kl", "clip_ratio", "entropy", "beta")
    last = result.last_step
    result.metrics = {**{k: last[k] for k in keys if k in last}, **result.metrics, **data}
    return result
