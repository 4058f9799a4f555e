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


def lock_group_round(con: duckdb.DuckDBPyConnection, group_id: int) -> int:
    """Take the write lock of a group's round (see lock_round); the round's id."""
    found = con.execute(
        "UPDATE rounds SET overlap = coalesce(overlap, 1) + 1 "
        "WHERE id = (SELECT round_id FROM groups WHERE id = ?) RETURNING id",
        [int(group_id)],
    ).fetchall()
    if not found:
        raise PrefloopError(f"unknown group_id {group_id}")
    round_id = int(found[0][0])
    con.execute("UPDATE rounds SET overlap = overlap - 1 WHERE id = ?", [round_id])
    return round_id


def standing(
    con: duckdb.DuckDBPyConnection, group_id: int, annotator: str
) -> tuple[int | None, datetime | None]:
    """The annotator's label id on a group and when their lease on it ends (or ended)."""
    row = con.execute(
        "SELECT (SELECT id FROM labels WHERE group_id = $g AND annotator = $a), "
        "(SELECT expires FROM leases WHERE group_id = $g AND annotator = $a)",
        {"g": int(group_id), "a": annotator.strip()},
    ).fetchone()
    return (None if row[0] is None else int(row[0])), row[1]


def round_of_group(con: duckdb.DuckDBPyConnection, group_id: int) -> int:
    """The round a group belongs to; unknown groups raise."""
    row = con.execute("SELECT round_id FROM groups WHERE id = ?", [int(group_id)]).fetchone()
    if row is None:
        raise PrefloopError(f"unknown group_id {group_id}")
    return int(row[0])


@dataclass(frozen=True)
class Offer:
    """What the queue policy needs to pick an annotator's next group of a round."""

    options: list[Option]  # own leases, gold groups, and the fullest other group with a slot
    total: int  # groups the annotator could get (gold or with a free slot)
    done: int  # groups of the round the annotator has labelled (skips included)
    show_suggestions: bool = False  # the round shows annotators the judge's ranking


_OFFER = f"""
    WITH rg AS (SELECT id FROM groups WHERE round_id = $round),
    lab AS (
        SELECT l.group_id, count(*) FILTER (WHERE NOT l.{SKIPPED_SQL}) AS n,
               bool_or(l.annotator = $annotator) AS mine
        FROM labels l SEMI JOIN rg ON rg.id = l.group_id GROUP BY l.group_id),
    ls AS (
        SELECT s.group_id,
               count(*) FILTER (WHERE s.annotator <> $annotator AND s.expires > $now) AS n,
               max(s.expires) FILTER (WHERE s.annotator = $annotator) AS own
        FROM leases s SEMI JOIN rg ON rg.id = s.group_id GROUP BY s.group_id),
    open AS (
        SELECT rg.id, coalesce(lab.n, 0) + coalesce(ls.n, 0) AS filled,
               rg.id IN (SELECT group_id FROM gold) AS gold, ls.own,
               coalesce(lab.mine, false) AS mine
        FROM rg LEFT JOIN lab ON lab.group_id = rg.id LEFT JOIN ls ON ls.group_id = rg.id),
    opts AS (
        SELECT id, filled, gold, own FROM open
        WHERE NOT mine
          AND (gold OR filled < (SELECT coalesce(overlap, 1) FROM rounds WHERE id = $round))),
    best AS (SELECT id FROM opts WHERE NOT gold ORDER BY filled DESC, id LIMIT 1),
    head AS (
        SELECT (SELECT count(*) FROM opts) AS total,
               (SELECT count(*) FROM open WHERE mine) AS done,
               (SELECT coalesce(show_suggestions, false) FROM rounds WHERE id = $round) AS hints)
    SELECT head.total, head.done, head.hints, o.id, o.filled, o.gold, o.own
    FROM head LEFT JOIN opts o
      ON o.own IS NOT NULL OR o.gold OR o.id IN (SELECT id FROM best)
    ORDER BY o.id
"""


def offer(con: duckdb.DuckDBPyConnection, annotator: str, round_id: int, now: datetime) -> Offer:
    """The groups of a round the policy chooses among (one statement: this runs on every
    hand-out). A group is open to the annotator when they have not labelled it and it is gold or
    has a free slot; of the regular open groups only the fullest (then lowest id) is returned,
    the one the policy would pick among them."""
    rows = con.execute(
        _OFFER, {"annotator": annotator, "now": now, "round": int(round_id)}
    ).fetchall()
    total, done, hints = int(rows[0][0]), int(rows[0][1]), bool(rows[0][2])
    options = [
        Option(int(gid), int(filled), bool(gold), own)
        for _, _, _, gid, filled, gold, own in rows
        if gid is not None
    ]
    return Offer(options, total, done, hints)


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
