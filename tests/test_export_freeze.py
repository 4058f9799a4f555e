"""`prefloop export` without --dataset freezes the current labels first; `prefloop labels
import` warns when labels come under the judge's reserved annotator name."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import main
from labeling.curation import JUDGE_ANNOTATOR
from store import datasets
from store import db as storedb
from tests.cli_helpers import cli, cli_error, read_jsonl, write_jsonl
from tests.fixtures_app import make_workspace, seed_round


@pytest.fixture
def ws(tmp_path: Path) -> storedb.Workspace:
    return make_workspace(tmp_path / "ws")


def _labels_file(path: Path, seeded, annotator: str) -> Path:
    rows = [
        {"group_id": gid, "annotator": annotator, "ranking": [[c] for c in cids]}
        for gid, cids in zip(seeded.group_ids, seeded.candidate_ids, strict=True)
    ]
    return write_jsonl(path, rows)


def _versions(ws: storedb.Workspace) -> list[str]:
    with storedb.connect(ws) as con:
        return list(datasets.list_datasets(con)["id"])


def test_export_without_a_version_freezes_the_current_labels(ws, tmp_path, capsys):
    root = ws.root
    assert "no labelled groups" in cli_error(
        capsys, "export", "-w", root, "--format", "pairs", "--out", tmp_path / "none.jsonl"
    )
    first = seed_round(ws, n_groups=3, k=4)
    cli(capsys, "labels", "import", _labels_file(tmp_path / "a.jsonl", first, "ann"), "-w", root)
    assert _versions(ws) == []

    out = tmp_path / "export" / "pairs.jsonl"
    printed = cli(capsys, "export", "-w", root, "--format", "pairs", "--out", out)
    assert "froze the current labels as dataset version d1" in printed
    assert _versions(ws) == ["d1"]
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out), split="train")
    assert ds.num_rows == 3 * 6  # three groups of four ranked candidates: C(4, 2) pairs each
    assert set(ds.column_names) == {"prompt", "chosen", "rejected", "view_differs"}
    assert not any(ds["view_differs"])  # plain text: the annotators saw what a model trains on
    assert ds[0]["chosen"] == first.texts[0][0]  # ranked best first
    assert "dataset version: `d1`" in (out.parent / "README.md").read_text()

    # unchanged labels: the same version, no new one
    printed = cli(
        capsys, "export", "-w", root, "--format", "listwise", "--out", tmp_path / "l.jsonl"
    )
    assert "dataset version d1 (unchanged, reused)" in printed and _versions(ws) == ["d1"]

    # new labels: a new version that holds them, exported
    second = seed_round(ws, n_groups=1, k=2)
    cli(capsys, "labels", "import", _labels_file(tmp_path / "b.jsonl", second, "ann"), "-w", root)
    out2 = tmp_path / "export2" / "pairs.jsonl"
    printed = cli(capsys, "export", "-w", root, "--format", "pairs", "--out", out2)
    assert "froze the current labels as dataset version d2" in printed
    assert len(read_jsonl(out2)) == 3 * 6 + 1

    # a named version is exported as it is, nothing frozen
    out3 = tmp_path / "export3" / "pairs.jsonl"
    printed = cli(
        capsys, "export", "-w", root, "--format", "pairs", "--out", out3, "--dataset", "d1"
    )
    assert "froze" not in printed and len(read_jsonl(out3)) == 18
    assert _versions(ws) == ["d1", "d2"]


def test_labels_import_under_the_judges_name_warns_how_to_use_them(ws, tmp_path, capsys):
    seeded = seed_round(ws, n_groups=2, k=3)
    judged = _labels_file(tmp_path / "j.jsonl", seeded, JUDGE_ANNOTATOR)
    assert main(["labels", "import", str(judged), "-w", str(ws.root)]) == 0
    captured = capsys.readouterr()
    assert "imported 2 labels" in captured.out
    assert "warning: 2 of these labels are by annotator 'judge'" in captured.err
    assert "--annotators judge," in captured.err and "leave them out unless named" in captured.err

    # and indeed a dataset version leaves them out unless named
    assert "no labelled groups" in cli_error(
        capsys, "export", "-w", ws.root, "--format", "pairs", "--out", tmp_path / "x.jsonl"
    )
    cli(capsys, "dataset", "freeze", "-w", ws.root, "--annotators", JUDGE_ANNOTATOR)
    assert _versions(ws) == ["d1"]

    # a person's labels: no warning
    person = _labels_file(tmp_path / "p.jsonl", seeded, "ann")
    assert main(["labels", "import", str(person), "-w", str(ws.root)]) == 0
    assert "warning" not in capsys.readouterr().err
