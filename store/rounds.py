"""Rounds, their groups and candidates."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import duckdb
import pandas as pd

from store.errors import PrefloopError


@dataclass
class CandidateRecord:
    """One sampled (or imported) completion of a group."""

    text: str
    n_tokens: int | None = None
    finish_reason: str | None = None
    logprob: float | None = None
    origin: str | None = None  # the model version that wrote it (None: outside data)


@dataclass
class GroupRecord:
    """A prompt and its K candidates, as stored."""

    group_id: int
    round_id: int
    prompt_id: int
    prompt: str
    messages: list[dict] | None
    candidate_ids: list[int]
    texts: list[str]
    logprobs: list[float | None] = field(default_factory=list)
    n_tokens: list[int | None] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)  # eos | length | None


def create_round(
    con: duckdb.DuckDBPyConnection,
    model_version: str | None,
    split: str,
    k: int,
    settings: dict,
    source: str,
) -> int:
    """A new, empty round; returns its id."""
    return int(
        con.execute(
            "INSERT INTO rounds (model_version, split, k, settings, source) "
            "VALUES (?, ?, ?, ?, ?) RETURNING id",
            [model_version, split, k, json.dumps(settings, sort_keys=True), source],
        ).fetchone()[0]
    )


def add_group(
    con: duckdb.DuckDBPyConnection,
    round_id: int,
    prompt_id: int,
    candidates: list[CandidateRecord],
) -> tuple[int, list[int]]:
    """Store one group with its candidates; returns (group id, candidate ids)."""
    return add_groups(con, round_id, [(prompt_id, candidates)])[0]


def _reserve(con: duckdb.DuckDBPyConnection, sequence: str, n: int) -> list[int]:
    rows = con.execute(f"SELECT nextval('{sequence}') FROM range(?)", [n]).fetchall()
    return [int(r[0]) for r in rows]


def add_groups(
    con: duckdb.DuckDBPyConnection,
    round_id: int,
    items: list[tuple[int, list[CandidateRecord]]],
) -> list[tuple[int, list[int]]]:
    """Store many groups (prompt id, candidates) in bulk; returns (group id, candidate ids) each."""
    if not items:
        return []
    group_ids = _reserve(con, "seq_groups", len(items))
    cand_ids = _reserve(con, "seq_candidates", sum(len(c) for _, c in items))
    groups_df = pd.DataFrame(
        {"id": group_ids, "round_id": round_id, "prompt_id": [p for p, _ in items]}
    )
    rows, out, at = [], [], 0
    for gid, (_, cands) in zip(group_ids, items, strict=True):
        ids = cand_ids[at : at + len(cands)]
        at += len(cands)
        out.append((gid, ids))
        rows.extend(
            (cid, gid, pos, c.text, c.n_tokens, c.finish_reason, c.logprob, c.origin)
            for pos, (cid, c) in enumerate(zip(ids, cands, strict=True))
        )
    cands_df = pd.DataFrame(
        rows,
        columns=[
            "id",
            "group_id",
            "position",
            "text",
            "n_tokens",
            "finish_reason",
            "logprob",
            "origin",
        ],
    ).astype(
        {"n_tokens": "Int64", "finish_reason": "object", "logprob": "float64", "origin": "object"}
    )
    con.register("_new_groups", groups_df)
    con.register("_new_candidates", cands_df)
    try:
        con.execute("INSERT INTO groups (id, round_id, prompt_id) SELECT * FROM _new_groups")
        con.execute(
            "INSERT INTO candidates (id, group_id, position, text, n_tokens, finish_reason, "
            "logprob, origin) SELECT * FROM _new_candidates"
        )
    finally:
        con.unregister("_new_groups")
        con.unregister("_new_candidates")
    return out


def list_rounds(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Rounds with group and label counts."""
    df = con.execute(
        """
        SELECT r.id, r.model_version, r.split, r.k, r.settings, r.source, r.created,
               r.mode, r.overlap, r.show_suggestions,
               count(DISTINCT g.id) AS groups,
               count(DISTINCT l.group_id) AS labelled_groups,
               count(l.id) AS labels
        FROM rounds r
        LEFT JOIN groups g ON g.round_id = r.id
        LEFT JOIN labels l ON l.group_id = g.id
        GROUP BY ALL ORDER BY r.id
        """
    ).df()
    df["settings"] = df["settings"].map(json.loads)
    return df


def get_round(con: duckdb.DuckDBPyConnection, round_id: int) -> dict:
    """One round's row; unknown ids raise."""
    df = list_rounds(con)
    match = df[df["id"] == int(round_id)]
    if match.empty:
        known = ", ".join(str(i) for i in df["id"]) or "none yet"
        raise PrefloopError(f"unknown round {round_id}; known rounds: {known}")
    return match.iloc[0].to_dict()


def groups(
    con: duckdb.DuckDBPyConnection,
    round_id: int | None = None,
    pending_for: str | None = None,
    pending: bool = False,
    group_ids: list[int] | None = None,
) -> list[GroupRecord]:
    """Groups with their prompt and candidates, filtered by round, id or labelling state."""
    where, params = [], []
    if round_id is not None:
        get_round(con, round_id)
        where.append("g.round_id = ?")
        params.append(int(round_id))
    if pending_for is not None:
        where.append("g.id NOT IN (SELECT group_id FROM labels WHERE annotator = ?)")
        params.append(pending_for)
    if pending:
        where.append("g.id NOT IN (SELECT group_id FROM labels)")
    if group_ids is not None:
        if not group_ids:
            return []
        where.append(f"g.id IN ({', '.join('?' for _ in group_ids)})")
        params.extend(int(i) for i in group_ids)
    sql = """
        SELECT g.id, g.round_id, g.prompt_id, p.text, p.messages,
               list(c.id ORDER BY c.position), list(c.text ORDER BY c.position),
               list(c.logprob ORDER BY c.position), list(c.n_tokens ORDER BY c.position),
               list(c.finish_reason ORDER BY c.position)
        FROM groups g JOIN prompts p ON p.id = g.prompt_id
        JOIN candidates c ON c.group_id = g.id
    """
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += " GROUP BY ALL ORDER BY g.id"
    return [
        GroupRecord(
            group_id=r[0],
            round_id=r[1],
            prompt_id=r[2],
            prompt=r[3],
            messages=json.loads(r[4]) if r[4] else None,
            candidate_ids=list(r[5]),
            texts=list(r[6]),
            logprobs=list(r[7]),
            n_tokens=list(r[8]),
            finish_reasons=list(r[9]),
        )
        for r in con.execute(sql, params).fetchall()
    ]


def candidates(con: duckdb.DuckDBPyConnection, round_id: int) -> pd.DataFrame:
    """A round's candidates: id, group_id, prompt_id, position, text, n_tokens, finish_reason,
    logprob, origin."""
    get_round(con, round_id)
    return con.execute(
        "SELECT c.id, c.group_id, g.prompt_id, c.position, c.text, c.n_tokens, c.finish_reason, "
        "c.logprob, c.origin "
        "FROM candidates c JOIN groups g ON g.id = c.group_id WHERE g.round_id = ? "
        "ORDER BY c.group_id, c.position",
        [int(round_id)],
    ).df()


def comparable_round(round_df: pd.DataFrame, round_id: int) -> int | None:
    """The newest other round sampled with the same settings by a different model version."""
    row = round_df.set_index("id").loc[round_id]
    same = {k: v for k, v in row["settings"].items() if k != "model_version"}
    for other in round_df.sort_values("id", ascending=False).itertuples():
        if other.id == round_id or other.model_version == row["model_version"]:
            continue
        if {k: v for k, v in other.settings.items() if k != "model_version"} == same:
            return int(other.id)
    return None


MODES = ("rank", "thumbs")


@dataclass
class RoundOptions:
    """How a round is labelled: mode, overlap target, judge suggestions shown, guidelines."""

    round_id: int
    mode: str = "rank"  # rank: order the K candidates | thumbs: up/down on each candidate
    overlap: int = 1  # annotators wanted per group
    show_suggestions: bool = False
    guidelines: str | None = None  # Markdown written by a researcher


def round_options(con: duckdb.DuckDBPyConnection, round_id: int) -> RoundOptions:
    """A round's labelling options; unknown ids raise."""
    row = con.execute(
        "SELECT mode, overlap, show_suggestions, guidelines FROM rounds WHERE id = ?",
        [int(round_id)],
    ).fetchone()
    if row is None:
        get_round(con, round_id)  # raises with the known ids
    return RoundOptions(int(round_id), row[0] or "rank", int(row[1] or 1), bool(row[2]), row[3])


def set_round_options(
    con: duckdb.DuckDBPyConnection,
    round_id: int,
    *,
    mode: str | None = None,
    overlap: int | None = None,
    show_suggestions: bool | None = None,
    guidelines: str | None = None,
) -> RoundOptions:
    """Change a round's labelling options (mode only while it has no labels)."""
    current = round_options(con, round_id)
    if mode is not None and mode != current.mode:
        if mode not in MODES:
            raise PrefloopError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        n = con.execute(
            "SELECT count(*) FROM labels l JOIN groups g ON g.id = l.group_id WHERE g.round_id = ?",
            [int(round_id)],
        ).fetchone()[0]
        if n:
            raise PrefloopError(
                f"round {round_id} has {n} label(s) already; its mode can no longer change "
                "(start a new round with the other mode)"
            )
        current.mode = mode
    if overlap is not None:
        if not 1 <= int(overlap) <= 50:
            raise PrefloopError("the overlap target must be between 1 and 50 annotators")
        current.overlap = int(overlap)
    if show_suggestions is not None:
        current.show_suggestions = bool(show_suggestions)
    if guidelines is not None:
        current.guidelines = guidelines.strip() or None
    con.execute(
        "UPDATE rounds SET mode = ?, overlap = ?, show_suggestions = ?, guidelines = ? "
        "WHERE id = ?",
        [current.mode, current.overlap, current.show_suggestions, current.guidelines, round_id],
    )
    return current


def latest_round(con: duckdb.DuckDBPyConnection) -> int | None:
    """The newest round's id, or None."""
    row = con.execute("SELECT max(id) FROM rounds").fetchone()
    return None if row[0] is None else int(row[0])


# Rounds an online tuning run stores: every step's samples (hidden from annotators) and the
# audit round (labelable) that receives a few of each step's groups.
ROLLOUT_SOURCE = "rollout:"
AUDIT_SOURCE = "audit:"


def rollout_source(run_id: int, step: int) -> str:
    """The source of an online run's step round."""
    return f"{ROLLOUT_SOURCE}run {int(run_id)} step {int(step)}"


def audit_source(run_id: int) -> str:
    """The source of an online run's audit round."""
    return f"{AUDIT_SOURCE}run {int(run_id)}"


def add_scored_groups(
    con: duckdb.DuckDBPyConnection,
    source: str,
    settings: dict,
    step: int,
    items: list[tuple[int, list[CandidateRecord]]],
    rewards: list[list[float]],
) -> int:
    """Store groups with each candidate's reward in the round of `source` (created with
    settings on first use); the round's settings record each candidate's reward and each
    group's step. Returns the round id."""
    row = con.execute(
        "SELECT id, settings FROM rounds WHERE source = ? ORDER BY id LIMIT 1", [source]
    ).fetchone()
    if row is None:
        k = max((len(c) for _, c in items), default=0)
        round_id = create_round(con, None, "train", k, settings, source)
        stored = {**settings}
    else:
        round_id, stored = int(row[0]), json.loads(row[1])
    added = add_groups(con, round_id, items)
    by_candidate = stored.setdefault("rewards", {})
    steps = stored.setdefault("steps", {})
    for (group_id, cand_ids), group_rewards in zip(added, rewards, strict=True):
        steps[str(group_id)] = int(step)
        for cid, reward in zip(cand_ids, group_rewards, strict=True):
            by_candidate[str(cid)] = float(reward)
    con.execute(
        "UPDATE rounds SET settings = ? WHERE id = ?",
        [json.dumps(stored, sort_keys=True), round_id],
    )
    return round_id


def candidate_rewards(con: duckdb.DuckDBPyConnection, round_id: int) -> dict[int, float]:
    """The reward an online run gave each candidate of one of its rounds (empty for others)."""
    settings = get_round(con, round_id)["settings"] or {}
    return {int(c): float(r) for c, r in (settings.get("rewards") or {}).items()}


def run_audit(con: duckdb.DuckDBPyConnection, run_id: int) -> dict | None:
    """An online run's audit round: its id, each group's step and each candidate's reward;
    None when the run has none."""
    row = con.execute(
        "SELECT id, settings FROM rounds WHERE source = ? ORDER BY id LIMIT 1",
        [audit_source(run_id)],
    ).fetchone()
    if row is None:
        return None
    settings = json.loads(row[1])
    return {
        "round_id": int(row[0]),
        "steps": {int(g): int(s) for g, s in (settings.get("steps") or {}).items()},
        "rewards": {int(c): float(r) for c, r in (settings.get("rewards") or {}).items()},
    }


def _drop_groups(con: duckdb.DuckDBPyConnection, group_ids: list[int]) -> None:
    if not group_ids:
        return
    marks = ", ".join("?" for _ in group_ids)
    for table in ("candidates", "leases", "suggestions"):
        con.execute(f"DELETE FROM {table} WHERE group_id IN ({marks})", group_ids)
    con.execute(f"DELETE FROM groups WHERE id IN ({marks})", group_ids)


def drop_run_steps_after(con: duckdb.DuckDBPyConnection, run_id: int, step: int) -> int:
    """Remove what an online run stored for the steps after `step` (a resumed run samples them
    again): their step rounds and their unlabelled audit groups (labelled ones stay: people's
    work is kept). Returns how many groups were removed."""
    run = rounds_of_run(con, run_id)
    later = run[run["source"].str.startswith(ROLLOUT_SOURCE) & (run["step"] > int(step))]
    removed = 0
    for round_id in (int(r) for r in later["id"]):
        if con.execute(
            "SELECT count(*) FROM labels l JOIN groups g ON g.id = l.group_id WHERE g.round_id = ?",
            [round_id],
        ).fetchone()[0]:
            continue
        ids = [int(r[0]) for r in con.execute(
            "SELECT id FROM groups WHERE round_id = ?", [round_id]
        ).fetchall()]  # fmt: skip
        _drop_groups(con, ids)
        con.execute("DELETE FROM rounds WHERE id = ?", [round_id])
        removed += len(ids)
    audit = run_audit(con, run_id)
    if audit is None:
        return removed
    later_groups = [g for g, s in audit["steps"].items() if s > int(step)]
    if not later_groups:
        return removed
    marks = ", ".join("?" for _ in later_groups)
    kept = {  # groups a person has worked on
        int(r[0])
        for r in con.execute(
            f"SELECT group_id FROM labels WHERE group_id IN ({marks}) "
            f"UNION SELECT group_id FROM gold WHERE group_id IN ({marks}) "
            f"UNION SELECT group_id FROM adjudications WHERE group_id IN ({marks})",
            later_groups * 3,
        ).fetchall()
    }
    drop = [g for g in later_groups if g not in kept]
    if not drop:
        return removed
    dropped_candidates = {
        int(r[0])
        for r in con.execute(
            f"SELECT id FROM candidates WHERE group_id IN ({', '.join('?' for _ in drop)})",
            drop,
        ).fetchall()
    }
    _drop_groups(con, drop)
    settings = json.loads(
        con.execute("SELECT settings FROM rounds WHERE id = ?", [audit["round_id"]]).fetchone()[0]
    )
    settings["steps"] = {g: s for g, s in settings["steps"].items() if int(g) not in drop}
    settings["rewards"] = {
        c: r for c, r in settings["rewards"].items() if int(c) not in dropped_candidates
    }
    con.execute(
        "UPDATE rounds SET settings = ? WHERE id = ?",
        [json.dumps(settings, sort_keys=True), audit["round_id"]],
    )
    return removed + len(drop)


def rounds_of_run(con: duckdb.DuckDBPyConnection, run_id: int) -> pd.DataFrame:
    """An online run's rounds (its step rounds and its audit round): id, source, step."""
    df = con.execute(
        "SELECT id, source, settings FROM rounds WHERE source = ? OR source LIKE ? ORDER BY id",
        [audit_source(run_id), f"{ROLLOUT_SOURCE}run {int(run_id)} step %"],
    ).df()
    df["step"] = [json.loads(s).get("step") for s in df["settings"]]
    return df.drop(columns=["settings"])
