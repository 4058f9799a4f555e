"""Rankings: tiers of candidates, fractional ranks, consensus across annotators, pairs."""

from __future__ import annotations

import math


def fractional_ranks(ranking: list[list[int]]) -> dict[int, float]:
    """1-based rank of each item; tied items share the mean of the places they fill."""
    ranks, place = {}, 1
    for tier in ranking:
        mean = place + (len(tier) - 1) / 2
        for item in tier:
            ranks[item] = mean
        place += len(tier)
    return ranks


def tiers_from_scores(scores: dict[int, float]) -> list[list[int]]:
    """Tiers ordered by ascending score (lower is better); equal scores tie."""
    tiers: list[list[int]] = []
    last = None
    for item, score in sorted(scores.items(), key=lambda kv: (kv[1], kv[0])):
        if last is not None and abs(score - last) < 1e-9:
            tiers[-1].append(item)
        else:
            tiers.append([item])
        last = score
    return tiers


def consensus(
    rankings: list[list[list[int]]], weights: list[float] | None = None
) -> list[list[int]]:
    """One ranking from several by mean fractional rank (a Borda count), optionally a weighted
    mean (one weight per ranking; rankings of weight 0 do not count)."""
    weights = [1.0] * len(rankings) if weights is None else weights
    counted = [(r, w) for r, w in zip(rankings, weights, strict=True) if w > 0]
    total = sum(w for _, w in counted)
    totals: dict[int, float] = {}
    for ranking, weight in counted:
        for item, rank in fractional_ranks(ranking).items():
            totals[item] = totals.get(item, 0.0) + weight * rank / total
    return tiers_from_scores(totals)


def tiers_to_ranks(ranking: list[list[int]], n: int) -> list[int]:
    """Dense 1-based ranks per index from tiers (tied indices share a rank)."""
    ranks = [0] * n
    for place, tier in enumerate(ranking, start=1):
        for item in tier:
            ranks[item] = place
    return ranks


def ordered_pairs(ranking: list[list[int]]) -> list[tuple[int, int]]:
    """(better, worse) pairs that a tiered ranking strictly orders."""
    return [
        (a, b)
        for i, upper in enumerate(ranking)
        for lower in ranking[i + 1 :]
        for a in upper
        for b in lower
    ]


def usable_rankings(
    candidate_ids: list[int], labels: list[tuple[list[list[int]] | None, list[str]]]
) -> list[list[list[int]]]:
    """Each annotator's ranking in candidate positions, skipped and unranked labels left out."""
    position = {cid: i for i, cid in enumerate(candidate_ids)}
    return [
        [[position[c] for c in tier] for tier in ranking]
        for ranking, flags in labels
        if ranking is not None and "skipped" not in flags
    ]


def group_training_ranking(
    candidate_ids: list[int], labels: list[tuple[list[list[int]] | None, list[str]]]
) -> list[list[int]] | None:
    """Consensus ranking (tiers of candidate positions) of a group; None without a usable label.

    An all-tied consensus is kept: DPO forms no pair from it, GRPO counts it as a zero-spread
    group.

    Groups flagged all_bad by any annotator are left out; skipped labels are ignored.
    """
    if any("all_bad" in flags for _, flags in labels):
        return None
    result = consensus(usable_rankings(candidate_ids, labels))
    return result or None


GAIN_SCHEDULES = ("linear", "dcg")


def place_gains(schedule: str, k: int) -> list[float]:
    """Gain of each place 1..k: linear (1 → 0), dcg (1/log2(place+1)) or explicit "1,0.6,0.3,0"."""
    if schedule == "linear":
        return [1.0 - i / (k - 1) if k > 1 else 1.0 for i in range(k)]
    if schedule == "dcg":
        return [1.0 / math.log2(i + 2) for i in range(k)]
    try:
        values = [float(v) for v in schedule.split(",")]
    except ValueError:
        raise ValueError(
            f"unknown gain schedule {schedule!r}: use linear, dcg or {k} numbers like 1,0.6,0.3,0"
        ) from None
    if len(values) != k:
        raise ValueError(f"gain schedule {schedule!r} has {len(values)} values; groups have {k}")
    return values


def ranking_gains(ranking: list[list[int]], k: int, schedule: str = "linear") -> list[float]:
    """Gain per candidate position; tied candidates share the mean of their places' gains."""
    table = place_gains(schedule, k)
    gains = [0.0] * k
    place = 0
    for tier in ranking:
        mean = sum(table[place : place + len(tier)]) / len(tier)
        for item in tier:
            gains[item] = mean
        place += len(tier)
    return gains


def mean_gains(rankings: list[list[list[int]]], k: int, schedule: str = "linear") -> list[float]:
    """Gains averaged over several annotators' rankings of one group."""
    per = [ranking_gains(r, k, schedule) for r in rankings]
    return [sum(col) / len(per) for col in zip(*per, strict=True)]


def pair_preferences(rankings: list[list[list[int]]]) -> dict[tuple[int, int], float]:
    """Empirical P(a beats b) over annotators (a tie counts half), for pairs with p > 0.5."""
    items = sorted({i for r in rankings for tier in r for i in tier})
    out = {}
    for a in items:
        for b in items:
            if a == b:
                continue
            score = 0.0
            for r in rankings:
                ranks = fractional_ranks(r)
                score += 1.0 if ranks[a] < ranks[b] else 0.5 if ranks[a] == ranks[b] else 0.0
            p = score / len(rankings)
            if p > 0.5:
                out[(a, b)] = p
    return out
