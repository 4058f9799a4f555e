"""Turning groups (a prompt and its K completions) into padded tensors, and scoring them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class GroupTokens:
    """One group's token ids: the prompt once, each candidate's completion."""

    prompt: list[int]
    completions: list[list[int]]


@dataclass
class Batch:
    """Candidates of several groups, prompts left-padded so completions start in one column."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor  # completion tokens, -100 where padded
    group_offsets: list[int]  # index of each group's first candidate

    def to(self, device: torch.device) -> Batch:
        """The same batch on another device."""
        return Batch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.labels.to(device),
            self.group_offsets,
        )


def truncate(group: GroupTokens, max_length: int) -> GroupTokens:
    """Fit every candidate into max_length tokens: keep the prompt's end, cut completions."""
    prompt = (
        group.prompt[-max(1, max_length // 2) :]
        if len(group.prompt) >= max_length
        else group.prompt
    )
    room = max(1, max_length - len(prompt))
    return GroupTokens(prompt, [c[:room] for c in group.completions])


def collate(groups: list[GroupTokens], pad_id: int, max_length: int) -> Batch:
    """Stack the candidates of groups into one batch."""
    groups = [truncate(g, max_length) for g in groups]
    rows = [(g.prompt, c) for g in groups for c in g.completions]
    p_len = max(len(p) for p, _ in rows)
    c_len = max(len(c) for _, c in rows)
    n = len(rows)
    input_ids = torch.full((n, p_len + c_len), pad_id, dtype=torch.long)
    attention = torch.zeros((n, p_len + c_len), dtype=torch.long)
    labels = torch.full((n, c_len), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        input_ids[i, p_len - len(p) : p_len] = torch.tensor(p)
        input_ids[i, p_len : p_len + len(c)] = torch.tensor(c)
        attention[i, p_len - len(p) : p_len + len(c)] = 1
        labels[i, : len(c)] = torch.tensor(c)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    offsets, at = [], 0
    for g in groups:
        offsets.append(at)
        at += len(g.completions)
    return Batch(input_ids, attention, position_ids, labels, offsets)


def sequence_logps(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed log-probability of each candidate's completion tokens (one number per row)."""
    c_len = batch.labels.shape[1]
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=c_len + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :].float()
    token_logps = -F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        batch.labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(batch.labels.shape)
    return token_logps.sum(-1)
