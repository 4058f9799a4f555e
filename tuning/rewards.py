"""Rewards of the online methods: weighted reward specs, parsed and loaded into one scorer.

A spec is `rm:VERSION` (a reward-model version), `llm` (the LLM judge: a sample's share of wins
against the other samples of its group), a registered judge's name, or `module:function` (a
scorer f(prompt, completion) -> float, or a pairwise judge f(prompt, a, b), scored like llm by
its share of wins). A spec may end in `*WEIGHT`; the reward is the weighted sum of the terms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from labeling.judges import judge_function, load_programmatic_judge, resolve_judge
from store import db as storedb
from store.errors import PrefloopError

LLM = "llm"
RM_PREFIX = "rm:"
SPEC_HELP = (
    "give rm:VERSION, llm, a registered judge's name or module:function, optionally weighted "
    "as SPEC*WEIGHT (e.g. --reward rm:v3 --reward mymod:brevity*0.2)"
)

# (prompts, completions) -> one score per completion
Scorer = Callable[[list[str], list[str]], list[float]]


@dataclass(frozen=True)
class RewardTerm:
    """One weighted term of the reward."""

    spec: str  # rm:VERSION, llm, a registered name or module:function
    weight: float = 1.0

    @property
    def kind(self) -> str:
        """rm, llm or function."""
        if self.spec.startswith(RM_PREFIX):
            return "rm"
        return LLM if self.spec == LLM else "function"


def parse_reward_spec(text: str) -> RewardTerm:
    """One `SPEC[*WEIGHT]` parsed; a bad spec or weight raises with what to write instead."""
    raw = (text or "").strip()
    spec, weight = raw, 1.0
    if "*" in raw:
        spec, _, number = raw.rpartition("*")
        spec = spec.strip()
        try:
            weight = float(number)
        except ValueError:
            raise PrefloopError(
                f"reward {raw!r}: the weight after '*' must be a number; {SPEC_HELP}"
            ) from None
        if not math.isfinite(weight):
            raise PrefloopError(f"reward {raw!r}: the weight must be a finite number")
    if not spec:
        raise PrefloopError(f"empty reward {raw!r}; {SPEC_HELP}")
    if spec.startswith(RM_PREFIX) and not spec[len(RM_PREFIX) :].strip():
        raise PrefloopError(
            f"reward {raw!r} names no reward-model version; write rm:VERSION (see "
            "`prefloop models list` for versions of kind reward)"
        )
    if any(c.isspace() for c in spec) or spec.count(":") > 1 and not spec.startswith(RM_PREFIX):
        raise PrefloopError(f"reward {raw!r} is not a reward spec; {SPEC_HELP}")
    return RewardTerm(spec, weight)


def parse_reward_specs(texts: list[str]) -> list[RewardTerm]:
    """Every `--reward` parsed; none at all raises."""
    if not texts:
        raise PrefloopError(f"online training needs a reward: {SPEC_HELP}")
    return [parse_reward_spec(t) for t in texts]


def win_shares(judge: Callable, prompt: str, texts: list[str]) -> list[float]:
    """Each text's mean outcome (1 win, ½ tie, 0 loss) against the group's other texts."""
    k = len(texts)
    if k < 2:
        return [0.5] * k
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    many = getattr(judge, "judge_many", None)
    items = [(prompt, texts[i], texts[j]) for i, j in pairs]
    outcomes = many(items) if many else [judge(*item) for item in items]
    wins = [0.0] * k
    for (i, j), o in zip(pairs, outcomes, strict=True):
        wins[i] += o
        wins[j] += 1 - o
    return [w / (k - 1) for w in wins]


class Reward:
    """The weighted reward of a run: scores a batch of groups, term by term."""

    def __init__(self, terms: list[RewardTerm], loaded: list[tuple[str, object]]) -> None:
        self.terms = terms
        self._loaded = loaded  # per term: ("scorer", Scorer) or ("pairwise", judge)

    def term_scores(self, prompts: list[str], groups: list[list[str]]) -> list[list[list[float]]]:
        """Per term, per group, each completion's score (unweighted)."""
        out = []
        for kind, fn in self._loaded:
            if kind == "scorer":
                flat_p = [p for p, g in zip(prompts, groups, strict=True) for _ in g]
                flat = [float(s) for s in fn(flat_p, [t for g in groups for t in g])]
                scores, at = [], 0
                for g in groups:
                    scores.append(flat[at : at + len(g)])
                    at += len(g)
            else:
                scores = [win_shares(fn, p, g) for p, g in zip(prompts, groups, strict=True)]
            for group in scores:
                if not all(math.isfinite(s) for s in group):
                    raise PrefloopError("a reward returned a value that is not a finite number")
            out.append(scores)
        return out

    def combine(self, per_term: list[list[list[float]]]) -> list[list[float]]:
        """The weighted sum of the terms' scores, per group and completion."""
        groups = per_term[0]
        return [
            [
                sum(t.weight * per_term[n][g][c] for n, t in enumerate(self.terms))
                for c in range(len(groups[g]))
            ]
            for g in range(len(groups))
        ]


def _programmatic(ws: storedb.Workspace, spec: str) -> tuple[str, object]:
    spec = resolve_judge(ws, spec)
    func, kind = judge_function(spec)
    if kind == "pairwise":
        return "pairwise", load_programmatic_judge(spec)
    return "scorer", lambda prompts, texts: [
        float(func(p, t)) for p, t in zip(prompts, texts, strict=True)
    ]


def _reward_model(ws: storedb.Workspace, version: str, base_model=None) -> tuple[str, object]:
    try:
        from tuning.reward_model import load_scorer
    except ImportError:
        raise PrefloopError(
            "this prefloop has no reward models yet (tuning.reward_model is missing); use llm "
            "or module:function"
        ) from None
    return "scorer", load_scorer(ws, version, base_model=base_model)


def load_reward(
    ws: storedb.Workspace, terms: list[RewardTerm], llm_judge=None, base_model=None
) -> Reward:
    """The Reward the terms describe, every judge loaded (llm_judge: the LLM judge to use,
    e.g. one on the policy's own base weights; None loads the default model). base_model: a
    loaded model (a policy's PeftModel, say) the first rm: term adds its adapter to, sharing
    its weights; None loads the base for it."""
    loaded: list[tuple[str, object]] = []
    for term in terms:
        if term.kind == "rm":
            # one reward adapter per shared model (it is added under one name); others load
            loaded.append(_reward_model(ws, term.spec[len(RM_PREFIX) :], base_model))
            base_model = None
        elif term.kind == LLM:
            if llm_judge is None:
                from tuning.llm_judge import LLMJudge
                from tuning.modeling import load_base, load_tokenizer
                from tuning.models_cache import DEFAULT_MODEL

                llm_judge = LLMJudge(load_base(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL))
            loaded.append(("pairwise", llm_judge))
        else:
            loaded.append(_programmatic(ws, term.spec))
    return Reward(terms, loaded)
