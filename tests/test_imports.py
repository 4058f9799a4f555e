"""Imports: good files land, malformed files are rejected whole with FILE:LINE."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from labeling.ingest import import_labels
from store import db, labels, rounds
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import ROOT, cli, cli_error, read_jsonl, run_cli, write_jsonl

HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def _counts(ws: Path) -> dict[str, int]:
    with db.connect(db.workspace(ws)) as con:
        return db.table_counts(con)


@pytest.fixture
def ws(tmp_path: Path, capsys) -> Path:
    """A workspace with two prompts and one round of two groups of K=3."""
    root = tmp_path / "ws"
    cli(capsys, "init", "-w", root, "--model", "unused")
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Say hi."}, {"prompt": "Say bye."}])
    cli(capsys, "prompts", "import", tmp_path / "p.jsonl", "-w", root)
    with db.connect(db.workspace(root)) as con:
        r = rounds.create_round(con, "base", "train", 3, {}, "sampled")
        for pid in (1, 2):
            rounds.add_group(con, r, pid, [CandidateRecord(t) for t in ("a", "bb", "ccc")])
    return root


def test_prompt_import_skips_duplicates_and_reads_all_formats(ws: Path, tmp_path: Path, capsys):
    src = write_jsonl(
        tmp_path / "more.jsonl",
        [
            {"prompt": "Say   hi. "},  # whitespace duplicate of an existing prompt
            {"prompt": "Name a colour."},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Name a fruit."},
                ]
            },
        ],
    )
    out = cli(capsys, "prompts", "import", src, "-w", ws, "--split", "heldout")
    assert "imported 2 prompts into heldout; skipped 1 duplicates" in out
    (tmp_path / "p.csv").write_text('prompt\n"Tell a joke, please."\nName a colour.\n')
    out = cli(capsys, "prompts", "import", tmp_path / "p.csv", "-w", ws)
    assert "imported 1 prompts" in out and "skipped 1 duplicates" in out
    assert _counts(ws)["prompts"] == 5


@pytest.mark.parametrize(
    ("command", "rows", "bad_line"),
    [
        (("prompts", "import"), ['{"prompt": "ok"}', '{"prompt": ""}'], 2),
        (("prompts", "import"), ['{"prompt": "ok"}', "{not json"], 2),
        (
            ("groups", "import"),
            [
                '{"prompt": "p", "completions": ["a", "b"], "ranks": [1, 2]}',
                '{"prompt": "p", "completions": ["a", "b"], "ranks": [1]}',
            ],
            2,
        ),
        (
            ("pairs", "import"),
            ['{"prompt": "p", "chosen": "a", "rejected": "b"}', '{"prompt": "p", "chosen": 3}'],
            2,
        ),
        (("labels", "import"), ['{"group_id": 1, "annotator": "x", "ranking": "no"}'], 1),
    ],
)
def test_malformed_files_are_rejected_whole(ws, tmp_path, capsys, command, rows, bad_line):
    before = _counts(ws)
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(rows) + "\n")
    err = cli_error(capsys, *command, src, "-w", ws)
    assert f"{src}:{bad_line}" in err
    assert _counts(ws) == before


def _label(group_id: int, ranking, annotator: str = "ann") -> dict:
    return {"group_id": group_id, "annotator": annotator, "ranking": ranking}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (_label(99, [[1], [2], [3]]), "unknown group_id 99"),
        (_label(1, [[1], [2]]), "misses candidate(s) [3]"),
        (_label(1, [[1], [2], [3], [4]]), "do not belong to group 1"),
        (_label(1, [[1], [1, 2], [3]]), "lists id 1 twice"),
        (_label(2, [[1], [2], [3]]), "do not belong to group 2"),
    ],
)
def test_label_import_validates_membership(ws, tmp_path, capsys, bad, message):
    good = _label(2, [[4], [5, 6]])
    src = write_jsonl(tmp_path / "labels.jsonl", [good, bad])
    err = cli_error(capsys, "labels", "import", src, "-w", ws)
    assert f"{src}:2" in err and message in err
    assert _counts(ws)["labels"] == 0  # the good first row was not stored either


def test_label_import_stores_ties_flags_and_refuses_a_second_label(ws, tmp_path, capsys):
    rows = [
        {**_label(1, [[3], [1, 2]]), "comment": "b and a tie"},
        {"group_id": 2, "annotator": "ann", "ranking": None, "flags": ["skipped"]},
        {**_label(1, [[1], [2], [3]], "other"), "flags": ["all_bad"]},
    ]
    src = write_jsonl(tmp_path / "labels.jsonl", rows)
    assert "imported 3 labels" in cli(capsys, "labels", "import", src, "-w", ws)
    with db.connect(db.workspace(ws)) as con:
        stored = labels.labels(con)
    first = stored[stored["annotator"] == "ann"].iloc[0]
    assert first["ranking"] == [[3], [1, 2]] and first["comment"] == "b and a tie"
    assert sorted(map(tuple, stored["flags"])) == [(), ("all_bad",), ("skipped",)]
    again = write_jsonl(tmp_path / "again.jsonl", [_label(1, [[1], [2], [3]])])
    assert "already has a label" in cli_error(capsys, "labels", "import", again, "-w", ws)


def test_groups_export_import_round_trip(ws, tmp_path, capsys):
    cli(capsys, "groups", "export", "-w", ws, "--out", tmp_path / "g.jsonl")
    exported = read_jsonl(tmp_path / "g.jsonl")
    assert [g["group_id"] for g in exported] == [1, 2]
    assert [c["text"] for c in exported[0]["candidates"]] == ["a", "bb", "ccc"]
    src = write_jsonl(
        tmp_path / "ranked.jsonl",
        [{"prompt": "Say hi.", "completions": ["x", "y", "z"], "ranks": [2, 1, 2]}],
    )
    assert "imported 1 ranked groups as round 2" in cli(capsys, "groups", "import", src, "-w", ws)
    with db.connect(db.workspace(ws)) as con:
        imported = labels.labels(con, [2])
        assert db.table_counts(con)["prompts"] == 2  # the prompt was matched, not duplicated
    ranking = imported.iloc[0]["ranking"]
    assert ranking == [[8], [7, 9]]


@pytest.mark.skipif(not HH.exists(), reason="shared HH-RLHF file not present")
def test_hh_rlhf_imports_completely(tmp_path, capsys):
    ws = tmp_path / "hh"
    cli(capsys, "init", "-w", ws, "--model", "unused")
    out = cli(capsys, "pairs", "import", HH, "-w", ws)
    assert "imported 2308 pairs" in out
    assert "skipped 4 rows: empty final Assistant turn" in out
    counts = _counts(ws)
    assert counts["groups"] == 2308 and counts["labels"] == 2308 and counts["candidates"] == 4616


def test_labelling_while_a_cli_job_samples(tmp_path: Path, tiny_model_dir: Path, capsys):
    """The app (labels, here through the same store call) and a CLI job share the workspace."""
    root = tmp_path / "ws"
    cli(capsys, "init", "-w", root, "--model", tiny_model_dir)
    cli(capsys, "prompts", "import", ROOT / "labeling/data/demo_prompts.jsonl", "-w", root)
    ws = db.workspace(root)
    with db.connect(ws) as con:
        r = rounds.create_round(con, "base", "train", 2, {}, "sampled")
        groups = [
            rounds.add_group(con, r, p, [CandidateRecord("x"), CandidateRecord("y")])
            for p in range(1, 31)
        ]
    result: dict = {}

    def job() -> None:
        result["proc"] = run_cli(
            "sample",
            "-w",
            root,
            "--k",
            2,
            "--max-new-tokens",
            24,
            "--prompts-per-batch",
            2,
            check=False,
        )

    thread = threading.Thread(target=job)
    thread.start()
    stored = 0
    for group_id, (a, b) in groups:
        with db.connect(ws) as con:
            labels.add_labels(con, [LabelRecord(group_id, "ann", [[a], [b]])])
        stored += 1
        time.sleep(0.05)
    thread.join(timeout=300)
    proc = result["proc"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert stored == 30
    with db.connect(ws) as con:
        assert db.table_counts(con)["labels"] == 30
        assert len(rounds.groups(con, round_id=int(proc.stdout.split()[-1]))) == 40


def test_import_labels_api_matches_cli(ws, tmp_path):
    src = write_jsonl(tmp_path / "l.jsonl", [_label(1, [[2], [1], [3]])])
    assert import_labels(db.workspace(ws), src) == 1
    assert json.loads(json.dumps(_counts(ws)))["labels"] == 1
