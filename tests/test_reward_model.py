"""Reward models: the losses against their formulas, the head across save → load, and the
`tune --method rm` → `judge`/`eval --judge rm:VERSION` path on a tiny labelled workspace."""

from __future__ import annotations

import contextlib
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch

from app.cli import main
from store import db, labels, models, rounds
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import cli, cli_error
from tests.labelled_ws import QUICK_TUNE, TEXTS, labelled_workspace
from tuning.losses import reward_listwise_loss, reward_metrics, reward_pairwise_loss

# -- the losses, against the formulas written out as plain float64 loops ---------------------


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


@pytest.mark.parametrize("margin,center", [(0.0, 0.0), (0.5, 0.0), (0.0, 0.1), (0.3, 0.05)])
def test_pairwise_loss_matches_bradley_terry_formula(margin: float, center: float) -> None:
    rng = random.Random(0)
    r = [rng.gauss(0, 2) for _ in range(7)]
    pairs = [(0, 1), (0, 2), (3, 1), (4, 5), (6, 0), (2, 5)]
    p = [1.0, 0.75, 1.0, 2 / 3, 0.5, 1.0]  # soft targets: share of annotators preferring
    expected = 0.0
    for (a, b), target in zip(pairs, p, strict=True):
        expected += -target * _log_sigmoid(r[a] - r[b] - margin)
        expected += -(1 - target) * _log_sigmoid(r[b] - r[a] - margin)
    expected /= len(pairs)
    expected += center * sum((r[a] + r[b]) ** 2 for a, b in pairs) / len(pairs)

    got = reward_pairwise_loss(
        torch.tensor(r, dtype=torch.float64),
        torch.tensor([a for a, _ in pairs]),
        torch.tensor([b for _, b in pairs]),
        torch.tensor(p, dtype=torch.float64),
        margin=margin,
        center=center,
    )
    assert abs(float(got) - expected) < 1e-6


def _breslow_nll(r: list[float], ranking: list[list[int]]) -> float:
    """−log P(ranking): each tier's members drawn from the candidates not placed above it."""
    placed: set[int] = set()
    everyone = [i for tier in ranking for i in tier]
    nll = 0.0
    for tier in ranking[:-1]:  # the last tier is what remains: no choice left
        pool = [j for j in everyone if j not in placed]
        denom = sum(math.exp(r[j]) for j in pool)
        for i in tier:
            nll -= r[i] - math.log(denom)
        placed.update(tier)
    return nll


@pytest.mark.parametrize("center", [0.0, 0.2])
def test_listwise_loss_with_ties_matches_plackett_luce_formula(center: float) -> None:
    rng = random.Random(1)
    r = [rng.gauss(0, 1.5) for _ in range(9)]
    groups = [
        # offset, each annotator's ranking (positions within the group), weights
        (0, [[[1], [0, 2], [3]], [[0], [1], [2, 3]]], [0.5, 0.5]),  # ties, two annotators
        (4, [[[2, 0], [1]]], [1.0]),  # a tied top tier
        (7, [[[1], [0]]], [1.0]),  # K=2: the pairwise sigmoid
    ]
    per_group = []
    for offset, rankings, weights in groups:
        size = len([i for t in rankings[0] for i in t])
        local = r[offset : offset + size]
        per_group.append(
            sum(w * _breslow_nll(local, rk) for rk, w in zip(rankings, weights, strict=True))
        )
    expected = sum(per_group) / len(per_group) + center * sum(x * x for x in r) / len(r)
    assert abs(per_group[2] + _log_sigmoid(r[8] - r[7])) < 1e-9  # K=2 is Bradley–Terry

    got = reward_listwise_loss(torch.tensor(r, dtype=torch.float64), groups, center=center)
    assert abs(float(got) - expected) < 1e-6


def test_metrics_count_only_strict_wins() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0])
    chosen, rejected = torch.tensor([0, 2, 3]), torch.tensor([1, 0, 2])  # win, tie, win
    m = reward_metrics(rewards, chosen, rejected)
    assert float(m["accuracy"]) == pytest.approx(2 / 3)
    assert float(m["margin"]) == pytest.approx((1 + 0 + 1) / 3)
    assert (float(m["mean_reward"]), float(m["min_reward"]), float(m["max_reward"])) == (
        1.0,
        0.0,
        2.0,
    )


# -- the scalar head survives save → load -----------------------------------------------------


def test_head_survives_save_and_load(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from tuning.config import RMConfig
    from tuning.modeling import load_base, load_tokenizer, load_version
    from tuning.reward_model import (
        HEAD_FILE,
        RewardModel,
        attach_reward_model,
        load_head,
        new_head,
        reward_model_to_train,
        score_texts,
    )

    torch.manual_seed(0)
    model = reward_model_to_train(str(tiny_model_dir), RMConfig(), None)
    with torch.no_grad():  # a trained state: LoRA B and the head away from their start
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    tok = load_tokenizer(str(tiny_model_dir))
    prompts = ["Say hi.", "Say hi.", "Count to three."]
    answers = ["Hi!", "Hello there, friend.", "1, 2, 3."]
    before = score_texts(model, tok, prompts, answers)
    model.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / HEAD_FILE).exists()

    lm = load_version(str(tiny_model_dir), tmp_path / "rm")
    reloaded = RewardModel(lm, load_head(tmp_path / "rm"))
    after = score_texts(reloaded, tok, prompts, answers)
    assert after == pytest.approx(before, abs=1e-6)

    # the pitfall the head file prevents: the same adapter with a head made afresh scores apart
    lost = RewardModel(load_version(str(tiny_model_dir), tmp_path / "rm"), new_head(64))
    apart = score_texts(lost, tok, prompts, answers)
    assert max(abs(a - b) for a, b in zip(apart, before, strict=True)) > 1e-3

    # sharing a policy's base: the reward adapter joins it, scores the same, and the policy's
    # own adapter is active again afterwards
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    policy = get_peft_model(load_base(str(tiny_model_dir)), lora)
    shared = attach_reward_model(policy, tmp_path / "rm")
    assert score_texts(shared, tok, prompts, answers) == pytest.approx(before, abs=1e-6)
    assert policy.active_adapter == "default"


# -- tune --method rm, then the reward model as a judge ---------------------------------------


def _run(*args: object) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main([str(a) for a in args])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def rm_ws(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The labelled tiny workspace, plus a labelled held-out round, a DPO policy v1 and a reward
    model v2 trained by `prefloop tune --method rm`; yields (workspace, rm's stdout)."""
    root = tmp_path_factory.mktemp("rm") / "ws"
    ws = labelled_workspace(root, tiny_model_dir)
    with db.connect(ws) as con:  # the same taste on held-out prompts (ids 41..)
        held = rounds.create_round(con, "base", "heldout", 4, {}, "sampled")
        for p in (41, 42, 43):
            gid, ids = rounds.add_group(con, held, p, [CandidateRecord(t) for t in TEXTS])
            labels.add_labels(con, [LabelRecord(gid, "ann1", [[i] for i in ids])])
    code, _ = _run("tune", "-w", root, *QUICK_TUNE)
    assert code == 0
    code, out = _run("tune", "-w", root, "--method", "rm", "--epochs", "6", "--lr", "3e-3",
                     "--quiet")  # fmt: skip
    assert code == 0
    return ws, out


def test_tune_rm_makes_a_reward_version_and_prints_it_last(rm_ws) -> None:
    ws, out = rm_ws
    assert out.strip().splitlines()[-1] == "v2"
    with db.connect(ws) as con:
        v2 = models.get_version(con, "v2", models.REWARD)
        assert models.default_version(con) == "v1"  # a reward model is never sampled from
    assert v2["kind"] == "reward" and v2["method"] == "rm" and v2["parent"] is None
    assert v2["dataset_id"] == "d1" and v2["config"]["loss_type"] == "pairwise"
    final = v2["config"]["final_metrics"]
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward", "eval/accuracy"):
        assert key in final
    # it learned the annotators' taste (chance is 0.5; the exact figure moves with the number
    # of CPU threads, which changes float summation order)
    assert final["accuracy"] >= 0.9 and final["eval/accuracy"] >= 0.9
    folder = models.adapter_dir(ws, v2)
    assert (folder / "reward_head.safetensors").exists()
    run = json.loads((ws.artifacts / "runs" / str(v2["run_id"]) / "config.json").read_text())
    assert run["method"] == "rm"


def test_judge_rm_scores_and_ranks_a_round(rm_ws, capsys) -> None:
    from tuning.reward_model import load_scorer

    ws, _ = rm_ws
    report = json.loads(
        cli(capsys, "judge", "1", "-w", ws.root, "--judge", "rm:v2", "--as-annotator", "--json")
    )
    assert report["suggested"] == 5 and report["labelled"] == 5
    scores = {int(g): {int(c): s for c, s in v.items()} for g, v in report["scores"].items()}
    assert sum(len(v) for v in scores.values()) == 20  # every candidate scored

    score = load_scorer(ws, "v2")  # the batched scorer online methods call gives the same
    with db.connect(ws) as con:
        groups = rounds.groups(con, round_id=1)
        judged = labels.labels(con, annotator="judge")
    stored = {int(r.group_id): [list(t) for t in r.ranking] for r in judged.itertuples()}
    agree = pairs = 0
    for g in groups:
        fresh = score([g.prompt] * len(g.texts), g.texts)
        mine = [scores[g.group_id][c] for c in g.candidate_ids]
        assert fresh == pytest.approx(mine, abs=1e-5)
        # the ranking it stored follows its rewards, best first
        by_score = sorted(g.candidate_ids, key=lambda c: -scores[g.group_id][c])
        assert stored[g.group_id] == [[c] for c in by_score]
        # and the rewards follow the annotators' order (candidate ids are in that order here)
        for i, a in enumerate(g.candidate_ids):
            for b in g.candidate_ids[i + 1 :]:
                agree += scores[g.group_id][a] > scores[g.group_id][b]
                pairs += 1
    assert agree / pairs >= 0.8


def test_eval_judges_win_rates_with_a_reward_model(rm_ws, capsys) -> None:
    ws, _ = rm_ws
    out = json.loads(
        cli(
            capsys,
            "eval",
            "-w",
            ws.root,
            "--model",
            "v1",
            "--judge",
            "rm:v2",
            "--limit",
            "2",
            "--k",
            "1",
            "--max-new-tokens",
            "4",
            "--json",
        )  # fmt: skip
    )
    assert out["winrate"]["n"] == 2
    assert out["winrate"]["wins"] + out["winrate"]["losses"] + out["winrate"]["ties"] == 2


def test_policy_and_reward_versions_are_not_confused(rm_ws, capsys) -> None:
    ws, _ = rm_ws
    err = cli_error(capsys, "judge", "1", "-w", ws.root, "--judge", "rm:v1")
    assert "v1 is a policy, not a reward model" in err
    err = cli_error(capsys, "sample", "-w", ws.root, "--model", "v2", "--limit", "1")
    assert "v2 is a reward model, not a policy" in err
    err = cli_error(capsys, "tune", "-w", ws.root, "--from", "v2", *QUICK_TUNE)
    assert "v2 is a reward model, not a policy" in err
    err = cli_error(capsys, "tune", "-w", ws.root, "--method", "rm", "--from", "v1", "--quiet")
    assert "v1 is a policy, not a reward model" in err
    err = cli_error(capsys, "tune", "-w", ws.root, "--method", "rm", "--loss", "sigmoid")
    assert "pairwise" in err and "listwise" in err


# -- the Researcher page's tuning form --------------------------------------------------------


def test_researcher_form_trains_a_reward_model(tmp_path, monkeypatch, tiny_model_dir) -> None:
    from labeling import annotation
    from tests.fixtures_app import make_workspace, seed_round
    from tests.test_app import click, element_values, finished_run, open_app

    model_ws = make_workspace(tmp_path / "ws", base_model=str(tiny_model_dir))
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(model_ws.root))

    seeded = seed_round(model_ws, n_groups=4, k=3)
    for gid, cids in zip(seeded.group_ids, seeded.candidate_ids, strict=True):
        annotation.save_label(model_ws, LabelRecord(gid, "lee", [[c] for c in cids]))
    at = open_app("Researcher")
    at.selectbox(key="tune_method").set_value("Reward model (listwise Plackett–Luce)").run()
    assert not at.exception
    labels_shown = [n.label for n in at.number_input]
    assert "Margin (pairwise)" in labels_shown and "Beta" not in labels_shown
    assert not any(label.startswith("KL budget") for label in labels_shown)
    at.number_input(key="tune_epochs").set_value(1)
    at.number_input(key="tune_lora_r").set_value(4)
    at.number_input(key="tune_center").set_value(0.01)
    click(at, "start_tuning")
    assert any("Started a Reward model (listwise" in v for v in element_values(at, "success"))

    row = finished_run(model_ws, "tune")
    assert row["result"] == "v1"
    with db.connect(model_ws) as con:
        v1 = models.get_version(con, "v1", models.REWARD)
    assert v1["config"]["loss_type"] == "listwise" and v1["config"]["center_rewards"] == 0.01
    at.run()
    assert not at.exception
    # the sampling form offers policies only; a reward-model run may continue v1
    assert at.selectbox(key="sample_version").options == ["base"]
    assert "v1" in at.selectbox(key="tune_from").options
    # the Evaluation page offers it as a judge, not as a version to evaluate
    at.sidebar.radio(key="page").set_value("Evaluation").run()
    assert not at.exception
    assert at.selectbox(key="eval_reward").options == ["v1"]
    assert at.selectbox(key="eval_version").options == ["base"]
    assert any("Reward model" in r.options for r in at.radio)
