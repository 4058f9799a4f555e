"""Assignment state: leases (who holds which group until when) and how full each group is.

The policy (which group an annotator gets next) lives in labeling/queue.py; these functions are
the SQL it needs. "Filled" slots of a group are its labels that are not skipped plus the
unexpired leases of other annotators; a skipped label leaves its slot to someone else.
Times are naive UTC datetimes passed in by the caller, so tests can move the clock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import duckdb
import pandas as pd

from store.errors import PrefloopError
from store.labels import SKIPPED_SQL


@dataclass(frozen=True)
class Option:
    """A group an annotator could get: how many slots are filled, gold or not, own lease."""

    group_id: int
    filled: int
    gold: bool
    own_expires: datetime | None  # the annotator's own lease on it (live or expired), if any


@dataclass(frozen=True)
class Slot:
    """Whether a group has room: its round, overlap target, slots filled by others, gold."""

    round_id: int
    overlap: int
    filled: int
    gold: bool

    @property
    def free(self) -> bool:
        """Gold groups are open to everyone once; others while filled < overlap."""
        return self.gold or self.filled < self.overlap


def lock_round(con: duckdb.DuckDBPyConnection, round_id: int) -> None:
    """Take the round's write lock for the rest of the caller's transaction.

    DuckDB's MVCC only detects write-write conflicts on the same row, and an UPDATE that sets a
    column to itself is skipped, so the row is changed and changed back: a concurrent transaction
    (another thread of this process) that does the same fails with a "Conflict on update"
    TransactionException, which the caller retries. Processes never overlap (DuckDB lets one
    process at a time open the file), so this serialises every queue change of a round.
    """
    found = con.execute(
        "UPDATE rounds SET overlap = coalesce(overlap, 1) + 1 WHERE id = ? RETURNING id",
        [int(round_id)],
    ).fetchall()
    if not found:
        known = [int(r[0]) for r in con.execute("SELECT id FROM rounds ORDER BY id").fetchall()]
        raise PrefloopError(
            f"unknown round {round_id}; known rounds: {', '.join(map(str, known)) or 'none yet'}"
        )
    con.execute("UPDATE rounds SET overlap = overlap - 1 WHERE id = ?", [int(round_id)])


def round_of_group(con: duckdb.DuckDBPyConnection, group_id: int) -> int:
    """The round a group belongs to; unknown groups raise."""
    row = con.execute("SELECT round_id FROM groups WHERE id = ?", [int(group_id)]).fetchone()
    if row is None:
        raise PrefloopError(f"unknown group_id {group_id}")
    return int(row[0])


_FILLED = f"""
    (SELECT count(*) FROM labels l WHERE l.group_id = g.id AND NOT l.{SKIPPED_SQL})
    + (SELECT count(*) FROM leases s
       WHERE s.group_id = g.id AND s.annotator <> $annotator AND s.expires > $now)
"""


def options(
    con: duckdb.DuckDBPyConnection, annotator: str, round_id: int, now: datetime
) -> list[Option]:
    """Groups of a round the annotator could get now: not labelled by them, and gold or with a
    free slot. In group order."""
    rows = con.execute(
        f"""
        SELECT g.id, {_FILLED} AS filled,
               g.id IN (SELECT group_id FROM gold) AS gold,
               (SELECT s.expires FROM leases s
                WHERE s.group_id = g.id AND s.annotator = $annotator) AS own_expires,
               coalesce(r.overlap, 1) AS overlap
        FROM groups g JOIN rounds r ON r.id = g.round_id
        WHERE g.round_id = $round
          AND g.id NOT IN (SELECT group_id FROM labels WHERE annotator = $annotator)
        ORDER BY g.id
        """,
        {"annotator": annotator, "now": now, "round": int(round_id)},
    ).fetchall()
    return [
        Option(int(gid), int(filled), bool(gold), own)
        for gid, filled, gold, own, overlap in rows
        if gold or filled < overlap
    ]


def done_count(con: duckdb.DuckDBPyConnection, annotator: str, round_id: int) -> int:
    """Groups of a round the annotator has labelled (skips included)."""
    return int(
        con.execute(
            "SELECT count(*) FROM labels l JOIN groups g ON g.id = l.group_id "
            "WHERE g.round_id = ? AND l.annotator = ?",
            [int(round_id), annotator],
        ).fetchone()[0]
    )


def slot(con: duckdb.DuckDBPyConnection, group_id: int, annotator: str, now: datetime) -> Slot:
    """How full a group is, not counting this annotator's own label or lease."""
    row = con.execute(
        f"""
        SELECT g.round_id, coalesce(r.overlap, 1),
               (SELECT count(*) FROM labels l WHERE l.group_id = g.id
                AND l.annotator <> $annotator AND NOT l.{SKIPPED_SQL})
               + (SELECT count(*) FROM leases s WHERE s.group_id = g.id
                  AND s.annotator <> $annotator AND s.expires > $now),
               g.id IN (SELECT group_id FROM gold)
        FROM groups g JOIN rounds r ON r.id = g.round_id WHERE g.id = $group
        """,
        {"annotator": annotator, "now": now, "group": int(group_id)},
    ).fetchone()
    if row is None:
        raise PrefloopError(f"unknown group_id {group_id}")
    return Slot(int(row[0]), int(row[1]), int(row[2]), bool(row[3]))


def lease_expires(con: duckdb.DuckDBPyConnection, group_id: int, annotator: str) -> datetime | None:
    """When the annotator's lease on a group ends (or ended); None if they never took it."""
    row = con.execute(
        "SELECT expires FROM leases WHERE group_id = ? AND annotator = ?",
        [int(group_id), annotator],
    ).fetchone()
    return None if row is None else row[0]


def hold(con: duckdb.DuckDBPyConnection, group_id: int, annotator: str, expires: datetime) -> None:
    """Lease a group to an annotator until expires (renews their lease if they hold it)."""
    con.execute(
        "INSERT OR REPLACE INTO leases (group_id, annotator, expires) VALUES (?, ?, ?)",
        [int(group_id), annotator, expires],
    )


def drop(con: duckdb.DuckDBPyConnection, group_id: int, annotator: str) -> None:
    """Remove an annotator's lease on a group (their label is stored)."""
    con.execute(
        "DELETE FROM leases WHERE group_id = ? AND annotator = ?", [int(group_id), annotator]
    )


def expire(con: duckdb.DuckDBPyConnection, group_id: int, annotator: str, now: datetime) -> bool:
    """End an annotator's live lease now (the row stays, as a record that they had it)."""
    rows = con.execute(
        "UPDATE leases SET expires = ? WHERE group_id = ? AND annotator = ? AND expires > ? "
        "RETURNING group_id",
        [now, int(group_id), annotator, now],
    ).fetchall()
    return bool(rows)


def leases(
    con: duckdb.DuckDBPyConnection, now: datetime, round_id: int | None = None
) -> pd.DataFrame:
    """Unexpired leases: group_id, round_id, annotator, expires."""
    sql = (
        "SELECT s.group_id, g.round_id, s.annotator, s.expires FROM leases s "
        "JOIN groups g ON g.id = s.group_id WHERE s.expires > ?"
    )
    params: list = [now]
    if round_id is not None:
        sql += " AND g.round_id = ?"
        params.append(int(round_id))
    return con.execute(sql + " ORDER BY s.expires", params).df()
