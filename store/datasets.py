"""Dataset versions: immutable Parquet snapshots of training groups, named by content hash."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import duckdb
import pandas as pd

from store.db import Workspace
from store.errors import PrefloopError
from store.exports import write_atomic
from store.records import TrainingGroup

SNAPSHOT_COLUMNS = [
    "group_id",
    "round_id",
    "model_version",
    "prompt",
    "messages",
    "candidate_ids",
    "texts",
    "sample_logprobs",
    "ranking",
    "n_labels",
    "rankings",  # every annotator's ranking (positions), for soft labels and averaged gains
    "finish_reasons",  # eos | length | None per candidate: cut-off text gets no end token
    "thumbs",  # thumbs rounds: [ups, downs] per candidate over the annotators; None otherwise
]
OPTIONAL_COLUMNS = ("thumbs",)  # left out of the content hash while every value is null


def _canonical(value):
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def content_hash(rows: pd.DataFrame) -> str:
    """sha256 of the snapshot's rows in canonical JSON (stable across a Parquet round trip)."""
    columns = [c for c in SNAPSHOT_COLUMNS if c in rows.columns]  # older snapshots lack some
    columns = [  # a version without thumbs hashes as it did before the column existed
        c
        for c in columns
        if c not in OPTIONAL_COLUMNS or any(_canonical(v) is not None for v in rows[c])
    ]
    records = [{k: _canonical(v) for k, v in r.items()} for r in rows[columns].to_dict("records")]
    payload = json.dumps(records, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def freeze(
    ws: Workspace,
    con: duckdb.DuckDBPyConnection,
    rows: pd.DataFrame,
    *,
    n_pairs: int,
    filters: dict,
    stats: dict | None = None,
) -> str:
    """Store rows as a new dataset version (or return the existing one with the same content)."""
    if rows.empty:
        raise PrefloopError(
            "no labelled groups to train on: rank some groups first (web app or "
            "`prefloop labels import`); flagged, skipped and all-tied groups are left out"
        )
    if "thumbs" not in rows.columns:
        rows = rows.assign(thumbs=None)
    label_ids = _label_ids(con, rows)  # the labels it freezes: their authors can't revise them
    rows = rows[SNAPSHOT_COLUMNS].reset_index(drop=True)
    digest = content_hash(rows)
    row = con.execute("SELECT id FROM datasets WHERE content_hash = ?", [digest]).fetchone()
    if row:
        _record_labels(con, str(row[0]), label_ids)
        return str(row[0])
    n = con.execute("SELECT count(*) FROM datasets").fetchone()[0]
    dataset_id = f"d{n + 1}"
    target = ws.artifacts / "snapshots" / f"{dataset_id}.parquet"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda tmp: rows.to_parquet(tmp, index=False))
    rounds = sorted({int(r) for r in rows["round_id"]})
    con.execute(
        "INSERT INTO datasets (id, content_hash, path, n_groups, n_pairs, rounds, filters, "
        "stats) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            dataset_id,
            digest,
            ws.relative(target),
            len(rows),
            n_pairs,
            json.dumps(rounds),
            json.dumps(filters, sort_keys=True),
            json.dumps(stats, default=str) if stats is not None else None,
        ],
    )
    _record_labels(con, dataset_id, label_ids)
    return dataset_id


def _label_ids(con: duckdb.DuckDBPyConnection, rows: pd.DataFrame) -> list[int]:
    """The ids of the labels behind snapshot rows: their `label_ids` column, else every label
    of their groups."""
    if "label_ids" in rows.columns:
        return sorted({int(i) for ids in rows["label_ids"] for i in ids})
    group_ids = sorted({int(g) for g in rows["group_id"]})
    found = con.execute(
        f"SELECT id FROM labels WHERE group_id IN ({', '.join('?' for _ in group_ids)})",
        group_ids,
    ).fetchall()
    return sorted(int(r[0]) for r in found)


def _record_labels(con: duckdb.DuckDBPyConnection, dataset_id: str, label_ids: list[int]) -> None:
    """Record that a dataset version froze these labels (once each)."""
    if not label_ids:
        return
    con.execute(
        "INSERT INTO dataset_labels (dataset_id, label_id) "
        "SELECT ?, unnest(?::INTEGER[]) EXCEPT "
        "SELECT dataset_id, label_id FROM dataset_labels WHERE dataset_id = ?",
        [dataset_id, label_ids, dataset_id],
    )


def frozen_labels(con: duckdb.DuckDBPyConnection, dataset_id: str) -> list[int]:
    """The ids of the labels a dataset version froze."""
    rows = con.execute(
        "SELECT label_id FROM dataset_labels WHERE dataset_id = ? ORDER BY label_id",
        [dataset_id],
    ).fetchall()
    return [int(r[0]) for r in rows]


def list_datasets(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Dataset versions, oldest first."""
    df = con.execute(
        "SELECT id, content_hash, path, n_groups, n_pairs, rounds, filters, stats, created "
        "FROM datasets ORDER BY created, id"
    ).df()
    df["rounds"] = df["rounds"].map(json.loads)
    df["filters"] = df["filters"].map(json.loads)
    df["stats"] = df["stats"].map(lambda s: json.loads(s) if isinstance(s, str) else None)
    return df


def get_dataset(con: duckdb.DuckDBPyConnection, dataset_id: str) -> dict:
    """A dataset version's row; unknown ids raise."""
    df = list_datasets(con)
    match = df[df["id"] == dataset_id]
    if match.empty:
        known = ", ".join(df["id"]) or "none yet"
        raise PrefloopError(f"unknown dataset version {dataset_id!r}; known: {known}")
    return match.iloc[0].to_dict()


def latest_dataset(con: duckdb.DuckDBPyConnection) -> str | None:
    """The newest dataset version's id, or None."""
    df = list_datasets(con)
    return None if df.empty else str(df.iloc[-1]["id"])


def _none(value):
    """None for the missing values pandas reads back as NaN."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _list(value) -> list:
    value = _none(value)
    if value is None:
        return []
    return value.tolist() if hasattr(value, "tolist") else list(value)


def training_groups(rows: pd.DataFrame) -> list[TrainingGroup]:
    """Snapshot rows (as read_snapshot or curation return them) as typed training groups."""
    groups = []
    for r in rows.to_dict("records"):
        messages = _none(r.get("messages"))
        groups.append(
            TrainingGroup(
                prompt=r["prompt"],
                texts=_list(r["texts"]),
                ranking=_canonical(r["ranking"]),
                rankings=_canonical(_list(r.get("rankings"))),
                messages=json.loads(messages) if isinstance(messages, str) else messages,
                finish_reasons=[_none(f) for f in _list(r.get("finish_reasons"))],
                model_version=_none(r.get("model_version")),
                group_id=_none(r.get("group_id")),
                round_id=_none(r.get("round_id")),
                candidate_ids=[int(c) for c in _list(r.get("candidate_ids"))],
                sample_logprobs=[_none(x) for x in _list(r.get("sample_logprobs"))],
                n_labels=int(_none(r.get("n_labels")) or 1),
                thumbs=_canonical(_none(r.get("thumbs"))),
            )
        )
    return groups


def read_groups(ws: Workspace, info: dict) -> list[TrainingGroup]:
    """A dataset version's training groups, checked against its content hash."""
    return training_groups(read_snapshot(ws, info))


def snapshot_path(ws: Workspace, info: dict) -> Path:
    """The snapshot file of a dataset version's row, refused if it is outside the workspace."""
    return ws.resolve_stored(info["path"], f"the snapshot of dataset {info['id']}")


def read_snapshot(ws: Workspace, info: dict) -> pd.DataFrame:
    """A dataset version's rows, checked against its content hash."""
    path = snapshot_path(ws, info)
    if not path.exists():
        raise PrefloopError(f"snapshot file {path} of dataset {info['id']} is missing")
    rows = pd.read_parquet(path)
    rows["ranking"] = rows["ranking"].map(lambda r: [list(map(int, t)) for t in r])
    if "rankings" in rows.columns:
        rows["rankings"] = rows["rankings"].map(
            lambda rs: [[list(map(int, t)) for t in r] for r in rs]
        )
    for col in ("candidate_ids", "texts", "sample_logprobs"):
        rows[col] = rows[col].map(list)
    digest = content_hash(rows)
    if "rankings" not in rows.columns:
        rows["rankings"] = rows["ranking"].map(lambda r: [r])
    if "thumbs" not in rows.columns:
        rows["thumbs"] = None
    else:
        rows["thumbs"] = rows["thumbs"].map(
            lambda t: None if t is None else [[int(x) for x in c] for c in t]
        )
    if "finish_reasons" not in rows.columns:
        rows["finish_reasons"] = rows["texts"].map(lambda t: [None] * len(t))
    else:
        rows["finish_reasons"] = rows["finish_reasons"].map(list)
    if digest != info["content_hash"]:
        raise PrefloopError(
            f"snapshot {path} does not match the content hash of dataset {info['id']}; "
            "it was modified outside prefloop"
        )
    return rows
