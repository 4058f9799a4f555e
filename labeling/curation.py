"""Turning stored labels into training groups and freezing them as a dataset version."""

from __future__ import annotations

import json

import duckdb
import pandas as pd

from labeling.ranking import group_training_ranking, ordered_pairs, usable_rankings
from store import datasets, labels, rounds
from store import db as storedb


def training_rows(
    con: duckdb.DuckDBPyConnection, split: str = "train", round_ids: list[int] | None = None
) -> tuple[pd.DataFrame, dict]:
    """One row per labelled group with its consensus ranking, plus counts of what was left out."""
    round_info = rounds.list_rounds(con).set_index("id")
    wanted = [int(r) for r in round_info.index if round_info.at[r, "split"] == split]
    if round_ids is not None:
        for r in round_ids:
            rounds.get_round(con, r)
        wanted = [r for r in wanted if r in set(round_ids)]
    labs = labels.labels(con, wanted)
    by_group: dict[int, list] = {}
    for row in labs.itertuples():
        by_group.setdefault(int(row.group_id), []).append((row.ranking, list(row.flags)))
    out, left_out = [], {"flagged_or_skipped": 0}
    for g in rounds.groups(con, group_ids=sorted(by_group)):
        ranking = group_training_ranking(g.candidate_ids, by_group[g.group_id])
        if ranking is None:
            left_out["flagged_or_skipped"] += 1
            continue
        out.append(
            {
                "group_id": g.group_id,
                "round_id": g.round_id,
                "model_version": round_info.at[g.round_id, "model_version"],
                "prompt": g.prompt,
                "messages": json.dumps(g.messages) if g.messages else None,
                "candidate_ids": g.candidate_ids,
                "texts": g.texts,
                "sample_logprobs": [float("nan") if x is None else x for x in g.logprobs],
                "ranking": ranking,
                "n_labels": len(by_group[g.group_id]),
                "rankings": usable_rankings(g.candidate_ids, by_group[g.group_id]),
                "finish_reasons": g.finish_reasons,
            }
        )
    return pd.DataFrame(out, columns=datasets.SNAPSHOT_COLUMNS), left_out


def freeze_dataset(
    ws: storedb.Workspace, split: str = "train", round_ids: list[int] | None = None
) -> str:
    """Freeze the labelled groups into a dataset version (reused if the content is unchanged)."""
    with storedb.connect(ws) as con:
        rows, left_out = training_rows(con, split, round_ids)
        n_pairs = sum(len(ordered_pairs(r)) for r in rows["ranking"])
        filters = {"split": split, "rounds": round_ids, "left_out": left_out}
        return datasets.freeze(ws, con, rows, n_pairs=n_pairs, filters=filters)


def snapshot_records(rows: pd.DataFrame) -> list[dict]:
    """Snapshot rows as plain dicts with messages decoded."""
    records = rows.to_dict("records")
    for r in records:
        r["messages"] = json.loads(r["messages"]) if isinstance(r["messages"], str) else None
    return records
