"""GRPO and the DPO family through `prefloop tune` on a tiny model, with their metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from store import db, labels, rounds, runs
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import ROOT, cli, cli_error
from tuning.batching import GroupTokens, collate, per_candidate, sequence_logps, token_logps
from tuning.modeling import load_base

TEXTS = ("Yes.", "Sure, here it is.", "No.", "I will not do that at all.")


@pytest.fixture
def ws(tmp_path: Path, tiny_model_dir: Path, capsys) -> db.Workspace:
    """Train groups of K=4 ranked by two annotators (one tied group), and labelled held-out."""
    root = tmp_path / "ws"
    data = ROOT / "labeling" / "data"
    cli(capsys, "init", "-w", root, "--model", tiny_model_dir)
    cli(capsys, "prompts", "import", data / "demo_prompts.jsonl", "-w", root)
    cli(capsys, "prompts", "import", data / "demo_prompts_heldout.jsonl", "-w", root,
        "--split", "heldout")  # fmt: skip
    workspace = db.workspace(root)
    with db.connect(workspace) as con:
        train = rounds.create_round(con, "base", "train", 4, {}, "sampled")
        held = rounds.create_round(con, "base", "heldout", 4, {}, "sampled")
        for r, pids in ((train, range(1, 7)), (held, range(41, 44))):
            for p in pids:
                gid, ids = rounds.add_group(con, r, p, [CandidateRecord(t) for t in TEXTS])
                first = [[ids[0]], [ids[1]], [ids[2]], [ids[3]]]
                second = [[ids[1]], [ids[0]], [ids[2], ids[3]]]
                if p == 6:
                    first = second = [ids]  # all tied: no signal
                labels.add_labels(
                    con, [LabelRecord(gid, "ann1", first), LabelRecord(gid, "ann2", second)]
                )
    return workspace


def _metrics(ws: db.Workspace, version_line: str) -> tuple[str, dict]:
    version = version_line.split()[-1]
    with db.connect(ws) as con:
        run = runs.list_runs(con).iloc[0]
        assert run["result"] == version and run["status"] == "completed"
        return version, runs.run_metrics(con, int(run["id"]))


def test_grpo_run_logs_its_metrics_and_counts_tied_groups(ws, capsys):
    out = cli(capsys, "tune", "-w", ws.root, "--method", "grpo", "--epochs", 1,
              "--groups-per-step", 6, "--gains", "1,0.6,0.3,0", "--quiet")  # fmt: skip
    version, metrics = _metrics(ws, out)
    for name in (
        "loss",
        "kl",
        "clip_ratio",
        "advantages/mean",
        "advantages/std",
        "frac_zero_std_groups",
        "entropy",
        "logps/policy",
        "grad_norm",
    ):
        assert name in metrics.columns, name
    assert metrics["frac_zero_std_groups"].iloc[0] == pytest.approx(1 / 6)  # the tied group
    assert abs(metrics["advantages/mean"].iloc[0]) < 1e-6
    models = json.loads(cli(capsys, "models", "list", "-w", ws.root, "--json"))
    v = next(m for m in models if m["id"] == version)
    assert v["method"] == "grpo" and v["config"]["gains"] == "1,0.6,0.3,0"


def test_grpo_from_a_version_uses_it_as_pi_old_and_adapts_beta(ws, capsys):
    cli(capsys, "tune", "-w", ws.root, "--epochs", 1, "--quiet")  # v1 (DPO)
    with db.connect(ws) as con:  # v1 samples a round (the texts are fixed here), ranked once
        r = rounds.create_round(con, "v1", "train", 4, {}, "sampled")
        for p in range(7, 10):
            gid, ids = rounds.add_group(con, r, p, [CandidateRecord(t) for t in TEXTS])
            labels.add_labels(con, [LabelRecord(gid, "ann1", [[i] for i in ids])])
    out = cli(
        capsys,
        "tune",
        "-w",
        ws.root,
        "--method",
        "grpo",
        "--from",
        "v1",
        "--epochs",
        2,
        "--target-kl",
        "0.01",
        "--ppo-epochs",
        2,
        "--loss-type",
        "bnpo",
        "--quiet",
    )
    _, metrics = _metrics(ws, out)
    assert metrics["beta"].iloc[0] == pytest.approx(0.04)
    assert metrics["beta"].iloc[-1] != pytest.approx(0.04)  # the controller moved it
    assert len(metrics) == 2 * 2 * 3  # epochs x ppo-epochs x steps (9 groups, 4 per step)


@pytest.mark.parametrize(
    "flags",
    [
        ["--loss", "ipo"],
        ["--loss", "hinge"],
        ["--loss", "robust", "--label-smoothing", "0.1"],
        ["--listwise"],
        ["--sft-weight", "0.5"],
        ["--hard-labels"],
    ],
)
def test_dpo_family_variants_train(ws, capsys, flags):
    out = cli(capsys, "tune", "-w", ws.root, "--epochs", 1, "--quiet", *flags)
    version, metrics = _metrics(ws, out)
    assert metrics["loss"].notna().all() and "rewards/accuracies" in metrics.columns
    if "--sft-weight" in flags:
        assert "nll_loss" in metrics.columns


def test_early_stopping_keeps_the_best_epoch(ws, capsys):
    out = cli(capsys, "tune", "-w", ws.root, "--epochs", 6, "--early-stop", 1, "--quiet")
    _, metrics = _metrics(ws, out)
    evals = metrics["eval/rewards/accuracies"].dropna()
    assert 2 <= len(evals) <= 6  # measured once per epoch; stops after one epoch without gain
    models = json.loads(cli(capsys, "models", "list", "-w", ws.root, "--json"))
    final = models[-1]["config"]["final_metrics"]
    assert final["eval/rewards/accuracies"] == pytest.approx(evals.max())


def test_early_stopping_without_heldout_labels_says_what_to_do(tmp_path, tiny_model_dir, capsys):
    root = tmp_path / "w2"
    cli(capsys, "init", "-w", root, "--model", tiny_model_dir)
    cli(capsys, "prompts", "import", ROOT / "labeling/data/demo_prompts.jsonl", "-w", root)
    with db.connect(db.workspace(root)) as con:
        r = rounds.create_round(con, "base", "train", 2, {}, "sampled")
        gid, (a, b) = rounds.add_group(con, r, 1, [CandidateRecord("x"), CandidateRecord("y")])
        labels.add_labels(con, [LabelRecord(gid, "ann", [[a], [b]])])
    assert "--split heldout" in cli_error(capsys, "tune", "-w", root, "--early-stop", 2)


def test_token_logps_sum_to_sequence_logps(tiny_model_dir: Path) -> None:
    model = load_base(str(tiny_model_dir))
    groups = [
        GroupTokens([5, 6, 7], [[8, 9], [10, 11, 12], [13]]),
        GroupTokens([1, 2], [[3], [4, 5]]),
    ]
    batch = collate(groups, 0, 64)
    with torch.no_grad():
        flat, entropy = token_logps(model, batch, with_entropy=True)
        sums = sequence_logps(model, batch)
    parts = per_candidate(flat, batch)
    assert [len(p) for p in parts] == [2, 3, 1, 1, 2]
    assert torch.allclose(torch.stack([p.sum() for p in parts]), sums, atol=1e-5)
    assert (entropy > 0).all() and (entropy <= torch.log(torch.tensor(49152.0)) + 1e-3).all()


def test_cut_off_candidates_train_without_an_end_token(tiny_model_dir: Path) -> None:
    from tuning.modeling import candidate_ids, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    ids = candidate_ids(tok, {"texts": ["Hello there", "Hello there"],
                              "finish_reasons": ["eos", "length"]})  # fmt: skip
    assert ids[0][-1] == tok.eos_token_id and ids[1][-1] != tok.eos_token_id
    assert ids[0][:-1] == ids[1]
