"""Fluency in evaluation: NLL per token under π_ref by hand, broken answers, guarded win-rates,
`prefloop eval` end to end, and the Evaluation page's red mark."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoModelForCausalLM, AutoTokenizer

from labeling.annotation import save_label
from labeling.judges import load_programmatic_judge
from store import db, evals, rounds
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import cli
from tests.fixtures_app import add_prompts, make_workspace
from tests.test_app import ensure_user, sign_in
from tests.test_evaluation import tuned_ws  # noqa: F401  (fixture)
from tuning.config import TrainSettings
from tuning.eval_stats import guarded_summary, win_rate
from tuning.evaluation import breaking_reason, human_ab_results, judged_win_rate, measure_drift
from tuning.fluency import (
    BROKEN_MARGIN,
    broken_flags,
    degenerate,
    fluency,
    guarded_outcomes,
    won_by_breaking,
)

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
GIBBERISH = "a,bol,is,e,c,urrunio,vol,es"


def test_degenerate_answers() -> None:
    assert degenerate("") and degenerate("   ")
    assert degenerate("no no no no no no")  # six in a row
    assert not degenerate("no no no no no")
    assert degenerate("!!!!!!")
    assert degenerate("the cat sat " * 5)  # 15 words, 3 distinct trigrams of 13
    assert not degenerate("The capital of France is Paris, a city on the Seine with many museums.")
    assert not degenerate(GIBBERISH)  # not repetition: only its NLL under π_ref gives it away


def test_broken_flags_use_the_reference_median_plus_one_nat() -> None:
    assert BROKEN_MARGIN == 1.0
    ref = [1.0, 2.0, 3.0]  # median 2.0 -> limit 3.0 nats per token
    texts = ["fine answer", "fine answer", "fine answer", "", "x x x x x x"]
    assert broken_flags([2.9, 3.1, 3.0, 1.0, 1.0], texts, ref) == [
        False,
        True,
        False,  # exactly at the limit is not above it
        True,  # empty
        True,  # degenerate
    ]
    # an even count: median 2.5 -> limit 3.5
    assert broken_flags([3.4, 3.6], ["ok", "ok"], [1.0, 2.0, 3.0, 4.0]) == [False, True]
    assert broken_flags([9.0], ["ok"], [1.0], margin=10.0) == [False]


def test_fluency_summary_by_hand() -> None:
    summary, mine, theirs = fluency(
        [2.0, 5.0, 2.5, 2.5], ["ok", "ok", "ok", ""], [2.0, 2.0, 4.0], ["ok", "ok", "ok"], 0.3
    )
    assert mine == [False, True, False, True]  # limit: median 2.0 + 1 = 3.0
    assert theirs == [False, False, True]
    assert summary.nll_per_token == pytest.approx(3.0)
    assert summary.nll_per_token_against == pytest.approx(8 / 3)
    assert summary.fluency_drift == pytest.approx(3.0 - 8 / 3)
    assert (summary.broken_share, summary.broken_share_against) == (0.5, pytest.approx(1 / 3))
    assert summary.to_dict()["kl_per_token"] == 0.3


def test_guarded_outcomes_and_summary() -> None:
    outcomes = [1.0, 0.0, 0.5, 1.0, 0.0, 1.0]
    broken = [True, False, False, True, False, False]
    against = [False, True, True, True, False, False]
    guarded = guarded_outcomes(outcomes, broken, against)
    assert guarded == [0.0, 1.0, 1.0, 0.5, 0.0, 1.0]
    s = guarded_summary(guarded)
    w = win_rate(guarded)
    assert (s["guarded_wins"], s["guarded_losses"], s["guarded_ties"]) == (3, 2, 1)
    assert (s["guarded_win_rate"], s["guarded_low"], s["guarded_high"]) == (
        w.win_rate,
        w.low,
        w.high,
    )


def test_won_by_breaking_and_its_reason() -> None:
    assert won_by_breaking(0.06, 0.1, 0.5) and not won_by_breaking(0.05, 0.1, 0.5)
    assert won_by_breaking(0.0, 0.6, 0.5) and not won_by_breaking(0.0, None, 0.5)
    assert breaking_reason({"broken_share": 0.0, "kl_per_token": 0.1, "kl_budget": 0.5}) is None
    assert breaking_reason({"broken_share": 0.4, "kl_per_token": 0.8, "kl_budget": 0.5}) == (
        "broken share 40% (> 5%) / KL per token 0.800 > budget 0.5"
    )
    assert breaking_reason({"kl_per_token": 0.8}) is None  # stored before fluency was measured


def _hand_nll(model, tok, prompt: str, text: str, finish_reason: str | None) -> float:
    """NLL per token of text after the chat-rendered prompt, with plain logits + log_softmax."""
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tok(rendered, add_special_tokens=False)["input_ids"]
    answer = tok(text, add_special_tokens=False)["input_ids"]
    if finish_reason != "length":
        answer = [*answer, tok.eos_token_id]
    ids = torch.tensor([prompt_ids + answer])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    start = len(prompt_ids)
    total = sum(logp[start + j - 1, tok_id].item() for j, tok_id in enumerate(answer))
    return -total / len(answer)


def test_nll_per_token_under_pi_ref_matches_a_hand_computation(
    tuned_ws: Path,  # noqa: F811
    tiny_model_dir: Path,
) -> None:
    ws = db.workspace(tuned_ws)
    answers = {
        "mine": [
            [("The capital of France is Paris.", None), (GIBBERISH, "length")],
            [("no no no no no no", None), ("Water boils at 100 degrees.", None)],
        ],
        "theirs": [
            [("Paris.", None), ("I think it is Paris, in France.", None)],
            [("Water boils at one hundred degrees Celsius.", "length"), ("Hot.", None)],
        ],
    }
    with db.connect(ws) as con:
        ids = {}
        for side, groups in answers.items():
            rid = rounds.create_round(
                con, "v1" if side == "mine" else "base", "heldout", 2, {}, "t"
            )
            for pid, cands in zip((41, 42), groups, strict=True):
                rounds.add_group(
                    con, rid, pid, [CandidateRecord(t, finish_reason=f) for t, f in cands]
                )
            ids[side] = rid
        prompts = {g.prompt_id: g.prompt for g in rounds.groups(con, round_id=ids["mine"])}
    # π_ref is the base model itself: the version's adapter must not count
    measured = measure_drift(ws, "v1", ids["mine"], ids["theirs"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    got = {(d["round"], d["prompt_id"], d["index"]): d for d in measured.details}
    hand: dict[str, list[float]] = {}
    for side, groups in answers.items():
        for pid, cands in zip((41, 42), groups, strict=True):
            for i, (text, reason) in enumerate(cands):
                expected = _hand_nll(base, tok, prompts[pid], text, reason)
                assert got[(ids[side], pid, i)]["nll_per_token"] == pytest.approx(
                    expected, abs=1e-4
                )
                hand.setdefault(side, []).append(expected)
    m = measured.metrics
    assert abs(m["kl_per_token"]) > 1e-3  # the version differs from π_ref, so this told them apart
    assert m["nll_per_token"] == pytest.approx(statistics.fmean(hand["mine"]), abs=1e-4)
    assert m["nll_per_token_against"] == pytest.approx(statistics.fmean(hand["theirs"]), abs=1e-4)
    assert m["fluency_drift"] == pytest.approx(m["nll_per_token"] - m["nll_per_token_against"])
    limit = statistics.median(hand["theirs"]) + BROKEN_MARGIN
    texts = [t for groups in answers["mine"] for t, _ in groups]
    expected_flags = [degenerate(t) or x > limit for t, x in zip(texts, hand["mine"], strict=True)]
    assert [measured.broken[(pid, i)] for pid in (41, 42) for i in (0, 1)] == expected_flags
    assert measured.broken[(42, 0)]  # "no no no ..." is degenerate whatever its NLL
    assert m["broken_share"] == pytest.approx(sum(expected_flags) / 4)


EVAL = ["--judge", "tests.judges.length:always_a", "--limit", 3, "--k", 2, "--max-new-tokens", 6]


def test_eval_end_to_end_stores_fluency_and_guarded_win_rate(tuned_ws, capsys):  # noqa: F811
    out = json.loads(cli(capsys, "eval", "-w", tuned_ws, "--model", "v1", *EVAL, "--json"))
    d, w = out["drift"], out["winrate"]
    keys = ["nll_per_token", "nll_per_token_against", "fluency_drift", "broken_share",
            "broken_share_against", "kl_per_token", "kl_budget", "won_by_breaking"]  # fmt: skip
    assert set(keys) <= set(d), set(keys) - set(d)
    assert d["kl_budget"] == TrainSettings().kl_budget  # the default the version was tuned with
    assert d["fluency_drift"] == pytest.approx(d["nll_per_token"] - d["nll_per_token_against"])
    assert d["won_by_breaking"] == won_by_breaking(d["broken_share"], d["kl_per_token"], 0.5)
    ws = db.workspace(tuned_ws)
    mine, theirs = out["rounds"]
    with db.connect(ws) as con:
        stored = evals.list_evals(con)
        drift_row = stored[stored["kind"] == "drift"].iloc[-1]
        win_row = stored[stored["kind"] == "winrate"].iloc[-1]
        drift_details = evals.eval_details(con, int(drift_row["id"]))
        win_details = evals.eval_details(con, int(win_row["id"]))
    assert drift_row["metrics"]["broken_share"] == d["broken_share"]
    assert win_row["metrics"]["guarded_win_rate"] == w["guarded_win_rate"]
    flags = {(x["round"], x["prompt_id"], x["index"]): x["broken"] for x in drift_details}
    assert len(flags) == 12  # 3 prompts x 2 samples, both rounds
    mine_flags = [v for (r, _, _), v in flags.items() if r == mine]
    assert d["broken_share"] == pytest.approx(sum(mine_flags) / 6)
    # the details pair the broken flags with the judged pairs exactly
    for x in win_details:
        assert x["broken"] == flags[(mine, x["prompt_id"], x["index"])]
        assert x["broken_against"] == flags[(theirs, x["prompt_id"], x["index"])]
    guarded = guarded_outcomes(
        [x["outcome"] for x in win_details],
        [x["broken"] for x in win_details],
        [x["broken_against"] for x in win_details],
    )
    assert [x["guarded_outcome"] for x in win_details] == guarded
    expected = win_rate(guarded)
    assert (w["wins"], w["n"]) == (6, 6)  # always_a: the raw win-rate is untouched
    assert (w["guarded_wins"], w["guarded_losses"], w["guarded_ties"]) == (
        expected.wins,
        expected.losses,
        expected.ties,
    )
    assert w["guarded_win_rate"] == pytest.approx(expected.win_rate)
    assert (w["guarded_low"], w["guarded_high"]) == pytest.approx((expected.low, expected.high))
    # hand-made flags land on exactly the pairs they name: (prompt, index) of each round
    broken = {(p, i): (p, i) == (41, 0) for p in (41, 42, 43) for i in (0, 1)}
    broken_against = {(p, i): (p, i) in {(41, 0), (42, 1)} for p in (41, 42, 43) for i in (0, 1)}
    judge = load_programmatic_judge("tests.judges.length:always_a")
    res, det = judged_win_rate(ws, "v1", theirs, mine, judge, broken, broken_against)
    by_pair = {(x["prompt_id"], x["index"]): x["guarded_outcome"] for x in det}
    assert by_pair == {(41, 0): 0.5, (41, 1): 1.0, (42, 0): 1.0, (42, 1): 1.0, (43, 0): 1.0,
                       (43, 1): 1.0}  # fmt: skip
    assert (res["guarded_wins"], res["guarded_ties"], res["wins"]) == (5, 1, 6)
    # the text report (same settings: the rounds are reused)
    text = cli(capsys, "eval", "-w", tuned_ws, "--model", "v1", *EVAL)
    assert "guarded win-rate" in text and "NLL/token under π_ref" in text
    assert "broken share" in text
    assert ("WON BY BREAKING THE MODEL" in text) == d["won_by_breaking"]
    # base against v1: π_ref's own answers (the base round) set the broken limit
    rev = json.loads(
        cli(capsys, "eval", "-w", tuned_ws, "--model", "base", "--against", "v1", *EVAL, "--json")
    )
    assert rev["rounds"] == [theirs, mine] and rev["reference_round"] == theirs
    assert rev["drift"]["fluency_reference_round"] == theirs
    assert rev["drift"]["kl_per_token"] == 0.0
    # a human A/B round on the same rounds gets the guarded win-rate from the stored flags
    human = cli(capsys, "eval", "-w", tuned_ws, "--model", "v1", "--judge", "human",
                *EVAL[2:])  # fmt: skip
    ab_round = int(human.split("A/B evaluation round ")[1].split()[0])
    with db.connect(ws) as con:
        cands = rounds.candidates(con, ab_round)
        groups = rounds.groups(con, round_id=ab_round)
    origin = dict(zip(cands["id"], cands["origin"], strict=True))
    for g in groups:  # the annotator always prefers v1
        v1 = next(c for c in g.candidate_ids if origin[c] == "v1")
        other = next(c for c in g.candidate_ids if origin[c] == "base")
        save_label(ws, LabelRecord(g.group_id, "alice", [[v1], [other]]))
    result = human_ab_results(ws, ab_round)
    pairs = [(flags[(mine, g.prompt_id, 0)], flags[(theirs, g.prompt_id, 0)]) for g in groups]
    hand = win_rate(guarded_outcomes([1.0] * 3, [a for a, _ in pairs], [b for _, b in pairs]))
    assert result["wins"] == 3
    assert result["guarded_wins"] == hand.wins and result["guarded_losses"] == hand.losses
    assert result["guarded_win_rate"] == pytest.approx(hand.win_rate)


def _drift_metrics(broken_share: float, kl: float) -> dict:
    return {
        "kl_per_token": kl,
        "mean_length": 20.0,
        "mean_length_against": 21.0,
        "length_change": -1.0,
        "distinct2": 0.9,
        "distinct2_against": 0.9,
        "length_limit_share": 0.0,
        "length_limit_share_against": 0.0,
        "nll_per_token": 2.0 + 3 * broken_share,
        "nll_per_token_against": 2.0,
        "fluency_drift": 3 * broken_share,
        "broken_share": broken_share,
        "broken_share_against": 0.0,
        "kl_budget": 0.5,
        "won_by_breaking": won_by_breaking(broken_share, kl, 0.5),
    }


def _winrate_metrics(raw: float, guarded: float) -> dict:
    return {
        "wins": 10,
        "losses": 0,
        "ties": 0,
        "win_rate": raw,
        "low": 0.7,
        "high": 1.0,
        "n": 10,
        "guarded_wins": 6,
        "guarded_losses": 4,
        "guarded_ties": 0,
        "guarded_win_rate": guarded,
        "guarded_low": 0.3,
        "guarded_high": 0.85,
    }


def test_evaluation_page_marks_a_version_that_won_by_breaking(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    with db.connect(ws) as con:
        for version, share, rids in (("v1", 0.4, [1, 2]), ("v2", 0.0, [3, 2])):
            evals.add_eval(con, "winrate", version, _winrate_metrics(1.0, 0.6), against="base",
                           judge="tests.judges.length:always_a", round_ids=rids)  # fmt: skip
            evals.add_eval(
                con, "drift", version, _drift_metrics(share, 0.1), against="base", round_ids=rids
            )
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws.root))
    ensure_user("rita", "researcher")
    at = sign_in(AppTest.from_file(str(APP), default_timeout=60).run(), "rita")
    at.sidebar.radio(key="page").set_value("Evaluation").run()
    assert not at.exception, at.exception
    marks = [e.value for e in at.error]
    assert len(marks) == 1, marks
    assert "v1" in marks[0] and "won by breaking the model" in marks[0]
    assert "broken share 40%" in marks[0]
    assert not any("v2" in m for m in marks)
    # raw and guarded win-rates beside the fluency measures, per version
    shown = {m.label: m.value for m in at.metric}
    assert {"win-rate", "guarded win-rate", "broken share", "NLL/token (π_ref)"} <= set(shown)
    values = [(m.label, m.value) for m in at.metric]
    assert ("guarded win-rate", "0.600") in values and ("broken share", "40%") in values
    assert ("broken share", "0%") in values
    frames = [df.value for df in at.dataframe]
    table = next(f for f in frames if "guarded_win_rate" in f.columns)
    by_version = table.set_index("version")
    assert by_version.at["v1", "broken_share"] == 0.4 and by_version.at["v2", "broken_share"] == 0
    assert bool(by_version.at["v1", "won_by_breaking"]) is True
    assert bool(by_version.at["v2", "won_by_breaking"]) is False


def test_answers_that_dodge_the_question_are_broken_on_the_default_model(
    tmp_path: Path, default_model_dir: Path
) -> None:
    """Held-out answers that two rounds of the `shorter` taste produced on the default model
    (tests/data/shorter_taste_answers.json): the short dodges ("Please go ahead and write the
    note." for a note, "A morning of lazy breakfast sounds wonderful." for a breakfast) and the
    repetitions won the annotator's taste; the fluency measure must count them as broken
    against π_ref's own answers to the same prompts, and the fluent on-topic answers not."""
    data = json.loads((Path(__file__).parent / "data" / "shorter_taste_answers.json").read_text())
    ws = make_workspace(tmp_path / "ws", base_model=str(default_model_dir))
    texts = list(dict.fromkeys(r["prompt"] for r in data["pi_ref"]))
    ids = dict(zip(texts, add_prompts(ws, texts, split="heldout"), strict=True))
    round_ids = {}
    with db.connect(ws) as con:
        for side in ("pi_ref", "version"):
            rid = rounds.create_round(con, "base", "heldout", 4, {}, "test")
            for prompt in texts:
                cands = [
                    CandidateRecord(r["text"], finish_reason=r["finish"])
                    for r in data[side]
                    if r["prompt"] == prompt
                ]
                if cands:
                    rounds.add_group(con, rid, ids[prompt], cands)
            round_ids[side] = rid
    measured = measure_drift(ws, "base", round_ids["version"], round_ids["pi_ref"])
    got = {}
    for prompt in texts:
        mine = [r for r in data["version"] if r["prompt"] == prompt]
        for i, r in enumerate(mine):
            got[r["text"]] = measured.broken[(ids[prompt], i)]
    expected = {r["text"]: r["broken"] for r in data["version"]}
    assert got == expected
    assert sum(expected.values()) == 5 and len(expected) - 5 >= 25
    assert not any(measured.broken_against.values())  # π_ref's own answers are its baseline
