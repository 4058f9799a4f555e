"""Evaluation results: one row per (kind, version, against) measurement."""

from __future__ import annotations

import json

import duckdb
import pandas as pd

KINDS = ("winrate", "preference", "drift", "human_ab")


def add_eval(
    con: duckdb.DuckDBPyConnection,
    kind: str,
    version: str,
    metrics: dict,
    *,
    against: str | None = None,
    judge: str | None = None,
    round_ids: list[int] | None = None,
    details: dict | list | None = None,
    run_id: int | None = None,
) -> int:
    """Store one evaluation result; returns its id."""
    return int(
        con.execute(
            "INSERT INTO evals (kind, version, against, judge, round_ids, metrics, details, "
            "run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            [
                kind,
                version,
                against,
                judge,
                json.dumps(round_ids or []),
                json.dumps(metrics, sort_keys=True),
                json.dumps(details) if details is not None else None,
                run_id,
            ],
        ).fetchone()[0]
    )


def list_evals(con: duckdb.DuckDBPyConnection, kind: str | None = None) -> pd.DataFrame:
    """Evaluations, oldest first, with metrics decoded (details left out)."""
    sql = "SELECT id, kind, version, against, judge, round_ids, metrics, run_id, created FROM evals"
    params: list = []
    if kind:
        sql += " WHERE kind = ?"
        params.append(kind)
    df = con.execute(sql + " ORDER BY id", params).df()
    df["round_ids"] = df["round_ids"].map(json.loads)
    df["metrics"] = df["metrics"].map(json.loads)
    return df


def eval_details(con: duckdb.DuckDBPyConnection, eval_id: int) -> dict | list | None:
    """The per-item details of one evaluation."""
    row = con.execute("SELECT details FROM evals WHERE id = ?", [int(eval_id)]).fetchone()
    return json.loads(row[0]) if row and row[0] else None
