"""Generating K completions per prompt: a small interface and its transformers implementation."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class Sample:
    """One generated completion."""

    text: str
    n_tokens: int
    finish_reason: str  # "eos" or "length"
    logprob: float  # summed log-probability under the sampling model at temperature 1
    token_ids: list[int] = field(default_factory=list)  # generated ids, stop token included
    token_logps: list[float] = field(default_factory=list)  # each one's log-prob, temperature 1


class Generator(Protocol):
    """Anything that samples k completions for each of a batch of tokenised prompts."""

    def generate(
        self,
        prompts: list[list[int]],
        k: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[list[Sample]]: ...


class HFGenerator:
    """Sampling on a transformers model with its KV cache, in one loop written for the task.

    Each prompt is prefilled once and its cache shared by its k samples; only the last
    position's logits are computed; each sampled token's log-probability (temperature 1) is
    gathered as it is drawn; a row leaves the batch, cache included, as soon as it stops.
    """

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        stop = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            stop.add(gen_eos)
        elif gen_eos:
            stop.update(gen_eos)
        self.stop_ids = sorted(i for i in stop if i is not None)
        # transformers 5.x renamed the forward's `past_key_values` to `cache`
        from transformers import PreTrainedModel

        inner = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), model)
        params = inspect.signature(type(inner).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        k: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[list[Sample]]:
        """Sample k completions per prompt; reproducible for the same inputs and seed."""
        from transformers import DynamicCache

        device = self.model.device
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        rng = torch.Generator(device=device).manual_seed(seed)
        stops = torch.tensor(self.stop_ids, dtype=torch.long, device=device)

        # prefill: each prompt once, then its cache and last logits repeated for its k samples
        cache = DynamicCache()
        step = {"use_cache": True, "logits_to_keep": 1, self._cache_arg: cache}
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            **step,
        )  # fmt: skip
        cache.batch_repeat_interleave(k)
        logits = out.logits[:, -1].repeat_interleave(k, 0)
        mask = mask.repeat_interleave(k, 0)
        rows = len(prompts) * k
        tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long, device=device)
        logps = torch.zeros((rows, max_new_tokens), device=device)
        lengths = torch.full((rows,), max_new_tokens, dtype=torch.long, device=device)
        alive = torch.arange(rows, device=device)  # original row of each row still sampling

        # decode: one token for every live row per step
        for t in range(max_new_tokens):
            logprobs = F.log_softmax(logits.float(), -1)
            nxt = _draw(logprobs, logits, temperature, top_p, rng)
            tokens[alive, t] = nxt
            logps[alive, t] = logprobs.gather(-1, nxt[:, None]).squeeze(-1)
            done = torch.isin(nxt, stops)
            if done.any():
                lengths[alive[done]] = t + 1
                keep = (~done).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                alive, nxt, mask = alive[keep], nxt[keep], mask[keep]
                cache.batch_select_indices(keep)
            if t + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], 1)
            out = self.model(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=mask.sum(-1, keepdim=True) - 1,
                **step,
            )
            logits = out.logits[:, -1]
        del cache, out, step
        return self._samples(tokens.cpu(), logps.cpu(), lengths.cpu(), k)

    def _samples(
        self, tokens: torch.Tensor, logps: torch.Tensor, lengths: torch.Tensor, k: int
    ) -> list[list[Sample]]:
        """Per prompt, its k samples: text without the stop token, counts with it."""
        results: list[list[Sample]] = []
        for row in range(tokens.shape[0]):
            n = int(lengths[row])
            ids = tokens[row, :n].tolist()
            stopped = ids[-1] in self.stop_ids
            sample = Sample(
                text=self.tokenizer.decode(
                    ids[:-1] if stopped else ids, skip_special_tokens=True
                ).strip(),
                n_tokens=n,
                finish_reason="eos" if stopped else "length",
                logprob=float(logps[row, :n].sum()),
                token_ids=ids,
                token_logps=logps[row, :n].tolist(),
            )
            if row % k == 0:
                results.append([])
            results[-1].append(sample)
        return results


def _draw(
    logprobs: torch.Tensor,
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    rng: torch.Generator,
) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else from the tempered nucleus."""
    if temperature <= 0:
        return logprobs.argmax(-1)
    probs = F.softmax(logits.float() / temperature, -1)
    ids = None
    if top_p < 1:
        probs, ids = _nucleus(probs, top_p)
    # inverse CDF: torch.multinomial over a whole vocabulary costs ~40x more on a CPU
    cdf = probs.cumsum(-1)
    u = torch.rand((len(cdf), 1), generator=rng, device=cdf.device) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
    return pick if ids is None else ids.gather(-1, pick[:, None]).squeeze(-1)


def _nucleus(probs: torch.Tensor, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The smallest most-likely set per row holding top_p of the mass: (its probabilities,
    zero outside the set; its token ids)."""
    # the nucleus is a prefix of the sorted vocabulary: look in the top few first, since a
    # full sort of every row per token is most of the cost of sampling on a CPU
    for width in (64, 1024, probs.shape[-1]):
        vals, ids = probs.topk(min(width, probs.shape[-1]), -1)
        if bool((vals.sum(-1) >= top_p).all()):
            break
    # drop a token when the more likely ones already reach top_p (the first always stays)
    return vals.masked_fill(vals.cumsum(-1) - vals >= top_p, 0.0), ids
