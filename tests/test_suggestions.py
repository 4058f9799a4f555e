"""Judge suggestions: scorers, pairwise and LLM judges pre-rank a round; `prefloop judge`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labeling.agreement import annotator_report
from labeling.suggest import (
    Scorer,
    judge_scores,
    load_suggestion_judge,
    scores_to_ranking,
    scores_to_thumbs,
    suggest_round,
)
from store import db as storedb
from store import labels, rounds, runs, suggestions
from store.errors import PrefloopError
from store.records import LabelRecord
from tests.cli_helpers import cli, cli_error
from tests.fixtures_app import make_workspace, seed_round

SHORTER = "tests.judges.length:shorter"  # scorer: -len(completion)
ALWAYS_A = "tests.judges.length:always_a"  # pairwise: the first answer wins


@pytest.fixture
def ws(tmp_path: Path) -> storedb.Workspace:
    return make_workspace(tmp_path / "ws")


def test_scores_become_tiers_and_pairwise_wins_count_ties_half() -> None:
    assert scores_to_ranking([7, 8, 9], [1.0, 3.0, 1.0]) == [[8], [7, 9]]
    assert scores_to_thumbs([7, 8, 9, 10], [1.0, 2.0, 3.0, 4.0]) == {
        7: False,
        8: False,
        9: True,
        10: True,
    }
    assert scores_to_thumbs([7, 8], [1.0, 1.0]) == {7: False, 8: False}  # nothing above median
    assert scores_to_thumbs([7, 8], [0.2, 0.7], threshold=0.5) == {7: False, 8: True}

    def by_length(prompt: str, a: str, b: str) -> float:
        return 1.0 if len(a) > len(b) else 0.0 if len(a) < len(b) else 0.5

    # 'bb' beats both; 'a' and 'c' tie with each other (½ each) and lose to 'bb'
    assert judge_scores(by_length, [("p", ["a", "bb", "c"])]) == [[0.5, 2.0, 0.5]]
    scorer = load_suggestion_judge(SHORTER)
    assert isinstance(scorer, Scorer)
    assert judge_scores(scorer, [("p", ["a", "bbb"])]) == [[-1.0, -3.0]]
    assert not isinstance(load_suggestion_judge(ALWAYS_A), Scorer)
    with pytest.raises(PrefloopError, match="cannot load judge"):
        load_suggestion_judge("tests.judges.length:missing")


def test_scorer_suggestions_stored_per_group_and_as_judge_labels(ws) -> None:
    r = seed_round(ws, n_groups=2, k=3, first_texts=["medium", "a long answer", "s"])
    g, c = r.group_ids, r.candidate_ids
    judge = load_suggestion_judge(SHORTER)
    report = suggest_round(ws, r.round_id, judge, SHORTER, as_annotator=True)
    assert (report.groups, report.suggested, report.labelled) == (2, 2, 2)
    with storedb.connect(ws) as con:
        assert suggestions.suggestion(con, g[0]) == (SHORTER, [[c[0][2]], [c[0][0]], [c[0][1]]])
        assert suggestions.suggestion(con, g[1]) == (SHORTER, [c[1]])  # equal lengths tie
        df = suggestions.suggestions(con, r.round_id)
        judged = labels.labels(con, annotator="judge")
        run = runs.list_runs(con).iloc[-1]
    assert df["group_id"].tolist() == g and df["judge"].eq(SHORTER).all()
    assert judged["ranking"].tolist() == [[[c[0][2]], [c[0][0]], [c[0][1]]], [c[1]]]
    assert (run["kind"], run["status"]) == ("judge", "completed")

    # judging again replaces the suggestions but keeps the judge's labels
    report = suggest_round(
        ws, r.round_id, load_suggestion_judge(ALWAYS_A), ALWAYS_A, as_annotator=True
    )
    assert (report.labelled, report.already_labelled) == (0, 2)
    with storedb.connect(ws) as con:
        assert suggestions.suggestion(con, g[0]) == (ALWAYS_A, [[i] for i in c[0]])
        assert len(labels.labels(con, annotator="judge")) == 2
        assert suggestions.suggestion(con, 999) is None


def test_judge_labels_give_judge_human_agreement(ws) -> None:
    r = seed_round(ws, n_groups=3, k=3, first_texts=["medium", "a long answer", "s"])
    human = [
        LabelRecord(gid, "ann", [[x] for x in sorted(cids, key=lambda x: -x)])
        for gid, cids in zip(r.group_ids, r.candidate_ids, strict=True)
    ]
    with storedb.connect(ws) as con:
        labels.add_labels(con, human)
    suggest_round(ws, r.round_id, load_suggestion_judge(ALWAYS_A), ALWAYS_A, as_annotator=True)
    with storedb.connect(ws) as con:
        labs = labels.labels(con, [r.round_id])
    by_group: dict = {}
    for row in labs.itertuples():
        by_group.setdefault(row.group_id, {})[row.annotator] = row.ranking
    report = {s.annotator: s for s in annotator_report(by_group)}
    # the judge ranks by position, the human in reverse: they agree on no pair
    assert report["judge"].pairwise_agreement == 0.0 and report["ann"].n_shared == 3


def test_judge_cli_toggles_show_and_reports(ws, capsys) -> None:
    r = seed_round(ws, n_groups=2, k=2)
    out = cli(capsys, "judge", r.round_id, "--judge", SHORTER, "-w", ws.root, "--show", "on")
    assert "2 suggestions (rankings)" in out and "annotators see the suggestions" in out
    with storedb.connect(ws) as con:
        assert rounds.round_options(con, r.round_id).show_suggestions is True
    summary = json.loads(
        cli(
            capsys,
            "judge",
            r.round_id,
            "--judge",
            SHORTER,
            "-w",
            ws.root,
            "--show",
            "off",
            "--json",
        )
    )
    assert summary["show_suggestions"] is False and summary["labelled"] == 0
    with storedb.connect(ws) as con:
        assert rounds.round_options(con, r.round_id).show_suggestions is False
        assert labels.labels(con).empty  # no --as-annotator: no labels
    listed = json.loads(
        cli(capsys, "suggestions", "list", "--round", r.round_id, "-w", ws.root, "--json")
    )
    assert [s["group_id"] for s in listed] == r.group_ids

    assert "unknown round 9" in cli_error(capsys, "judge", "9", "--judge", SHORTER, "-w", ws.root)
    err = cli_error(capsys, "judge", r.round_id, "--judge", "nope", "-w", ws.root)
    assert "module:function" in err
    err = cli_error(
        capsys, "judge", r.round_id, "--judge", ALWAYS_A, "--thumbs-threshold", "1", "-w", ws.root
    )
    assert "threshold applies to a scorer" in err


def test_llm_judge_suggests_through_the_cli(ws, tiny_model_dir: Path, capsys) -> None:
    r = seed_round(ws, n_groups=2, k=3)
    out = cli(
        capsys,
        *("judge", r.round_id, "--judge", "llm", "--judge-model", tiny_model_dir),
        *("--as-annotator", "-w", ws.root),
    )
    assert "2 suggestions" in out and "stored 2 labels as annotator 'judge'" in out
    with storedb.connect(ws) as con:
        for gid, cids in zip(r.group_ids, r.candidate_ids, strict=True):
            name, ranking = suggestions.suggestion(con, gid)
            assert name == f"llm:{tiny_model_dir}"
            assert sorted(x for tier in ranking for x in tier) == cids
