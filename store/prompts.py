"""Prompts: import with de-duplication, and listing by split."""

from __future__ import annotations

import json

import duckdb
import pandas as pd

from store.errors import PrefloopError
from store.records import ImportReport, PromptRecord

SPLITS = ("train", "heldout")


def check_split(split: str) -> str:
    """Validate a split name."""
    if split not in SPLITS:
        raise PrefloopError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")
    return split


def _key(record: PromptRecord) -> str:
    from store.files import normalize_prompt

    return normalize_prompt(record.messages if record.messages else record.text)


def upsert_prompt(
    con: duckdb.DuckDBPyConnection, record: PromptRecord, split: str, source: str
) -> tuple[int, bool]:
    """The id of the prompt (inserted if new) and whether it was new."""
    key = _key(record)
    row = con.execute("SELECT id FROM prompts WHERE norm_key = ?", [key]).fetchone()
    if row:
        return int(row[0]), False
    messages = json.dumps(record.messages) if record.messages else None
    new_id = con.execute(
        "INSERT INTO prompts (text, messages, norm_key, split, source) VALUES (?, ?, ?, ?, ?) "
        "RETURNING id",
        [record.text, messages, key, split, source],
    ).fetchone()[0]
    return int(new_id), True


def add_prompts(
    con: duckdb.DuckDBPyConnection, records: list[PromptRecord], split: str, source: str
) -> ImportReport:
    """Store prompts, skipping exact (whitespace-normalised) duplicates."""
    check_split(split)
    report = ImportReport()
    for record in records:
        _, new = upsert_prompt(con, record, split, source)
        if new:
            report.stored += 1
        else:
            report.duplicates += 1
    return report


def list_prompts(con: duckdb.DuckDBPyConnection, split: str | None = None) -> pd.DataFrame:
    """Prompts (id, text, messages, split), optionally of one split."""
    sql = "SELECT id, text, messages, split FROM prompts"
    params: list = []
    if split:
        sql += " WHERE split = ?"
        params.append(check_split(split))
    df = con.execute(sql + " ORDER BY id", params).df()
    df["messages"] = df["messages"].map(lambda m: json.loads(m) if isinstance(m, str) else None)
    return df
