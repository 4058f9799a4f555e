"""A round's team view: agreement per annotator, Krippendorff's α, disputes, adjudication."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from labeling import agreement, bias_audit
from store import adjudications, gold, labels, rounds
from store import db as storedb

MIN_AGREEMENT = 0.6  # annotators below this (on gold, else with peers) are flagged
DISPUTE_THRESHOLD = 0.5  # groups whose annotators disagree on at least half the pairs


@dataclass
class TeamReport:
    """Agreement figures of some rounds."""

    alpha: float | None  # Krippendorff's α (ordinal) over every annotator and group
    mean_agreement: float | None  # mean pairwise agreement over groups with 2+ annotators
    groups_with_overlap: int
    annotators: pd.DataFrame  # one row per annotator (see agreement.AnnotatorStats)
    disputes: pd.DataFrame  # group_id, disagreement, n_labels, adjudicated
    rankings: dict[int, dict[str, list[list[int]]]] = field(default_factory=dict)


def rankings_by_group(df: pd.DataFrame) -> dict[int, dict[str, list[list[int]]]]:
    """group id -> annotator -> ranking, from labels; skipped and all-bad labels left out."""
    out: dict[int, dict[str, list[list[int]]]] = {}
    for row in df.itertuples():
        if row.ranking is None or set(row.flags) & {"skipped", "all_bad"}:
            continue
        out.setdefault(int(row.group_id), {})[row.annotator] = row.ranking
    return out


def _seconds(df: pd.DataFrame) -> dict[tuple[int, str], float]:
    if "seconds" not in df:
        return {}
    return {
        (int(r.group_id), r.annotator): float(r.seconds)
        for r in df.itertuples()
        if r.seconds is not None and not math.isnan(r.seconds)
    }


def team_report(
    ws: storedb.Workspace,
    round_ids: list[int] | None = None,
    *,
    min_agreement: float = MIN_AGREEMENT,
    dispute_threshold: float = DISPUTE_THRESHOLD,
) -> TeamReport:
    """Agreement per annotator (peers, gold, Kendall τ, median time), α, and disputed groups."""
    with storedb.connect(ws) as con:
        df = labels.labels(con, round_ids=round_ids)
        golden = gold.gold(con, round_ids=round_ids)
        decided = adjudications.adjudications(con)
    by_group = rankings_by_group(df)
    stats = agreement.annotator_report(
        by_group, golden, min_agreement=min_agreement, seconds_by_label=_seconds(df)
    )
    per_group = [
        1 - agreement.group_disagreement(list(r.values())) for r in by_group.values() if len(r) > 1
    ]
    disputed = agreement.disputes(by_group, dispute_threshold)
    return TeamReport(
        alpha=agreement.ranking_alpha(by_group),
        mean_agreement=sum(per_group) / len(per_group) if per_group else None,
        groups_with_overlap=len(per_group),
        annotators=pd.DataFrame([s.__dict__ for s in stats]),
        disputes=pd.DataFrame(
            [
                {
                    "group_id": int(g),
                    "disagreement": round(d, 3),
                    "n_labels": len(by_group[g]),
                    "adjudicated": int(g) in decided,
                }
                for g, d in disputed
            ],
            columns=["group_id", "disagreement", "n_labels", "adjudicated"],
        ),
        rankings=by_group,
    )


def adjudicate(
    ws: storedb.Workspace,
    group_id: int,
    ranking: list[list[int]] | None,
    author: str,
    flags: list[str] | None = None,
    note: str | None = None,
) -> None:
    """Store a researcher's ranking (or drop flags) for a group; training uses it from then on."""
    with storedb.connect(ws) as con:
        adjudications.set_adjudication(con, group_id, ranking, author, flags, note)


def bias_report(
    ws: storedb.Workspace,
    round_ids: list[int] | None = None,
    *,
    alpha: float = bias_audit.ALPHA,
    min_groups: int = bias_audit.MIN_GROUPS,
) -> bias_audit.BiasAudit:
    """The position, length and Markdown-density audit of every annotator of some rounds."""
    with storedb.connect(ws) as con:
        df = labels.labels(con, round_ids=round_ids)
        groups = rounds.groups(con, group_ids=sorted(set(df["group_id"].astype(int))))
    return bias_audit.audit(bias_audit.audit_groups(df, groups), alpha=alpha, min_groups=min_groups)
