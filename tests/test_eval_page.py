"""The Evaluation page through streamlit.testing on a real workspace with stored evaluations."""

from __future__ import annotations

import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from store import db, evals, rounds
from tests.cli_helpers import cli
from tests.test_app import ensure_user, shown_text, sign_in
from tests.test_evaluation import tuned_ws  # noqa: F401  (fixture)

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"


def _open(monkeypatch, ws: Path) -> AppTest:
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws))
    ensure_user("rita", "researcher")
    at = sign_in(AppTest.from_file(str(APP), default_timeout=60).run(), "rita")
    at.sidebar.radio(key="page").set_value("Evaluation").run()
    assert not at.exception, at.exception
    return at


def test_evaluation_page_shows_winrate_drift_human_rounds_and_side_by_side(
    tuned_ws,  # noqa: F811
    capsys,
    monkeypatch,
):
    common = ["--limit", 2, "--k", 1, "--max-new-tokens", 6]
    cli(capsys, "eval", "-w", tuned_ws, "--model", "v1", "--judge",
        "tests.judges.length:always_a", *common)  # fmt: skip
    cli(capsys, "eval", "-w", tuned_ws, "--model", "v1", "--judge", "human", *common)
    at = _open(monkeypatch, tuned_ws)
    frames = [df.value for df in at.dataframe]
    winrate = next(f for f in frames if "win_rate" in f.columns and "judge" in f.columns)
    row = winrate.iloc[0]
    assert (row["version"], row["against"], row["wins"], row["losses"]) == ("v1", "base", 2, 0)
    drift = next(f for f in frames if "kl_per_token" in f.columns)
    assert list(drift["version"]) == ["v1", "v1"]
    human = next(f for f in frames if "judged" in f.columns)
    assert int(human.iloc[0]["judged"]) == 0 and human.iloc[0]["version"] == "v1"
    pref = next(f for f in frames if "accuracy" in f.columns)
    assert int(pref.iloc[0]["pairs"]) == 4
    # side by side: the evaluated rounds' prompts and both versions' completions, rendered safely
    with db.connect(db.workspace(tuned_ws)) as con:
        shown = [rounds.groups(con, round_id=int(r)) for r in winrate.iloc[0]["round_ids"]]
    texts = shown_text(at)
    for groups in shown:
        assert groups[0].prompt in texts and groups[0].texts[0] in texts
    assert at.multiselect(key="eval_metric_pick").value  # the training run's metrics


def test_evaluation_form_starts_a_job_with_a_registered_judge(tuned_ws, capsys, monkeypatch):  # noqa: F811
    cli(capsys, "judges", "add", "short", "tests.judges.length:shorter", "-w", tuned_ws)
    at = _open(monkeypatch, tuned_ws)
    assert not [t for t in at.text_input if t.key == "eval_spec"]  # no code typed into a form
    assert at.selectbox(key="eval_registered").options == ["short"]
    next(r for r in at.radio if "Registered judge" in r.options).set_value("Registered judge")
    at.selectbox(key="eval_registered").set_value("short")
    at.number_input[0].set_value(2)  # limit
    at.number_input[1].set_value(1)  # samples per prompt
    at.number_input[2].set_value(6)  # max new tokens
    next(b for b in at.button if "Start evaluation" in str(b.label)).click().run()
    assert not at.exception, at.exception
    assert any("Started the evaluation" in s.value for s in at.success)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with db.connect(db.workspace(tuned_ws)) as con:
            done = evals.list_evals(con, "winrate")
        if not done.empty:
            break
        time.sleep(0.5)
    assert done.iloc[0]["judge"] == "short"
    assert done.iloc[0]["metrics"]["n"] == 2
