"""What a killed job leaves behind is dealt with by the next run: an adapter folder moved into
place but never recorded, and a run row still marked running."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from store import db, models, runs
from tests.cli_helpers import cli
from tests.labelled_ws import QUICK_TUNE, labelled_workspace, prefloop


@pytest.fixture(scope="module")
def labelled(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with ranked train groups and no model version yet."""
    root = tmp_path_factory.mktemp("labelled") / "ws"
    labelled_workspace(root, tiny_model_dir)
    return root


@pytest.fixture
def ws(labelled: Path, tmp_path: Path) -> db.Workspace:
    """A copy of the labelled workspace."""
    shutil.copytree(labelled, tmp_path / "ws")
    return db.workspace(tmp_path / "ws")


def dead_pid() -> int:
    """The id of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def killed_run(ws: db.Workspace, kind: str) -> int:
    """A run row left `running` by a process that is gone, as a kill leaves it."""
    with db.connect(ws) as con:
        run_id = runs.start_run(con, kind, {"method": "dpo"})
        con.execute("UPDATE runs SET pid = ? WHERE id = ?", [dead_pid(), run_id])
    return run_id


def stored_status(ws: db.Workspace, run_id: int) -> tuple[str, str | None]:
    """A run's status and error as the table holds them (not as the listing reports them)."""
    with db.connect(ws) as con:
        return con.execute("SELECT status, error FROM runs WHERE id = ?", [run_id]).fetchone()


def orphan_adapter(ws: db.Workspace, name: str, run_id: int | None) -> Path:
    """An adapter folder moved into place whose database commit never happened."""
    folder = ws.artifacts / "adapters" / name
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    if run_id is not None:
        marker = {"pid": dead_pid(), "host": socket.gethostname(), "run_id": run_id}
        (folder / models.MARKER).write_text(json.dumps(marker))
    return folder


@pytest.mark.parametrize("marked", [True, False], ids=["killed-run", "unmarked"])
def test_next_tune_sets_the_orphan_aside_and_numbers_without_a_gap(ws, capsys, marked):
    run_id = killed_run(ws, "tune")
    orphan_adapter(ws, "v1", run_id if marked else None)
    out = cli(capsys, "tune", "-w", ws.root, *QUICK_TUNE)
    assert out.split()[-1] == "v1"
    with db.connect(ws) as con:
        assert models.list_versions(con)["id"].tolist() == ["v1"]
    assert (ws.artifacts / "adapters" / "v1" / "adapter_model.safetensors").exists()
    kept = ws.artifacts / "orphans" / "v1"
    assert json.loads((kept / "adapter_config.json").read_text()) == {}
    assert stored_status(ws, run_id)[0] == "failed"


def test_a_folder_being_registered_by_a_live_run_is_left_alone(ws):
    with db.connect(ws) as con:
        run_id = runs.start_run(con, "tune", {})  # this process: alive, running
    folder = ws.artifacts / "adapters" / "v1"
    folder.mkdir(parents=True)
    marker = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id}
    (folder / models.MARKER).write_text(json.dumps(marker))
    with db.connect(ws) as con:
        assert models.set_aside_orphans(ws, con) == []
        runs.finish_run(con, run_id, None)  # its run ended without recording it: an orphan now
        assert models.set_aside_orphans(ws, con) == [("v1", ws.artifacts / "orphans" / "v1")]
    assert not folder.exists()


def test_runs_list_records_a_killed_run_as_failed_in_the_table(ws, capsys):
    killed = killed_run(ws, "tune")
    with db.connect(ws) as con:
        alive = runs.start_run(con, "sample", {})  # this process: still running
    rows = json.loads(cli(capsys, "runs", "list", "-w", ws.root, "--json"))
    assert {r["id"]: r["status"] for r in rows} == {killed: "failed", alive: "running"}
    status, error = stored_status(ws, killed)
    assert status == "failed" and "killed or crashed" in error
    assert stored_status(ws, alive) == ("running", None)


def test_next_sample_records_a_killed_run_as_failed(ws):
    killed = killed_run(ws, "sample")
    prefloop("sample", "-w", ws.root, "--k", 1, "--max-new-tokens", 2, "--limit", 1)
    status, error = stored_status(ws, killed)
    assert status == "failed" and "killed or crashed" in error
