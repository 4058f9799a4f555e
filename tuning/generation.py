"""Generating K completions per prompt: a small interface and its transformers implementation."""

from __future__ import annotations

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
    """Sampling with `transformers.generate`: a batch of prompts, k sequences each."""

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
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        device = self.model.device
        torch.manual_seed(seed)
        sampling = temperature > 0
        out = self.model.generate(
            # each prompt repeated k times (greedy decoding refuses num_return_sequences > 1)
            input_ids=ids.repeat_interleave(k, 0).to(device),
            attention_mask=mask.repeat_interleave(k, 0).to(device),
            do_sample=sampling,
            temperature=temperature if sampling else None,
            top_p=top_p if sampling else None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.stop_ids,
            pad_token_id=pad,
            return_dict_in_generate=True,
            output_logits=True,
        )
        new = out.sequences[:, width:]
        # raw logits, so log-probs are at temperature 1 whatever the sampling settings were;
        # gathered step by step so no second (rows, steps, vocab) tensor is ever made
        token_logps = torch.stack(
            [
                F.log_softmax(step.float(), -1).gather(-1, new[:, t, None]).squeeze(-1)
                for t, step in enumerate(out.logits)
            ],
            1,
        ).cpu()
        del out
        new = new.cpu()
        results: list[list[Sample]] = []
        for row in range(new.shape[0]):
            tokens = new[row].tolist()
            stop_at = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
            # a finished row is padded after its stop token; count up to and including it
            n = len(tokens) if stop_at is None else stop_at + 1
            body = tokens[: stop_at if stop_at is not None else n]
            sample = Sample(
                text=self.tokenizer.decode(body, skip_special_tokens=True).strip(),
                n_tokens=n,
                finish_reason="eos" if stop_at is not None else "length",
                logprob=float(token_logps[row, :n].sum()),
                token_ids=tokens[:n],
            )
            if row % k == 0:
                results.append([])
            results[-1].append(sample)
        return results
