"""Model versions: LoRA adapters with a parent, a dataset version and a config."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from pathlib import Path

import duckdb
import pandas as pd

from store import runs
from store.db import Workspace, get_meta
from store.errors import PrefloopError

BASE = "base"
POLICY, REWARD = "policy", "reward"  # what a version is: a policy samples, a reward model judges
# written into an adapter folder just before it is moved into place: which process and run are
# registering it, so a folder whose registration was killed can be told from one in progress
MARKER = "prefloop-run.json"


def base_model(con: duckdb.DuckDBPyConnection) -> str:
    """The workspace's base model id or path."""
    value = get_meta(con, "base_model")
    if not value:
        raise PrefloopError("the workspace has no base model; re-create it with `prefloop init`")
    return value


def list_versions(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Model versions, oldest first, with their config decoded."""
    df = con.execute(
        "SELECT id, parent, base_model, adapter_path, dataset_id, method, promoted, gate, config, "
        "run_id, created, coalesce(kind, 'policy') AS kind FROM model_versions "
        "ORDER BY created, id"
    ).df()
    df["config"] = df["config"].map(json.loads)
    df["gate"] = df["gate"].map(lambda g: json.loads(g) if isinstance(g, str) else None)
    df["promoted"] = df["promoted"].fillna(True).astype(bool)
    return df


def get_version(
    con: duckdb.DuckDBPyConnection, version: str, kind: str | None = None
) -> dict | None:
    """A model version's row; None for the base model; unknown ids raise, and so does a version
    of another kind than `kind` (policy or reward) when one is asked for."""
    if version in (BASE, None, ""):
        if kind == REWARD:
            raise PrefloopError(
                "the base model is a policy, not a reward model; name a version that "
                "`prefloop tune --method rm` made (see `prefloop models list`)"
            )
        return None
    df = list_versions(con)
    match = df[df["id"] == version]
    if match.empty:
        known = ", ".join([BASE, *df["id"]])
        raise PrefloopError(f"unknown model version {version!r}; known versions: {known}")
    row = match.iloc[0].to_dict()
    if kind == REWARD and row["kind"] != REWARD:
        raise PrefloopError(
            f"{version} is a policy, not a reward model; name a version that "
            "`prefloop tune --method rm` made (see `prefloop models list`)"
        )
    if kind == POLICY and row["kind"] == REWARD:
        raise PrefloopError(
            f"{version} is a reward model, not a policy: it scores answers but does not sample "
            f"or continue a policy's training; use it as a judge (--judge rm:{version}) or "
            "name a policy version"
        )
    return row


def latest_version(con: duckdb.DuckDBPyConnection) -> str:
    """The newest policy version's id, or 'base'."""
    df = list_versions(con)
    df = df[df["kind"] == POLICY]
    return BASE if df.empty else str(df.iloc[-1]["id"])


def default_version(con: duckdb.DuckDBPyConnection) -> str:
    """The version a new round samples from by default: the newest promoted policy, or 'base'."""
    df = list_versions(con)
    df = df[df["promoted"] & (df["kind"] == POLICY)]
    return BASE if df.empty else str(df.iloc[-1]["id"])


def set_gate(con: duckdb.DuckDBPyConnection, version: str, gate: dict, promoted: bool) -> None:
    """Record a version's promotion-gate verdict and whether it is promoted."""
    get_version(con, version)
    con.execute(
        "UPDATE model_versions SET gate = ?, promoted = ? WHERE id = ?",
        [json.dumps(gate, sort_keys=True, default=float), promoted, version],
    )


def promote(con: duckdb.DuckDBPyConnection, version: str, force: bool = False) -> dict:
    """Make a version the default for sampling; a version that failed its gate needs force."""
    info = get_version(con, version, POLICY)
    if info is None:
        raise PrefloopError("the base model is always available; name a version such as v2")
    gate = info["gate"] or {}
    if gate.get("passed") is False and not force:
        raise PrefloopError(
            f"{version} failed its promotion gate ({'; '.join(gate.get('reasons', []))}); "
            f"use --force to promote it anyway"
        )
    gate = {**gate, "forced": bool(force and gate.get("passed") is False)}
    set_gate(con, version, gate, True)
    return gate


def adapter_dir(ws: Workspace, info: dict) -> Path:
    """The adapter folder of a model version's row, refused if it is outside the workspace."""
    return ws.resolve_stored(info["adapter_path"], f"the adapter of model version {info['id']}")


def _registering(con: duckdb.DuckDBPyConnection, folder: Path) -> bool:
    """Whether a live process is registering this adapter folder right now."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or not runs.process_alive(
        marker.get("pid"), marker.get("host")
    ):
        return False
    run_id = marker.get("run_id")
    if run_id is None:
        return True
    row = con.execute("SELECT status FROM runs WHERE id = ?", [run_id]).fetchone()
    return row is not None and row[0] == "running"


def set_aside_orphans(ws: Workspace, con: duckdb.DuckDBPyConnection) -> list[tuple[str, Path]]:
    """Move adapter folders that no model version records (a run killed between moving its
    adapter into place and recording it) to artifacts/orphans/; returns (name, new place)."""
    folder = ws.artifacts / "adapters"
    if not folder.is_dir():
        return []
    known = {str(r[0]) for r in con.execute("SELECT id FROM model_versions").fetchall()}
    moved = []
    for path in sorted(folder.iterdir()):
        if not (path.is_dir() and re.fullmatch(r"v\d+", path.name)) or path.name in known:
            continue
        if _registering(con, path):
            continue
        orphans = ws.artifacts / "orphans"
        orphans.mkdir(parents=True, exist_ok=True)
        target, n = orphans / path.name, 1
        while target.exists():
            n += 1
            target = orphans / f"{path.name}-{n}"
        os.replace(path, target)
        moved.append((path.name, target))
    return moved


def register_version(
    ws: Workspace,
    con: duckdb.DuckDBPyConnection,
    staged_dir: Path,
    *,
    parent: str | None,
    dataset_id: str | None,
    method: str,
    config: dict,
    run_id: int | None,
    promoted: bool = True,
    kind: str = POLICY,
) -> str:
    """Move a complete adapter folder into place and record it as the next version (a policy,
    or with kind="reward" a reward model)."""
    set_aside_orphans(ws, con)  # so that numbering continues without a gap
    n = con.execute("SELECT count(*) FROM model_versions").fetchone()[0]
    version = f"v{n + 1}"
    while (ws.artifacts / "adapters" / version).exists():
        n += 1
        version = f"v{n + 1}"
    target = ws.artifacts / "adapters" / version
    marker = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id}
    (Path(staged_dir) / MARKER).write_text(json.dumps(marker))
    os.replace(staged_dir, target)
    try:
        con.execute(
            "INSERT INTO model_versions (id, parent, base_model, adapter_path, dataset_id, method, "
            "config, run_id, promoted, kind) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                version,
                parent,
                base_model(con),
                ws.relative(target),
                dataset_id,
                method,
                json.dumps(config, sort_keys=True),
                run_id,
                promoted,
                kind,
            ],
        )
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return version
