"""GRPO on human-ranked groups: ranks become gains, gains become group-normalised advantages,
and the clipped per-token surrogate against π_old (the version that sampled the group) is
optimised with a k3 KL penalty to π_ref (the base model, adapter disabled)."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from labeling.bradley_terry import bt_gains
from labeling.ranking import mean_gains
from store.errors import PrefloopError
from tuning.batching import GroupTokens, collate, per_candidate, token_logps
from tuning.config import GRPOConfig
from tuning.dpo import make_optimizer, new_adapter
from tuning.losses import grpo_advantages, grpo_loss
from tuning.modeling import candidate_ids, limit_threads, load_tokenizer, load_version, prompt_ids

StepCallback = Callable[[int, dict[str, float]], None]
OLD = "pi_old"


@dataclass
class GRPOGroup:
    """A group ready for GRPO: tokens, per-candidate gains, who sampled it, fixed log-probs."""

    tokens: GroupTokens
    gains: torch.Tensor
    origin: str | None
    ref: list[torch.Tensor] | None = None  # per candidate, per token
    old: list[torch.Tensor] | None = None


def build_grpo_groups(rows: list[dict], tokenizer, cfg: GRPOConfig) -> list[GRPOGroup]:
    """Tokenise snapshot rows and turn their rankings into gains: the schedule's gains averaged
    over annotators, or with cfg.gain_source="bt" Bradley–Terry gains fitted to the rankings."""
    groups = []
    for row in rows:
        k = len(row["texts"])
        rankings = row.get("rankings") or [row["ranking"]]
        try:
            if cfg.gain_source == "bt":
                gains = bt_gains(rankings, k)
            else:
                gains = mean_gains(rankings, k, cfg.gains)
        except ValueError as exc:
            raise PrefloopError(str(exc)) from None
        tokens = GroupTokens(
            prompt_ids(tokenizer, row["prompt"], row.get("messages")),
            candidate_ids(tokenizer, row),
        )
        origin = row.get("model_version")
        origin = (
            None if origin is None or (isinstance(origin, float) and math.isnan(origin)) else origin
        )
        groups.append(GRPOGroup(tokens, torch.tensor(gains, dtype=torch.float32), origin))
    return groups


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
    rows: list[dict],
    cfg: GRPOConfig,
    out_dir: Path,
    *,
    adapters: dict[str, Path],
    init_adapter: Path | None = None,
    on_step: StepCallback | None = None,
    show_progress: bool = True,
) -> dict[str, float]:
    """Train a LoRA adapter with GRPO on ranked groups; save it to out_dir; return final metrics."""
    limit_threads()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tokenizer = load_tokenizer(base)
    groups = build_grpo_groups(rows, tokenizer, cfg)
    if not groups:
        raise PrefloopError("the dataset has no ranked groups to train on")
    model = (
        load_version(base, init_adapter, trainable=True) if init_adapter else new_adapter(base, cfg)
    )
    model.to(accelerator.device)
    pad = tokenizer.pad_token_id
    fixed_logprobs(model, groups, pad, cfg, adapters)

    steps_per_epoch = math.ceil(len(groups) / cfg.groups_per_step)
    total = steps_per_epoch * cfg.epochs * cfg.ppo_epochs
    params, optimizer, scheduler = make_optimizer(model, cfg, total)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    rank, world = accelerator.process_index, accelerator.num_processes
    max_len = max(len(c) for g in groups for c in g.tokens.completions)
    beta = cfg.beta

    step, last = 0, {}
    bar = tqdm(
        total=total,
        desc="grpo",
        unit="step",
        disable=not (show_progress and accelerator.is_main_process),
    )
    order_rng = random.Random(cfg.seed)
    for epoch in range(cfg.epochs):
        order = list(range(len(groups)))
        order_rng.shuffle(order)
        for s in range(steps_per_epoch):
            ids = order[s * cfg.groups_per_step : (s + 1) * cfg.groups_per_step]
            chunk = [groups[i] for i in ids[rank::world]] or [groups[ids[0]]]
            batch = collate([g.tokens for g in chunk], pad, cfg.max_length).to(accelerator.device)
            adv, zero = grpo_advantages([g.gains for g in chunk], cfg.scale_rewards)
            old, mask = _padded([t for g in chunk for t in g.old])
            ref, _ = _padded([t for g in chunk for t in g.ref])
            dev = accelerator.device
            for _ in range(cfg.ppo_epochs):
                model.train()
                flat, entropy = token_logps(model, batch, with_entropy=True)
                logps, _ = _padded(per_candidate(flat, batch))
                ent, _ = _padded(per_candidate(entropy, batch))
                loss, metrics = grpo_loss(
                    logps, old.to(dev), ref.to(dev), mask.to(dev), adv.to(dev),
                    epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=beta,
                    loss_type=cfg.loss_type, max_completion_length=max_len,
                    entropy=ent, entropy_coef=cfg.entropy_coef,
                )  # fmt: skip
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                logged = {"loss": loss.detach(), **metrics, "grad_norm": torch.as_tensor(grad_norm)}
                logged = {
                    k: float(accelerator.reduce(v.to(dev).float(), "mean"))
                    for k, v in logged.items()
                }
                logged["advantages/mean"] = float(adv.mean())
                logged["advantages/std"] = float(adv.std()) if adv.numel() > 1 else 0.0
                logged["frac_zero_std_groups"] = float(zero.float().mean())
                logged["learning_rate"] = scheduler.get_last_lr()[0]
                logged["beta"] = beta
                logged["epoch"] = epoch + (s + 1) / steps_per_epoch
                if cfg.target_kl:
                    # adaptive KL controller: move beta so the KL per token tracks the target
                    error = max(-0.2, min(0.2, logged["kl"] / cfg.target_kl - 1))
                    beta = max(1e-6, beta * (1 + 0.5 * error))
                bar.update(1)
                bar.set_postfix(loss=f"{logged['loss']:.4f}", kl=f"{logged['kl']:.4f}")
                if on_step is not None and accelerator.is_main_process:
                    on_step(step, logged)
                last = logged
    bar.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(str(out_dir))
    return {k: last[k] for k in ("loss", "kl", "clip_ratio", "entropy", "beta") if k in last}
