"""The DPO training loop over groups: one forward pass per candidate per step."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from labeling.bradley_terry import bt_preferences
from labeling.ranking import ordered_pairs, pair_preferences
from store.errors import PrefloopError
from store.records import TrainingGroup
from tuning.batching import GroupTokens, collate, sequence_logps
from tuning.config import DPOConfig
from tuning.fluency import demote, demotions
from tuning.losses import dpo_loss, plackett_luce_loss, preference_loss
from tuning.modeling import candidate_ids, load_tokenizer, load_version, prompt_ids
from tuning.train_loop import (
    Method,
    StepCallback,
    TrainResult,
    make_guard,
    policy_model,
    setup,
    train,
)


@dataclass
class TrainGroup:
    """A group ready for training: tokens, its consensus ranking, the pairs it orders with their
    target probabilities, and reference log-probs."""

    tokens: GroupTokens
    pairs: list[tuple[int, int]]
    targets: list[float] = field(default_factory=list)
    ranking: list[list[int]] = field(default_factory=list)
    ref_logps: torch.Tensor | None = None
    texts: list[str] = field(default_factory=list)
    rankings: list[list[list[int]]] = field(default_factory=list)  # every annotator's


def build_groups(
    rows: list[TrainingGroup], tokenizer, max_length: int, soft: str | bool = "hard"
) -> list[TrainGroup]:
    """Tokenise snapshot rows; groups whose ranking orders no pair are left out.

    soft="empirical" (or True) with several annotators: a pair's target is the share of
    annotators who prefer its first candidate (ties count half). soft="bt": pairs and targets
    are the Bradley–Terry probabilities fitted to the group's rankings (one annotator's too).
    Otherwise (soft="hard" or False) the pairs come from the consensus, each with target 1.
    """
    mode = _mode(soft)
    groups = []
    for row in rows:
        pairs, targets = _pairs(row.rankings, row.ranking, mode)
        if not pairs:
            continue
        tokens = GroupTokens(
            prompt_ids(tokenizer, row.prompt, row.messages),
            candidate_ids(tokenizer, row.texts, row.finish_reasons),
        )
        groups.append(
            TrainGroup(tokens, pairs, targets, row.ranking, texts=row.texts, rankings=row.rankings)
        )
    return groups


def _mode(soft: str | bool) -> str:
    return ("empirical" if soft else "hard") if isinstance(soft, bool) else soft


def _pairs(
    rankings: list[list[list[int]]], ranking: list[list[int]], mode: str
) -> tuple[list[tuple[int, int]], list[float]]:
    """The ordered pairs of a group and their target probabilities (see build_groups)."""
    if mode == "bt":
        prefs = bt_preferences(rankings)
        return list(prefs), list(prefs.values())
    if mode == "empirical" and len(rankings) > 1:
        prefs = pair_preferences(rankings)
        return list(prefs), list(prefs.values())
    pairs = ordered_pairs(ranking)
    return pairs, [1.0] * len(pairs)


def demote_broken(
    groups: list[TrainGroup], reference_nll: list[float] | None, soft: str | bool
) -> dict[str, float]:
    """Rank each group's broken candidates, judged by their reference log-probs against π_ref's
    own answers (tuning.fluency.demotions), below its fluent ones in every annotator's ranking
    and rebuild its pairs; the counts, as run metrics."""
    nll = [
        (-g.ref_logps / torch.tensor([max(len(c), 1) for c in g.tokens.completions])).tolist()
        for g in groups
    ]
    bads, counts = demotions(
        nll, [g.texts for g in groups], [g.rankings for g in groups], reference_nll
    )
    for g, bad in zip(groups, bads, strict=True):
        if bad:
            g.rankings = [demote(r, bad) for r in g.rankings]
            g.ranking = demote(g.ranking, bad)
            g.pairs, g.targets = _pairs(g.rankings, g.ranking, _mode(soft))
    return counts


def _ref_cache_key(base: str, max_length: int, groups: list[TrainGroup]) -> str:
    digest = hashlib.sha256(json.dumps([base, max_length]).encode())
    for g in groups:
        digest.update(json.dumps([g.tokens.prompt, g.tokens.completions]).encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def reference_logps(
    model, groups: list[TrainGroup], pad_id: int, cfg: DPOConfig, cache: Path | None, base: str
) -> None:
    """Fill each group's reference log-probs: base model (adapter disabled), once per dataset."""
    key = _ref_cache_key(base, cfg.max_length, groups)
    if cache is not None:
        path = cache.with_name(f"{cache.name}.ref-{key}.pt")
        if path.exists():
            for g, ref in zip(groups, torch.load(path), strict=True):
                g.ref_logps = ref
            return
    model.eval()
    with model.disable_adapter():
        for chunk in _chunks_by_length(groups, cfg.groups_per_step):
            batch = collate([g.tokens for g in chunk], pad_id, cfg.max_length).to(model.device)
            logps = sequence_logps(model, batch).cpu()
            for g, start in zip(chunk, batch.group_offsets, strict=True):
                g.ref_logps = logps[start : start + len(g.tokens.completions)]
    if cache is not None:
        tmp = path.with_suffix(".tmp")
        torch.save([g.ref_logps for g in groups], tmp)
        tmp.replace(path)


def _chunks_by_length(groups: list[TrainGroup], size: int) -> list[list[TrainGroup]]:
    """Groups in chunks of similar token counts, for passes whose batching order is free."""
    ordered = sorted(
        groups, key=lambda g: len(g.tokens.prompt) + sum(map(len, g.tokens.completions))
    )
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def group_loss(
    logps: torch.Tensor,
    ref: torch.Tensor,
    chunk: list[TrainGroup],
    offsets: list[int],
    cfg: DPOConfig,
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured DPO-family loss of a batch of groups, plus TRL's metrics."""
    chosen, rejected = _pair_index(chunk, offsets)
    targets = torch.tensor([t for g in chunk for t in g.targets], dtype=logps.dtype)
    loss, metrics = preference_loss(
        logps, ref, chosen, rejected, cfg.beta, cfg.loss_type, cfg.label_smoothing,
        targets.to(logps.device),
    )  # fmt: skip
    if cfg.listwise:
        rewards = cfg.beta * (logps - ref)
        loss = torch.stack(
            [
                plackett_luce_loss(rewards[start : start + len(g.tokens.completions)], g.ranking)
                for g, start in zip(chunk, offsets, strict=True)
            ]
        ).mean()
    if cfg.sft_weight:
        best = [start + i for g, start in zip(chunk, offsets, strict=True) for i in g.ranking[0]]
        idx = torch.tensor(best, device=logps.device)
        nll = -(logps[idx] / lengths[idx]).mean()
        metrics["nll_loss"] = nll.detach()
        loss = loss + cfg.sft_weight * nll
    return loss, metrics


def _pair_index(chunk: list[TrainGroup], offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = [start + a for g, start in zip(chunk, offsets, strict=True) for a, _ in g.pairs]
    rejected = [start + b for g, start in zip(chunk, offsets, strict=True) for _, b in g.pairs]
    return torch.tensor(chosen), torch.tensor(rejected)


def train_dpo(
    base: str,
    rows: list[TrainingGroup],
    cfg: DPOConfig,
    out_dir: Path,
    *,
    init_adapter: Path | None = None,
    ref_cache: Path | None = None,
    on_step: StepCallback | None = None,
    show_progress: bool = True,
    heldout_rows: list[TrainingGroup] | None = None,
    guard_prompts: list[list[int]] | None = None,
) -> TrainResult:
    """Train a LoRA adapter with DPO on ranked groups and save it to out_dir.

    With cfg.early_stop and held-out rows, held-out preference accuracy is measured after each
    epoch; training stops after early_stop epochs without improvement and keeps the best epoch.
    With guard prompts, the fluency guard runs after each epoch (see tuning.train_loop).
    """
    accelerator = setup(cfg)
    tokenizer = load_tokenizer(base)
    groups = build_groups(rows, tokenizer, cfg.max_length, cfg.soft_labels)
    if not groups:
        raise PrefloopError(
            "the dataset has no ordered pairs (every group is tied or flagged); rank more groups"
        )
    model = policy_model(base, cfg, init_adapter, load_version)
    model.to(accelerator.device)
    pad = tokenizer.pad_token_id
    reference_logps(model, groups, pad, cfg, ref_cache, base)
    heldout = build_groups(heldout_rows or [], tokenizer, cfg.max_length, cfg.soft_labels)
    scoring = bool(cfg.early_stop and heldout)
    if scoring:
        reference_logps(model, heldout, pad, cfg, None, base)
    guard = make_guard(model, tokenizer, guard_prompts, cfg)
    data = (
        demote_broken(groups, guard.ref_nll if guard else None, cfg.soft_labels)
        if cfg.demote_broken
        else {}
    )

    def loss(model, chunk: list[TrainGroup]):
        batch = collate([g.tokens for g in chunk], pad, cfg.max_length).to(accelerator.device)
        logps = sequence_logps(model, batch)
        ref = torch.cat([g.ref_logps for g in chunk]).to(logps.device)
        lengths = torch.tensor(
            [len(c) for g in chunk for c in g.tokens.completions], device=logps.device
        )
        return group_loss(logps, ref, chunk, batch.group_offsets, cfg, lengths)

    method = Method(
        name="dpo",
        groups=groups,
        loss=loss,
        postfix=("loss", "rewards/accuracies"),
        epoch_score=(
            (lambda m: evaluate_groups(m, heldout, pad, cfg)["rewards/accuracies"])
            if scoring
            else None
        ),
        score_name="eval/rewards/accuracies",
        patience=cfg.early_stop,
        final_metrics=lambda m: evaluate_groups(m, groups, pad, cfg),
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
    result.metrics.update(data)
    return result


@torch.no_grad()
def evaluate_groups(
    model, groups: list[TrainGroup], pad_id: int, cfg: DPOConfig
) -> dict[str, float]:
    """Loss and reward metrics of the current policy over all pairs of the groups."""
    model.eval()
    all_logps, all_ref, chosen, rejected, at = [], [], [], [], 0
    for chunk in _chunks_by_length(groups, cfg.groups_per_step):
        batch = collate([g.tokens for g in chunk], pad_id, cfg.max_length).to(model.device)
        all_logps.append(sequence_logps(model, batch).cpu())
        all_ref.extend(g.ref_logps for g in chunk)
        c, r = _pair_index(chunk, [at + o for o in batch.group_offsets])
        chosen.append(c)
        rejected.append(r)
        at += batch.n_candidates
    loss, metrics = dpo_loss(
        torch.cat(all_logps), torch.cat(all_ref), torch.cat(chosen), torch.cat(rejected), cfg.beta
    )
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}
