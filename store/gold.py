"""Gold groups: groups a researcher ranked with a known answer, to measure annotators."""

from __future__ import annotations

import json

import duckdb
import pandas as pd

from store.access import check_name
from store.errors import PrefloopError
from store.labels import check_ranking


def _candidate_ids(con: duckdb.DuckDBPyConnection, group_id: int) -> list[int]:
    rows = con.execute(
        "SELECT id FROM candidates WHERE group_id = ? ORDER BY position", [int(group_id)]
    ).fetchall()
    if not rows:
        raise PrefloopError(f"unknown group {group_id}")
    return [int(r[0]) for r in rows]


def set_gold(
    con: duckdb.DuckDBPyConnection, group_id: int, ranking: list[list[int]], author: str | None
) -> None:
    """Mark a group as gold with its known ranking (candidate ids, best first); replaces any."""
    author = None if author is None else check_name(author, "author name")
    expected = _candidate_ids(con, group_id)
    check_ranking(ranking, expected, int(group_id), f"gold for group {group_id}: ")
    if len(ranking) < 2:
        raise PrefloopError(
            f"gold for group {group_id}: an all-tied ranking cannot tell right from wrong; "
            "give at least two places"
        )
    con.execute("DELETE FROM gold WHERE group_id = ?", [int(group_id)])
    con.execute(
        "INSERT INTO gold (group_id, ranking, author) VALUES (?, ?, ?)",
        [int(group_id), json.dumps([[int(c) for c in t] for t in ranking]), author],
    )


def remove_gold(con: duckdb.DuckDBPyConnection, group_id: int) -> None:
    """Unmark a gold group (its labels stay)."""
    n = con.execute(
        "DELETE FROM gold WHERE group_id = ? RETURNING group_id", [int(group_id)]
    ).fetchall()
    if not n:
        raise PrefloopError(
            f"group {group_id} is not a gold group; `prefloop gold list` shows them"
        )


def _where_rounds(round_ids: list[int] | None) -> tuple[str, list[int]]:
    if round_ids is None:
        return "", []
    ids = [int(r) for r in round_ids] or [-1]
    return f" WHERE g.round_id IN ({', '.join('?' for _ in ids)})", ids


def gold(
    con: duckdb.DuckDBPyConnection, round_ids: list[int] | None = None
) -> dict[int, list[list[int]]]:
    """Gold rankings by group id, optionally of some rounds only."""
    where, params = _where_rounds(round_ids)
    rows = con.execute(
        f"SELECT o.group_id, o.ranking FROM gold o JOIN groups g ON g.id = o.group_id{where} "
        "ORDER BY o.group_id",
        params,
    ).fetchall()
    return {int(g): json.loads(r) for g, r in rows}


def list_gold(con: duckdb.DuckDBPyConnection, round_ids: list[int] | None = None) -> pd.DataFrame:
    """Gold groups: group_id, round_id, ranking, author, created, labels (how many it has)."""
    where, params = _where_rounds(round_ids)
    df = con.execute(
        "SELECT o.group_id, g.round_id, o.ranking, o.author, o.created, "
        "(SELECT count(*) FROM labels l WHERE l.group_id = o.group_id) AS labels "
        f"FROM gold o JOIN groups g ON g.id = o.group_id{where} ORDER BY o.group_id",
        params,
    ).df()
    df["ranking"] = df["ranking"].map(json.loads)
    return df
