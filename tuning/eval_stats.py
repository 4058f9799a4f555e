"""Statistics behind evaluation: win-rates with Wilson intervals, calibration, diversity."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class WinRate:
    """Wins, losses and ties of A against B; ties count half."""

    wins: int
    losses: int
    ties: int
    win_rate: float
    low: float
    high: float

    def to_dict(self) -> dict:
        """Plain dict for storing."""
        return asdict(self)


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a proportion (95% by default)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(outcomes: list[float]) -> WinRate:
    """Summarise judged outcomes (1 = A wins, 0 = B wins, 0.5 = tie)."""
    wins = sum(1 for o in outcomes if o > 0.5)
    losses = sum(1 for o in outcomes if o < 0.5)
    ties = len(outcomes) - wins - losses
    score = wins + 0.5 * ties
    n = len(outcomes)
    low, high = wilson_interval(score, n)
    return WinRate(wins, losses, ties, score / n if n else float("nan"), low, high)


def reliability_curve(
    predicted: list[float], observed: list[float], bins: int = 10
) -> list[dict[str, float]]:
    """Per probability bin: count, mean predicted probability, mean observed frequency."""
    rows = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, p in enumerate(predicted) if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if idx:
            rows.append(
                {
                    "bin_low": lo,
                    "bin_high": hi,
                    "count": len(idx),
                    "predicted": sum(predicted[i] for i in idx) / len(idx),
                    "observed": sum(observed[i] for i in idx) / len(idx),
                }
            )
    return rows


def expected_calibration_error(
    predicted: list[float], observed: list[float], bins: int = 10
) -> float:
    """ECE: bin-weighted mean |predicted - observed|."""
    n = len(predicted)
    if n == 0:
        return float("nan")
    curve = reliability_curve(predicted, observed, bins)
    return sum(r["count"] / n * abs(r["predicted"] - r["observed"]) for r in curve)


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Distinct n-grams over all n-grams of whitespace tokens (1.0 = no repetition)."""
    total, seen = 0, set()
    for text in texts:
        words = text.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def guarded_summary(outcomes: list[float]) -> dict:
    """win_rate of guarded outcomes as a dict with every key prefixed by 'guarded_'."""
    return {f"guarded_{k}": v for k, v in win_rate(outcomes).to_dict().items()}
