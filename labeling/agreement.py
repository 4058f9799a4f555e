"""Agreement between annotators' rankings: pairwise agreement, Kendall's τ-b, Krippendorff's α,
per-annotator reports, disputed groups and majority pairs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from labeling.ranking import fractional_ranks

Ranking = list[list[Hashable]]
LEVELS = ("nominal", "ordinal", "interval")


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def _ordered_items(rankings: Sequence[Ranking]) -> list[Hashable]:
    """The items of the rankings, sorted when they can be, else in order of first appearance."""
    seen = list(dict.fromkeys(i for r in rankings for tier in r for i in tier))
    try:
        return sorted(seen)
    except TypeError:
        return seen


def _relations(a: Ranking, b: Ranking) -> list[tuple[int, int]]:
    """For each pair of items both rankings hold: the sign of their rank difference in a and b."""
    ra, rb = fractional_ranks(a), fractional_ranks(b)
    common = [i for i in _ordered_items([a]) if i in rb]
    return [(_sign(ra[x] - ra[y]), _sign(rb[x] - rb[y])) for x, y in combinations(common, 2)]


def _agreement_counts(a: Ranking, b: Ranking) -> tuple[int, int]:
    """(pairs ordered the same way, pairs compared) between two rankings."""
    rel = _relations(a, b)
    return sum(x == y for x, y in rel), len(rel)


def pairwise_agreement(a: Ranking, b: Ranking) -> float | None:
    """Share of the common item pairs that both rankings order the same way (tie = tie agrees)."""
    agree, total = _agreement_counts(a, b)
    return agree / total if total else None


def kendall_tau(a: Ranking, b: Ranking) -> float | None:
    """Kendall's τ-b between two rankings over their common items; None when undefined."""
    rel = _relations(a, b)
    concordant = sum(x * y > 0 for x, y in rel)
    discordant = sum(x * y < 0 for x, y in rel)
    untied_a = sum(x != 0 for x, _ in rel)
    untied_b = sum(y != 0 for _, y in rel)
    if untied_a == 0 or untied_b == 0:
        return None
    return (concordant - discordant) / math.sqrt(untied_a * untied_b)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def krippendorff_alpha(
    data: Sequence[Sequence[float | None]], level: str = "ordinal"
) -> float | None:
    """Krippendorff's α of a coders × units matrix (None/NaN = missing); None when undefined.

    Levels: "nominal", "interval", and "ordinal" with Krippendorff's rank-based metric computed
    from the value frequencies of the coincidence matrix. Units with fewer than two values are
    not pairable and are left out.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    n_units = max((len(row) for row in data), default=0)
    units = []
    for u in range(n_units):
        values = [row[u] for row in data if u < len(row) and not _missing(row[u])]
        if len(values) >= 2:
            units.append(values)
    if not units:
        return None
    values = sorted({v for unit in units for v in unit})
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))  # the coincidence matrix
    for unit in units:
        counts = np.zeros(len(values))
        for v in unit:
            counts[index[v]] += 1
        o += (np.outer(counts, counts) - np.diag(counts)) / (len(unit) - 1)
    n_v = o.sum(axis=1)
    n = n_v.sum()
    if level == "nominal":
        delta = 1.0 - np.eye(len(values))
    elif level == "interval":
        x = np.asarray(values, dtype=float)
        delta = (x[:, None] - x[None, :]) ** 2
    else:
        cum = np.concatenate([[0.0], np.cumsum(n_v)])  # cum[i] = n of the values below i
        lo = np.minimum.outer(np.arange(len(values)), np.arange(len(values)))
        hi = np.maximum.outer(np.arange(len(values)), np.arange(len(values)))
        between = cum[hi + 1] - cum[lo]  # n of values from the lower to the higher, inclusive
        delta = (between - (n_v[:, None] + n_v[None, :]) / 2) ** 2
    expected = float((np.outer(n_v, n_v) * delta).sum())
    if expected == 0:
        return None
    return 1.0 - (n - 1) * float((o * delta).sum()) / expected


def ranking_alpha(labels_by_group: Mapping[Hashable, Mapping[str, Ranking]]) -> float | None:
    """Ordinal Krippendorff's α over groups of rankings; None when no unit has two values.

    Each (group, candidate) is a unit, each annotator a coder, and the value is the candidate's
    fractional rank in that annotator's ranking of the group (1 = best, tied candidates share
    the mean of their places). The ordinal metric only uses the order of these values, so
    groups of different sizes can be pooled.
    """
    annotators = sorted({a for labels in labels_by_group.values() for a in labels})
    columns: list[dict[str, float]] = []
    for labels in labels_by_group.values():
        ranks = {a: fractional_ranks(r) for a, r in labels.items() if r is not None}
        for item in _ordered_items(list(r for r in labels.values() if r is not None)):
            columns.append({a: rk[item] for a, rk in ranks.items() if item in rk})
    data = [[col.get(a) for col in columns] for a in annotators]
    return krippendorff_alpha(data, "ordinal")


@dataclass
class AnnotatorStats:
    """One annotator's agreement with the others and with gold rankings."""

    annotator: str
    n_labels: int
    pairwise_agreement: float | None  # with the others, pair-weighted over shared groups
    kendall_tau: float | None  # mean τ-b against each other annotator over shared groups
    gold_accuracy: float | None  # pairwise agreement with the gold rankings, pair-weighted
    n_shared: int  # labelled groups that another annotator also labelled
    n_gold: int  # labelled groups that have a gold ranking
    median_seconds: float | None
    flagged: bool


def annotator_report(
    labels_by_group: Mapping[Hashable, Mapping[str, Ranking]],
    gold: Mapping[Hashable, Ranking] | None = None,
    *,
    min_agreement: float = 0.6,
    min_labels: int = 3,
    seconds_by_label: Mapping[tuple[Hashable, str], float] | None = None,
) -> list[AnnotatorStats]:
    """Per-annotator agreement statistics, sorted by annotator, low agreement flagged.

    An annotator with at least min_labels gold groups is flagged when gold accuracy is below
    min_agreement; otherwise, with at least min_labels shared groups, when agreement with the
    others is below it; with fewer comparable labels an annotator is never flagged.
    """
    gold = gold or {}
    seconds_by_label = seconds_by_label or {}
    annotators = sorted({a for labels in labels_by_group.values() for a in labels})
    out = []
    for me in annotators:
        agree = total = gold_agree = gold_total = n_labels = n_shared = n_gold = 0
        taus, seconds = [], []
        for group, labels in labels_by_group.items():
            mine = labels.get(me)
            if mine is None:
                continue
            n_labels += 1
            if (group, me) in seconds_by_label:
                seconds.append(seconds_by_label[(group, me)])
            others = [r for a, r in labels.items() if a != me and r is not None]
            n_shared += bool(others)
            for other in others:
                a, t = _agreement_counts(mine, other)
                agree, total = agree + a, total + t
                tau = kendall_tau(mine, other)
                if tau is not None:
                    taus.append(tau)
            if group in gold:
                n_gold += 1
                a, t = _agreement_counts(mine, gold[group])
                gold_agree, gold_total = gold_agree + a, gold_total + t
        peer = agree / total if total else None
        gold_acc = gold_agree / gold_total if gold_total else None
        if gold_acc is not None and n_gold >= min_labels:
            flagged = gold_acc < min_agreement
        elif peer is not None and n_shared >= min_labels:
            flagged = peer < min_agreement
        else:
            flagged = False
        out.append(
            AnnotatorStats(
                annotator=me,
                n_labels=n_labels,
                pairwise_agreement=peer,
                kendall_tau=sum(taus) / len(taus) if taus else None,
                gold_accuracy=gold_acc,
                n_shared=n_shared,
                n_gold=n_gold,
                median_seconds=statistics.median(seconds) if seconds else None,
                flagged=flagged,
            )
        )
    return out


def group_disagreement(rankings: Sequence[Ranking]) -> float:
    """1 − the mean pairwise agreement over pairs of annotators; 0 with fewer than two."""
    values = [pairwise_agreement(a, b) for a, b in combinations(rankings, 2)]
    values = [v for v in values if v is not None]
    return 1.0 - sum(values) / len(values) if values else 0.0


def disputes(
    labels_by_group: Mapping[Hashable, Mapping[str, Ranking]], threshold: float = 0.5
) -> list[tuple[Hashable, float]]:
    """Groups whose disagreement is at least threshold, as (group, disagreement), worst first."""
    scored = [
        (group, group_disagreement([r for r in labels.values() if r is not None]))
        for group, labels in labels_by_group.items()
    ]
    return sorted((s for s in scored if s[1] >= threshold), key=lambda s: -s[1])


def majority_pairs(rankings: Sequence[Ranking]) -> list[tuple[Hashable, Hashable]]:
    """(winner, loser) pairs that a strict majority of the annotators ranking both put that way."""
    ranks = [fractional_ranks(r) for r in rankings]
    out = []
    for x, y in combinations(_ordered_items(rankings), 2):
        both = [r for r in ranks if x in r and y in r]
        x_wins = sum(r[x] < r[y] for r in both)
        y_wins = sum(r[y] < r[x] for r in both)
        if 2 * x_wins > len(both):
            out.append((x, y))
        elif 2 * y_wins > len(both):
            out.append((y, x))
    return out
