"""Labels: one ranking per annotator per group, validated against the group, revised by their
author until a dataset version freezes them (every earlier revision is kept)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import duckdb
import pandas as pd

from store.errors import PrefloopError
from store.records import LabelRecord
from store.rounds import GroupRecord, groups

FLAGS = ("all_bad", "skipped")
SKIPPED_SQL = "flags LIKE '%\"skipped\"%'"  # flags are stored as a sorted JSON list of FLAGS


def _where(record: LabelRecord, source: str) -> str:
    return f"{source}:{record.line}: " if record.line else ""


def check_ranking(
    ranking: list[list[int]], expected: list[int], group_id: int, at: str = ""
) -> None:
    """Raise unless ranking holds each of the group's candidate ids exactly once, in tiers."""
    if not isinstance(ranking, list) or any(not isinstance(t, list) for t in ranking):
        raise PrefloopError(f"{at}a ranking is a list of places, each a list of candidate ids")
    seen: list[int] = [c for tier in ranking for c in tier]
    if any(not tier for tier in ranking):
        raise PrefloopError(f"{at}ranking has an empty place")
    repeated = sorted({c for c in seen if seen.count(c) > 1})
    if repeated:
        raise PrefloopError(f"{at}candidate(s) {repeated} appear more than once in the ranking")
    foreign = [c for c in seen if c not in expected]
    if foreign:
        raise PrefloopError(
            f"{at}candidate(s) {foreign} do not belong to group {group_id} "
            f"(its candidates are {expected})"
        )
    missing = [c for c in expected if c not in seen]
    if missing:
        raise PrefloopError(
            f"{at}ranking of group {group_id} misses candidate(s) {missing}; "
            "every candidate must appear exactly once"
        )


def thumbs_ranking(thumbs: dict[int, bool], candidate_ids: list[int]) -> list[list[int]]:
    """The ranking a thumbs label implies: [[ups], [downs]], or one tier when all agree."""
    ups = [c for c in candidate_ids if c in thumbs and thumbs[c]]
    downs = [c for c in candidate_ids if c in thumbs and not thumbs[c]]
    return [tier for tier in (ups, downs) if tier]


def _candidate_keys(mapping, what: str, expected: list[int], group_id: int, at: str) -> dict:
    """A {candidate id: value} mapping with int keys (JSON gives strings), foreign ids refused."""
    if not isinstance(mapping, dict):
        raise PrefloopError(f"{at}{what} must map candidate ids to values, got {mapping!r}")
    out = {}
    for key, value in mapping.items():
        try:
            cid = int(key)
        except (TypeError, ValueError):
            raise PrefloopError(f"{at}{what}: {key!r} is not a candidate id") from None
        if isinstance(key, (float, bool)) or cid in out:
            raise PrefloopError(f"{at}{what}: {key!r} is not a candidate id (or repeats one)")
        out[cid] = value
    foreign = sorted(c for c in out if c not in expected)
    if foreign:
        raise PrefloopError(
            f"{at}{what} name candidate(s) {foreign} that do not belong to group {group_id} "
            f"(its candidates are {expected})"
        )
    return out


@dataclass
class _Stored:
    """A label's stored values, validated and encoded."""

    ranking: str | None
    flags: str
    comment: str | None
    thumbs: str | None
    ratings: str | None
    seconds: float | None
    render_version: str | None = None
    render_hash: str | None = None

    def same_content(self, other: _Stored) -> bool:
        """Whether two labels say the same thing (time spent and the view aside)."""
        keys = ("ranking", "flags", "comment", "thumbs", "ratings")
        return all(getattr(self, k) == getattr(other, k) for k in keys)


def _encode_map(mapping: dict[int, object] | None) -> str | None:
    if mapping is None:
        return None
    return json.dumps({str(k): mapping[k] for k in sorted(mapping)})


def _decode_map(text: str | None) -> dict[int, object] | None:
    if not isinstance(text, str):
        return None
    return {int(k): v for k, v in json.loads(text).items()}


def _prepare(
    record: LabelRecord, members: dict[int, list[int]], modes: dict[int, str], source: str
) -> _Stored:
    """Validate a label against its group and round; the values to store."""
    at = _where(record, source)
    if not record.annotator or not record.annotator.strip():
        raise PrefloopError(f"{at}annotator name is empty")
    if record.group_id not in members:
        raise PrefloopError(f"{at}unknown group_id {record.group_id}")
    gid, expected = record.group_id, members[record.group_id]
    mode = modes.get(gid, "rank")
    bad_flags = [f for f in record.flags if f not in FLAGS]
    if bad_flags:
        raise PrefloopError(f"{at}unknown flag(s) {bad_flags}; allowed: {', '.join(FLAGS)}")
    skipped = "skipped" in record.flags

    thumbs = None
    if record.thumbs is not None:
        thumbs = _candidate_keys(record.thumbs, "thumbs", expected, gid, at)
        not_bool = {c: v for c, v in thumbs.items() if not isinstance(v, bool)}
        if not_bool:
            raise PrefloopError(
                f"{at}thumbs must be true (up) or false (down) per candidate; got {not_bool}"
            )
    if mode == "thumbs" and not skipped:
        missing = [c for c in expected if thumbs is None or c not in thumbs]
        if missing:
            raise PrefloopError(
                f"{at}group {gid} is in a thumbs round: every candidate needs a thumb up or "
                f"down (missing: candidate(s) {missing}), or flag the group skipped"
            )

    ratings = None
    if record.ratings is not None:
        ratings = _candidate_keys(record.ratings, "ratings", expected, gid, at)
        bad = {
            c: v
            for c, v in ratings.items()
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5
        }
        if bad:
            raise PrefloopError(f"{at}ratings must be whole numbers from 1 to 5; got {bad}")

    seconds = record.seconds
    if seconds is not None:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise PrefloopError(f"{at}seconds must be a number, got {seconds!r}")
        if not math.isfinite(seconds) or seconds < 0:
            raise PrefloopError(f"{at}seconds spent must be zero or more, got {seconds!r}")
        seconds = float(seconds)
    for what in ("render_version", "render_hash"):
        value = getattr(record, what)
        if value is not None and (not isinstance(value, str) or len(value) > 64):
            raise PrefloopError(f"{at}{what} must be a short string, got {value!r}")

    ranking = record.ranking
    if thumbs is not None and set(thumbs) == set(expected):
        derived = thumbs_ranking(thumbs, expected)
        if ranking is None:
            ranking = derived
        elif mode == "thumbs" and [sorted(t) for t in ranking] != [sorted(t) for t in derived]:
            raise PrefloopError(
                f"{at}group {gid} is in a thumbs round, where the ranking comes from the "
                f"thumbs ({derived}); leave the ranking out or make it match"
            )
    if ranking is None:
        if not skipped:
            raise PrefloopError(
                f"{at}a ranking is required unless the group is flagged skipped"
                + (" (or a thumb for every candidate)" if thumbs is not None else "")
            )
    else:
        check_ranking(ranking, expected, gid, at)
    return _Stored(
        ranking=json.dumps(ranking) if ranking is not None else None,
        flags=json.dumps(sorted(set(record.flags))),
        comment=record.comment,
        thumbs=_encode_map(thumbs),
        ratings=_encode_map(ratings),
        seconds=seconds,
        render_version=record.render_version,
        render_hash=record.render_hash,
    )


def _placeholders(values: list) -> str:
    return ", ".join("?" for _ in values)


def _members(
    con: duckdb.DuckDBPyConnection, ids: list[int]
) -> tuple[dict[int, list[int]], dict[int, str], set[tuple[int, str]]]:
    """Candidate ids (in position order) and the round's mode of each group, and the
    (group, annotator) pairs already labelled."""
    if not ids:
        return {}, {}, set()
    among = _placeholders(ids)
    rows = con.execute(
        f"SELECT c.group_id, list(c.id ORDER BY c.position), any_value(r.mode), "
        f"any_value(e.names) FROM candidates c JOIN groups g ON g.id = c.group_id "
        f"JOIN rounds r ON r.id = g.round_id LEFT JOIN (SELECT group_id, list(annotator) AS names "
        f"FROM labels WHERE group_id IN ({among}) GROUP BY group_id) e ON e.group_id = c.group_id "
        f"WHERE c.group_id IN ({among}) GROUP BY c.group_id",
        ids + ids,
    ).fetchall()
    members = {int(g): list(c) for g, c, _, _ in rows}
    modes = {int(g): m or "rank" for g, _, m, _ in rows}
    existing = {(int(g), a) for g, _, _, names in rows for a in names or []}
    return members, modes, existing


def _validated(
    con: duckdb.DuckDBPyConnection, records: list[LabelRecord], source: str
) -> tuple[list[tuple[int, str]], list[_Stored]]:
    """The (group, annotator) key and stored values of each record; raises on the first bad one."""
    ids = sorted({r.group_id for r in records})
    members, modes, existing = _members(con, ids)
    keys = [(r.group_id, r.annotator.strip() if r.annotator else "") for r in records]
    seen: set[tuple[int, str]] = set()
    stored: list[_Stored] = []
    for record, key in zip(records, keys, strict=True):
        stored.append(_prepare(record, members, modes, source))
        if key in existing or key in seen:
            raise PrefloopError(
                f"{_where(record, source)}group {record.group_id} already has a label from "
                f"{record.annotator!r}; each annotator ranks a group once"
            )
        seen.add(key)
    return [(int(g), a) for g, a in keys], stored


def add_labels(
    con: duckdb.DuckDBPyConnection, records: list[LabelRecord], source: str = "label"
) -> int:
    """Validate and store labels; any invalid record rejects them all (caller's transaction)."""
    keys, stored = _validated(con, records, source)
    if not records:
        return 0
    df = pd.DataFrame(
        {
            "group_id": [g for g, _ in keys],
            "annotator": [a for _, a in keys],
            "ranking": pd.Series([s.ranking for s in stored], dtype="object"),
            "flags": [s.flags for s in stored],
            "comment": pd.Series([s.comment for s in stored], dtype="object"),
            "thumbs": pd.Series([s.thumbs for s in stored], dtype="object"),
            "ratings": pd.Series([s.ratings for s in stored], dtype="object"),
            "seconds": pd.Series([s.seconds for s in stored], dtype="float64"),
            "render_version": pd.Series([s.render_version for s in stored], dtype="object"),
            "render_hash": pd.Series([s.render_hash for s in stored], dtype="object"),
        }
    )
    con.register("_new_labels", df)
    try:
        con.execute(
            "INSERT INTO labels (group_id, annotator, ranking, flags, comment, thumbs, ratings, "
            "seconds, render_version, render_hash, revision, updated) "
            "SELECT *, 1, current_timestamp FROM _new_labels"
        )
    finally:
        con.unregister("_new_labels")
    return len(records)


def add_label(con: duckdb.DuckDBPyConnection, record: LabelRecord, source: str = "label") -> int:
    """Validate and store one label; its id. (One statement and no DataFrame: this runs on every
    submission from the annotator page.)"""
    [(gid, annotator)], [s] = _validated(con, [record], source)
    row = con.execute(
        "INSERT INTO labels (group_id, annotator, ranking, flags, comment, thumbs, ratings, "
        "seconds, render_version, render_hash, revision, updated) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, current_timestamp) RETURNING id",
        [
            *(gid, annotator, s.ranking, s.flags, s.comment, s.thumbs, s.ratings, s.seconds),
            *(s.render_version, s.render_hash),
        ],
    ).fetchone()
    return int(row[0])


def _decode(df: pd.DataFrame) -> pd.DataFrame:
    df["ranking"] = df["ranking"].map(lambda r: json.loads(r) if isinstance(r, str) else None)
    df["flags"] = df["flags"].map(json.loads)
    for col in ("thumbs", "ratings"):
        if col in df.columns:
            df[col] = df[col].map(_decode_map).astype("object")
    return df


def labels(
    con: duckdb.DuckDBPyConnection,
    round_ids: list[int] | None = None,
    annotator: str | None = None,
) -> pd.DataFrame:
    """Stored labels (group_id, round_id, annotator, ranking, flags, comment, created, thumbs,
    ratings, seconds, revision, updated, label_id, render_version, render_hash)."""
    sql = (
        "SELECT l.group_id, g.round_id, l.annotator, l.ranking, l.flags, l.comment, l.created, "
        "l.thumbs, l.ratings, l.seconds, l.revision, l.updated, l.id AS label_id, "
        "l.render_version, l.render_hash "
        "FROM labels l JOIN groups g ON g.id = l.group_id"
    )
    where, params = [], []
    if round_ids is not None:
        if not round_ids:
            round_ids = [-1]
        where.append(f"g.round_id IN ({_placeholders(round_ids)})")
        params.extend(int(r) for r in round_ids)
    if annotator is not None:
        where.append("l.annotator = ?")
        params.append(annotator)
    if where:
        sql += " WHERE " + " AND ".join(where)
    return _decode(con.execute(sql + " ORDER BY l.id", params).df())


def label_id(con: duckdb.DuckDBPyConnection, group_id: int, annotator: str) -> int | None:
    """The id of an annotator's label on a group, or None."""
    row = con.execute(
        "SELECT id FROM labels WHERE group_id = ? AND annotator = ?",
        [int(group_id), annotator.strip()],
    ).fetchone()
    return None if row is None else int(row[0])


def frozen_in(con: duckdb.DuckDBPyConnection, label_id: int) -> list[str]:
    """The dataset versions that froze a label (empty: it can still be revised)."""
    rows = con.execute(
        "SELECT DISTINCT dataset_id FROM dataset_labels WHERE label_id = ? ORDER BY dataset_id",
        [int(label_id)],
    ).fetchall()
    return [str(r[0]) for r in rows]


def revise_label(
    con: duckdb.DuckDBPyConnection, record: LabelRecord, source: str = "revision"
) -> int:
    """Replace the author's own label on a group, keeping the old one; returns the new revision.

    Refused when the annotator has no label there, when a dataset version froze the label, and
    when the new label says the same as the stored one.
    """
    annotator = (record.annotator or "").strip()
    if not annotator:
        raise PrefloopError("annotator name is empty")
    row = con.execute(
        "SELECT id, revision, ranking, flags, comment, thumbs, ratings, seconds, render_version, "
        "render_hash, coalesce(updated, created) FROM labels WHERE group_id = ? AND annotator = ?",
        [int(record.group_id), annotator],
    ).fetchone()
    if row is None:
        authors = [
            a
            for (a,) in con.execute(
                "SELECT annotator FROM labels WHERE group_id = ? ORDER BY id",
                [int(record.group_id)],
            ).fetchall()
        ]
        who = f" (it has labels from {', '.join(map(repr, authors))})" if authors else ""
        raise PrefloopError(
            f"{annotator!r} has no label on group {record.group_id} to revise{who}; "
            "a label can only be revised by the annotator who made it"
        )
    lid, revision, *old_values, old_made = row
    frozen = frozen_in(con, lid)
    if frozen:
        raise PrefloopError(
            f"the label of {annotator!r} on group {record.group_id} is frozen in dataset "
            f"version(s) {', '.join(frozen)} and can no longer be revised (dataset versions "
            "are immutable); add a comment for the researcher instead"
        )
    members, modes, _ = _members(con, [int(record.group_id)])
    new = _prepare(record, members, modes, source)
    if new.same_content(_Stored(*old_values)):
        raise PrefloopError(
            f"group {record.group_id} already has a label from {annotator!r} that says the "
            "same, so nothing changed. Revise it to change it."
        )
    con.execute(
        "INSERT INTO label_revisions (label_id, revision, ranking, flags, comment, thumbs, "
        "ratings, seconds, render_version, render_hash, created) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [lid, int(revision or 1), *old_values, old_made],
    )
    con.execute(
        "UPDATE labels SET ranking = ?, flags = ?, comment = ?, thumbs = ?, ratings = ?, "
        "seconds = ?, render_version = ?, render_hash = ?, revision = ?, "
        "updated = current_timestamp WHERE id = ?",
        [
            new.ranking,
            new.flags,
            new.comment,
            new.thumbs,
            new.ratings,
            new.seconds,
            new.render_version,
            new.render_hash,
            int(revision or 1) + 1,
            lid,
        ],
    )
    return int(revision or 1) + 1


def recorded_views(con: duckdb.DuckDBPyConnection, label_ids: list[int]) -> dict[int, list]:
    """Per group, the view hashes these labels recorded (None for labels without one)."""
    if not label_ids:
        return {}
    rows = con.execute(
        f"SELECT group_id, render_hash FROM labels WHERE id IN ({_placeholders(label_ids)}) "
        "ORDER BY id",
        [int(i) for i in label_ids],
    ).fetchall()
    out: dict[int, list] = {}
    for gid, digest in rows:
        out.setdefault(int(gid), []).append(digest)
    return out


def label_history(con: duckdb.DuckDBPyConnection, group_id: int, annotator: str) -> pd.DataFrame:
    """Every revision of an annotator's label on a group, oldest first; the last is current.

    Columns: revision, ranking, flags, comment, thumbs, ratings, seconds, made (when that
    revision was stored), replaced (when a later one replaced it; NaT for the current one),
    current.
    """
    lid = label_id(con, group_id, annotator)
    if lid is None:
        raise PrefloopError(f"{annotator.strip()!r} has no label on group {group_id}")
    df = con.execute(
        "SELECT revision, ranking, flags, comment, thumbs, ratings, seconds, created AS made, "
        "replaced, FALSE AS current FROM label_revisions WHERE label_id = ? "
        "UNION ALL "
        "SELECT coalesce(revision, 1), ranking, flags, comment, thumbs, ratings, seconds, "
        "coalesce(updated, created), NULL, TRUE FROM labels WHERE id = ? "
        "ORDER BY revision",
        [lid, lid],
    ).df()
    return _decode(df)


def my_labels(
    con: duckdb.DuckDBPyConnection, annotator: str, round_id: int | None = None, limit: int = 50
) -> pd.DataFrame:
    """An annotator's own labels, most recently changed first, with whether each can be revised.

    Columns: label_id, group_id, round_id, prompt, ranking, flags, comment, thumbs, ratings,
    seconds, revision, created, updated, frozen.
    """
    sql = (
        "SELECT l.id AS label_id, l.group_id, g.round_id, p.text AS prompt, l.ranking, l.flags, "
        "l.comment, l.thumbs, l.ratings, l.seconds, l.revision, l.created, "
        "coalesce(l.updated, l.created) AS updated, "
        "EXISTS (SELECT 1 FROM dataset_labels d WHERE d.label_id = l.id) AS frozen "
        "FROM labels l JOIN groups g ON g.id = l.group_id JOIN prompts p ON p.id = g.prompt_id "
        "WHERE l.annotator = ?"
    )
    params: list = [annotator.strip()]
    if round_id is not None:
        sql += " AND g.round_id = ?"
        params.append(int(round_id))
    sql += " ORDER BY coalesce(l.updated, l.created) DESC, l.id DESC LIMIT ?"
    params.append(int(limit))
    return _decode(con.execute(sql, params).df())


def next_group(con: duckdb.DuckDBPyConnection, annotator: str, round_id: int) -> GroupRecord | None:
    """The first group of the round this annotator has not labelled yet (ignores the queue)."""
    pending = groups(con, round_id=round_id, pending_for=annotator)
    return pending[0] if pending else None


def progress(con: duckdb.DuckDBPyConnection, annotator: str, round_id: int) -> tuple[int, int]:
    """(done, left) for an annotator in a round, ignoring overlap targets (see labeling.queue)."""
    done, total = con.execute(
        "SELECT count(l.id), count(DISTINCT g.id) FROM groups g "
        "LEFT JOIN labels l ON l.group_id = g.id AND l.annotator = ? WHERE g.round_id = ?",
        [annotator, int(round_id)],
    ).fetchone()
    return int(done), int(total) - int(done)
