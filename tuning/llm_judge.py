"""The LLM judge: a local causal LM asked which of two answers is better, in both orders."""

from __future__ import annotations

import torch

from labeling.judges import DEFAULT_RUBRIC
from tuning.modeling import prompt_ids


class LLMJudge:
    """A local causal LM asked which of two answers is better, in both orders."""

    def __init__(self, model, tokenizer, rubric: str = DEFAULT_RUBRIC, tie_margin: float = 0.05):
        self.model = model
        self.tokenizer = tokenizer
        self.rubric = rubric
        self.tie_margin = tie_margin
        self.choice_ids = [tokenizer(x, add_special_tokens=False)["input_ids"][0] for x in "AB"]

    def _messages(self, prompt: str, first: str, second: str) -> list[dict]:
        return [
            {"role": "system", "content": self.rubric},
            {
                "role": "user",
                "content": f"Request:\n{prompt}\n\nAnswer A:\n{first}\n\nAnswer B:\n{second}\n\n"
                "Which answer is better? Reply with the single letter A or B.",
            },
        ]

    def prob_first_better(self, items: list[tuple[str, str, str]]) -> list[float]:
        """P(first answer is better) for each (prompt, first, second), from the A/B logits."""
        out = []
        for start in range(0, len(items), 8):
            chunk = items[start : start + 8]
            ids = [prompt_ids(self.tokenizer, "", self._messages(*item)) for item in chunk]
            width = max(map(len, ids))
            pad = self.tokenizer.pad_token_id
            x = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros_like(x)
            for i, row in enumerate(ids):
                x[i, width - len(row) :] = torch.tensor(row)
                mask[i, width - len(row) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(
                    input_ids=x.to(self.model.device),
                    attention_mask=mask.to(self.model.device),
                    position_ids=pos.to(self.model.device),
                    logits_to_keep=1,
                ).logits[:, -1, self.choice_ids]
            out.extend(torch.softmax(logits.float(), -1)[:, 0].tolist())
        return out

    def judge_many(self, items: list[tuple[str, str, str]]) -> list[float]:
        """Outcomes for (prompt, a, b) items, averaging both presentation orders."""
        forward = self.prob_first_better(items)
        backward = self.prob_first_better([(p, b, a) for p, a, b in items])
        outcomes = []
        for f, r in zip(forward, backward, strict=True):
            p_a = (f + (1 - r)) / 2
            if abs(p_a - 0.5) <= self.tie_margin:
                outcomes.append(0.5)
            else:
                outcomes.append(1.0 if p_a > 0.5 else 0.0)
        return outcomes

    def __call__(self, prompt: str, a: str, b: str) -> float:
        return self.judge_many([(prompt, a, b)])[0]
