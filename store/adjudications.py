"""A researcher's decision on a disputed group: the ranking training uses instead of consensus."""

from __future__ import annotations

import json

import duckdb

from store.access import check_name
from store.errors import PrefloopError
from store.labels import FLAGS, check_ranking


def set_adjudication(
    con: duckdb.DuckDBPyConnection,
    group_id: int,
    ranking: list[list[int]] | None,
    author: str,
    flags: list[str] | None = None,
    note: str | None = None,
) -> None:
    """Decide a group: a full ranking of its candidates, or flags (e.g. all_bad) to drop it."""
    author = check_name(author, "author name")
    flags = sorted(set(flags or []))
    bad = [f for f in flags if f not in FLAGS]
    if bad:
        raise PrefloopError(f"unknown flag(s) {bad}; allowed: {', '.join(FLAGS)}")
    members = [
        int(r[0])
        for r in con.execute(
            "SELECT id FROM candidates WHERE group_id = ? ORDER BY position", [int(group_id)]
        ).fetchall()
    ]
    if not members:
        raise PrefloopError(f"unknown group {group_id}")
    if ranking is None:
        if not flags:
            raise PrefloopError("give a ranking, or flag the group (e.g. all_bad) to drop it")
    else:
        check_ranking(ranking, members, int(group_id))
    con.execute("DELETE FROM adjudications WHERE group_id = ?", [int(group_id)])
    con.execute(
        "INSERT INTO adjudications (group_id, ranking, flags, author, note) VALUES (?, ?, ?, ?, ?)",
        [
            int(group_id),
            json.dumps(ranking) if ranking is not None else None,
            json.dumps(flags),
            author,
            (note or "").strip() or None,
        ],
    )


def adjudications(
    con: duckdb.DuckDBPyConnection, group_ids: list[int] | None = None
) -> dict[int, dict]:
    """Decided groups: group id -> {ranking, flags, author, note, created}."""
    sql = "SELECT group_id, ranking, flags, author, note, created FROM adjudications"
    params: list = []
    if group_ids is not None:
        if not group_ids:
            return {}
        sql += f" WHERE group_id IN ({', '.join('?' for _ in group_ids)})"
        params = [int(g) for g in group_ids]
    return {
        int(g): {
            "ranking": json.loads(r) if r else None,
            "flags": json.loads(f),
            "author": a,
            "note": n,
            "created": c,
        }
        for g, r, f, a, n, c in con.execute(sql, params).fetchall()
    }
