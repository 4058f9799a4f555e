"""Paths stored in the database are resolved inside the workspace; one that leaves it is
refused by export, tune and sample, and nothing is read or written outside."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from store import db
from tests.cli_helpers import cli_error
from tests.labelled_ws import QUICK_TUNE, labelled_workspace, prefloop


@pytest.fixture(scope="module")
def trained(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with dataset version d1 and model version v1 (trained once per module)."""
    root = tmp_path_factory.mktemp("trained") / "ws"
    labelled_workspace(root, tiny_model_dir)
    prefloop("tune", "-w", root, *QUICK_TUNE)
    return root


@pytest.fixture
def ws(trained: Path, tmp_path: Path) -> db.Workspace:
    """A copy of the trained workspace, with an empty folder `outside` beside it."""
    shutil.copytree(trained, tmp_path / "ws")
    (tmp_path / "outside").mkdir()
    return db.workspace(tmp_path / "ws")


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder with its size and modification time."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def snapshot_moved_out(ws: db.Workspace) -> Path:
    """Move d1's snapshot out of the workspace and store its absolute path, as a hand-edited
    database would; returns the folder it went to."""
    outside = ws.root.parent / "outside"
    shutil.move(ws.artifacts / "snapshots" / "d1.parquet", outside / "d1.parquet")
    with db.connect(ws) as con:
        con.execute("UPDATE datasets SET path = ? WHERE id = 'd1'", [str(outside / "d1.parquet")])
    return outside


def adapter_moved_out(ws: db.Workspace) -> Path:
    """Move v1's adapter out of the workspace and store a path that climbs out with `..`."""
    outside = ws.root.parent / "outside"
    shutil.move(ws.artifacts / "adapters" / "v1", outside / "adapter-v1")
    with db.connect(ws) as con:
        con.execute(
            "UPDATE model_versions SET adapter_path = '../outside/adapter-v1' WHERE id = 'v1'"
        )
    return outside


def counts(ws: db.Workspace) -> tuple[int, int, int]:
    """Model versions, rounds and dataset versions in the workspace."""
    with db.connect(ws) as con:
        return tuple(
            con.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("model_versions", "rounds", "datasets")
        )


def test_export_refuses_a_snapshot_stored_outside_the_workspace(ws, capsys):
    outside = snapshot_moved_out(ws)
    out = ws.root.parent / "pairs.jsonl"
    err = cli_error(capsys, "export", "-w", ws.root, "--format", "pairs", "--out", out)
    assert "the snapshot of dataset d1" in err and "outside the workspace" in err
    assert str(outside / "d1.parquet") in err and "backup" in err
    assert not out.exists()


def test_export_refuses_a_snapshot_linked_from_outside(ws, capsys):
    outside = snapshot_moved_out(ws)
    with db.connect(ws) as con:  # the stored path is the usual one, but the file is a link
        con.execute("UPDATE datasets SET path = 'artifacts/snapshots/d1.parquet'")
    (ws.artifacts / "snapshots" / "d1.parquet").symlink_to(outside / "d1.parquet")
    out = ws.root.parent / "lists.parquet"
    err = cli_error(capsys, "export", "-w", ws.root, "--format", "listwise", "--out", out)
    assert "the snapshot of dataset d1" in err and "outside the workspace" in err
    assert not out.exists()


def test_tune_refuses_a_snapshot_stored_outside_and_writes_nothing_beside_it(ws, capsys):
    outside = snapshot_moved_out(ws)
    before, made = listing(outside), counts(ws)
    err = cli_error(capsys, "tune", "-w", ws.root, "--dataset", "d1", *QUICK_TUNE)
    assert "the snapshot of dataset d1" in err and "outside the workspace" in err
    assert listing(outside) == before  # no reference-log-prob cache beside it
    assert counts(ws) == made


def test_sample_and_tune_refuse_an_adapter_stored_outside(ws, capsys):
    outside = adapter_moved_out(ws)
    before, made = listing(outside), counts(ws)
    err = cli_error(capsys, "sample", "-w", ws.root, "--model", "v1", "--k", 1,
                    "--max-new-tokens", 2, "--limit", 1)  # fmt: skip
    assert "the adapter of model version v1" in err and "outside the workspace" in err
    assert "../outside/adapter-v1" in err
    err = cli_error(capsys, "tune", "-w", ws.root, "--from", "v1", "--dataset", "d1", *QUICK_TUNE)
    assert "the adapter of model version v1" in err and "outside the workspace" in err
    assert listing(outside) == before
    assert counts(ws) == made  # no round sampled, no version registered


def test_paths_inside_the_workspace_still_work(ws, capsys):
    out = ws.root.parent / "pairs.jsonl"
    prefloop("export", "-w", ws.root, "--format", "pairs", "--out", out)
    assert out.read_text().strip()
    prefloop("sample", "-w", ws.root, "--model", "v1", "--k", 1, "--max-new-tokens", 2,
             "--limit", 1)  # fmt: skip
    assert counts(ws)[1] == 2
