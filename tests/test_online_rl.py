"""Online GRPO and RLOO: reward specs and their weighting, and short real runs on the default
model that store each step's samples with their rewards and record the step metrics."""

from __future__ import annotations

import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from app import actions
from labeling.judges import REGISTERED_ONLY_ENV, register_judge
from store import db, labels, models, rounds, runs
from store.access import User
from store.errors import PrefloopError
from store.records import LabelRecord
from tests.cli_helpers import ROOT, cli, cli_error
from tests.fixtures_app import make_workspace
from tests.judges.length import shorter
from tests.test_app import model_ws  # noqa: F401  (a fixture)
from tuning.generation import Sample
from tuning.online import (
    ADAPTIVE_START_BETA,
    RolloutGroup,
    RolloutPrompt,
    score_groups,
    set_advantages,
)
from tuning.rewards import RewardTerm, load_reward, parse_reward_spec, parse_reward_specs
from tuning.rl_math import adaptive_beta

SHORTER = "tests.judges.length:shorter"
ALWAYS_A = "tests.judges.length:always_a"

# the metrics every online step records, under the names TRL/verl users read
STEP_METRICS = (
    "objective/rlhf_reward", "objective/scores", "objective/kl", "objective/entropy", "beta",
    "policy/clipfrac_avg", "policy/approxkl_avg", "loss/policy_avg", "frac_reward_zero_std",
    "completions/mean_length", "completions/clipped_ratio", "time/generate_s", "time/train_s",
)  # fmt: skip


# -- reward specs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "spec", "weight"),
    [
        ("rm:v3", "rm:v3", 1.0),
        ("llm", "llm", 1.0),
        ("mymod.sub:brevity*0.2", "mymod.sub:brevity", 0.2),
        (" llm * -1.5 ", "llm", -1.5),
        ("safety", "safety", 1.0),  # a registered judge's name
    ],
)
def test_reward_specs_parse_with_their_weights(text, spec, weight) -> None:
    term = parse_reward_spec(text)
    assert (term.spec, term.weight) == (spec, weight)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("llm*heavy", "weight after '*' must be a number"),
        ("*2", "empty reward"),
        ("rm:", "names no reward-model version"),
        ("llm*inf", "finite"),
        ("a:b:c", "not a reward spec"),
    ],
)
def test_bad_reward_specs_say_what_to_write(text, says) -> None:
    with pytest.raises(PrefloopError, match=re.escape(says)):
        parse_reward_spec(text)
    with pytest.raises(PrefloopError, match="needs a reward"):
        parse_reward_specs([])


def _group(prompt: str, texts: list[str], finish: list[str] | None = None) -> RolloutGroup:
    finish = finish or ["eos"] * len(texts)
    samples = [Sample(t, len(t), f, 0.0, [1]) for t, f in zip(texts, finish, strict=True)]
    return RolloutGroup(RolloutPrompt(1, prompt, [1]), samples, None)  # type: ignore[arg-type]


def test_rewards_are_the_weighted_sum_of_the_terms_less_the_cutoff_penalty(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws")
    terms = parse_reward_specs([f"{SHORTER}*0.5", ALWAYS_A])
    reward = load_reward(ws, terms)
    groups = [_group("p", ["aaaa", "bb", "c"], ["eos", "length", "eos"])]
    means = score_groups(reward, groups, truncation_penalty=10.0)
    # shorter: -len; always_a (pairwise): each sample's share of wins against the others
    lengths = [-4.0, -2.0, -1.0]
    wins = [1.0, 0.5, 0.0]
    want = [0.5 * s + w - p for s, w, p in zip(lengths, wins, [0, 10, 0], strict=True)]
    assert groups[0].rewards.tolist() == pytest.approx(want)
    assert means[f"rewards/{SHORTER}"] == pytest.approx(sum(lengths) / 3)
    assert means[f"rewards/{ALWAYS_A}"] == pytest.approx(0.5)


def test_rm_rewards_come_from_the_reward_models_scorer(tmp_path, monkeypatch) -> None:
    ws = make_workspace(tmp_path / "ws")
    calls = []

    def load_scorer(workspace, version, base_model=None):
        calls.append(version)
        return lambda prompts, completions: [float(len(c)) for c in completions]

    fake = types.ModuleType("tuning.reward_model")
    fake.load_scorer = load_scorer
    monkeypatch.setitem(sys.modules, "tuning.reward_model", fake)
    reward = load_reward(ws, [RewardTerm("rm:v7", 2.0), RewardTerm(SHORTER, 1.0)])
    groups = [_group("p", ["abc", "a"]), _group("q", ["abcd", "ab"])]
    score_groups(reward, groups)
    assert calls == ["v7"]
    assert groups[0].rewards.tolist() == [2 * 3 - 3, 2 * 1 - 1]
    assert groups[1].rewards.tolist() == [2 * 4 - 4, 2 * 2 - 2]


def test_web_jobs_run_only_registered_reward_functions(tmp_path, monkeypatch) -> None:
    ws = make_workspace(tmp_path / "ws")
    register_judge(ws, "brevity", SHORTER, "alice")
    monkeypatch.setenv(REGISTERED_ONLY_ENV, "1")
    with pytest.raises(PrefloopError, match="not registered"):
        load_reward(ws, parse_reward_specs([SHORTER]))
    reward = load_reward(ws, parse_reward_specs(["brevity"]))
    groups = [_group("p", ["abc", "a"])]
    score_groups(reward, groups)
    assert groups[0].rewards.tolist() == [shorter("p", "abc"), shorter("p", "a")]


def test_grpo_and_rloo_advantages_of_scored_groups() -> None:
    groups = [_group("p", ["a", "b", "c"]), _group("q", ["a", "b", "c"])]
    groups[0].rewards = torch.tensor([3.0, 0.0, 0.0])
    groups[1].rewards = torch.tensor([1.0, 1.0, 1.0])
    zero = set_advantages(groups, "rloo")
    assert groups[0].advantages.tolist() == pytest.approx([3.0, -1.5, -1.5])
    assert groups[1].advantages.tolist() == [0.0, 0.0, 0.0]
    assert zero.tolist() == [False, True]
    set_advantages(groups, "grpo", "none")
    assert groups[0].advantages.tolist() == pytest.approx([2.0, -1.0, -1.0])


# -- the command line ----------------------------------------------------------------------------


@pytest.fixture
def online_ws(tmp_path: Path, default_model_dir: Path, capsys) -> db.Workspace:
    root = tmp_path / "ws"
    cli(capsys, "init", "-w", root, "--model", default_model_dir)
    cli(capsys, "prompts", "import", ROOT / "labeling" / "data" / "demo_prompts.jsonl", "-w", root)
    return db.workspace(root)


def test_online_settings_are_checked_before_a_run_starts(online_ws, capsys) -> None:
    root = online_ws.root
    assert "add --online" in cli_error(capsys, "tune", "-w", root, "--method", "grpo",
                                       "--reward", "llm")  # fmt: skip
    assert "needs a reward" in cli_error(capsys, "tune", "-w", root, "--method", "rloo")
    assert "No module named" in cli_error(capsys, "tune", "-w", root, "--method", "rloo",
                                          "--reward", "nosuchmodule:fn")  # fmt: skip
    assert "always trains online" in cli_error(capsys, "tune", "-w", root, "--method", "rloo",
                                               "--no-online", "--reward", "llm")  # fmt: skip
    assert "--gains is not a setting of --method rloo" in cli_error(
        capsys, "tune", "-w", root, "--method", "rloo", "--reward", "llm", "--gains", "dcg"
    )
    assert "--k must be at least 2" in cli_error(capsys, "tune", "-w", root, "--method", "rloo",
                                                 "--reward", "llm", "--k", "1")  # fmt: skip
    with db.connect(online_ws) as con:
        assert runs.list_runs(con).empty  # nothing started
    with pytest.raises(SystemExit):
        cli(capsys, "tune", "--help")
    out = capsys.readouterr().out
    assert "--reward VALUE" in out and "(repeatable)" in out and "--audit" in out


QUICK_ONLINE = ("--k", "2", "--prompts-per-step", "2", "--max-new-tokens", "6", "--epochs", "1",
                "--guard-prompts", "0", "--gate-prompts", "0", "--quiet")  # fmt: skip


def _run(online_ws, capsys, tmp_path, *args: str) -> tuple[str, dict, int]:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n{"prompt": "Name a colour."}\n')
    out = cli(capsys, "tune", "-w", online_ws.root, "--prompts", prompts, *QUICK_ONLINE, *args)
    version = out.strip().splitlines()[-1]  # the new version's id, printed last
    with db.connect(online_ws) as con:
        info = models.get_version(con, version)
        run_id = int(info["run_id"])
    return version, info, run_id


@pytest.mark.slow
def test_online_grpo_trains_a_version_and_stores_every_step(online_ws, capsys, tmp_path):
    version, info, run_id = _run(
        online_ws, capsys, tmp_path, "--method", "grpo", "--online", "--reward", SHORTER,
        "--prompts-per-step", "1", "--audit", "1",
    )  # fmt: skip
    assert info["method"] == "grpo" and info["config"]["online"] is True
    assert info["config"]["reward"] == [SHORTER]
    assert info["dataset_id"] is None
    # --prompts-per-step 1 over 2 prompts: two rollout steps of one prompt each
    with db.connect(online_ws) as con:
        metrics = runs.run_metrics(con, run_id)
        run_rounds = rounds.rounds_of_run(con, run_id)
    assert list(metrics.index) == [1, 2]
    for name in STEP_METRICS:
        assert name in metrics.columns, name
    steps = run_rounds[run_rounds["source"].str.startswith("rollout:")]
    assert steps["step"].tolist() == [1, 2]
    with db.connect(online_ws) as con:
        for row in steps.itertuples():
            cands = rounds.candidates(con, int(row.id))
            rewards = rounds.candidate_rewards(con, int(row.id))
            assert len(cands) == 2
            for c in cands.itertuples():
                assert rewards[int(c.id)] == pytest.approx(-len(c.text))
    # the audit round: one group per step, on the annotators' list (the step rounds are not)
    audit = run_rounds[run_rounds["source"].str.startswith("audit:")]
    assert len(audit) == 1
    audit_id = int(audit["id"].iloc[0])
    annotator = User("ann1", "annotator")
    listed = actions.labelling_rounds(online_ws, annotator)
    assert listed["id"].tolist() == [audit_id]
    assert f"tuning run {run_id}" in listed["title"].iloc[0]
    with db.connect(online_ws) as con:
        settings = rounds.get_round(con, audit_id)["settings"]
        groups = rounds.groups(con, round_id=audit_id)
        assert sorted(settings["steps"].values()) == [1, 2]
        # it is labelled like any round
        g = groups[0]
        labels.add_labels(con, [LabelRecord(g.group_id, "ann1", [[c] for c in g.candidate_ids])])
        assert len(labels.labels(con, round_ids=[audit_id])) == 1
    assert metrics["beta"].tolist() == [0.0, 0.0]  # fixed β (the default 0)


@pytest.mark.slow
def test_rloo_with_adaptive_kl_trains_a_version(online_ws, capsys, tmp_path):
    version, info, run_id = _run(
        online_ws, capsys, tmp_path, "--method", "rloo", "--reward", f"{SHORTER}*1",
        "--target-kl", "0.01", "--kl-horizon", "10", "--prompts-per-step", "1",
    )  # fmt: skip
    assert info["method"] == "rloo" and info["config"]["target_kl"] == 0.01
    with db.connect(online_ws) as con:
        metrics = runs.run_metrics(con, run_id)
        steps = rounds.rounds_of_run(con, run_id)
    assert list(metrics.index) == [1, 2] and steps["step"].tolist() == [1, 2]
    for name in STEP_METRICS:
        assert name in metrics.columns, name
    # β starts at the controller's start value and follows Ziegler's rule from step 1's KL
    beta = metrics["beta"].tolist()
    assert beta[0] == pytest.approx(ADAPTIVE_START_BETA)
    kl = metrics["kl_per_token"].iloc[0]
    assert beta[1] == pytest.approx(adaptive_beta(beta[0], kl, 0.01, 1 * 2, 10.0))
    assert (Path(online_ws.artifacts) / "adapters" / version).is_dir()


# -- the Researcher page -------------------------------------------------------------------------


@pytest.mark.usefixtures("model_ws")
def test_researcher_form_starts_an_online_rloo_run_with_a_registered_reward():
    from tests.fixtures_app import add_prompts
    from tests.test_app import click, element_values, finished_run, open_app

    app_ws = db.workspace()  # the tiny-model workspace the app opens

    add_prompts(app_ws, ["Name a colour.", "Say hi."])
    register_judge(app_ws, "brevity", SHORTER, "rita")
    at = open_app("Researcher")
    at.selectbox(key="tune_method").set_value("RLOO online (fresh samples, a reward)").run()
    reward = at.multiselect(key="tune_reward")
    assert reward.options == ["llm", "brevity"]  # no module:function typed in the browser
    reward.set_value(["brevity"])
    at.number_input(key="tune_epochs").set_value(1)
    at.number_input(key="tune_online_k").set_value(2)
    at.number_input(key="tune_audit").set_value(1)
    click(at, "start_tuning")
    assert any("Started a RLOO online" in v for v in element_values(at, "success"))
    row = finished_run(app_ws, "tune")
    with db.connect(app_ws) as con:
        version = models.get_version(con, row["result"])
        metrics = runs.run_metrics(con, int(row["id"]))
        run_rounds = rounds.rounds_of_run(con, int(row["id"]))
    assert version["method"] == "rloo" and version["config"]["reward"] == ["brevity"]
    assert "objective/scores" in metrics.columns
    assert run_rounds["source"].str.startswith("audit:").sum() == 1
    at.run()
    assert not at.exception
    charts = at.get("vega_lite_chart")
    fields = [json.loads(c.proto.spec)["layer"][0]["encoding"]["y"]["field"] for c in charts]
    assert fields[:2] == ["objective/scores", "objective/kl"]
