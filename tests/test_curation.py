"""Curated dataset versions: each filter, the held-out split, statistics and the card."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from labeling.curation import Curation, curated_rows, freeze_versions
from store import datasets, labels
from store import db as storedb
from store import gold as store_gold
from store.errors import PrefloopError
from store.records import LabelRecord
from tests.cli_helpers import cli, cli_error, read_jsonl
from tests.fixtures_app import SeededRound, make_workspace, seed_round


def _label(ws: storedb.Workspace, records: list[LabelRecord]) -> None:
    with storedb.connect(ws) as con:
        labels.add_labels(con, records)


def _best_first(cids: list[int]) -> list[list[int]]:
    return [[c] for c in cids]


def _worst_first(cids: list[int]) -> list[list[int]]:
    return [[c] for c in reversed(cids)]


def _rows(ws: storedb.Workspace, **filters) -> tuple[pd.DataFrame, dict]:
    with storedb.connect(ws) as con:
        return curated_rows(con, Curation(**filters))


@pytest.fixture
def ws(tmp_path: Path) -> storedb.Workspace:
    return make_workspace(tmp_path / "ws")


def test_annotator_filters_and_judge_left_out_by_default(ws) -> None:
    r = seed_round(ws, n_groups=2, k=3)
    g, c = r.group_ids, r.candidate_ids
    _label(
        ws,
        [
            LabelRecord(g[0], "ann", _best_first(c[0])),
            LabelRecord(g[0], "bob", _worst_first(c[0])),
            LabelRecord(g[1], "bob", _worst_first(c[1])),
            LabelRecord(g[0], "judge", _best_first(c[0])),
            LabelRecord(g[1], "judge", _best_first(c[1])),
        ],
    )
    rows, info = _rows(ws)
    assert [a for a in rows["annotators"]] == [["ann", "bob"], ["bob"]]  # no judge
    assert info["labels_excluded"]["annotator_filter"] == 2

    rows, info = _rows(ws, annotators=["ann"])
    assert rows["group_id"].tolist() == [g[0]]
    assert rows.iloc[0]["ranking"] == [[0], [1], [2]]
    assert info["left_out"]["no_selected_annotator"] == 1

    rows, _ = _rows(ws, exclude_annotators=["ann"])
    assert rows["ranking"].tolist() == [[[2], [1], [0]], [[2], [1], [0]]]

    rows, _ = _rows(ws, annotators=["judge"])
    assert rows["ranking"].tolist() == [[[0], [1], [2]], [[0], [1], [2]]]

    with pytest.raises(PrefloopError, match="no labels from annotator"):
        _rows(ws, annotators=["nobody"])


def test_exclude_flagged_drops_the_annotator_the_agreement_report_flags(ws) -> None:
    r = seed_round(ws, n_groups=4, k=3)
    records = []
    for gid, cids in zip(r.group_ids, r.candidate_ids, strict=True):
        records += [LabelRecord(gid, a, _best_first(cids)) for a in ("ann", "bob", "cat")]
        records.append(LabelRecord(gid, "contrarian", _worst_first(cids)))
    _label(ws, records)

    rows, info = _rows(ws)
    assert info["flagged_annotators"] == []
    assert all("contrarian" in a for a in rows["annotators"])
    assert rows.iloc[0]["agreement"] == pytest.approx(0.5)  # 3 of 6 annotator pairs agree

    rows, info = _rows(ws, exclude_flagged=True)
    assert info["flagged_annotators"] == ["contrarian"]
    assert info["labels_excluded"]["flagged_annotator"] == 4
    assert all(a == ["ann", "bob", "cat"] for a in rows["annotators"])
    assert rows.iloc[0]["agreement"] == pytest.approx(1.0)


def test_exclude_flagged_uses_gold_groups(ws) -> None:
    r = seed_round(ws, n_groups=4, k=2)
    with storedb.connect(ws) as con:
        for gid, cids in zip(r.group_ids, r.candidate_ids, strict=True):
            store_gold.set_gold(con, gid, _best_first(cids), "lead")
    # nobody shares a group, so only gold accuracy can flag: 'sloppy' gets every gold group wrong
    _label(
        ws,
        [
            *(
                LabelRecord(g, "sloppy", _worst_first(c))
                for g, c in zip(r.group_ids[:3], r.candidate_ids[:3], strict=True)
            ),
            LabelRecord(r.group_ids[3], "careful", _best_first(r.candidate_ids[3])),
        ],
    )
    assert len(_rows(ws)[0]) == 4
    rows, info = _rows(ws, exclude_flagged=True)
    assert info["flagged_annotators"] == ["sloppy"]
    assert rows["group_id"].tolist() == [r.group_ids[3]]


def test_min_agreement_drops_disputed_groups_and_passes_single_annotators(ws) -> None:
    r = seed_round(ws, n_groups=3, k=3)
    g, c = r.group_ids, r.candidate_ids
    _label(
        ws,
        [
            LabelRecord(g[0], "ann", _best_first(c[0])),
            LabelRecord(g[0], "bob", _best_first(c[0])),
            LabelRecord(g[1], "ann", _best_first(c[1])),
            LabelRecord(g[1], "bob", [[c[1][1]], [c[1][0]], [c[1][2]]]),  # 2 of 3 pairs agree
            LabelRecord(g[2], "ann", _worst_first(c[2])),
        ],
    )
    assert _rows(ws)[0]["group_id"].tolist() == g
    rows, info = _rows(ws, min_agreement=0.7)
    assert rows["group_id"].tolist() == [g[0], g[2]]
    assert info["left_out"]["low_agreement"] == 1
    assert _rows(ws, min_agreement=2 / 3)[0]["group_id"].tolist() == g  # at the bound: kept
    with pytest.raises(PrefloopError, match="between 0 and 1"):
        _rows(ws, min_agreement=1.5)


def test_all_bad_groups_left_out_unless_kept_and_skipped_labels_ignored(ws) -> None:
    r = seed_round(ws, n_groups=3, k=2)
    g, c = r.group_ids, r.candidate_ids
    _label(
        ws,
        [
            LabelRecord(g[0], "ann", _best_first(c[0]), flags=["all_bad"]),
            LabelRecord(g[1], "ann", None, flags=["skipped"]),
            LabelRecord(g[2], "ann", _best_first(c[2])),
            LabelRecord(g[2], "bob", None, flags=["skipped"]),
        ],
    )
    rows, info = _rows(ws)
    assert rows["group_id"].tolist() == [g[2]] and rows.iloc[0]["rankings"] == [[[0], [1]]]
    assert info["left_out"]["all_bad"] == 1 and info["left_out"]["skipped"] == 1
    rows, info = _rows(ws, keep_all_bad=True)
    assert rows["group_id"].tolist() == [g[0], g[2]] and info["left_out"]["all_bad"] == 0


def test_dedupe_keeps_one_group_per_prompt_most_labels_then_newest(ws) -> None:
    first = seed_round(ws, n_groups=2, k=2)
    second = seed_round(ws, n_groups=2, k=2)  # the same two prompts, sampled again
    records = [
        LabelRecord(first.group_ids[0], "ann", _best_first(first.candidate_ids[0])),
        LabelRecord(first.group_ids[0], "bob", _best_first(first.candidate_ids[0])),
        LabelRecord(second.group_ids[0], "ann", _best_first(second.candidate_ids[0])),
        LabelRecord(first.group_ids[1], "ann", _best_first(first.candidate_ids[1])),
        LabelRecord(second.group_ids[1], "ann", _best_first(second.candidate_ids[1])),
    ]
    _label(ws, records)
    assert len(_rows(ws)[0]) == 4
    rows, info = _rows(ws, dedupe=True)
    # prompt 1: the group with two labels; prompt 2: equal labels, the newer group
    assert rows["group_id"].tolist() == [first.group_ids[0], second.group_ids[1]]
    assert info["left_out"]["duplicate_prompt"] == 2


def test_max_length_ratio_leaves_out_groups_teaching_lopsided_pairs(ws) -> None:
    r = seed_round(ws, n_groups=2, k=3, first_texts=["short", "a much longer answer", "tiny"])
    g, c = r.group_ids, r.candidate_ids
    _label(ws, [LabelRecord(gid, "ann", _best_first(cids)) for gid, cids in zip(g, c, strict=True)])
    # group 1 teaches 'a much longer answer' (20 chars) over 'tiny' (4): ratio 5
    assert len(_rows(ws)[0]) == 2
    rows, info = _rows(ws, max_length_ratio=3.0)
    assert rows["group_id"].tolist() == [g[1]] and info["left_out"]["length_ratio"] == 1
    assert len(_rows(ws, max_length_ratio=5.0)[0]) == 2
    # an annotator's pair counts too, even when the consensus ties it away
    _label(ws, [LabelRecord(g[1], "bob", _worst_first(c[1]))])
    assert len(_rows(ws, max_length_ratio=1.01)[0]) == 1


def test_heldout_split_by_prompt_two_linked_versions(ws, capsys) -> None:
    rounds_ = [seed_round(ws, n_groups=8, k=2) for _ in range(2)]  # each prompt twice
    records = [
        LabelRecord(gid, "ann", _best_first(cids))
        for r in rounds_
        for gid, cids in zip(r.group_ids, r.candidate_ids, strict=True)
    ]
    _label(ws, records)
    out = freeze_versions(ws, Curation(heldout_fraction=0.4, split_seed=3))
    assert out.heldout is not None
    with storedb.connect(ws) as con:
        train = datasets.get_dataset(con, out.train)
        held = datasets.get_dataset(con, out.heldout)
    train_rows = datasets.read_snapshot(ws, train)
    held_rows = datasets.read_snapshot(ws, held)
    assert len(train_rows) + len(held_rows) == 16
    assert not set(train_rows["prompt"]) & set(held_rows["prompt"])  # a prompt on one side
    assert held_rows.groupby("prompt").size().eq(2).all()  # with all its groups
    assert train["filters"]["heldout_version"] == out.heldout
    assert held["filters"]["part"] == "heldout" and held["stats"]["groups"] == len(held_rows)
    assert train["stats"]["heldout_groups"] == len(held_rows)
    # the same seed puts every prompt on the same side again, whatever else changed
    again = freeze_versions(ws, Curation(heldout_fraction=0.4, split_seed=3, dedupe=True))
    with storedb.connect(ws) as con:
        held_again = datasets.read_snapshot(ws, datasets.get_dataset(con, again.heldout))
    assert set(held_again["prompt"]) == set(held_rows["prompt"])
    with pytest.raises(PrefloopError, match="held-out split put"):
        freeze_versions(ws, Curation(heldout_fraction=0.001))

    printed = cli(
        capsys, "dataset", "freeze", "-w", ws.root, "--heldout-fraction", 0.4, "--split-seed", 3
    )
    assert printed.strip() == out.train  # stdout: the training version only
    data = json.loads(
        cli(
            capsys,
            *("dataset", "freeze", "-w", ws.root, "--heldout-fraction", 0.4),
            *("--split-seed", 3, "--json"),
        )
    )
    assert (data["train"], data["heldout"]) == (out.train, out.heldout)


def test_freeze_cli_records_filters_and_stats_and_show_prints_the_card(ws, capsys) -> None:
    r = seed_round(ws, n_groups=3, k=3, first_texts=["x", "a longer answer here", "yy"])
    g, c = r.group_ids, r.candidate_ids
    _label(
        ws,
        [
            *(LabelRecord(gid, "ann", _best_first(cids)) for gid, cids in zip(g, c, strict=True)),
            LabelRecord(g[1], "bob", _best_first(c[1])),
            LabelRecord(g[2], "bob", _worst_first(c[2])),
        ],
    )
    version = cli(
        capsys,
        *("dataset", "freeze", "-w", ws.root, "--annotators", "ann,bob"),
        *("--min-agreement", "0.5", "--max-length-ratio", "4"),
    ).strip()
    with storedb.connect(ws) as con:
        info = datasets.get_dataset(con, version)
    f, s = info["filters"], info["stats"]
    assert f["annotators"] == ["ann", "bob"] and f["min_agreement"] == 0.5
    assert f["max_length_ratio"] == 4.0 and f["dedupe"] is False
    assert s["groups"] == 1 and s["pairs"] == 3 and info["n_pairs"] == 3
    assert s["left_out"]["length_ratio"] == 1 and s["left_out"]["low_agreement"] == 1
    assert s["annotators"] == ["ann", "bob"] and s["labels_per_group"] == 2.0
    assert s["mean_agreement"] == 1.0
    assert s["length_ratio"]["max"] == pytest.approx(1.0)  # 'answer 2.x' texts: equal lengths

    card = cli(capsys, "dataset", "show", version, "-w", ws.root)
    assert f"Dataset version `{version}`" in card and info["content_hash"] in card
    assert "annotators: ann, bob" in card and "minimum agreement per group: 0.500" in card
    assert "length ratio cap: 4.000" in card
    assert "groups left out: low_agreement 1, length_ratio 1" in card
    assert "mean agreement: 1.000" in card
    assert cli(capsys, "dataset", "show", "-w", ws.root) == card  # newest by default
    assert "unknown dataset version" in cli_error(capsys, "dataset", "show", "d9", "-w", ws.root)

    out = ws.root / "export" / "pairs.jsonl"
    cli(capsys, "export", "-w", ws.root, "--format", "pairs", "--out", out, "--dataset", version)
    assert len(read_jsonl(out)) == 3
    readme = (out.parent / "README.md").read_text()
    assert f"dataset version: `{version}`" in readme
    assert "### Filters" in readme and "groups left out: low_agreement 1" in readme


def test_rank_only_versions_hash_as_before_and_old_snapshots_still_read(ws) -> None:
    r: SeededRound = seed_round(ws, n_groups=2, k=2)
    pairs = zip(r.group_ids, r.candidate_ids, strict=True)
    _label(ws, [LabelRecord(g, "ann", _best_first(c)) for g, c in pairs])
    version = freeze_versions(ws).train
    with storedb.connect(ws) as con:
        info = datasets.get_dataset(con, version)
    rows = datasets.read_snapshot(ws, info)
    assert rows["thumbs"].isna().all()
    old = rows.drop(columns=["thumbs"])
    assert datasets.content_hash(old) == info["content_hash"]  # no thumbs: the pre-thumbs hash
    old.to_parquet(datasets.snapshot_path(ws, info), index=False)  # a snapshot frozen before thumbs
    again = datasets.read_snapshot(ws, info)
    assert again["thumbs"].isna().all() and len(again) == 2
    assert freeze_versions(ws).train == version  # same content, same version


def test_an_adjudicated_dispute_replaces_the_consensus_in_training(tmp_path):
    """Two annotators disagree completely; the researcher's decision is what gets frozen."""
    from labeling import team
    from labeling.curation import freeze_dataset
    from store.records import LabelRecord
    from tests.fixtures_app import make_workspace, seed_round

    ws = make_workspace(tmp_path / "adj")
    seeded = seed_round(ws, n_groups=2, k=3)
    (g1, g2), (c1, c2) = seeded.group_ids, seeded.candidate_ids
    with storedb.connect(ws) as con:
        labels.add_labels(
            con,
            [
                LabelRecord(g1, "ann", [[c1[0]], [c1[1]], [c1[2]]]),
                LabelRecord(g1, "bob", [[c1[2]], [c1[1]], [c1[0]]]),
                LabelRecord(g2, "ann", [[c2[0]], [c2[1]], [c2[2]]]),
            ],
        )
    report = team.team_report(ws)
    assert list(report.disputes["group_id"]) == [g1]
    assert report.disputes.iloc[0]["disagreement"] == 1.0
    team.adjudicate(ws, g1, [[c1[1]], [c1[0], c1[2]]], "rey", note="B is the only correct one")
    assert bool(team.team_report(ws).disputes.iloc[0]["adjudicated"])
    rows = _frozen_rows(ws, freeze_dataset(ws))
    # snapshots hold candidate positions within the group
    assert rows[g1]["ranking"] == [[1], [0, 2]]
    assert rows[g1]["rankings"] == [[[1], [0, 2]]]  # soft labels follow the decision too
    assert rows[g2]["ranking"] == [[0], [1], [2]]
    team.adjudicate(ws, g2, None, "rey", flags=["all_bad"])
    rows = _frozen_rows(ws, freeze_dataset(ws))
    assert set(rows) == {g1}


def _frozen_rows(ws, dataset_id):
    from store import datasets as store_datasets

    with storedb.connect(ws) as con:
        info = store_datasets.get_dataset(con, dataset_id)
    df = store_datasets.read_snapshot(ws, info)
    return {
        int(r["group_id"]): {
            "ranking": [[int(c) for c in t] for t in r["ranking"]],
            "rankings": [[[int(c) for c in t] for t in rk] for rk in r["rankings"]],
        }
        for r in df.to_dict("records")
    }
