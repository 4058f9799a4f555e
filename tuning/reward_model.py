"""Reward models: the base model with a LoRA adapter and a scalar head on the last token.

A reward model is a model version of kind "reward". Its folder holds the PEFT adapter and the
head in `reward_head.safetensors` (PEFT saves only the adapter's own weights, so a head kept
anywhere else would be lost on save). It is trained on the frozen labelled groups with the
pairwise (Bradley–Terry) or listwise (Plackett–Luce) loss of tuning.losses, and used wherever a
judge is accepted as `rm:VERSION`, and by online methods through load_scorer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from store import db as storedb
from store import models
from store.errors import PrefloopError
from store.records import TrainingGroup
from tuning.batching import GroupTokens, collate, last_token_hidden
from tuning.config import RMConfig
from tuning.losses import reward_listwise_loss, reward_metrics, reward_pairwise_loss
from tuning.modeling import completion_ids, load_tokenizer, prompt_ids
from tuning.train_loop import (
    Method,
    StepCallback,
    TrainResult,
    loading,
    new_adapter,
    setup,
    train,
)

HEAD_FILE = "reward_head.safetensors"
ADAPTER = "reward"  # the adapter's name when it shares a base model with a policy
SPEC_PREFIX = "rm:"
Scorer = Callable[[list[str], list[str]], list[float]]


class RewardModel(torch.nn.Module):
    """A causal LM with a LoRA adapter (`lm`, a PeftModel) and a scalar head reading the final
    hidden state of each candidate's last token."""

    def __init__(self, lm: torch.nn.Module, head: torch.nn.Linear, adapter: str | None = None):
        super().__init__()
        self.lm = lm
        self.reward_head = head
        self.adapter = adapter  # the adapter to activate while scoring (None: the active one)

    @property
    def device(self) -> torch.device:
        """Where the head (and the model) lives."""
        return self.reward_head.weight.device

    def forward(self, batch) -> torch.Tensor:
        """One reward per candidate of a packed batch (tuning.batching.collate)."""
        with _active_adapter(self.lm, self.adapter):
            hidden = last_token_hidden(self.lm, batch)
        return self.reward_head(hidden.to(self.reward_head.weight.dtype)).squeeze(-1)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the adapter and, next to it, the head."""
        if self.adapter not in (None, "default"):  # PEFT writes named adapters to a subfolder
            raise ValueError("only a reward model trained as the default adapter is saved")
        out = Path(out_dir)
        self.lm.save_pretrained(str(out))
        state = self.reward_head.state_dict()
        head = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        save_file(head, str(out / HEAD_FILE), metadata={"hidden_size": str(self.hidden_size)})

    @property
    def hidden_size(self) -> int:
        """Width of the hidden state the head reads."""
        return self.reward_head.in_features


@contextlib.contextmanager
def _active_adapter(lm: torch.nn.Module, name: str | None) -> Iterator[None]:
    """Make adapter `name` the active one for a while; which one was active and which parameters
    train are restored after (PEFT's set_adapter resets them)."""
    if name is None or getattr(lm, "active_adapter", name) == name:
        yield
        return
    before = lm.active_adapter
    flags = {n: p.requires_grad for n, p in lm.named_parameters()}
    lm.set_adapter(name)
    try:
        yield
    finally:
        lm.set_adapter(before)
        for n, p in lm.named_parameters():
            p.requires_grad_(flags.get(n, False))


def new_head(hidden_size: int) -> torch.nn.Linear:
    """A fresh scalar head: small random weights (as a sequence-classification head starts)."""
    head = torch.nn.Linear(hidden_size, 1)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    return head


def load_head(adapter_dir: Path) -> torch.nn.Linear:
    """The scalar head saved in a reward model's folder."""
    path = Path(adapter_dir) / HEAD_FILE
    if not path.exists():
        raise PrefloopError(
            f"{adapter_dir} has no {HEAD_FILE}: it is not a reward model's folder, or it was "
            "damaged; train the reward model again with `prefloop tune --method rm`"
        )
    state = load_file(str(path))
    head = torch.nn.Linear(state["weight"].shape[1], 1)
    head.load_state_dict(state)
    return head


def _hidden_size(lm: torch.nn.Module) -> int:
    return int(lm.get_input_embeddings().weight.shape[1])


def reward_model_to_train(base: str, cfg: RMConfig, init_adapter: Path | None) -> RewardModel:
    """A reward model to train: a fresh adapter and head, or a reward version's to continue."""
    from tuning.modeling import load_version

    if init_adapter is not None:
        lm = load_version(base, init_adapter, trainable=True, **loading(cfg))
        head = load_head(init_adapter)
    else:
        lm = new_adapter(base, cfg)
        head = new_head(_hidden_size(lm))
    head.requires_grad_(True)
    return RewardModel(lm, head.to(next(lm.parameters()).device))


def attach_reward_model(base_model: torch.nn.Module, adapter_dir: Path) -> RewardModel:
    """A reward version on an already loaded base model, sharing its weights: its adapter is
    added to a PeftModel (a policy's, say) under the name "reward", or wraps a plain model."""
    from peft import PeftModel

    if isinstance(base_model, PeftModel):
        base_model.load_adapter(str(adapter_dir), adapter_name=ADAPTER, is_trainable=False)
        lm = base_model
    else:
        lm = PeftModel.from_pretrained(base_model, str(adapter_dir), adapter_name=ADAPTER)
    head = load_head(adapter_dir).to(next(lm.parameters()).device)
    head.requires_grad_(False)
    return RewardModel(lm, head, adapter=ADAPTER).eval()


def load_reward_model(
    ws: storedb.Workspace,
    version: str,
    base_model: torch.nn.Module | None = None,
    dtype: str = "auto",
) -> tuple[RewardModel, object, dict]:
    """A reward version loaded for scoring, its tokenizer and its row; a policy is refused."""
    from tuning.modeling import load_version

    with storedb.connect(ws) as con:
        info = models.get_version(con, version, models.REWARD)
        base = models.base_model(con)
    folder = models.adapter_dir(ws, info)
    if base_model is not None:
        model = attach_reward_model(base_model, folder)
    else:
        lm = load_version(base, folder, dtype=dtype)
        model = RewardModel(lm, load_head(folder).to(next(lm.parameters()).device)).eval()
        model.requires_grad_(False)
    return model, load_tokenizer(info["base_model"] or base), info


@torch.no_grad()
def score_texts(
    model: RewardModel,
    tokenizer,
    prompts: list[str],
    completions: list[str],
    max_length: int = 512,
    groups_per_batch: int = 8,
) -> list[float]:
    """The reward of each (prompt, completion); answers to one prompt share its forward pass."""
    if len(prompts) != len(completions):
        raise ValueError("give one prompt per completion")
    by_prompt: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_prompt.setdefault(p, []).append(i)
    items = list(by_prompt.items())
    out = [0.0] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), groups_per_batch):
            chunk = items[start : start + groups_per_batch]
            groups = [
                GroupTokens(
                    prompt_ids(tokenizer, p, None),
                    [completion_ids(tokenizer, completions[i]) for i in idx],
                )
                for p, idx in chunk
            ]
            batch = collate(groups, tokenizer.pad_token_id, max_length).to(model.device)
            rewards = model(batch).float().cpu().tolist()
            for (_, idx), at in zip(chunk, batch.group_offsets, strict=True):
                for j, i in enumerate(idx):
                    out[i] = rewards[at + j]
    finally:
        model.train(was_training)
    return out


def load_scorer(
    ws: storedb.Workspace,
    version: str,
    base_model: torch.nn.Module | None = None,
    dtype: str = "auto",
) -> Scorer:
    """Batched rewards of a reward version: f(prompts, completions) -> one float each.

    With base_model (a loaded base or a policy's PeftModel) the reward adapter is added to it,
    so the weights are shared; otherwise the base model is loaded. A policy version is refused.
    """
    model, tokenizer, info = load_reward_model(ws, version, base_model, dtype)
    max_length = int((info["config"] or {}).get("max_length", 512))

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        return score_texts(model, tokenizer, list(prompts), list(completions), max_length)

    return score


class RewardJudge:
    """A reward version as a judge: scores each answer once (score_many), or compares two
    answers by their rewards (1 if a's is higher, 0 if lower, 0.5 if equal)."""

    def __init__(self, score: Scorer):
        self.score = score

    def score_many(self, items: list[tuple[str, list[str]]]) -> list[list[float]]:
        """Rewards of each (prompt, candidate texts), in one batched pass."""
        prompts = [p for p, texts in items for _ in texts]
        flat = self.score(prompts, [t for _, texts in items for t in texts])
        out, at = [], 0
        for _, texts in items:
            out.append(flat[at : at + len(texts)])
            at += len(texts)
        return out

    def judge_many(self, items: list[tuple[str, str, str]]) -> list[float]:
        """Outcomes of (prompt, a, b) items by reward."""
        ra = self.score([p for p, _, _ in items], [a for _, a, _ in items])
        rb = self.score([p for p, _, _ in items], [b for _, _, b in items])
        return [1.0 if x > y else 0.0 if x < y else 0.5 for x, y in zip(ra, rb, strict=True)]

    def __call__(self, prompt: str, a: str, b: str) -> float:
        return self.judge_many([(prompt, a, b)])[0]


def reward_version_of(spec: str) -> str | None:
    """The version an "rm:VERSION" judge spec names; None for other specs."""
    if not spec.startswith(SPEC_PREFIX):
        return None
    version = spec[len(SPEC_PREFIX) :].strip()
    if not version:
        raise PrefloopError("name the reward model after rm:, e.g. --judge rm:v3")
    return version


def reward_judge(ws: storedb.Workspace, spec: str, dtype: str = "auto") -> RewardJudge:
    """The judge an "rm:VERSION" spec names, its base weights in dtype."""
    return RewardJudge(load_scorer(ws, reward_version_of(spec) or spec, dtype=dtype))


# -- training ----------------------------------------------------------------------------------


@dataclass
class RMGroup:
    """A group ready for reward-model training: tokens, the pairs it orders with their targets,
    and the rankings the listwise loss reads with their weights."""

    tokens: GroupTokens
    pairs: list[tuple[int, int]]
    targets: list[float]
    rankings: list[list[list[int]]]
    weights: list[float]


def build_rm_groups(rows: list[TrainingGroup], tokenizer, cfg: RMConfig) -> list[RMGroup]:
    """Tokenise snapshot rows; groups whose rankings order no pair are left out.

    Pairs and targets as DPO forms them (tuning.dpo.build_groups, by cfg.soft_labels); the
    listwise rankings are every annotator's, equally weighted, with soft_labels "empirical", and
    the consensus otherwise.
    """
    from tuning.dpo import build_groups

    groups = []
    for row in rows:
        built = build_groups([row], tokenizer, cfg.max_length, cfg.soft_labels)
        if not built:
            continue
        g = built[0]
        rankings = row.rankings if cfg.soft_labels == "empirical" else [row.ranking]
        rankings = [r for r in rankings if len(r) > 1] or [row.ranking]
        weights = [1.0 / len(rankings)] * len(rankings)
        groups.append(RMGroup(g.tokens, g.pairs, g.targets, rankings, weights))
    return groups


def _pair_index(chunk: list[RMGroup], offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [(at + a, at + b) for g, at in zip(chunk, offsets, strict=True) for a, b in g.pairs]
    return torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs])


def batch_loss(
    rewards: torch.Tensor, chunk: list[RMGroup], offsets: list[int], cfg: RMConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The configured reward-model loss of a batch of groups, and TRL's reward metrics."""
    chosen, rejected = _pair_index(chunk, offsets)
    chosen, rejected = chosen.to(rewards.device), rejected.to(rewards.device)
    if cfg.loss_type == "listwise":
        lists = [(at, g.rankings, g.weights) for g, at in zip(chunk, offsets, strict=True)]
        loss = reward_listwise_loss(rewards, lists, cfg.center_rewards)
    else:
        targets = torch.tensor([t for g in chunk for t in g.targets], device=rewards.device)
        loss = reward_pairwise_loss(
            rewards, chosen, rejected, targets, cfg.margin, cfg.center_rewards
        )
    return loss, reward_metrics(rewards, chosen, rejected)


@torch.no_grad()
def evaluate_groups(model: RewardModel, groups: list[RMGroup], pad_id: int, cfg: RMConfig):
    """Loss and reward metrics over every pair of the groups."""
    model.eval()
    rewards, chunks = [], []
    for i in range(0, len(groups), cfg.groups_per_step):
        chunk = groups[i : i + cfg.groups_per_step]
        batch = collate([g.tokens for g in chunk], pad_id, cfg.max_length).to(model.device)
        rewards.append(model(batch).float().cpu())
        chunks.append(chunk)
    flat = torch.cat(rewards)
    offsets, at = [], 0
    for g in groups:
        offsets.append(at)
        at += len(g.tokens.completions)
    loss, metrics = batch_loss(flat, [g for c in chunks for g in c], offsets, cfg)
    return {"loss": float(loss), **{k: float(v) for k, v in metrics.items()}}


def train_reward_model(
    base: str,
    rows: list[TrainingGroup],
    cfg: RMConfig,
    out_dir: Path,
    *,
    init_adapter: Path | None = None,
    heldout_rows: list[TrainingGroup] | None = None,
    on_step: StepCallback | None = None,
    show_progress: bool = True,
) -> TrainResult:
    """Train a reward model on ranked groups and save its adapter and head to out_dir.

    With held-out rows, held-out accuracy (consensus pairs, strict wins) is measured after each
    epoch and the best epoch is kept.
    """
    accelerator = setup(cfg)
    tokenizer = load_tokenizer(base)
    groups = build_rm_groups(rows, tokenizer, cfg)
    if not groups:
        raise PrefloopError(
            "the dataset has no ordered pairs (every group is tied or flagged); rank more groups"
        )
    model = reward_model_to_train(base, cfg, init_adapter)
    model.to(accelerator.device)
    pad = tokenizer.pad_token_id
    hard = replace(cfg, soft_labels="hard")
    heldout = build_rm_groups(heldout_rows or [], tokenizer, hard)
    dev = accelerator.device

    def loss(model, chunk: list[RMGroup]):
        batch = collate([g.tokens for g in chunk], pad, cfg.max_length).to(dev)
        return batch_loss(model(batch), chunk, batch.group_offsets, cfg)

    method = Method(
        name="rm",
        groups=groups,
        loss=loss,
        postfix=("loss", "accuracy"),
        epoch_score=(
            (lambda m: evaluate_groups(m, heldout, pad, hard)["accuracy"]) if heldout else None
        ),
        score_name="eval/accuracy",
        final_metrics=lambda m: evaluate_groups(m, groups, pad, cfg),
    )
    return train(
        model,
        method,
        cfg,
        out_dir,
        accelerator=accelerator,
        on_step=on_step,
        show_progress=show_progress,
    )
