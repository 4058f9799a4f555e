"""Judges that compare two completions of one prompt: programmatic functions or a local LLM."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from store.errors import PrefloopError

# (prompt, completion_a, completion_b) -> 1.0 if a is better, 0.0 if b is, 0.5 for a tie
Judge = Callable[[str, str, str], float]

DEFAULT_RUBRIC = (
    "You compare two answers to the same request. Prefer the answer that is helpful, correct, "
    "clear and concise, and that follows the request. Ignore which answer comes first."
)


def _outcome(value: object) -> float:
    if isinstance(value, str):
        table = {"a": 1.0, "b": 0.0, "tie": 0.5}
        if value.lower() not in table:
            raise PrefloopError(f"a pairwise judge returned {value!r}; return 'a', 'b' or 'tie'")
        return table[value.lower()]
    v = float(value)
    return 1.0 if v > 0.5 else 0.0 if v < 0.5 else 0.5


def load_programmatic_judge(spec: str) -> Judge:
    """A judge from "module:function".

    The function is either a scorer f(prompt, completion) -> float (higher is better) or a
    pairwise judge f(prompt, a, b) -> 'a' | 'b' | 'tie' (or 1 / 0 / 0.5).
    """
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise PrefloopError(f"judge {spec!r} is not of the form module:function")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise PrefloopError(f"cannot load judge {spec!r}: {exc}") from exc
    n_params = len(inspect.signature(func).parameters)
    if n_params == 2:

        def judge(prompt: str, a: str, b: str) -> float:
            sa, sb = float(func(prompt, a)), float(func(prompt, b))
            return 1.0 if sa > sb else 0.0 if sa < sb else 0.5

        return judge
    if n_params == 3:
        return lambda prompt, a, b: _outcome(func(prompt, a, b))
    raise PrefloopError(
        f"judge {spec!r} takes {n_params} arguments; write f(prompt, completion) -> score "
        "or f(prompt, a, b) -> 'a' | 'b' | 'tie'"
    )


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
        import torch

        from tuning.modeling import prompt_ids

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
