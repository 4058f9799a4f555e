"""PPO on LoRA adapters: fresh samples of the prompts scored by the run's reward, a per-token
reward of −β·KL(π‖π_ref) plus the score at the last token, a critic (its own LoRA adapter and a
scalar value head), GAE advantages, and the clipped policy and value losses; β fixed, or adapted
after each batch towards --target-kl (Ziegler et al.).

Policy (adapter "default"), π_ref (adapters disabled), critic (adapter "critic") and an rm:
reward model (adapter "reward") share one copy of the base weights.

One step reuses the online rollout pieces (tuning.online): `sample_groups` → `score_groups` →
`fill_logprobs`, then `fill_values` (the critic) → `set_ppo_advantages` (per-token rewards, GAE,
whitening) → `ppo_loss` per minibatch, `ppo_epochs` times.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from store import db as storedb
from store.errors import PrefloopError
from tuning.batching import collate, per_candidate, token_hidden, token_logps
from tuning.config import PPOConfig
from tuning.grpo import _padded
from tuning.modeling import upcast_trainable
from tuning.online import (
    ADAPTIVE_START_BETA,
    RolloutGroup,
    RolloutPrompt,
    _PolicyBaseJudge,
    beta_controller,
    fill_logprobs,
    rollout_metrics,
    rollout_prompts,
    sample_groups,
    score_groups,
    store_step,
    with_objective,
)
from tuning.reward_model import new_head
from tuning.rewards import load_reward, parse_reward_specs
from tuning.rl_math import gae, ppo_policy_loss, ppo_value_loss, whiten
from tuning.train_loop import (
    Checkpointing,
    Method,
    StepCallback,
    TrainResult,
    lora_config,
    make_guard,
    policy_model,
    setup,
    train,
)

POLICY = "default"  # PEFT's name for the adapter a version is saved and loaded as
CRITIC = "critic"
VALUE_HEAD_FILE = "value_head.safetensors"


class PolicyCritic(torch.nn.Module):
    """A PeftModel holding the policy's adapter and the critic's, plus the critic's value head.

    Called, generating or scoring it is the policy; `values` runs the critic; `save_pretrained`
    writes the policy's adapter only (and the critic to critic_dir, when given).
    """

    def __init__(self, lm: torch.nn.Module, value_head: torch.nn.Linear, critic_dir=None):
        super().__init__()
        self.lm = lm
        self.value_head = value_head
        self.critic_dir = Path(critic_dir) if critic_dir else None

    # -- the policy, as the loop, the guard and the generator use it ---------------------------
    def forward(self, **inputs):
        """The policy's forward pass."""
        return self.lm(**inputs)

    def generate(self, **kwargs):
        """Sample from the policy."""
        return self.lm.generate(**kwargs)

    def disable_adapter(self):
        """Context in which the model is π_ref (every adapter off)."""
        return self.lm.disable_adapter()

    def get_output_embeddings(self) -> torch.nn.Module:
        """The LM head."""
        return self.lm.get_output_embeddings()

    @property
    def generation_config(self):
        """The base model's generation settings."""
        return self.lm.generation_config

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.value_head.weight.device

    # -- the critic -----------------------------------------------------------------------------
    def values(self, batch) -> torch.Tensor:
        """The critic's value at each completion token (flat, in batch.labels order): V of the
        context that predicts the token."""
        self.lm.set_adapter(CRITIC)
        try:
            hidden = token_hidden(self.lm, batch)
        finally:
            self.lm.set_adapter(POLICY)
            self.set_trainable()
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)

    def set_trainable(self) -> None:
        """Only the policy's and the critic's LoRA weights and the value head train (PEFT resets
        the flags when adapters are added, switched or disabled)."""
        for name, p in self.lm.named_parameters():
            mine = f".{POLICY}." in name or f".{CRITIC}." in name
            p.requires_grad_("lora_" in name and mine)
        self.value_head.requires_grad_(True)

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write the policy's adapter (the model version) and, with critic_dir, the critic."""
        self.lm.save_pretrained(str(out_dir), selected_adapters=[POLICY])
        if self.critic_dir is None:
            return
        from peft import get_peft_model_state_dict

        self.critic_dir.mkdir(parents=True, exist_ok=True)
        self.lm.peft_config[CRITIC].save_pretrained(str(self.critic_dir))
        state = get_peft_model_state_dict(self.lm, adapter_name=CRITIC)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in state.items()},
            str(self.critic_dir / "adapter_model.safetensors"),
        )
        head = {k: v.detach().float().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(head, str(self.critic_dir / VALUE_HEAD_FILE))


def ppo_model(
    base: str,
    cfg: PPOConfig,
    init_adapter: Path | None = None,
    critic_dir: Path | None = None,
    load=None,
) -> PolicyCritic:
    """The policy (a fresh adapter or a version's) with a fresh critic adapter of the same
    shape and a value head, on one copy of the base."""
    lm = policy_model(base, cfg, init_adapter, load)
    lm.add_adapter(CRITIC, lora_config(cfg))
    lm.set_adapter(POLICY)
    hidden = int(lm.get_input_embeddings().weight.shape[1])
    head = new_head(hidden).to(next(lm.parameters()).device)
    model = PolicyCritic(lm, head, critic_dir)
    model.set_trainable()
    upcast_trainable(model)  # the critic's adapter and the value head too
    return model


@dataclass
class PPOGroup(RolloutGroup):
    """A rollout group with what PPO adds, per sample and per token: the critic's values at
    rollout time, the whitened GAE advantages and the returns."""

    values: list[torch.Tensor] | None = None
    token_advantages: list[torch.Tensor] | None = None
    returns: list[torch.Tensor] | None = None


def _samples(groups: list[PPOGroup], attr: str) -> list[torch.Tensor]:
    return [t for g in groups for t in getattr(g, attr)]


@torch.no_grad()
def fill_values(model: PolicyCritic, groups: list[PPOGroup], pad_id: int, cfg: PPOConfig):
    """The critic's values per token of each sample, as they were at rollout time."""
    was_training = model.training
    model.eval()
    for i in range(0, len(groups), cfg.groups_per_step):
        chunk = groups[i : i + cfg.groups_per_step]
        batch = collate([g.tokens for g in chunk], pad_id, cfg.max_length).to(model.device)
        parts = [p.float().cpu() for p in per_candidate(model.values(batch), batch)]
        for g, start in zip(chunk, batch.group_offsets, strict=True):
            g.values = parts[start : start + len(g.tokens.completions)]
    model.train(was_training)


def token_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards [N, T]: −β·(log π − log π_ref) at every response token (k1 KL), plus
    each sample's score at its last response token; and the k1 KL per token."""
    m = mask.to(logps.dtype)
    kl = (logps - ref_logps) * m
    rewards = -beta * kl
    last = (m.sum(-1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards, kl


def set_ppo_advantages(groups: list[PPOGroup], beta: float, cfg: PPOConfig) -> dict[str, float]:
    """Per-token rewards, GAE advantages (whitened over the batch) and returns of each sample;
    returns the critic's metrics at rollout time."""
    logps, mask = _padded(_samples(groups, "old"))
    ref, _ = _padded(_samples(groups, "ref"))
    values, _ = _padded(_samples(groups, "values"))
    scores = torch.cat([g.rewards for g in groups])
    rewards, _ = token_rewards(scores, logps, ref, mask, beta)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    advantages = whiten(advantages, mask)
    lengths = mask.sum(-1).tolist()
    at = 0
    for g in groups:
        rows = range(at, at + len(g.samples))
        g.token_advantages = [advantages[i, : lengths[i]] for i in rows]
        g.returns = [returns[i, : lengths[i]] for i in rows]
        at += len(g.samples)
    m = mask.to(values.dtype)
    return {"val/values_mean": float((values * m).sum() / m.sum().clamp(min=1))}


def ppo_loss(
    model: PolicyCritic, chunk: list[PPOGroup], pad_id: int, cfg: PPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy surrogate plus vf_coef × the clipped value loss on a minibatch of
    rollout groups, and their metrics under TRL's names.

    The value loss is back-propagated here, before the policy's forward pass, so the critic's
    and the policy's activations are never held at once (they train disjoint weights); the
    returned loss carries the value term as a constant, and its backward reaches the policy.
    """
    dev = model.device
    model.set_trainable()  # π_ref's disabled adapters (rollout, guard) left the critic frozen
    batch = collate([g.tokens for g in chunk], pad_id, cfg.max_length).to(dev)
    old_values, mask = _padded(_samples(chunk, "values"))
    returns, _ = _padded(_samples(chunk, "returns"))
    old_values, returns, mask = old_values.to(dev), returns.to(dev), mask.to(dev)
    values, _ = _padded(per_candidate(model.values(batch), batch))
    value, vm = ppo_value_loss(values, old_values, returns, mask, cfg.cliprange_value)
    (cfg.vf_coef * value).backward()
    del values
    flat, entropy = token_logps(model, batch, with_entropy=True)
    logps, _ = _padded(per_candidate(flat, batch))
    ent, _ = _padded(per_candidate(entropy, batch))
    old, _ = _padded(_samples(chunk, "old"))
    adv, _ = _padded(_samples(chunk, "token_advantages"))
    old, adv = old.to(dev), adv.to(dev)
    policy, pm = ppo_policy_loss(logps, old, adv, mask, cfg.epsilon)
    m = mask.to(ent.dtype)
    return policy + cfg.vf_coef * value.detach(), {
        "loss/policy_avg": policy.detach(),
        "loss/value_avg": value.detach(),
        "policy/clipfrac_avg": pm["clipfrac"],
        "policy/approxkl_avg": pm["approxkl"],
        "policy/entropy_avg": ((ent * m).sum() / m.sum().clamp(min=1)).detach(),
        "val/clipfrac_avg": vm["clipfrac"],
    }


def check_ppo(cfg: PPOConfig) -> None:
    """Refuse settings a PPO run cannot use, saying what to do."""
    if not cfg.online:
        raise PrefloopError("ppo always trains online; drop --no-online")
    parse_reward_specs(cfg.reward)
    for name, value in (
        ("k", cfg.k),
        ("prompts-per-step", cfg.prompts_per_step),
        ("max-new-tokens", cfg.max_new_tokens),
        ("ppo-epochs", cfg.ppo_epochs),
    ):
        if value < 1:
            raise PrefloopError(f"--{name} must be at least 1")
    if cfg.audit < 0:
        raise PrefloopError("--audit must be 0 or more")
    if cfg.audit and cfg.k < 2:
        raise PrefloopError(
            "--audit needs --k 2 or more: the annotators rank a prompt's samples against each other"
        )
    if cfg.target_kl is not None and cfg.target_kl <= 0:
        raise PrefloopError("--target-kl must be more than 0 (or none for a fixed β)")
    for name, value in (("gamma", cfg.gamma), ("lam", cfg.lam)):
        if not 0 <= value <= 1:
            raise PrefloopError(f"--{name} must be between 0 and 1")
    for name, value in (("epsilon", cfg.epsilon), ("cliprange-value", cfg.cliprange_value)):
        if value <= 0:
            raise PrefloopError(f"--{name} must be more than 0")
    for name, value in (("beta", cfg.beta), ("vf-coef", cfg.vf_coef)):
        if value < 0:
            raise PrefloopError(f"--{name} must be 0 or more")


def train_ppo(
    ws: storedb.Workspace,
    base: str,
    cfg: PPOConfig,
    out_dir: Path,
    *,
    run_id: int | None = None,
    init_adapter: Path | None = None,
    on_step: StepCallback | None = None,
    show_progress: bool = True,
    guard_prompts: list[list[int]] | None = None,
    checkpoint: Checkpointing | None = None,
) -> TrainResult:
    """Train a LoRA adapter with PPO against the run's reward and save it (the policy only) to
    out_dir; the critic is kept in the run's folder. Each step's samples and rewards are stored
    as a round of run_id; the run checkpoints to (and resumes from) `checkpoint` (the policy,
    the critic and its value head, the optimizer and β)."""
    from tuning.modeling import load_tokenizer

    check_ppo(cfg)
    terms = parse_reward_specs(cfg.reward)
    accelerator = setup(cfg)
    if accelerator.num_processes > 1:
        raise PrefloopError(
            "ppo runs in one process for now; start it with `prefloop tune`, not accelerate launch"
        )
    tokenizer = load_tokenizer(base)
    prompts = rollout_prompts(ws, tokenizer, cfg.prompts)
    critic_dir = ws.artifacts / "runs" / str(run_id) / CRITIC if run_id is not None else None
    model = ppo_model(base, cfg, init_adapter, critic_dir)
    model.to(accelerator.device)
    llm = _PolicyBaseJudge(model.lm, tokenizer) if any(t.kind == "llm" for t in terms) else None
    reward = load_reward(ws, terms, llm_judge=llm, base_model=model.lm)
    guard = make_guard(model, tokenizer, guard_prompts, cfg)
    model.set_trainable()  # the reward's adapter and the guard's π_ref samples reset the flags
    pad = tokenizer.pad_token_id
    state = {"beta": cfg.beta or (ADAPTIVE_START_BETA if cfg.target_kl else 0.0)}
    settings = {
        "run_id": run_id,
        "method": "ppo",
        "reward": list(cfg.reward),
        "k": cfg.k,
        "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
    }

    def rollout(policy: PolicyCritic, batch: list[RolloutPrompt], step: int):
        started = time.perf_counter()
        sampled = sample_groups(policy.lm, tokenizer, batch, cfg, seed=cfg.seed * 100_003 + step)
        groups = [PPOGroup(**vars(g)) for g in sampled]
        generated = time.perf_counter()
        term_means = score_groups(reward, groups, cfg.truncation_penalty)
        scored = time.perf_counter()
        fill_logprobs(policy.lm, groups, pad, cfg)
        fill_values(policy, groups, pad, cfg)
        critic = set_ppo_advantages(groups, state["beta"], cfg)
        metrics = {
            **rollout_metrics(groups, state["beta"]),
            **term_means,
            **critic,
            "time/generate_s": generated - started,
            "time/score_s": scored - generated,
        }
        if run_id is not None:
            store_step(ws, run_id, step, groups, settings, cfg.audit)
        return groups, metrics

    result = train(
        model,
        Method(
            name="ppo",
            groups=prompts,
            loss=lambda m, chunk: ppo_loss(m, chunk, pad, cfg),
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
