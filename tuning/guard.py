"""The fluency guard of a training run: sample held-out prompts from the policy and measure its
KL per token to π_ref and its share of broken answers, against π_ref's own answers."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tuning.batching import GroupTokens, collate, sequence_logps
from tuning.fluency import MAX_BROKEN_SHARE, broken_flags
from tuning.generation import HFGenerator, Sample

GUARD_TEMPERATURE = 0.7  # as `prefloop eval` samples, so the figures compare
GUARD_TOP_P = 0.95


@dataclass
class GuardReport:
    """What one guard measurement saw."""

    kl_per_token: float
    broken_share: float
    nll_per_token: float  # mean NLL per token under π_ref of the policy's answers
    nll_per_token_ref: float  # ... and of π_ref's own answers
    broken_share_ref: float  # π_ref's own answers judged the same way
    max_broken_share: float  # 5%, or π_ref's own broken share where that is higher
    answers: int
    within: bool  # KL within the budget and broken share at most max_broken_share
    examples: list[str]

    def metrics(self, prefix: str) -> dict[str, float]:
        """The report as run metrics named prefix/…"""
        keys = ("kl_per_token", "broken_share", "nll_per_token", "nll_per_token_ref")
        keys += ("broken_share_ref",)
        return {f"{prefix}/{k}": float(getattr(self, k)) for k in keys}

    def to_dict(self) -> dict:
        """Plain dict for storing."""
        return asdict(self)


class Guard:
    """Samples `samples` answers to each of a fixed set of held-out prompts (same seed each time)
    and judges them."""

    def __init__(
        self,
        model,
        tokenizer,
        prompts: list[list[int]],
        *,
        kl_budget: float,
        max_new_tokens: int,
        max_length: int,
        samples: int,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.samples = samples
        self.prompts = prompts
        self.kl_budget = kl_budget
        self.max_new_tokens = max_new_tokens
        self.max_length = max_length
        self.seed = seed
        with model.disable_adapter():
            ref_samples = self._sample(model, prompts)
            ref_logps = self._logps(model, prompts, ref_samples)
        flat = _flat(ref_samples)
        self.ref_nll = [-lp / max(s.n_tokens, 1) for lp, s in zip(ref_logps, flat, strict=True)]
        self.ref_broken = broken_flags(self.ref_nll, [s.text for s in flat], self.ref_nll)

    @torch.no_grad()
    def _sample(self, model, prompts: list[list[int]]) -> list[list[Sample]]:
        was_training = model.training
        model.eval()
        gen = HFGenerator(model, self.tokenizer)
        out: list[list[Sample]] = []
        for i in range(0, len(prompts), 8):
            out += gen.generate(
                prompts[i : i + 8],
                self.samples,
                max_new_tokens=self.max_new_tokens,
                temperature=GUARD_TEMPERATURE,
                top_p=GUARD_TOP_P,
                seed=self.seed * 7919 + i,
            )
        model.train(was_training)
        return out

    @torch.no_grad()
    def _logps(self, model, prompts: list[list[int]], samples: list[list[Sample]]) -> list[float]:
        """Summed log-probs of every sampled answer under `model` as it is now."""
        out: list[float] = []
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(prompts), 4):
            tokens = [
                GroupTokens(p, [s.token_ids or [pad] for s in group])
                for p, group in zip(prompts[i : i + 4], samples[i : i + 4], strict=True)
            ]
            batch = collate(tokens, pad, self.max_length).to(model.device)
            out += sequence_logps(model, batch).cpu().tolist()
        return out

    def measure(self, model, n_prompts: int | None = None) -> GuardReport:
        """Sample the first n_prompts prompts from the policy and judge the answers."""
        prompts = self.prompts[: n_prompts or len(self.prompts)]
        samples = self._sample(model, prompts)
        flat = _flat(samples)
        policy = [s.logprob for s in flat]
        was_training = model.training
        model.eval()
        with model.disable_adapter():
            ref = self._logps(model, prompts, samples)
        model.train(was_training)
        tokens = sum(s.n_tokens for s in flat)
        kl = sum(p - r for p, r in zip(policy, ref, strict=True)) / max(tokens, 1)
        nll = [-r / max(s.n_tokens, 1) for r, s in zip(ref, flat, strict=True)]
        texts = [s.text for s in flat]
        broken = broken_flags(nll, texts, self.ref_nll)
        share = sum(broken) / len(broken)
        ref_broken = self.ref_broken[: len(flat)]  # π_ref's answers to the same prompts
        ref_share = sum(ref_broken) / len(ref_broken)
        # the broken share allowed: 5%, or π_ref's own where π_ref itself is worse than that
        allowed = max(MAX_BROKEN_SHARE, ref_share)
        return GuardReport(
            kl_per_token=kl,
            broken_share=share,
            nll_per_token=sum(nll) / len(nll),
            nll_per_token_ref=sum(self.ref_nll) / len(self.ref_nll),
            broken_share_ref=ref_share,
            max_broken_share=allowed,
            answers=len(flat),
            within=kl <= self.kl_budget and share <= allowed,
            examples=texts[:: self.samples][:4],
        )


def _flat(samples: list[list[Sample]]) -> list[Sample]:
    return [s for group in samples for s in group]
