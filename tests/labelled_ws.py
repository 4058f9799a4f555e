"""A workspace on the tiny model with ranked train groups, ready for `prefloop tune`."""

from __future__ import annotations

from pathlib import Path

from app.cli import main
from store import db, labels, rounds
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import ROOT

TEXTS = ("Yes.", "Sure, here it is.", "No.", "I will not do that at all.")
# the quickest tuning run: one epoch, no fluency guard, no promotion-gate sampling
QUICK_TUNE = ("--epochs", "1", "--guard-prompts", "0", "--gate-prompts", "0", "--quiet")


def prefloop(*args: object) -> None:
    """Run prefloop in-process, failing on a non-zero exit (for fixtures without capsys)."""
    code = main([str(a) for a in args])
    assert code == 0, f"prefloop {' '.join(map(str, args))} exited {code}"


def labelled_workspace(root: Path, model_dir: Path, texts: tuple[str, ...] = TEXTS) -> db.Workspace:
    """A workspace on model_dir with train and held-out prompts and five train groups of
    `texts`, each ranked in that order."""
    data = ROOT / "labeling" / "data"
    prefloop("init", "-w", root, "--model", model_dir)
    prefloop("prompts", "import", data / "demo_prompts.jsonl", "-w", root)
    prefloop("prompts", "import", data / "demo_prompts_heldout.jsonl", "-w", root,
             "--split", "heldout")  # fmt: skip
    ws = db.workspace(root)
    with db.connect(ws) as con:
        round_id = rounds.create_round(con, "base", "train", 4, {}, "sampled")
        for p in range(1, 6):
            gid, ids = rounds.add_group(con, round_id, p, [CandidateRecord(t) for t in texts])
            labels.add_labels(con, [LabelRecord(gid, "ann1", [[i] for i in ids])])
    return ws
