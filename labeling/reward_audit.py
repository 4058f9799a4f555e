"""Does the reward still agree with people on the policy's own samples? An online run's audit
round puts a few of each step's groups, with the rewards the run gave them, in front of the
annotators; this module turns their rankings into reward–human agreement per training step.

Agreement is pairwise: of the ordered pairs an annotator's ranking orders (a above b), the share
the reward orders the same way (r_a > r_b); a reward tie counts half. Each annotator's pairs
count separately. A curve that falls while the reward climbs is the alarm that the policy has
learnt to game the reward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from labeling.bias_audit import wilson
from labeling.curation import JUDGE_ANNOTATOR
from labeling.ranking import ordered_pairs
from labeling.team import rankings_by_group
from store import db as storedb
from store import labels, runs
from store import rounds as storerounds
from store.errors import PrefloopError

CURVE_COLUMNS = (
    "step", "groups", "labelled_groups", "labels", "pairs", "agreement", "low", "high",
)  # fmt: skip


def pair_agreement(
    rewards: Mapping[int, float], rankings: Sequence[list[list[int]]]
) -> tuple[float, int]:
    """(agreeing pairs, pairs): over every pair each ranking strictly orders, 1 when the
    reward orders it the same way, ½ when the reward ties it, 0 when it orders it the other way."""
    hits, n = 0.0, 0
    for ranking in rankings:
        for better, worse in ordered_pairs(ranking):
            if better not in rewards or worse not in rewards:
                continue  # a candidate the run gave no reward
            n += 1
            if rewards[better] > rewards[worse]:
                hits += 1.0
            elif rewards[better] == rewards[worse]:
                hits += 0.5
    return hits, n


def agreement_curve(ws: storedb.Workspace, run_id: int) -> pd.DataFrame:
    """Reward–human agreement per training step of an online run's audit round: step, groups,
    labelled_groups, labels, pairs, agreement (None until a pair is ranked) and its 95% Wilson
    interval (low, high). The judge's labels do not count: they are not a person's."""
    with storedb.connect(ws) as con:
        run = runs.get_run(con, run_id)
        audit = storerounds.run_audit(con, run_id)
        df = labels.labels(con, round_ids=[audit["round_id"]]) if audit else None
    if audit is None:
        config = run["config"] if isinstance(run["config"], dict) else {}
        online = config.get("online") or config.get("method") in ("rloo", "ppo")
        raise PrefloopError(
            f"run {run_id} has no audit round: "
            + (
                "it was started without --audit; start an online run with --audit N to put N "
                "of each step's groups in front of the annotators"
                if online
                else "only online runs (--method grpo --online, rloo) with --audit N have one"
            )
        )
    df = df[df["annotator"] != JUDGE_ANNOTATOR]
    by_group = rankings_by_group(df)
    rows = []
    for step in sorted(set(audit["steps"].values())):
        group_ids = [g for g, s in audit["steps"].items() if s == step]
        hits, n, labelled, n_labels = 0.0, 0, 0, 0
        for g in group_ids:
            rankings = list(by_group.get(g, {}).values())
            labelled += bool(rankings)
            n_labels += len(rankings)
            h, k = pair_agreement(audit["rewards"], rankings)
            hits, n = hits + h, n + k
        low, high = wilson(hits, n)
        rows.append(
            {
                "step": step,
                "groups": len(group_ids),
                "labelled_groups": labelled,
                "labels": n_labels,
                "pairs": n,
                "agreement": hits / n if n else None,
                "low": low,
                "high": high,
            }
        )
    return pd.DataFrame(rows, columns=list(CURVE_COLUMNS))


def curve_summary(curve: pd.DataFrame, run_id: int) -> str:
    """One line on the whole curve: pairs ranked so far and the overall agreement."""
    pairs = int(curve["pairs"].sum()) if not curve.empty else 0
    if pairs == 0:
        return (
            f"run {run_id}: no audit group is ranked yet ({int(curve['groups'].sum())} groups "
            "wait in its audit round)"
        )
    hits = float((curve["agreement"].fillna(0) * curve["pairs"]).sum())
    low, high = wilson(hits, pairs)
    return (
        f"run {run_id}: reward–human agreement {hits / pairs:.3f} over {pairs} ranked pairs "
        f"(95% CI {low:.3f}–{high:.3f}); 0.5 is chance, a falling curve means the policy games "
        "the reward"
    )


def audit_line(ws: storedb.Workspace, run_id: int) -> str | None:
    """The curve's one-line summary for a run with a ranked audit round; None otherwise."""
    try:
        curve = agreement_curve(ws, run_id)
    except PrefloopError:
        return None
    return curve_summary(curve, run_id) if curve["pairs"].sum() > 0 else None
