"""GRPO and the DPO family through `prefloop tune` on a tiny model, with their metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from labeling.bradley_terry import bt_gains, bt_preferences
from labeling.ranking import consensus, mean_gains, ordered_pairs
from store import db, labels, models, rounds, runs
from store.records import LabelRecord, TrainingGroup
from store.rounds import CandidateRecord
from tests.cli_helpers import ROOT, cli, cli_error
from tuning.batching import GroupTokens, collate, per_candidate, sequence_logps, token_logps
from tuning.config import DPOConfig, GRPOConfig
from tuning.dpo import build_groups, group_loss
from tuning.grpo import build_grpo_groups
from tuning.modeling import load_base, load_tokenizer

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
    # by default the top-ranked candidates' NLL is mixed in to keep the language
    assert v["config"]["sft_weight"] == GRPOConfig().sft_weight > 0
    assert (metrics["nll_loss"] > 0).all()


def test_grpo_without_the_sft_term_logs_no_nll(ws, capsys):
    out = cli(capsys, "tune", "-w", ws.root, "--method", "grpo", "--epochs", 1,
              "--sft-weight", 0, "--guard-prompts", 0, "--quiet")  # fmt: skip
    version, metrics = _metrics(ws, out)
    assert "nll_loss" not in metrics.columns and metrics["loss"].notna().all()


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
        "--beta",
        "0.04",
        "--target-kl",
        "0.01",
        "--ppo-epochs",
        2,
        "--loss-type",
        "bnpo",
        "--guard-prompts",
        0,  # every epoch runs: this test counts steps
        "--quiet",
    )
    version, metrics = _metrics(ws, out)
    with db.connect(ws) as con:
        v1, v2 = models.get_version(con, "v1"), models.get_version(con, version)
    # the round's β: the requested 0.04 moved by the Ziegler rule from v1's measured KL
    kl, target = v1["gate"]["kl_per_token"], v2["config"]["kl_budget"] / 2
    expected = 0.04 * (1 + max(-0.2, min(0.2, kl / target - 1)))
    assert v2["config"]["training"]["beta_requested"] == pytest.approx(0.04)
    assert v2["config"]["beta"] == pytest.approx(expected)
    assert metrics["beta"].iloc[0] == pytest.approx(expected)
    assert metrics["beta"].iloc[-1] != pytest.approx(expected)  # the in-run controller moved it
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
    models = json.loads(cli(capsys, "models", "list", "-w", ws.root, "--json"))
    config = next(m for m in models if m["id"] == version)["config"]
    assert config["soft_labels"] == ("hard" if "--hard-labels" in flags else "empirical")


# three annotators who disagree on (0,1), (1,2) and (2,3): each pair 2 to 1
THREE = [[[0], [1], [2], [3]], [[1], [0], [3], [2]], [[0], [2], [1], [3]]]


def _three_row() -> TrainingGroup:
    return TrainingGroup("Say yes.", list(TEXTS), consensus(THREE), THREE)


def test_bt_soft_labels_reach_the_dpo_loss(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    row = _three_row()
    empirical, bt, hard = (build_groups([row], tok, 64, m)[0] for m in ("empirical", "bt", "hard"))
    # empirical: 2/3 for the disputed pairs, 1 for the unanimous ones
    assert dict(zip(empirical.pairs, empirical.targets, strict=True)) == pytest.approx(
        {(0, 1): 2 / 3, (0, 2): 1, (0, 3): 1, (1, 2): 2 / 3, (1, 3): 1, (2, 3): 2 / 3}
    )
    bt_targets = dict(zip(bt.pairs, bt.targets, strict=True))
    assert bt_targets == pytest.approx(bt_preferences(THREE))
    assert set(bt_targets) == set(empirical.pairs)  # same pairs, other targets
    assert all(0.5 < t < 1 for t in bt.targets) and bt.targets != empirical.targets
    assert bt_targets[(0, 3)] > bt_targets[(0, 2)] > bt_targets[(0, 1)]  # transitive evidence
    assert hard.pairs == ordered_pairs(row.ranking) and set(hard.targets) == {1.0}
    assert build_groups([row], tok, 64, True)[0].targets == empirical.targets  # old bool configs
    assert build_groups([row], tok, 64, False)[0].targets == hard.targets

    g = torch.Generator().manual_seed(0)
    logps = torch.randn(4, generator=g, dtype=torch.float64) * 5 - 30
    ref = logps + torch.randn(4, generator=g, dtype=torch.float64)
    lengths = torch.tensor([len(c) for c in bt.tokens.completions])
    losses = {}
    for mode, group in (("empirical", empirical), ("bt", bt)):
        cfg = DPOConfig(soft_labels=mode, beta=1.0)
        losses[mode] = float(group_loss(logps, ref, [group], [0], cfg, lengths)[0])
    assert losses["bt"] != pytest.approx(losses["empirical"])


def test_bt_gains_reach_grpo(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    mean = build_grpo_groups([_three_row()], tok, GRPOConfig())[0].gains
    bt = build_grpo_groups([_three_row()], tok, GRPOConfig(gain_source="bt"))[0].gains
    assert mean.tolist() == pytest.approx(mean_gains(THREE, 4))
    assert bt.tolist() == pytest.approx(bt_gains(THREE, 4))
    assert not torch.allclose(bt, mean)
    assert bt.argsort(descending=True).tolist() == [0, 1, 2, 3]


def test_soft_label_configs_stored_as_bools_still_read() -> None:
    assert DPOConfig(soft_labels=True).soft_labels == "empirical"
    assert DPOConfig(soft_labels=False).soft_labels == "hard"
    stored = {"method": "dpo", "final_metrics": {}, **DPOConfig(beta=0.3).to_dict()}
    stored["soft_labels"] = False
    cfg = DPOConfig.from_dict(stored)
    assert (cfg.soft_labels, cfg.beta, cfg.lora.r) == ("hard", 0.3, 16)
    assert GRPOConfig.from_dict(GRPOConfig(gain_source="bt").to_dict()).gain_source == "bt"
    with pytest.raises(ValueError, match="soft_labels"):
        DPOConfig(soft_labels="soft")
    with pytest.raises(ValueError, match="gain_source"):
        GRPOConfig(gain_source="median")


def test_bt_options_through_the_cli(ws, capsys):
    out = cli(capsys, "tune", "-w", ws.root, "--epochs", 1, "--soft-labels", "bt", "--quiet")
    version, metrics = _metrics(ws, out)
    assert metrics["loss"].notna().all()
    out = cli(capsys, "tune", "-w", ws.root, "--method", "grpo", "--epochs", 1,
              "--groups-per-step", 6, "--gain-source", "bt", "--quiet")  # fmt: skip
    grpo_version, grpo_metrics = _metrics(ws, out)
    assert grpo_metrics["frac_zero_std_groups"].iloc[0] == pytest.approx(1 / 6)  # all tied
    models = {
        m["id"]: m for m in json.loads(cli(capsys, "models", "list", "-w", ws.root, "--json"))
    }
    assert models[version]["config"]["soft_labels"] == "bt"
    assert models[grpo_version]["config"]["gain_source"] == "bt"
    with pytest.raises(SystemExit):
        cli(capsys, "tune", "-w", ws.root, "--soft-labels", "soft")
    assert "invalid choice" in capsys.readouterr().err


def test_early_stopping_keeps_the_best_epoch(ws, capsys):
    # without the per-epoch guard, which on a random model restarts or stops by chance
    out = cli(capsys, "tune", "-w", ws.root, "--epochs", 6, "--early-stop", 1,
              "--guard-prompts", 0, "--quiet")  # fmt: skip
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
    ids = candidate_ids(tok, ["Hello there", "Hello there"], ["eos", "length"])
    assert ids[0][-1] == tok.eos_token_id and ids[1][-1] != tok.eos_token_id
    assert ids[0][:-1] == ids[1]
