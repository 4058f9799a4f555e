"""Judge suggestions: one judge ranking per group, shown to annotators when a round allows it."""

from __future__ import annotations

import json

import duckdb
import pandas as pd

from store.errors import PrefloopError


def set_suggestions(
    con: duckdb.DuckDBPyConnection, judge: str, rankings: dict[int, list[list[int]]]
) -> int:
    """Store (or replace) the judge's ranking of each group; rankings hold candidate ids."""
    if not rankings:
        return 0
    ids = sorted(int(g) for g in rankings)
    known = {
        int(r[0])
        for r in con.execute(
            f"SELECT id FROM groups WHERE id IN ({', '.join('?' for _ in ids)})", ids
        ).fetchall()
    }
    unknown = [g for g in ids if g not in known]
    if unknown:
        raise PrefloopError(f"cannot store suggestions for unknown group(s) {unknown}")
    df = pd.DataFrame(
        {
            "group_id": ids,
            "judge": judge,
            "ranking": [json.dumps([[int(c) for c in t] for t in rankings[g]]) for g in ids],
        }
    )
    con.register("_new_suggestions", df)
    try:
        con.execute(
            f"DELETE FROM suggestions WHERE group_id IN ({', '.join('?' for _ in ids)})", ids
        )
        con.execute(
            "INSERT INTO suggestions (group_id, judge, ranking) "
            "SELECT group_id, judge, ranking FROM _new_suggestions"
        )
    finally:
        con.unregister("_new_suggestions")
    return len(ids)


def suggestion(con: duckdb.DuckDBPyConnection, group_id: int) -> tuple[str, list[list[int]]] | None:
    """The judge's name and ranking (candidate ids, best tier first) for a group, or None."""
    row = con.execute(
        "SELECT judge, ranking FROM suggestions WHERE group_id = ?", [int(group_id)]
    ).fetchone()
    return None if row is None else (str(row[0]), json.loads(row[1]))


def suggestions(con: duckdb.DuckDBPyConnection, round_id: int) -> pd.DataFrame:
    """A round's suggestions: group_id, judge, ranking (candidate ids), created."""
    df = con.execute(
        "SELECT s.group_id, s.judge, s.ranking, s.created FROM suggestions s "
        "JOIN groups g ON g.id = s.group_id WHERE g.round_id = ? ORDER BY s.group_id",
        [int(round_id)],
    ).df()
    df["ranking"] = df["ranking"].map(json.loads)
    return df


def clear_suggestions(con: duckdb.DuckDBPyConnection, round_id: int) -> int:
    """Delete a round's suggestions; returns how many there were."""
    n = con.execute(
        "SELECT count(*) FROM suggestions WHERE group_id IN "
        "(SELECT id FROM groups WHERE round_id = ?)",
        [int(round_id)],
    ).fetchone()[0]
    con.execute(
        "DELETE FROM suggestions WHERE group_id IN (SELECT id FROM groups WHERE round_id = ?)",
        [int(round_id)],
    )
    return int(n)
