"""Online GRPO and RLOO: K fresh samples per prompt from the current policy, scored by the
run's reward, turned into advantages (group-normalised, or RLOO's leave-one-out baseline) and
trained on with GRPO's clipped surrogate and k3 KL to π_ref (the policy with its adapter
disabled: one copy of the base weights).

One rollout step is four separate functions a method can reuse: `sample_groups` (rollout) →
`score_groups` (rewards) → `fill_logprobs` + `set_advantages` (advantages) → `policy_loss`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from store import db as storedb
from store import prompts as storeprompts
from store import rounds
from store.errors import PrefloopError
from store.rounds import CandidateRecord
from tuning.batching import GroupTokens, collate, per_candidate, token_logps
from tuning.config import PolicySettings
from tuning.generation import HFGenerator, Sample
from tuning.grpo import _fill, _padded
from tuning.losses import best_nll, grpo_advantages, grpo_loss
from tuning.rewards import Reward, load_reward, parse_reward_specs
from tuning.rl_math import adaptive_beta, masked_mean, rloo_advantages
from tuning.train_loop import (
    Checkpointing,
    Method,
    StepCallback,
    TrainResult,
    make_guard,
    policy_model,
    setup,
    train,
)

# β the adaptive controller starts from when --beta is 0 (a product of 0 never moves)
ADAPTIVE_START_BETA = 0.05


@dataclass
class RolloutPrompt:
    """A prompt an online run samples: its id in the workspace, text and token ids."""

    prompt_id: int
    text: str
    ids: list[int]


@dataclass
class RolloutGroup:
    """One prompt's K fresh samples, their rewards, advantages and fixed log-probs."""

    prompt: RolloutPrompt
    samples: list[Sample]
    tokens: GroupTokens
    rewards: torch.Tensor | None = None  # [K], the weighted reward (penalties included)
    advantages: torch.Tensor | None = None  # [K]
    old: list[torch.Tensor] | None = None  # per sample, per token: π_old (the sampling policy)
    ref: list[torch.Tensor] | None = None  # ... π_ref (adapter disabled)


def rollout_prompts(
    ws: storedb.Workspace, tokenizer, prompts_file: str | None = None
) -> list[RolloutPrompt]:
    """The prompts to sample: a file's (stored as train prompts when new) or the train split."""
    from store.files import read_prompts
    from tuning.modeling import prompt_ids

    with storedb.connect(ws) as con:
        if prompts_file:
            path = Path(prompts_file)
            if not path.is_file():
                raise PrefloopError(f"no prompts file {prompts_file}; give a JSONL or text file")
            ids, _ = storeprompts.upsert_prompts(con, read_prompts(path), "train", path.name)
            df = storeprompts.list_prompts(con)
            df = df.set_index("id").loc[list(dict.fromkeys(ids))].reset_index()
        else:
            df = storeprompts.list_prompts(con, "train")
    if df.empty:
        raise PrefloopError(
            "no train prompts to sample; add some with `prefloop prompts import FILE` or give "
            "--prompts FILE"
        )
    return [
        RolloutPrompt(int(r.id), r.text, prompt_ids(tokenizer, r.text, r.messages))
        for r in df.itertuples()
    ]


@torch.no_grad()
def sample_groups(
    model, tokenizer, prompts: list[RolloutPrompt], cfg: PolicySettings, seed: int
) -> list[RolloutGroup]:
    """Rollout: K samples of each prompt from the current policy (adapter on)."""
    was_training = model.training
    model.eval()
    samples = HFGenerator(model, tokenizer).generate(
        [p.ids for p in prompts],
        cfg.k,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=seed,
    )
    model.train(was_training)
    pad = tokenizer.pad_token_id
    return [
        RolloutGroup(p, group, GroupTokens(p.ids, [s.token_ids or [pad] for s in group]))
        for p, group in zip(prompts, samples, strict=True)
    ]


def score_groups(
    reward: Reward, groups: list[RolloutGroup], truncation_penalty: float = 0.0
) -> dict[str, float]:
    """Rewards: each sample's weighted reward, less the penalty when it was cut off; returns
    each term's mean score (rewards/<spec>)."""
    texts = [[s.text for s in g.samples] for g in groups]
    per_term = reward.term_scores([g.prompt.text for g in groups], texts)
    combined = reward.combine(per_term)
    for g, values in zip(groups, combined, strict=True):
        penalties = [truncation_penalty * (s.finish_reason == "length") for s in g.samples]
        g.rewards = torch.tensor(values, dtype=torch.float32) - torch.tensor(penalties)
    metrics = {}
    for term, scores in zip(reward.terms, per_term, strict=True):
        flat = [s for group in scores for s in group]
        metrics[f"rewards/{term.spec}"] = sum(flat) / len(flat)
    return metrics


def fill_logprobs(model, groups: list[RolloutGroup], pad_id: int, cfg: PolicySettings) -> None:
    """π_old (the policy as it sampled) and π_ref (adapter disabled) per token of each sample."""
    was_training = model.training
    model.eval()
    if _sampled_logps_exact(model, groups, cfg.max_length):
        # the sampler's own log-probs are π_old's: no second forward pass over the samples
        for g in groups:
            g.old = [torch.tensor(s.token_logps) for s in g.samples]
    else:
        _fill(model, groups, "old", pad_id, cfg)
    with model.disable_adapter():
        _fill(model, groups, "ref", pad_id, cfg)
    model.train(was_training)


def _sampled_logps_exact(model, groups: list[RolloutGroup], max_length: int) -> bool:
    """Whether the log-probs recorded while sampling are what a forward pass over the samples
    would give: float32 weights (bf16's cached decoding differs from a full pass by more than
    the clipping should absorb) and no sample cut to fit max_length."""
    head = model.get_output_embeddings()
    if head is None or head.weight.dtype != torch.float32:
        return False
    return all(
        len(s.token_logps) == len(c) and len(g.tokens.prompt) + len(c) <= max_length
        for g in groups
        for s, c in zip(g.samples, g.tokens.completions, strict=True)
    )


def set_advantages(
    groups: list[RolloutGroup], estimator: str, scale_rewards: str = "group"
) -> torch.Tensor:
    """Advantages from the rewards: group-normalised (grpo) or leave-one-out (rloo); returns
    which groups' rewards were all equal (no signal)."""
    rewards = [g.rewards for g in groups]
    if estimator == "rloo":
        adv = rloo_advantages(rewards)
        zero = torch.tensor([bool(r.numel() < 2 or r.std() < 1e-8) for r in rewards])
    else:
        adv, zero = grpo_advantages(rewards, scale_rewards)
    for g, part in zip(groups, torch.split(adv, [len(r) for r in rewards]), strict=True):
        g.advantages = part
    return zero


def rollout_metrics(groups: list[RolloutGroup], beta: float) -> dict[str, float]:
    """The step's metrics under TRL's names: scores, KL to π_ref, entropy, lengths."""
    old, mask = _padded([t for g in groups for t in g.old])
    ref, _ = _padded([t for g in groups for t in g.ref])
    m = mask.to(old.dtype)
    kl_seq = ((old - ref) * m).sum(-1)  # summed log-ratio per sample, as TRL reports it
    scores = torch.cat([g.rewards for g in groups])
    samples = [s for g in groups for s in g.samples]
    return {
        "objective/scores": float(scores.mean()),
        "objective/kl": float(kl_seq.mean()),
        "objective/rlhf_reward": float((scores - beta * kl_seq).mean()),
        "objective/entropy": float((-old * m).sum(-1).mean()),
        "kl_per_token": float(masked_mean(old - ref, mask)),
        "completions/mean_length": sum(s.n_tokens for s in samples) / len(samples),
        "completions/clipped_ratio": sum(s.finish_reason == "length" for s in samples)
        / len(samples),
    }


def policy_loss(
    model,
    chunk: list[RolloutGroup],
    pad_id: int,
    cfg: PolicySettings,
    beta: float,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's clipped surrogate with k3 KL (β) on a minibatch of rollout groups, plus
    sft_weight × the NLL per token of each group's highest-reward samples, and metrics."""
    dev = next(model.parameters()).device
    batch = collate([g.tokens for g in chunk], pad_id, cfg.max_length).to(dev)
    adv = torch.cat([g.advantages for g in chunk]).to(dev)
    old, mask = _padded([t for g in chunk for t in g.old])
    ref, _ = _padded([t for g in chunk for t in g.ref])
    old, ref, mask = old.to(dev), ref.to(dev), mask.to(dev)
    flat, entropy = token_logps(
        model, batch, with_entropy=True, entropy_grad=bool(cfg.entropy_coef)
    )
    logps, _ = _padded(per_candidate(flat, batch))
    ent, _ = _padded(per_candidate(entropy, batch))
    common = dict(
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        loss_type=cfg.loss_type,
        max_completion_length=cfg.max_new_tokens,
    )
    loss, metrics = grpo_loss(
        logps, old, ref, mask, adv, beta=beta, entropy=ent, entropy_coef=cfg.entropy_coef,
        **common,
    )  # fmt: skip
    with torch.no_grad():
        policy_only, _ = grpo_loss(logps, old, None, mask, adv, beta=0.0, **common)
    extra = {}
    if sft_weight:
        nll = best_nll(logps, mask, [g.rewards for g in chunk])
        extra["nll_loss"] = nll.detach()
        loss = loss + sft_weight * nll
    return loss, {
        **extra,
        "loss/policy_avg": policy_only,
        "policy/clipfrac_avg": metrics["clip_ratio"],
        "policy/approxkl_avg": 0.5 * masked_mean((logps - old).detach() ** 2, mask),
        "policy/entropy_avg": metrics["entropy"],
        "kl": metrics["kl"],
    }


class _PolicyBaseJudge:
    """The LLM judge on π_ref's weights: the policy with its adapter disabled."""

    def __init__(self, model, tokenizer) -> None:
        from tuning.llm_judge import LLMJudge

        self.model = model
        self.judge = LLMJudge(model, tokenizer)

    def judge_many(self, items: list[tuple[str, str, str]]) -> list[float]:
        with torch.no_grad(), self.model.disable_adapter():
            return self.judge.judge_many(items)

    def __call__(self, prompt: str, a: str, b: str) -> float:
        return self.judge_many([(prompt, a, b)])[0]


def store_step(
    ws: storedb.Workspace,
    run_id: int,
    step: int,
    groups: list[RolloutGroup],
    settings: dict,
    audit: int = 0,
) -> int:
    """Store a step's samples and rewards as a round (source: run and step) and its first
    `audit` groups in the run's audit round; returns the step round's id."""
    items = [
        (
            g.prompt.prompt_id,
            [
                CandidateRecord(s.text, s.n_tokens, s.finish_reason, s.logprob, f"run {run_id}")
                for s in g.samples
            ],
        )
        for g in groups
    ]
    rewards = [g.rewards.tolist() for g in groups]
    with storedb.connect(ws) as con:
        round_id = rounds.add_scored_groups(
            con, rounds.rollout_source(run_id, step), {**settings, "step": step}, step, items,
            rewards,
        )  # fmt: skip
        if audit > 0:
            audit_id = rounds.add_scored_groups(
                con, rounds.audit_source(run_id), settings, step, items[:audit], rewards[:audit]
            )
            rounds.set_round_options(
                con, audit_id, guidelines=f"Samples of tuning run {run_id} while it trained: "
                "rank them as you would any round; they check the run's reward."
            )  # fmt: skip
    return round_id


def check_online(method: str, cfg: PolicySettings) -> None:
    """Refuse settings an online (or offline) run cannot use, saying what to do."""
    if method == "ppo":
        from tuning.ppo import check_ppo

        return check_ppo(cfg)
    online = method == "rloo" or cfg.online
    if method == "rloo" and not cfg.online:
        raise PrefloopError("rloo always trains online; drop --no-online")
    if not online:
        if cfg.reward:
            raise PrefloopError("--reward is for online runs: add --online (or use --method rloo)")
        return
    parse_reward_specs(cfg.reward)
    for name, value in (("k", cfg.k), ("prompts-per-step", cfg.prompts_per_step)):
        if value < 1:
            raise PrefloopError(f"--{name} must be at least 1")
    if cfg.k < 2:
        raise PrefloopError("--k must be at least 2: advantages compare a prompt's samples")
    if cfg.max_new_tokens < 1:
        raise PrefloopError("--max-new-tokens must be at least 1")
    if cfg.audit < 0:
        raise PrefloopError("--audit must be 0 or more")
    if cfg.checkpoint_every < 0:
        raise PrefloopError("--checkpoint-every must be 0 (never) or more")
    if cfg.target_kl is not None and cfg.target_kl <= 0:
        raise PrefloopError("--target-kl must be more than 0 (or none for a fixed β)")


def check_rewards(ws: storedb.Workspace, specs: list[str]) -> None:
    """Refuse, before a run starts, a reward that cannot load: an unknown or unregistered
    judge, a function that does not import, an unknown model version."""
    from labeling.judges import judge_function, resolve_judge
    from store import models

    for term in parse_reward_specs(specs):
        if term.kind == "function":
            judge_function(resolve_judge(ws, term.spec))
        elif term.kind == "rm":
            with storedb.connect(ws) as con:
                models.get_version(con, term.spec.removeprefix("rm:"))


def beta_controller(state: dict, cfg) -> Callable[[dict[str, float]], dict[str, float]]:
    """The loop's after-step hook of an online run: logs the β the step used, then adapts
    state["beta"] towards cfg.target_kl (fixed β without one)."""

    def after_step(logged: dict[str, float]) -> dict[str, float]:
        used = state["beta"]
        if cfg.target_kl:
            n = cfg.prompts_per_step * cfg.k
            state["beta"] = adaptive_beta(
                used, logged["kl_per_token"], cfg.target_kl, n, cfg.kl_horizon
            )
        return {"beta": used}

    return after_step


def with_objective(result: TrainResult) -> TrainResult:
    """The run's final metrics led by its last rollout step's objective, KL and β."""
    keys = ("objective/scores", "objective/kl", "objective/rlhf_reward", "kl_per_token", "beta")
    last = result.last_step
    result.metrics = {**{k: last[k] for k in keys if k in last}, **result.metrics}
    return result


def train_online(
    ws: storedb.Workspace,
    base: str,
    method: str,
    cfg: PolicySettings,
    out_dir: Path,
    *,
    run_id: int | None = None,
    init_adapter: Path | None = None,
    on_step: StepCallback | None = None,
    show_progress: bool = True,
    guard_prompts: list[list[int]] | None = None,
    checkpoint: Checkpointing | None = None,
) -> TrainResult:
    """Train a LoRA adapter online with GRPO or RLOO against the run's reward; save it to
    out_dir. Each step's samples and rewards are stored as a round of run_id; the run
    checkpoints to (and resumes from) `checkpoint`."""
    from tuning.modeling import load_tokenizer

    check_online(method, cfg)
    terms = parse_reward_specs(cfg.reward)
    accelerator = setup(cfg)
    tokenizer = load_tokenizer(base)
    prompts = rollout_prompts(ws, tokenizer, cfg.prompts)
    model = policy_model(base, cfg, init_adapter)
    model.to(accelerator.device)
    llm = _PolicyBaseJudge(model, tokenizer) if any(t.kind == "llm" for t in terms) else None
    reward = load_reward(ws, terms, llm_judge=llm)
    guard = make_guard(model, tokenizer, guard_prompts, cfg)
    pad = tokenizer.pad_token_id
    estimator = "rloo" if method == "rloo" else "grpo"
    sft = getattr(cfg, "sft_weight", 0.0)  # GRPO's; RLOO has none
    start = cfg.beta or (ADAPTIVE_START_BETA if cfg.target_kl else 0.0)
    state = {"beta": start}
    settings = {
        "run_id": run_id,
        "method": f"{method} (online)",
        "reward": list(cfg.reward),
        "k": cfg.k,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
    }

    def rollout(policy, batch: list[RolloutPrompt], step: int):
        started = time.perf_counter()
        groups = sample_groups(policy, tokenizer, batch, cfg, seed=cfg.seed * 100_003 + step)
        generated = time.perf_counter()
        term_means = score_groups(reward, groups, cfg.truncation_penalty)
        scored = time.perf_counter()
        fill_logprobs(policy, groups, pad, cfg)
        zero = set_advantages(groups, estimator, getattr(cfg, "scale_rewards", "group"))
        metrics = {
            **rollout_metrics(groups, state["beta"]),
            **term_means,
            "frac_reward_zero_std": float(zero.float().mean()),
            "time/generate_s": generated - started,
            "time/score_s": scored - generated,
        }
        if run_id is not None and accelerator.is_main_process:
            store_step(ws, run_id, step, groups, settings, cfg.audit)
        return groups, metrics

    result = train(
        model,
        Method(
            name=f"{method} (online)",
            groups=prompts,
            loss=lambda m, chunk: policy_loss(m, chunk, pad, cfg, state["beta"], sft),
            passes_per_batch=cfg.ppo_epochs,
            after_step=beta_controller(state, cfg),
            postfix=("objective/scores", "objective/kl"),
            rollout=rollout,
            batch_size=cfg.prompts_per_step,
            state=state,
        ),
        cfg,
        out_dir,
        accelerator=accelerator,
        guard=guard,
        on_step=on_step,
        show_progress=show_progress,
        checkpoint=checkpoint,
    )
    return with_objective(result)
