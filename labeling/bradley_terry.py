"""Bradley–Terry strengths from weighted pairwise comparisons, and BT preferences and gains for a
group ranked by several annotators."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from itertools import combinations

import numpy as np

Ranking = list[list[Hashable]]


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return np.exp(_log_sigmoid(x))


def fit_bradley_terry(
    items: Sequence[Hashable],
    comparisons: Sequence[tuple[Hashable, Hashable, float]],
    prior: float = 1.0,
    *,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> dict[Hashable, float]:
    """Log-strengths s (mean zero) maximising Σ w·log σ(s_winner − s_loser) plus the prior.

    comparisons are (winner, loser, weight); pass a tie as (a, b, 0.5) and (b, a, 0.5). The
    prior gives every item `prior` virtual wins and as many virtual losses against a pseudo item
    of strength 0, so an undefeated item keeps a finite score. With prior=0 this is the plain
    maximum-likelihood fit, finite only when every item has both won and lost on a connected
    comparison graph; otherwise scores grow until max_iter.
    """
    items = list(items)
    index = {item: i for i, item in enumerate(items)}
    n = len(items)
    if n == 0:
        return {}
    wins = np.zeros((n, n))  # wins[i, j] = total weight of i beating j
    for winner, loser, weight in comparisons:
        if winner != loser:
            wins[index[winner], index[loser]] += weight
    games = wins + wins.T

    def objective(s: np.ndarray) -> float:
        diff = s[:, None] - s[None, :]
        return float((wins * _log_sigmoid(diff)).sum()) + prior * float(
            (_log_sigmoid(s) + _log_sigmoid(-s)).sum()
        )

    s = np.zeros(n)
    value = objective(s)
    for _ in range(max_iter):
        p = _sigmoid(s[:, None] - s[None, :])  # p[i, j] = P(i beats j)
        q = _sigmoid(s)
        grad = (wins * p.T).sum(axis=1) - (wins.T * p).sum(axis=1) + prior * (1 - 2 * q)
        h = games * p * p.T
        hessian = np.diag(h.sum(axis=1) + prior * 2 * q * (1 - q)) - h
        if prior == 0:  # the likelihood ignores a common shift: pin the mean instead
            hessian += 1.0 / n
        step = np.linalg.lstsq(hessian, grad, rcond=None)[0]
        rate = 1.0
        while rate > 1e-6:  # backtrack until the objective does not get worse
            candidate = s + rate * step
            new_value = objective(candidate)
            if new_value >= value - 1e-12:
                break
            rate /= 2
        else:
            break
        s, value = candidate, new_value
        if np.abs(rate * step).max() < tol:
            break
    s -= s.mean()
    return {item: float(s[i]) for i, item in enumerate(items)}


def ranking_comparisons(rankings: Sequence[Ranking]) -> list[tuple[Hashable, Hashable, float]]:
    """(winner, loser, weight) comparisons of every ranking: 1 per ordered pair, 0.5 each way
    per tied pair."""
    out = []
    for ranking in rankings:
        for i, tier in enumerate(ranking):
            for a, b in combinations(tier, 2):
                out += [(a, b, 0.5), (b, a, 0.5)]
            for lower in ranking[i + 1 :]:
                out += [(a, b, 1.0) for a in tier for b in lower]
    return out


def _group_scores(
    rankings: Sequence[Ranking], items: Sequence[Hashable], prior: float
) -> dict[Hashable, float]:
    return fit_bradley_terry(items, ranking_comparisons(rankings), prior)


def bt_preferences(
    rankings: Sequence[Ranking], prior: float = 1.0, *, all_pairs: bool = False
) -> dict[tuple[Hashable, Hashable], float]:
    """Fitted P(a beats b) = σ(s_a − s_b) over one group's rankings, keyed (a, b).

    Like labeling.ranking.pair_preferences, only pairs with p > 0.5 are returned (so each
    unordered pair appears once, oriented winner first), unless all_pairs asks for every
    ordered pair.
    """
    items = sorted({i for r in rankings for tier in r for i in tier})
    scores = _group_scores(rankings, items, prior)
    out = {}
    for a in items:
        for b in items:
            if a == b:
                continue
            p = float(_sigmoid(np.array(scores[a] - scores[b])))
            if all_pairs or p > 0.5 + 1e-9:
                out[(a, b)] = p
    return out


def bt_gains(rankings: Sequence[Ranking], k: int, prior: float = 1.0) -> list[float]:
    """Gain in [0, 1] per candidate position 0..k-1: its mean fitted BT probability of beating
    each other candidate of the group (0.5 for all when every ranking ties everything)."""
    if k == 1:
        return [0.5]
    scores = _group_scores(rankings, list(range(k)), prior)
    s = np.array([scores[i] for i in range(k)])
    p = _sigmoid(s[:, None] - s[None, :])
    return [float((p[i].sum() - 0.5) / (k - 1)) for i in range(k)]
