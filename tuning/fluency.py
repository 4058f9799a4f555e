"""Fluency measures of a version's answers: NLL per token under π_ref, broken answers, KL.

A preference win is only worth something if the answer is still language. These measures say
whether it is: an answer is *broken* when it is empty, degenerate repetition, or much less likely
under π_ref (per token) than π_ref's own answers to the same prompts.
"""

from __future__ import annotations

import re
import statistics
import unicodedata
from dataclasses import asdict, dataclass

# An answer whose NLL per token under π_ref exceeds the median of π_ref's own answers by more
# than this many nats is counted as broken.
BROKEN_MARGIN = 1.0
# The broken share above which a version is "won by breaking the model".
MAX_BROKEN_SHARE = 0.05

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def _symbol_line(line: str) -> bool:
    """A line of three or more characters that are all pictographs (emoji, dingbats), private or
    unassigned code points, or undecodable bytes (not rules such as "===" or "---")."""
    chars = [c for c in line if not c.isspace()]
    return len(chars) >= 3 and all(
        c == "\ufffd" or unicodedata.category(c) in ("So", "Co", "Cn", "Cs") for c in chars
    )


def degenerate(text: str, *, min_words: int = 12, max_repeat: int = 6) -> bool:
    """True for an empty answer, one that is mostly repetition, or one with a line of symbols.

    Repetition: the same word or punctuation mark `max_repeat` or more times in a row, or (for
    answers of at least `min_words` words) fewer than 40% of its word trigrams distinct. A line
    made only of symbols, emoji or undecodable bytes ("🍧☰🍧\ufffd") is the kind of garbage a
    tuned small model emits that π_ref's likelihood alone does not flag.
    """
    words = _WORD.findall(text.lower())
    if not words or any(_symbol_line(line) for line in text.splitlines()):
        return True
    run = 1
    for a, b in zip(words, words[1:], strict=False):
        run = run + 1 if a == b else 1
        if run >= max_repeat:
            return True
    if len(words) < min_words:
        return False
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    return len(set(trigrams)) / len(trigrams) < 0.4


def broken_flags(
    nll_per_token: list[float],
    texts: list[str],
    reference_nll_per_token: list[float],
    margin: float = BROKEN_MARGIN,
) -> list[bool]:
    """Which answers are broken: empty, degenerate, or with an NLL per token under π_ref more
    than `margin` nats above the median of π_ref's own answers (reference_nll_per_token)."""
    limit = statistics.median(reference_nll_per_token) + margin if reference_nll_per_token else None
    return [
        degenerate(t) or (limit is not None and nll > limit)
        for nll, t in zip(nll_per_token, texts, strict=True)
    ]


def demote(ranking: list[list[int]], broken: set[int]) -> list[list[int]]:
    """The ranking with every broken candidate placed below every fluent one (each side keeps
    its order; tiers emptied by the move are dropped)."""
    fluent = [[c for c in tier if c not in broken] for tier in ranking]
    demoted = [[c for c in tier if c in broken] for tier in ranking]
    return [tier for tier in fluent + demoted if tier]


def demotions(
    nll_per_token: list[list[float]],
    texts: list[list[str]],
    rankings: list[list[list[list[int]]]],
    reference_nll_per_token: list[float] | None,
) -> tuple[list[set[int]], dict[str, float]]:
    """Per group, the broken candidates to rank below its fluent ones: empty where none is
    ranked above a fluent one by any annotator, or where every candidate is broken. Answers are
    judged as `broken_flags` judges them, against π_ref's own answers (reference; None: the
    median of every candidate). Also the counts, as run metrics."""
    reference = reference_nll_per_token or [x for group in nll_per_token for x in group]
    out, n_broken = [], 0
    for nll, group_texts, group_rankings in zip(nll_per_token, texts, rankings, strict=True):
        flags = broken_flags(nll, group_texts, reference)
        bad = {i for i, f in enumerate(flags) if f}
        n_broken += len(bad)
        moves = 0 < len(bad) < len(flags) and any(demote(r, bad) != r for r in group_rankings)
        out.append(bad if moves else set())
    counts = {
        "data/broken_candidates": float(n_broken),
        "data/demoted_groups": float(sum(map(bool, out))),
    }
    return out, counts


@dataclass
class Fluency:
    """Fluency of a version's answers beside π_ref's own answers to the same prompts."""

    nll_per_token: float  # mean over answers, under π_ref
    nll_per_token_against: float
    fluency_drift: float  # the difference: how much less natural the version's answers are
    broken_share: float
    broken_share_against: float
    kl_per_token: float | None = None  # on the version's own samples, when measured

    def to_dict(self) -> dict:
        """Plain dict for storing."""
        return asdict(self)


def fluency(
    nll: list[float],
    texts: list[str],
    reference_nll: list[float],
    reference_texts: list[str],
    kl_per_token: float | None = None,
    margin: float = BROKEN_MARGIN,
) -> tuple[Fluency, list[bool], list[bool]]:
    """Fluency summary plus the broken flags of the version's and of π_ref's answers.

    nll / reference_nll: NLL per token under π_ref of each answer of the version / of π_ref.
    """
    mine = broken_flags(nll, texts, reference_nll, margin)
    theirs = broken_flags(reference_nll, reference_texts, reference_nll, margin)
    mean = statistics.fmean(nll) if nll else float("nan")
    mean_ref = statistics.fmean(reference_nll) if reference_nll else float("nan")
    summary = Fluency(
        nll_per_token=mean,
        nll_per_token_against=mean_ref,
        fluency_drift=mean - mean_ref,
        broken_share=sum(mine) / len(mine) if mine else 0.0,
        broken_share_against=sum(theirs) / len(theirs) if theirs else 0.0,
        kl_per_token=kl_per_token,
    )
    return summary, mine, theirs


def guarded_outcomes(
    outcomes: list[float], broken: list[bool], broken_against: list[bool]
) -> list[float]:
    """Judged outcomes (1 = the version wins) with broken answers counted as losing: a broken
    answer never wins; if both sides are broken the pair is a tie."""
    out = []
    for o, mine, theirs in zip(outcomes, broken, broken_against, strict=True):
        if mine and theirs:
            out.append(0.5)
        elif mine:
            out.append(0.0)
        elif theirs:
            out.append(1.0)
        else:
            out.append(o)
    return out


def won_by_breaking(broken_share: float, kl_per_token: float | None, kl_budget: float) -> bool:
    """True when a version's answers are too often broken or it drifted past its KL budget."""
    return broken_share > MAX_BROKEN_SHARE or (
        kl_per_token is not None and kl_per_token > kl_budget
    )
