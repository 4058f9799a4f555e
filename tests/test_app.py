"""The web app (AppTest on the real script, real DuckDB), its ranking state and job launcher."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pyarrow as pa
import pytest
from streamlit.testing.v1 import AppTest

from app import launcher
from app.cli import build_parser, tune_config
from app.config_options import config_from_args
from labeling import annotation
from labeling.annotation import RankingState
from labeling.safe_text import WORD_JOINER
from store import db as storedb
from store import labels, models, prompts, rounds, runs, users
from store.errors import PrefloopError
from store.records import LabelRecord, PromptRecord
from tests.fixtures_app import XSS, add_prompts, make_workspace, seed_round
from tuning.config import DPOConfig, GRPOConfig, LoraSettings, SamplingConfig

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
JOB_TIMEOUT_S = 120


# ----------------------------------------------------------------------------------------------
# helpers


PASSWORD = "correct horse battery"


def ensure_user(name: str, role: str) -> None:
    """An account in the workspace the app opens ($PREFLOOP_WORKSPACE), created once."""
    with storedb.connect(storedb.workspace()) as con:
        if name not in set(users.list_users(con)["name"]):
            users.add_user(con, name, role, PASSWORD)


def sign_in(at: AppTest, name: str, password: str = PASSWORD) -> AppTest:
    """Fill in and submit the sign-in form."""
    at.text_input(key="login_name").input(name)
    at.text_input(key="login_password").input(password)
    at.button(key="sign_in").click().run()
    assert not at.exception, at.exception
    return at


def open_app(page: str = "Annotator", annotator: str | None = None, role: str | None = None):
    """Run the app script (workspace from $PREFLOOP_WORKSPACE), sign in, and open a page.

    With annotator=NAME the user is that annotator; otherwise a researcher (an admin for the
    Admin page)."""
    name = annotator or ("ada" if page == "Admin" else "rita")
    role = role or ("annotator" if annotator else "admin" if page == "Admin" else "researcher")
    ensure_user(name, role)
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, at.exception
    sign_in(at, name)
    if page != "Annotator":
        at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, at.exception
    return at


def click(at: AppTest, key: str) -> AppTest:
    """Click a button by key and rerun; fail on an exception in the script."""
    at.button(key=key).click().run()
    assert not at.exception, at.exception
    return at


def stored_labels(ws: storedb.Workspace):
    with storedb.connect(ws) as con:
        return labels.labels(con)


def letter_ids(annotator: str, group_id: int, candidate_ids: list[int]) -> dict[str, int]:
    """Which candidate id the page shows under each letter for this annotator."""
    order = annotation.display_order(annotator, group_id, len(candidate_ids))
    return {annotation.letter(i): candidate_ids[p] for i, p in enumerate(order)}


def wait_for(check, timeout_s: float = JOB_TIMEOUT_S, what: str = "condition"):
    """Poll check() until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def element_values(at: AppTest, kind: str) -> list:
    return [e.value for e in getattr(at, kind)]


def shown_text(at: AppTest) -> list[str]:
    """The text and Markdown elements as a reader sees them (Markdown escapes and the word
    joiners that keep text inert dropped): how prompts and candidates appear."""
    markdown = [
        re.sub(r"\\(.)", r"\1", m).replace(WORD_JOINER, "") for m in element_values(at, "markdown")
    ]
    return element_values(at, "text") + markdown


@pytest.fixture
def ws(tmp_path, monkeypatch) -> storedb.Workspace:
    """An empty workspace that the app opens through $PREFLOOP_WORKSPACE."""
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


# ----------------------------------------------------------------------------------------------
# labeling.annotation: ranking state


def make_state(k: int = 4) -> RankingState:
    return RankingState(
        group_id=7,
        annotator="ann",
        candidate_ids=[100 + i for i in range(k)],
        texts=[f"t{i}" for i in range(k)],
    )


def test_ranking_picks_ties_undo_and_summary():
    state = make_state()
    assert state.letters == ["A", "B", "C", "D"]
    assert state.summary() == ""
    state.rank_next("B")
    state.rank_next("A")
    state.tie_with_last("D")
    assert state.summary() == "1. B  2. A = D"
    assert state.unranked == ["C"]
    assert state.place_of("D") == 2 and state.place_of("C") is None
    assert not state.complete and not state.can_submit()
    assert state.undo() == "D"
    assert state.summary() == "1. B  2. A"
    assert state.undo() == "A"
    assert state.tiers == [["B"]]
    state.tie_with_last("C")
    state.rank_next("A")
    state.rank_next("D")
    assert state.complete and state.can_submit()
    record = state.to_label(comment="  fine  ")
    assert record == LabelRecord(7, "ann", [[101, 102], [100], [103]], [], "fine")
    state.reset()
    assert state.tiers == [] and state.undo() is None


def test_ranking_rejects_bad_moves():
    state = make_state(3)
    with pytest.raises(PrefloopError, match="rank a candidate first"):
        state.tie_with_last("A")
    state.rank_next("A")
    with pytest.raises(PrefloopError, match="ranked already"):
        state.rank_next("A")
    with pytest.raises(PrefloopError, match="ranked already"):
        state.tie_with_last("A")
    with pytest.raises(PrefloopError, match="no candidate 'E'"):
        state.rank_next("E")
    with pytest.raises(PrefloopError, match="still unranked: B, C"):
        state.to_label()


def test_all_bad_and_skip_labels():
    state = make_state(3)
    state.rank_next("C")
    assert state.can_submit(all_bad=True)
    record = state.to_label(all_bad=True)
    assert record.ranking == [[100, 101, 102]] and record.flags == ["all_bad"]
    state.rank_next("A")
    state.rank_next("B")
    record = state.to_label(all_bad=True, comment="")
    assert record.ranking == [[102], [100], [101]] and record.comment is None
    skip = state.skip_label("unclear prompt")
    assert skip.ranking is None and skip.flags == ["skipped"] and skip.comment == "unclear prompt"


def test_display_order_is_a_stable_per_annotator_shuffle():
    order = annotation.display_order("alice", 12, 4)
    assert sorted(order) == [0, 1, 2, 3]
    assert order == annotation.display_order(" alice ", 12, 4)
    orders = {tuple(annotation.display_order(f"a{i}", 12, 4)) for i in range(30)}
    assert len(orders) > 5
    groups = {tuple(annotation.display_order("alice", g, 4)) for g in range(30)}
    assert len(groups) > 5
    assert [annotation.letter(i) for i in (0, 3, 25, 26)] == ["A", "D", "Z", "A2"]


def test_start_ranking_maps_letters_to_candidates(ws):
    seeded = seed_round(ws, n_groups=1)
    with storedb.connect(ws) as con:
        group = labels.next_group(con, "bob", seeded.round_id)
    state = annotation.start_ranking(group, " bob ")
    assert state.annotator == "bob"
    order = annotation.display_order("bob", group.group_id, 4)
    assert state.candidate_ids == [group.candidate_ids[p] for p in order]
    assert state.texts == [group.texts[p] for p in order]
    with pytest.raises(PrefloopError, match="annotator name"):
        annotation.start_ranking(group, "   ")


def test_save_label_and_assignment_progress(ws):
    seeded = seed_round(ws, n_groups=2, k=3)
    job = annotation.next_assignment(ws, "carol", seeded.round_id)
    assert (job.group.group_id, job.done, job.left) == (seeded.group_ids[0], 0, 2)
    state = annotation.start_ranking(job.group, "carol")
    for name in state.letters:
        state.rank_next(name)
    annotation.save_label(ws, state.to_label())
    with pytest.raises(PrefloopError, match="already has a label"):
        annotation.save_label(ws, state.to_label())
    job = annotation.next_assignment(ws, "carol", seeded.round_id)
    assert (job.group.group_id, job.done, job.left) == (seeded.group_ids[1], 1, 1)
    annotation.save_label(ws, annotation.start_ranking(job.group, "carol").skip_label())
    job = annotation.next_assignment(ws, "carol", seeded.round_id)
    assert job.group is None and (job.done, job.left) == (2, 0)
    with pytest.raises(PrefloopError, match="unknown round 99"):
        annotation.next_assignment(ws, "carol", 99)


def test_round_title():
    assert annotation.round_title(3, "v2") == "Ranking round 3 (model version v2)"
    title = annotation.round_title(4, None, "import:x.jsonl")
    assert title == "Ranking round 4 (imported: x.jsonl)"


# ----------------------------------------------------------------------------------------------
# app.launcher


def test_launcher_args_parse_back_to_the_same_configs(ws):
    parse = build_parser().parse_args
    cfg = SamplingConfig(k=3, max_new_tokens=17, temperature=0.7, top_p=0.9, seed=5, limit=2)
    ns = parse(launcher.sample_args(cfg, "v2"))
    assert (ns.command, ns.model) == ("sample", "v2")
    assert config_from_args(SamplingConfig, ns) == cfg
    default = parse(launcher.sample_args(SamplingConfig(), None))
    assert config_from_args(SamplingConfig, default) == SamplingConfig()
    ns = parse(launcher.sample_args(cfg, None, "thumbs", 3))
    assert (ns.mode, ns.overlap) == ("thumbs", 3)

    # a tuning job gets its config as a JSON file that the real parser reads back
    dpo = DPOConfig(beta=0.2, epochs=2, lr=3e-5, groups_per_step=3, lora=LoraSettings(8, 16))
    args = launcher.tune_config_args(ws, dpo, from_version="v1", dataset_id="d2")
    assert args[:2] == ["tune", "--config"] and Path(args[2]).parent == launcher.log_dir(ws)
    stored = json.loads(Path(args[2]).read_text())
    assert (stored["method"], stored["from"], stored["dataset"]) == ("dpo", "v1", "d2")
    settings = {k: v for k, v in stored.items() if k not in ("method", "from", "dataset")}
    assert config_from_args(DPOConfig, parse(["tune"]), settings) == dpo
    assert tune_config(parse(args)) == ("dpo", dpo, "v1", "d2")
    again = launcher.tune_config_args(ws, dpo, from_version="base")
    assert again[2] != args[2] and tune_config(parse(again)) == ("dpo", dpo, None, None)
    for soft in ("hard", "bt", "empirical"):
        cfg = DPOConfig(soft_labels=soft, listwise=True, loss_type="ipo")
        assert tune_config(parse(launcher.tune_config_args(ws, cfg)))[1] == cfg
    grpo = GRPOConfig(gain_source="bt", gains="dcg", epsilon_high=0.3, adapt_beta=False)
    assert tune_config(parse(launcher.tune_config_args(ws, grpo, method="grpo"))) == (
        "grpo",
        grpo,
        None,
        None,
    )
    assert not list(launcher.log_dir(ws).glob("*.tmp"))  # written atomically


def test_start_job_runs_the_cli_detached_and_logs_it(ws):
    pid, log_path = launcher.start_job(ws, ["rounds", "list", "--json"])
    assert log_path.parent == ws.artifacts / "runs" and f"pid{pid}" in log_path.name
    wait_for(lambda: launcher.exit_code(log_path) is not None, 60, "the job to exit")
    assert launcher.exit_code(log_path) == 0
    lines = launcher.read_tail(log_path)
    assert lines[0].startswith("$ prefloop rounds list --json --workspace")
    assert json.loads(lines[1]) == []
    jobs = launcher.launched_jobs(ws)
    assert [(j.pid, j.kind, j.state, j.running) for j in jobs] == [(pid, "rounds", "exit 0", False)]
    assert launcher.find_log(ws, pid) == log_path
    assert launcher.find_log(ws, 999_999_999) is None

    pid, log_path = launcher.start_job(ws, ["rounds", "list", "--workspace-typo"])
    wait_for(lambda: launcher.exit_code(log_path) is not None, 60, "the bad job to exit")
    assert launcher.exit_code(log_path) == 2
    assert any("unrecognized arguments" in line for line in launcher.read_tail(log_path))


def test_read_tail_shows_the_last_state_of_progress_bars(tmp_path):
    log = tmp_path / "x.log"
    log.write_bytes(b"start\nbar 10%\rbar 50%\rbar 100%\ndone\n\n")
    assert launcher.read_tail(log) == ["start", "bar 100%", "done"]
    assert launcher.read_tail(log, lines=1) == ["done"]
    assert launcher.read_tail(tmp_path / "missing.log") == []


# ----------------------------------------------------------------------------------------------
# the annotator page


def test_missing_workspace_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(tmp_path / "nowhere"))
    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.exception
    [error] = element_values(at, "error")
    assert "no prefloop workspace" in error and "prefloop serve --workspace DIR" in error


def test_no_rounds_then_a_group(ws):
    at = open_app(annotator="nina")
    assert any("no rounds yet" in v for v in element_values(at, "info"))
    seeded = seed_round(ws, n_groups=1)
    at.run()
    assert seeded.prompts[0] in shown_text(at)


def test_round_selector_defaults_to_the_newest_round(ws):
    first = seed_round(ws, n_groups=1)
    with storedb.connect(ws) as con:
        second = rounds.create_round(con, "v1", "train", 2, {}, "sampled")
        rounds.add_group(
            con,
            second,
            first_prompt_id(con, first.round_id),
            [rounds.CandidateRecord("x"), rounds.CandidateRecord("y")],
        )
    at = open_app(annotator="dora")
    box = at.selectbox(key="round")
    assert box.value == second
    assert box.options == [
        f"Ranking round {second} (model version v1)",
        f"Ranking round {first.round_id} (model version base)",
    ]
    assert "Done 0 / left 1 in this round" in element_values(at, "caption")
    box.set_value(first.round_id).run()
    assert "Prompt number 1: say something nice." in shown_text(at)


def first_prompt_id(con, round_id: int) -> int:
    return rounds.groups(con, round_id=round_id)[0].prompt_id


def test_rank_with_tie_and_undo_then_submit(ws):
    seeded = seed_round(ws, n_groups=3, k=4)
    gid, cids, texts = seeded.group_ids[0], seeded.candidate_ids[0], seeded.texts[0]
    at = open_app(annotator="alice")
    assert "Ranking round 1 (model version base)" in at.selectbox(key="round").options
    assert "Done 0 / left 3 in this round" in element_values(at, "caption")
    shown = shown_text(at)
    assert seeded.prompts[0] in shown
    order = annotation.display_order("alice", gid, 4)
    assert [t for t in shown if t in texts] == [texts[p] for p in order]
    heads = [m for m in element_values(at, "markdown") if m.startswith("**Candidate")]
    assert heads == [f"**Candidate {x}** · key {i + 1}" for i, x in enumerate("ABCD")]
    assert at.button(key="submit").disabled
    assert [b.key for b in at.button if b.key.startswith("tie_")] == []

    click(at, "rank_B")
    click(at, "rank_C")
    click(at, "undo")  # takes C back
    click(at, "tie_C")  # C shares first place with B
    click(at, "rank_D")
    assert at.button(key="submit").disabled
    assert at.button(key="rank_B").disabled and not at.button(key="rank_A").disabled
    click(at, "rank_A")
    ranking = "**Your ranking:** 1. B = C\u2003\u20032. D\u2003\u20033. A"
    assert ranking in element_values(at, "markdown")
    assert not at.button(key="submit").disabled
    at.text_area(key=f"comment_{gid}").input("B and C equally good")
    click(at, "submit")

    ids = letter_ids("alice", gid, cids)
    df = stored_labels(ws)
    assert len(df) == 1
    row = df.iloc[0]
    assert (row["group_id"], row["annotator"], row["flags"]) == (gid, "alice", [])
    assert row["ranking"] == [[ids["B"], ids["C"]], [ids["D"]], [ids["A"]]]
    assert row["comment"] == "B and C equally good"
    assert "Saved your ranking." in element_values(at, "success")
    assert "Done 1 / left 2 in this round" in element_values(at, "caption")
    assert seeded.prompts[1] in shown_text(at)
    assert seeded.prompts[0] not in shown_text(at)
    assert "**Your ranking:** (empty)" in element_values(at, "markdown")


def test_skip_all_bad_and_done(ws):
    seeded = seed_round(ws, n_groups=3, k=3)
    at = open_app(annotator="erin")
    g1, g2, g3 = seeded.group_ids

    at.text_area(key=f"comment_{g1}").input("cannot judge")
    click(at, "skip")
    assert "Skipped that group." in element_values(at, "success")
    assert "Done 1 / left 2 in this round" in element_values(at, "caption")

    click(at, "rank_A")  # one pick, then all bad: stored as one tier
    assert at.button(key="submit").disabled
    click(at, "all_bad")
    assert "Flagged all bad and saved." in element_values(at, "success")

    for name in ("C", "A", "B"):
        click(at, f"rank_{name}")
    click(at, "all_bad")

    df = stored_labels(ws).set_index("group_id")
    assert df.loc[g1, "ranking"] is None and df.loc[g1, "flags"] == ["skipped"]
    assert df.loc[g1, "comment"] == "cannot judge"
    assert df.loc[g2, "ranking"] == [sorted(seeded.candidate_ids[1])]
    assert df.loc[g2, "flags"] == ["all_bad"]
    ids = letter_ids("erin", g3, seeded.candidate_ids[2])
    assert df.loc[g3, "ranking"] == [[ids["C"]], [ids["A"]], [ids["B"]]]
    assert df.loc[g3, "flags"] == ["all_bad"]
    assert "Done 3 / left 0 in this round" in element_values(at, "caption")
    assert any("No groups left" in v for v in element_values(at, "success"))
    assert not [b for b in at.main.button if b.key != "revise_start"]


def test_a_second_tab_cannot_label_the_same_group_twice(ws):
    seeded = seed_round(ws, n_groups=2, k=2)
    tab1, tab2 = open_app(annotator="finn"), open_app(annotator="finn")
    for tab in (tab1, tab2):
        click(tab, "rank_A")
        click(tab, "rank_B")
    click(tab1, "submit")
    click(tab2, "submit")
    assert any("already" in v and "Revise" in v for v in element_values(tab2, "error"))
    assert seeded.prompts[1] in shown_text(tab2)  # and it moves on
    assert len(stored_labels(ws)) == 1


def test_candidate_html_is_shown_as_text(ws):
    seed_round(ws, n_groups=1, k=3, first_texts=[XSS])
    at = open_app(annotator="gus")
    assert "\\<img src=x onerror=alert(1)>**bold**" in element_values(at, "markdown")
    assert not any(re.search(r"(?<!\\)<img", v) for v in element_values(at, "markdown"))
    assert not any("onerror" in str(v) for v in element_values(at, "caption"))


def test_round_survives_a_visit_to_the_researcher_page(ws):
    seed_round(ws, n_groups=1)
    at = open_app("Researcher")
    at.sidebar.radio(key="page").set_value("Annotator").run()
    assert "Done 0 / left 1 in this round" in element_values(at, "caption")


# ----------------------------------------------------------------------------------------------
# the researcher page


def test_researcher_page_shows_rounds_with_counts(ws):
    seeded = seed_round(ws, n_groups=3, k=2)
    for who in ("ivy", "jon"):
        annotation.save_label(
            ws, LabelRecord(seeded.group_ids[0], who, [[c] for c in seeded.candidate_ids[0]])
        )
    at = open_app("Researcher")
    table = at.dataframe[0].value
    row = table.iloc[0]
    assert (row["id"], row["model version"], row["k"], row["groups"]) == (1, "base", 2, 3)
    assert (row["labelled groups"], row["labels"]) == (1, 2)
    assert at.selectbox(key="sample_version").value == "base"
    assert any("No jobs yet" in v for v in element_values(at, "caption"))


@pytest.fixture
def model_ws(tmp_path, monkeypatch, tiny_model_dir) -> storedb.Workspace:
    """A workspace on the tiny random model, opened by the app through $PREFLOOP_WORKSPACE."""
    workspace = make_workspace(tmp_path / "ws", base_model=str(tiny_model_dir))
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


def run_rows(ws: storedb.Workspace, kind: str):
    with storedb.connect(ws) as con:
        df = runs.list_runs(con)
    return df[df["kind"] == kind]


def finished_run(ws: storedb.Workspace, kind: str) -> dict:
    """Wait for the newest run of a kind to end; fail with its log if it did not complete."""

    def done():
        df = run_rows(ws, kind)
        if not df.empty and df.iloc[0]["status"] in ("completed", "failed"):
            return df.iloc[0].to_dict()
        bad = [j for j in launcher.launched_jobs(ws) if j.exit_code not in (None, 0)]
        if bad:
            raise AssertionError("\n".join(launcher.read_tail(bad[0].log_path)))
        return None

    row = wait_for(done, what=f"the {kind} job")
    logs = [launcher.read_tail(j.log_path) for j in launcher.launched_jobs(ws)]
    assert row["status"] == "completed", (row["error"], logs)
    return row


def test_sampling_form_starts_a_job_that_makes_a_round(model_ws):
    add_prompts(model_ws, ["Name a colour.", "Say hi.", "Count to three."])
    at = open_app("Researcher")
    at.number_input(key="sample_k").set_value(3)
    at.number_input(key="sample_max_new_tokens").set_value(6)
    at.number_input(key="sample_limit").set_value(2)
    click(at, "start_sampling")
    assert any("Started sampling from base" in v for v in element_values(at, "success"))

    row = finished_run(model_ws, "sample")
    assert row["result"] == "round 1"
    with storedb.connect(model_ws) as con:
        info = rounds.get_round(con, 1)
    assert (info["model_version"], info["k"], info["groups"]) == ("base", 3, 2)
    assert info["settings"]["max_new_tokens"] == 6

    at.run()
    assert not at.exception
    assert at.dataframe[0].value.iloc[0]["groups"] == 2
    jobs = at.dataframe[1].value
    assert (jobs.iloc[0]["kind"], jobs.iloc[0]["status"]) == ("sample", "completed")
    assert "Status: completed, result: round 1" in element_values(at, "text")
    wait_for(lambda: launcher.launched_jobs(model_ws)[0].exit_code == 0, 30, "the exit mark")
    log = launcher.find_log(model_ws, row["pid"], row["log_path"])
    assert log is not None and launcher.read_tail(log)[-1].endswith("exited with code 0")

    # the new round is ready for annotators, its (random) candidates shown as plain text
    at.sidebar.radio(key="page").set_value("Annotator").run()
    assert "Done 0 / left 2 in this round" in element_values(at, "caption")
    assert "Name a colour." in shown_text(at)


def test_grpo_form_passes_its_sft_weight_and_gains_to_the_run(model_ws):
    seeded = seed_round(model_ws, n_groups=2, k=3)
    for gid, cids in zip(seeded.group_ids, seeded.candidate_ids, strict=True):
        annotation.save_label(model_ws, LabelRecord(gid, "lee", [[c] for c in cids]))
    at = open_app("Researcher")
    at.selectbox(key="tune_method").set_value("GRPO").run()
    sft = at.number_input(key="tune_sft")
    assert sft.value == GRPOConfig().sft_weight  # the form shows the method's default
    sft.set_value(0.8)
    at.text_input(key="tune_gains").set_value("dcg")
    demote = at.checkbox(key="tune_demote")
    assert demote.value is GRPOConfig().demote_broken
    demote.set_value(not GRPOConfig().demote_broken)
    at.number_input(key="tune_epochs").set_value(1)
    click(at, "start_tuning")
    row = finished_run(model_ws, "tune")
    with storedb.connect(model_ws) as con:
        version = models.get_version(con, row["result"])
        metrics = runs.run_metrics(con, int(row["id"]))
    assert version["method"] == "grpo"
    assert (version["config"]["sft_weight"], version["config"]["gains"]) == (0.8, "dcg")
    demoted = not GRPOConfig().demote_broken  # the form's choice, not the default
    assert version["config"]["demote_broken"] is demoted
    assert ("data/demoted_groups" in version["config"]["final_metrics"]) is demoted
    assert "nll_loss" in metrics.columns


def test_dpo_form_trains_a_version_with_metrics(model_ws):
    seeded = seed_round(model_ws, n_groups=4, k=3)
    for gid, cids in zip(seeded.group_ids, seeded.candidate_ids, strict=True):
        annotation.save_label(model_ws, LabelRecord(gid, "lee", [[c] for c in cids]))
    at = open_app("Researcher")
    at.number_input(key="tune_epochs").set_value(2)
    at.number_input(key="tune_groups_per_step").set_value(2)
    at.number_input(key="tune_lora_r").set_value(4)
    at.number_input(key="tune_lora_alpha").set_value(8)
    click(at, "start_tuning")
    assert any("Started a DPO (sigmoid) run" in v for v in element_values(at, "success"))

    row = finished_run(model_ws, "tune")
    assert row["result"] == "v1"
    with storedb.connect(model_ws) as con:
        version = models.get_version(con, "v1")
        metrics = runs.run_metrics(con, int(row["id"]))
    assert version["config"]["epochs"] == 2 and version["config"]["lora"]["r"] == 4
    assert {"loss", "rewards/accuracies"} <= set(metrics.columns)
    # 4 groups / 2 per step, for every epoch run (also those of a restart at a lower rate, when
    # the per-epoch guard finds the tiny model's epoch out of budget)
    training = version["config"]["training"]
    epochs = training["epochs_run"] + sum(b["epochs_run"] for b in training["backoffs"])
    assert len(metrics) == 2 * epochs and epochs >= 2, training

    at.run()
    assert not at.exception
    assert at.selectbox(key="run_select").value == int(row["id"])
    assert "Status: completed, result: v1" in element_values(at, "text")
    charts = at.get("vega_lite_chart")
    assert [json.loads(c.proto.spec)["layer"][0]["encoding"]["y"]["field"] for c in charts] == [
        "loss",
        "rewards/accuracies",
        "guard/kl_per_token",  # the per-epoch fluency guard
        "guard/broken_share",
    ]
    for chart, name in zip(charts[:2], ("loss", "rewards/accuracies"), strict=True):
        data = pa.ipc.open_stream(chart.proto.datasets[0].data.data).read_all().to_pandas()
        assert list(data["step"]) == list(metrics.index)
        assert list(data[name]) == pytest.approx(list(metrics[name]))
    guard = pa.ipc.open_stream(charts[2].proto.datasets[0].data.data).read_all().to_pandas()
    assert len(guard) == epochs  # one point per epoch run
    assert "**loss**" in element_values(at, "markdown")
    assert "**rewards/accuracies**" in element_values(at, "markdown")
    assert at.selectbox(key="version_pick").value == "v1"
    assert at.json  # the version's config
    assert at.selectbox(key="sample_version").value == "v1"  # newest version is the default
    [versions] = [d.value for d in at.dataframe if "method" in d.value.columns]
    assert list(versions["id"]) == ["v1"] and versions.iloc[0]["dataset"] == "d1"


def test_conversation_prompts_show_every_turn_as_text(ws):
    turns = [
        {"role": "system", "content": "Be *brief*."},
        {"role": "user", "content": "Name a colour."},
    ]
    with storedb.connect(ws) as con:
        [pid], _ = prompts.upsert_prompts(
            con, [PromptRecord("Name a colour.", turns)], "train", "t"
        )
        rid = rounds.create_round(con, "base", "train", 2, {}, "sampled")
        rounds.add_group(
            con, rid, pid, [rounds.CandidateRecord("Red."), rounds.CandidateRecord("")]
        )
    at = open_app(annotator="mo")
    assert element_values(at, "text")[:2] == ["[system]", "[user]"]
    markdown = element_values(at, "markdown")  # the turns' Markdown is rendered (and escaped)
    assert markdown.index("Be *brief*.") < markdown.index("Name a colour.")
    assert "Red." in markdown
    assert "(empty)" in element_values(at, "caption")  # the empty candidate
