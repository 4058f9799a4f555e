"""Labels: one ranking per annotator per group, validated against the group."""

from __future__ import annotations

import json

import duckdb
import pandas as pd

from store.errors import PrefloopError
from store.records import LabelRecord
from store.rounds import GroupRecord, groups

FLAGS = ("all_bad", "skipped")


def _where(record: LabelRecord, source: str) -> str:
    return f"{source}:{record.line}: " if record.line else ""


def _check(record: LabelRecord, members: dict[int, list[int]], source: str) -> None:
    at = _where(record, source)
    if not record.annotator or not record.annotator.strip():
        raise PrefloopError(f"{at}annotator name is empty")
    if record.group_id not in members:
        raise PrefloopError(f"{at}unknown group_id {record.group_id}")
    bad_flags = [f for f in record.flags if f not in FLAGS]
    if bad_flags:
        raise PrefloopError(f"{at}unknown flag(s) {bad_flags}; allowed: {', '.join(FLAGS)}")
    if record.ranking is None:
        if "skipped" not in record.flags:
            raise PrefloopError(f"{at}a ranking is required unless the group is flagged skipped")
        return
    expected = members[record.group_id]
    seen: list[int] = [c for tier in record.ranking for c in tier]
    if any(not tier for tier in record.ranking):
        raise PrefloopError(f"{at}ranking has an empty place")
    repeated = sorted({c for c in seen if seen.count(c) > 1})
    if repeated:
        raise PrefloopError(f"{at}candidate(s) {repeated} appear more than once in the ranking")
    foreign = [c for c in seen if c not in expected]
    if foreign:
        raise PrefloopError(
            f"{at}candidate(s) {foreign} do not belong to group {record.group_id} "
            f"(its candidates are {expected})"
        )
    missing = [c for c in expected if c not in seen]
    if missing:
        raise PrefloopError(
            f"{at}ranking of group {record.group_id} misses candidate(s) {missing}; "
            "every candidate must appear exactly once"
        )


def add_labels(
    con: duckdb.DuckDBPyConnection, records: list[LabelRecord], source: str = "label"
) -> int:
    """Validate and store labels; any invalid record rejects them all (caller's transaction)."""
    ids = sorted({r.group_id for r in records})
    members: dict[int, list[int]] = {}
    if ids:
        rows = con.execute(
            f"SELECT group_id, list(id ORDER BY position) FROM candidates "
            f"WHERE group_id IN ({', '.join('?' for _ in ids)}) GROUP BY group_id",
            ids,
        ).fetchall()
        members = {int(g): list(c) for g, c in rows}
    keys = [(r.group_id, r.annotator.strip() if r.annotator else "") for r in records]
    existing = set()
    if ids:
        existing = {
            (int(g), a)
            for g, a in con.execute(
                f"SELECT group_id, annotator FROM labels "
                f"WHERE group_id IN ({', '.join('?' for _ in ids)})",
                ids,
            ).fetchall()
        }
    seen: set[tuple[int, str]] = set()
    for record, key in zip(records, keys, strict=True):
        _check(record, members, source)
        if key in existing or key in seen:
            raise PrefloopError(
                f"{_where(record, source)}group {record.group_id} already has a label from "
                f"{record.annotator!r}; each annotator ranks a group once"
            )
        seen.add(key)
    if not records:
        return 0
    df = pd.DataFrame(
        {
            "group_id": [r.group_id for r in records],
            "annotator": [a for _, a in keys],
            "ranking": [json.dumps(r.ranking) if r.ranking is not None else None for r in records],
            "flags": [json.dumps(sorted(set(r.flags))) for r in records],
            "comment": pd.Series([r.comment for r in records], dtype="object"),
        }
    )
    con.register("_new_labels", df)
    try:
        con.execute(
            "INSERT INTO labels (group_id, annotator, ranking, flags, comment) "
            "SELECT * FROM _new_labels"
        )
    finally:
        con.unregister("_new_labels")
    return len(records)


def labels(
    con: duckdb.DuckDBPyConnection,
    round_ids: list[int] | None = None,
    annotator: str | None = None,
) -> pd.DataFrame:
    """Stored labels (group_id, round_id, annotator, ranking, flags, comment, created)."""
    sql = (
        "SELECT l.group_id, g.round_id, l.annotator, l.ranking, l.flags, l.comment, l.created "
        "FROM labels l JOIN groups g ON g.id = l.group_id"
    )
    where, params = [], []
    if round_ids is not None:
        if not round_ids:
            round_ids = [-1]
        where.append(f"g.round_id IN ({', '.join('?' for _ in round_ids)})")
        params.extend(int(r) for r in round_ids)
    if annotator is not None:
        where.append("l.annotator = ?")
        params.append(annotator)
    if where:
        sql += " WHERE " + " AND ".join(where)
    df = con.execute(sql + " ORDER BY l.id", params).df()
    df["ranking"] = df["ranking"].map(lambda r: json.loads(r) if isinstance(r, str) else None)
    df["flags"] = df["flags"].map(json.loads)
    return df


def next_group(con: duckdb.DuckDBPyConnection, annotator: str, round_id: int) -> GroupRecord | None:
    """The first group of the round this annotator has not labelled yet."""
    pending = groups(con, round_id=round_id, pending_for=annotator)
    return pending[0] if pending else None


def progress(con: duckdb.DuckDBPyConnection, annotator: str, round_id: int) -> tuple[int, int]:
    """(done, left) for an annotator in a round."""
    done, total = con.execute(
        "SELECT count(l.id), count(DISTINCT g.id) FROM groups g "
        "LEFT JOIN labels l ON l.group_id = g.id AND l.annotator = ? WHERE g.round_id = ?",
        [annotator, int(round_id)],
    ).fetchone()
    return int(done), int(total) - int(done)
