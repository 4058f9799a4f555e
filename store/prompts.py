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


def upsert_prompts(
    con: duckdb.DuckDBPyConnection, records: list[PromptRecord], split: str, source: str
) -> tuple[list[int], int]:
    """Ids of the prompts (new ones inserted in bulk) and how many were new."""
    keys = [_key(r) for r in records]
    existing = dict(
        con.execute(
            "SELECT norm_key, id FROM prompts WHERE norm_key IN (SELECT unnest(?))", [keys]
        ).fetchall()
    )
    new: dict[str, PromptRecord] = {}
    for key, record in zip(keys, records, strict=True):
        if key not in existing and key not in new:
            new[key] = record
    if new:
        ids = [
            int(r[0])
            for r in con.execute(
                "SELECT nextval('seq_prompts') FROM range(?)", [len(new)]
            ).fetchall()
        ]
        df = pd.DataFrame(
            {
                "id": ids,
                "text": [r.text for r in new.values()],
                "messages": [json.dumps(r.messages) if r.messages else None for r in new.values()],
                "norm_key": list(new),
                "split": split,
                "source": source,
            }
        )
        con.register("_new_prompts", df)
        try:
            con.execute(
                "INSERT INTO prompts (id, text, messages, norm_key, split, source) "
                "SELECT * FROM _new_prompts"
            )
        finally:
            con.unregister("_new_prompts")
        existing.update(zip(new, ids, strict=True))
    return [int(existing[k]) for k in keys], len(new)


def add_prompts(
    con: duckdb.DuckDBPyConnection, records: list[PromptRecord], split: str, source: str
) -> ImportReport:
    """Store prompts, skipping exact (whitespace-normalised) duplicates."""
    check_split(split)
    _, stored = upsert_prompts(con, records, split, source)
    return ImportReport(stored=stored, duplicates=len(records) - stored)


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
