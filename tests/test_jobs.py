"""Killed or terminated jobs are marked failed and leave no model version behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from store import db, labels, models, rounds, runs
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import ROOT, cli


@pytest.fixture
def labelled_ws(tmp_path: Path, tiny_model_dir: Path, capsys) -> db.Workspace:
    root = tmp_path / "ws"
    cli(capsys, "init", "-w", root, "--model", tiny_model_dir)
    cli(capsys, "prompts", "import", ROOT / "labeling/data/demo_prompts.jsonl", "-w", root)
    ws = db.workspace(root)
    with db.connect(ws) as con:
        r = rounds.create_round(con, "base", "train", 3, {}, "sampled")
        for p in range(1, 9):
            gid, ids = rounds.add_group(
                con, r, p, [CandidateRecord(t * p) for t in ("ok. ", "longer text. ", "x ")]
            )
            labels.add_labels(con, [LabelRecord(gid, "ann", [[ids[2]], [ids[0]], [ids[1]]])])
    return ws


def _start_tune(ws: db.Workspace) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "tune",
            "-w",
            str(ws.root),
            "--epochs",
            "500",
            "--groups-per-step",
            "1",
            "--quiet",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_steps(ws: db.Workspace, proc: subprocess.Popen, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        with db.connect(ws) as con:
            df = runs.list_runs(con)
            if not df.empty:
                run_id = int(df.iloc[0]["id"])
                if len(runs.run_metrics(con, run_id)) >= 2:
                    return run_id
        time.sleep(0.3)
    raise AssertionError("the tuning job wrote no metrics in time")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_tuning_job_is_failed_and_leaves_no_version(labelled_ws, sig):
    proc = _start_tune(labelled_ws)
    try:
        run_id = _wait_for_steps(labelled_ws, proc)
        os.kill(proc.pid, sig)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    with db.connect(labelled_ws) as con:
        run = runs.get_run(con, run_id)
        assert run["status"] == "failed"
        assert models.list_versions(con).empty
    if sig == signal.SIGTERM:
        assert "terminated" in run["error"]  # the job recorded its own end
        assert proc.returncode == 130
    adapters = labelled_ws.artifacts / "adapters"
    assert not [p for p in adapters.iterdir() if not p.name.startswith(".staging")]


def test_a_new_run_cleans_what_a_killed_run_left(labelled_ws, capsys):
    stale = labelled_ws.artifacts / "adapters" / ".staging-run77"
    stale.mkdir(parents=True)
    (stale / "adapter_model.safetensors").write_bytes(b"half")
    version = cli(capsys, "tune", "-w", labelled_ws.root, "--epochs", 1, "--quiet").split()[-1]
    assert version == "v1" and not stale.exists()
    assert (labelled_ws.artifacts / "adapters" / "v1" / "adapter_config.json").exists()
