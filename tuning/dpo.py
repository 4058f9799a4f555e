"""The DPO training loop over groups: one forward pass per candidate per step."""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from labeling.bradley_terry import bt_preferences
from labeling.ranking import ordered_pairs, pair_preferences
from store.errors import PrefloopError
from tuning.batching import GroupTokens, collate, sequence_logps
from tuning.config import DPOConfig, GRPOConfig, TrainSettings
from tuning.losses import dpo_loss, plackett_luce_loss, preference_loss
from tuning.modeling import candidate_ids, limit_threads, load_tokenizer, load_version, prompt_ids

StepCallback = Callable[[int, dict[str, float]], None]


@dataclass
class TrainGroup:
    """A group ready for training: tokens, its consensus ranking, the pairs it orders with their
    target probabilities, and reference log-probs."""

    tokens: GroupTokens
    pairs: list[tuple[int, int]]
    targets: list[float] = field(default_factory=list)
    ranking: list[list[int]] = field(default_factory=list)
    ref_logps: torch.Tensor | None = None


def build_groups(
    rows: list[dict], tokenizer, max_length: int, soft: str | bool = "hard"
) -> list[TrainGroup]:
    """Tokenise snapshot rows; groups whose ranking orders no pair are left out.

    soft="empirical" (or True) with several annotators: a pair's target is the share of
    annotators who prefer its first candidate (ties count half). soft="bt": pairs and targets
    are the Bradley–Terry probabilities fitted to the group's rankings (one annotator's too).
    Otherwise (soft="hard" or False) the pairs come from the consensus, each with target 1.
    """
    mode = ("empirical" if soft else "hard") if isinstance(soft, bool) else soft
    groups = []
    for row in rows:
        rankings = row.get("rankings") or [row["ranking"]]
        if mode == "bt":
            prefs = bt_preferences(rankings)
            pairs, targets = list(prefs), list(prefs.values())
        elif mode == "empirical" and len(rankings) > 1:
            prefs = pair_preferences(rankings)
            pairs, targets = list(prefs), list(prefs.values())
        else:
            pairs = ordered_pairs(row["ranking"])
            targets = [1.0] * len(pairs)
        if not pairs:
            continue
        tokens = GroupTokens(
            prompt_ids(tokenizer, row["prompt"], row.get("messages")),
            candidate_ids(tokenizer, row),
        )
        groups.append(TrainGroup(tokens, pairs, targets, row["ranking"]))
    return groups


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


def new_adapter(base: str, cfg: DPOConfig | GRPOConfig):
    """The base model with a fresh LoRA adapter of cfg.lora's shape."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(load_version(base, None), lora)


def make_optimizer(model, cfg: TrainSettings, total_steps: int):
    """AdamW over the trainable (LoRA) parameters with linear warm-up, then a constant rate."""
    warmup = max(1, int(cfg.warmup_ratio * total_steps))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    return params, optimizer, scheduler


def train_dpo(
    base: str,
    rows: list[dict],
    cfg: DPOConfig,
    out_dir: Path,
    *,
    init_adapter: Path | None = None,
    ref_cache: Path | None = None,
    on_step: StepCallback | None = None,
    show_progress: bool = True,
    heldout_rows: list[dict] | None = None,
) -> dict[str, float]:
    """Train a LoRA adapter with DPO on ranked groups; save it to out_dir; return final metrics.

    With cfg.early_stop and held-out rows, held-out preference accuracy is measured after each
    epoch; training stops after early_stop epochs without improvement and keeps the best epoch.
    """
    limit_threads()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    tokenizer = load_tokenizer(base)
    groups = build_groups(rows, tokenizer, cfg.max_length, cfg.soft_labels)
    if not groups:
        raise PrefloopError(
            "the dataset has no ordered pairs (every group is tied or flagged); rank more groups"
        )
    if init_adapter is not None:
        model = load_version(base, init_adapter, trainable=True)
    else:
        model = new_adapter(base, cfg)
    model.to(accelerator.device)
    reference_logps(model, groups, tokenizer.pad_token_id, cfg, ref_cache, base)
    heldout = build_groups(heldout_rows or [], tokenizer, cfg.max_length, cfg.soft_labels)
    if cfg.early_stop and heldout:
        reference_logps(model, heldout, tokenizer.pad_token_id, cfg, None, base)
    best_acc, best_state, since_best = -1.0, None, 0

    steps_per_epoch = math.ceil(len(groups) / cfg.groups_per_step)
    total_steps = steps_per_epoch * cfg.epochs
    params, optimizer, scheduler = make_optimizer(model, cfg, total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    rank, world = accelerator.process_index, accelerator.num_processes

    step = 0
    bar = tqdm(
        total=total_steps,
        desc="dpo",
        unit="step",
        disable=not (show_progress and accelerator.is_main_process),
    )
    order_rng = random.Random(cfg.seed)
    for epoch in range(cfg.epochs):
        order = list(range(len(groups)))
        order_rng.shuffle(order)
        model.train()
        for s in range(steps_per_epoch):
            ids = order[s * cfg.groups_per_step : (s + 1) * cfg.groups_per_step]
            chunk = [groups[i] for i in ids[rank::world]] or [groups[ids[0]]]
            batch = collate([g.tokens for g in chunk], tokenizer.pad_token_id, cfg.max_length)
            batch = batch.to(accelerator.device)
            logps = sequence_logps(model, batch)
            ref = torch.cat([g.ref_logps for g in chunk]).to(logps.device)
            lengths = torch.tensor(
                [len(c) for g in chunk for c in g.tokens.completions], device=logps.device
            )
            loss, metrics = group_loss(logps, ref, chunk, batch.group_offsets, cfg, lengths)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            logged = {"loss": loss.detach(), **metrics, "grad_norm": torch.as_tensor(grad_norm)}
            logged = {
                k: float(accelerator.reduce(v.to(accelerator.device).float(), "mean"))
                for k, v in logged.items()
            }
            logged["learning_rate"] = scheduler.get_last_lr()[0]
            logged["epoch"] = epoch + (s + 1) / steps_per_epoch
            bar.update(1)
            bar.set_postfix(loss=f"{logged['loss']:.4f}", acc=f"{logged['rewards/accuracies']:.2f}")
            if on_step is not None and accelerator.is_main_process:
                on_step(step, logged)
        if cfg.early_stop and heldout:
            unwrapped = accelerator.unwrap_model(model)
            acc = evaluate_groups(unwrapped, heldout, tokenizer.pad_token_id, cfg)[
                "rewards/accuracies"
            ]
            if on_step is not None and accelerator.is_main_process:
                on_step(step, {"eval/rewards/accuracies": acc, "epoch": epoch + 1})
            if acc > best_acc:
                best_acc, since_best = acc, 0
                best_state = {
                    k: v.detach().clone() for k, v in unwrapped.state_dict().items() if "lora_" in k
                }
            else:
                since_best += 1
                if since_best >= cfg.early_stop:
                    break
    bar.close()
    if best_state is not None:
        accelerator.unwrap_model(model).load_state_dict(best_state, strict=False)

    final = evaluate_groups(accelerator.unwrap_model(model), groups, tokenizer.pad_token_id, cfg)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(str(out_dir))
    if best_state is not None:
        final["eval/rewards/accuracies"] = best_acc
    return final


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
