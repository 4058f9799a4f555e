"""Evaluation: statistics against hand computations, judges, and `prefloop eval` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labeling.annotation import save_label
from labeling.judges import load_programmatic_judge
from store import db, evals, labels, rounds
from store.errors import PrefloopError
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import ROOT, cli, cli_error
from tuning.eval_stats import distinct_n, expected_calibration_error, wilson_interval, win_rate
from tuning.evaluation import EvalConfig, evaluate, human_ab_results
from tuning.llm_judge import LLMJudge
from tuning.modeling import load_base, load_tokenizer


def test_wilson_interval_matches_published_values() -> None:
    # Newcombe (1998), example: 81 successes of 263 -> Wilson 0.2553 to 0.3662
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)


def test_win_rate_counts_ties_half() -> None:
    w = win_rate([1, 1, 0, 0.5, 0.5, 1])
    assert (w.wins, w.losses, w.ties) == (3, 1, 2)
    assert w.win_rate == pytest.approx(4 / 6)
    assert (w.low, w.high) == pytest.approx(wilson_interval(4, 6))


def test_ece_and_distinct2_by_hand() -> None:
    # two bins: [0.1, 0.15] observed [0, 1] -> |0.125 - 0.5|; [0.9] observed [1] -> |0.9 - 1|
    ece = expected_calibration_error([0.1, 0.15, 0.9], [0.0, 1.0, 1.0])
    assert ece == pytest.approx(2 / 3 * 0.375 + 1 / 3 * 0.1)
    assert distinct_n(["a b a b", "a b c"]) == pytest.approx(3 / 5)


def test_programmatic_judges_both_signatures() -> None:
    shorter = load_programmatic_judge("tests.judges.length:shorter")
    assert shorter("p", "hi", "hello") == 1.0 and shorter("p", "hello", "hi") == 0.0
    assert shorter("p", "ab", "cd") == 0.5
    assert load_programmatic_judge("tests.judges.length:always_a")("p", "x", "y") == 1.0
    with pytest.raises(PrefloopError, match="cannot load judge"):
        load_programmatic_judge("tests.judges.length:nope")
    with pytest.raises(PrefloopError, match="module:function"):
        load_programmatic_judge("just_a_name")


def test_llm_judge_cancels_position_bias(tiny_model_dir: Path) -> None:
    judge = LLMJudge(
        load_base(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), tie_margin=0.0
    )
    items = [("Say hi.", "Hello there!", "Go away."), ("Name a fruit.", "Apple.", "Chair.")]
    forward = judge.judge_many(items)
    backward = judge.judge_many([(p, b, a) for p, a, b in items])
    assert [1 - x for x in forward] == backward  # swapping the answers flips every verdict


@pytest.fixture
def tuned_ws(tmp_path: Path, tiny_model_dir: Path, capsys) -> Path:
    """A workspace with train and held-out prompts, a labelled held-out round, and v1."""
    root = tmp_path / "ws"
    data = ROOT / "labeling" / "data"
    cli(capsys, "init", "-w", root, "--model", tiny_model_dir)
    cli(capsys, "prompts", "import", data / "demo_prompts.jsonl", "-w", root)
    cli(
        capsys,
        "prompts",
        "import",
        data / "demo_prompts_heldout.jsonl",
        "-w",
        root,
        "--split",
        "heldout",
    )
    ws = db.workspace(root)
    with db.connect(ws) as con:
        train = rounds.create_round(con, "base", "train", 2, {}, "sampled")
        held = rounds.create_round(con, "base", "heldout", 2, {}, "sampled")
        for r, prompt_ids in ((train, range(1, 7)), (held, range(41, 45))):
            for p in prompt_ids:
                gid, (a, b) = rounds.add_group(
                    con, r, p, [CandidateRecord("Sure."), CandidateRecord("No, " * 5)]
                )
                labels.add_labels(con, [LabelRecord(gid, "ann", [[a], [b]])])
    cli(capsys, "tune", "-w", root, "--epochs", 1, "--quiet")
    return root


def test_eval_with_programmatic_judge_stores_winrate_drift_and_preference(tuned_ws, capsys):
    out = json.loads(
        cli(
            capsys,
            "eval",
            "-w",
            tuned_ws,
            "--model",
            "v1",
            "--judge",
            "tests.judges.length:always_a",
            "--limit",
            3,
            "--k",
            2,
            "--max-new-tokens",
            6,
            "--json",
        )
    )
    w = out["winrate"]
    assert (w["wins"], w["losses"], w["ties"], w["n"]) == (6, 0, 0, 6)  # 3 prompts x 2 samples
    assert w["low"] == pytest.approx(wilson_interval(6, 6)[0])
    d = out["drift"]
    assert d["mean_length"] <= 6 and 0 <= d["distinct2"] <= 1 and d["length_limit_share"] >= 0
    pref = out["preference"]
    assert pref["pairs"] == 4 and 0 <= pref["accuracy"] <= 1 and 0 <= pref["ece"] <= 1
    with db.connect(db.workspace(tuned_ws)) as con:
        stored = evals.list_evals(con)
        evaluated = rounds.list_rounds(con)
    assert set(stored["kind"]) == {"winrate", "drift", "preference"}
    mine, theirs = out["rounds"]
    by_id = evaluated.set_index("id")
    assert by_id.at[mine, "model_version"] == "v1" and by_id.at[theirs, "model_version"] == "base"
    assert by_id.at[mine, "settings"]["seed"] == by_id.at[theirs, "settings"]["seed"]
    # the same settings again reuse the same two rounds
    again = json.loads(
        cli(
            capsys,
            "eval",
            "-w",
            tuned_ws,
            "--model",
            "v1",
            "--judge",
            "tests.judges.length:shorter",
            "--limit",
            3,
            "--k",
            2,
            "--max-new-tokens",
            6,
            "--json",
        )
    )
    assert again["rounds"] == out["rounds"]
    assert "evaluate a version against a different one" in cli_error(
        capsys, "eval", "-w", tuned_ws, "--model", "base", "--judge", "human"
    )


def test_human_ab_round_end_to_end(tuned_ws, capsys):
    ws = db.workspace(tuned_ws)
    out = cli(
        capsys,
        "eval",
        "-w",
        tuned_ws,
        "--model",
        "v1",
        "--judge",
        "human",
        "--limit",
        3,
        "--max-new-tokens",
        6,
    )
    ab_round = int(out.split("A/B evaluation round ")[1].split()[0])
    with db.connect(ws) as con:
        cands = rounds.candidates(con, ab_round)
        groups = rounds.groups(con, round_id=ab_round)
    assert len(groups) == 3 and sorted(set(cands["origin"])) == ["base", "v1"]
    origin = dict(zip(cands["id"], cands["origin"], strict=True))
    # an annotator prefers v1 twice and calls the third a tie, through the app's own save path
    for i, g in enumerate(groups):
        v1 = next(c for c in g.candidate_ids if origin[c] == "v1")
        base = next(c for c in g.candidate_ids if origin[c] == "base")
        ranking = [[v1, base]] if i == 2 else [[v1], [base]]
        save_label(ws, LabelRecord(g.group_id, "alice", ranking))
    result = human_ab_results(ws, ab_round)
    assert (result["wins"], result["losses"], result["ties"]) == (2, 0, 1)
    assert result["win_rate"] == pytest.approx(2.5 / 3)
    assert "wins 2, losses 0, ties 1" in cli(
        capsys, "evals", "human", "-w", tuned_ws, "--round", ab_round
    )


def test_evaluate_api_refuses_unknown_versions(tuned_ws):
    with pytest.raises(PrefloopError, match="unknown model version"):
        evaluate(db.workspace(tuned_ws), "v9", EvalConfig(judge="tests.judges.length:shorter"))
