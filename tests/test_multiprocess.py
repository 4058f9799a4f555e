"""The same DPO loop as two CPU processes under `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from store import db, labels, models, rounds, runs
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import ROOT, cli


def test_two_process_dpo_run_registers_one_version(tmp_path: Path, tiny_model_dir: Path, capsys):
    root = tmp_path / "ws"
    cli(capsys, "init", "-w", root, "--model", tiny_model_dir)
    cli(capsys, "prompts", "import", ROOT / "labeling/data/demo_prompts.jsonl", "-w", root)
    ws = db.workspace(root)
    with db.connect(ws) as con:
        r = rounds.create_round(con, "base", "train", 2, {}, "sampled")
        for p in range(1, 9):
            gid, (a, b) = rounds.add_group(
                con, r, p, [CandidateRecord("Yes."), CandidateRecord("No way, " * p)]
            )
            labels.add_labels(con, [LabelRecord(gid, "ann", [[a], [b]])])
    launcher = Path(sys.executable).with_name("accelerate")
    proc = subprocess.run(
        [
            str(launcher),
            "launch",
            "--cpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "app.cli",
            "tune",
            "-w",
            str(root),
            "--epochs",
            "2",
            "--groups-per-step",
            "4",
            # the per-epoch guard on a random model restarts or stops by chance; not tested here
            "--guard-prompts",
            "0",
            "--quiet",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PREFLOOP_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "v1"
    with db.connect(ws) as con:
        versions = models.list_versions(con)
        all_runs = runs.list_runs(con)
        metrics = runs.run_metrics(con, int(all_runs.iloc[0]["id"]))
    assert list(versions["id"]) == ["v1"]  # one version, not one per process
    assert len(all_runs) == 1 and all_runs.iloc[0]["status"] == "completed"
    assert len(metrics) == 4  # 2 steps per epoch (8 groups, 4 per step, split over 2 processes)
    assert (ws.artifacts / "adapters" / "v1" / "adapter_model.safetensors").exists()
