"""Workspaces: creation, schema migration and refusal, and sharing the database file."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from store import db
from store.errors import PrefloopError
from tests.cli_helpers import ROOT, cli, cli_error


def test_init_creates_database_and_artifacts(tmp_path: Path, capsys) -> None:
    ws = tmp_path / "ws"
    cli(capsys, "init", "--workspace", ws, "--model", "some/model-id")
    for sub in ("adapters", "snapshots", "runs"):
        assert (ws / "artifacts" / sub).is_dir()
    out = cli(capsys, "status", "--workspace", ws)
    assert "base model: some/model-id" in out and "prompts: 0" in out
    assert "already exists" in cli_error(capsys, "init", "--workspace", ws)


def test_workspace_from_environment(tmp_path: Path, capsys, monkeypatch) -> None:
    ws = tmp_path / "envws"
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws))
    cli(capsys, "init")
    assert "prompts: 0" in cli(capsys, "status")


def test_missing_workspace_says_how_to_create_one(tmp_path: Path, capsys) -> None:
    err = cli_error(capsys, "rounds", "list", "--workspace", tmp_path / "nope")
    assert "prefloop init" in err


def test_older_schema_is_migrated(tmp_path: Path) -> None:
    ws = db.create(tmp_path / "old", "m", upto=1)
    con = duckdb.connect(str(ws.db_path))
    assert db.schema_version(con) == 1
    con.execute("INSERT INTO prompts (text, norm_key, split) VALUES ('hi', 'hi', 'train')")
    con.close()
    with db.connect(ws) as con:
        assert db.schema_version(con) == db.SCHEMA_VERSION
        assert db.table_counts(con)["prompts"] == 1  # data kept
        from store import runs

        assert runs.list_runs(con).empty  # the table migration 2 added


def test_newer_schema_is_refused(tmp_path: Path, capsys) -> None:
    ws = db.create(tmp_path / "new", "m")
    con = duckdb.connect(str(ws.db_path))
    con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(PrefloopError, match="upgrade prefloop"), db.connect(ws):
        pass
    assert "newer" in cli_error(capsys, "status", "--workspace", ws.root)


HOLD = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def _hold(ws: db.Workspace, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(ws.db_path), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_connect_waits_for_another_process_then_succeeds(tmp_path: Path) -> None:
    ws = db.create(tmp_path / "ws", "m")
    holder = _hold(ws, 1.5)
    start = time.monotonic()
    with db.connect(ws, timeout_s=30) as con:
        assert db.table_counts(con)["prompts"] == 0
    assert time.monotonic() - start > 0.5  # it really waited for the lock
    holder.wait(timeout=10)


def test_connect_gives_up_with_a_clear_message(tmp_path: Path) -> None:
    ws = db.create(tmp_path / "ws", "m")
    holder = _hold(ws, 5)
    try:
        with (
            pytest.raises(PrefloopError, match="held by another process"),
            db.connect(ws, timeout_s=0.5),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_migration_3_backfills_candidate_origins(tmp_path: Path) -> None:
    ws = db.create(tmp_path / "v2", "m", upto=2)
    con = duckdb.connect(str(ws.db_path))
    con.execute("INSERT INTO prompts (text, norm_key, split) VALUES ('hi', 'hi', 'train')")
    con.execute(
        "INSERT INTO rounds (model_version, split, k, settings, source) "
        "VALUES ('v7', 'train', 2, '{}', 'sampled')"
    )
    con.execute("INSERT INTO groups (round_id, prompt_id) VALUES (1, 1)")
    con.execute("INSERT INTO candidates (group_id, position, text) VALUES (1, 0, 'a'), (1, 1, 'b')")
    con.close()
    from store import rounds

    with db.connect(ws) as con:
        cands = rounds.candidates(con, 1)
    assert list(cands["origin"]) == ["v7", "v7"] and list(cands["text"]) == ["a", "b"]
