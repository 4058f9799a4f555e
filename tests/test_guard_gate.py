"""The fluency guard, the promotion gate and KL-budgeted rounds, through `prefloop` on a tiny
model: what a user sees when a run drifts past its budget."""

from __future__ import annotations

import json

import pytest

from app.cli import main
from store import db, models, runs
from tests.cli_helpers import cli, cli_error
from tests.test_tuning_methods import ws  # noqa: F401  (the ranked-groups workspace)
from tuning.config import DPOConfig
from tuning.fluency import broken_flags, degenerate, guarded_outcomes
from tuning.guard import GuardReport
from tuning.jobs import gate_verdict, round_beta


def _report(kl: float, broken: float, allowed: float = 0.05) -> GuardReport:
    return GuardReport(kl, broken, 2.0, 1.5, 0.0, allowed, 20, kl <= 0.5 and broken <= allowed, [])


def test_a_run_past_its_kl_budget_is_stopped_kept_unpromoted_and_sampling_stays_on_the_parent(
    ws,  # noqa: F811
    capsys,
):
    out = cli(capsys, "tune", "-w", ws.root, "--epochs", 1, "--quiet")
    assert out.split()[-1] == "v1"
    with db.connect(ws) as con:
        v1 = models.get_version(con, "v1")
    assert v1["promoted"] and v1["gate"]["passed"], v1["gate"]
    assert 0 <= v1["gate"]["broken_share"] <= 1 and v1["gate"]["answers"] == 40  # 10 prompts x 4

    # a destructive learning rate: the guard stops epoch 1 (over the budget) before any epoch
    # was kept, starts again from v1 at a quarter of the rate (DPO's default), twice (the
    # default), each time stopped, and keeps the starting adapter, v1's; nothing was learned, so
    # the gate does not promote it
    code = main([*map(str, ("tune", "-w", ws.root, "--from", "v1", "--lr", "5e-2", "--epochs", 3,
                            "--kl-budget", "0.005", "--quiet"))])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and out.split()[-1] == "v2", err
    assert "the fluency guard stopped training after epoch 1" in err and "kept epoch 0" in err
    assert "at lr 0.05 epoch 1 broke the guard's budget" in err and "at lr 0.0125" in err
    assert "started again from the starting adapter at lr 0.003125" in err
    with db.connect(ws) as con:
        v2 = models.get_version(con, "v2")
        run = runs.list_runs(con).iloc[0]
        steps = runs.run_metrics(con, int(run["id"]))
    training = v2["config"]["training"]
    assert training["stopped_by"] == "guard" and training["epochs_run"] == 1, training
    assert training["kept_epoch"] == 0 and len(training["guard"]) == 1, training
    assert training["guard"][0]["kl_per_token"] > 0.005 and not training["guard"][0]["within"]
    assert [b["lr"] for b in training["backoffs"]] == [5e-2, 1.25e-2], training
    assert all(b["epochs_run"] == 1 and len(b["guard"]) == 1 for b in training["backoffs"])
    assert training["lr"] == 3.125e-3, training
    # three attempts of one epoch each, every step and guard check recorded
    assert steps["guard/kl_per_token"].notna().sum() == 3
    assert steps["loss"].notna().all() and len(steps) % 3 == 0, steps
    assert sorted(steps["learning_rate"].dropna().unique())[-3:] == pytest.approx(
        [3.125e-3, 1.25e-2, 5e-2]
    )
    assert "guard/kl_per_token" in steps.columns  # the run's page plots the per-epoch curve
    assert v2["gate"]["kl_per_token"] <= 0.005 and not v2["promoted"], v2["gate"]
    assert v2["gate"]["reasons"] == [
        "no epoch stayed within the guard's budget, so nothing was learned (the starting adapter "
        "was kept, after 2 restarts, each at 0.25× the last rate); lower --lr or raise --beta"
    ]

    # without the per-epoch guard the same run drifts past the budget: the gate (one answer a
    # prompt here) refuses it
    code = main([*map(str, ("tune", "-w", ws.root, "--from", "v1", "--lr", "5e-2", "--epochs", 3,
                            "--kl-budget", "0.005", "--guard-prompts", 0, "--guard-samples", 1,
                            "--quiet"))])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and out.split()[-1] == "v3", err
    assert "v3 FAILED its promotion gate" in err and "prefloop models promote v3 --force" in err
    with db.connect(ws) as con:
        v3 = models.get_version(con, "v3")
    assert v3["config"]["training"]["epochs_run"] == 3 and not v3["config"]["training"]["guard"]
    assert not v3["promoted"] and v3["gate"]["passed"] is False, v3["gate"]
    assert v3["gate"]["answers"] == 10, v3["gate"]
    assert any("KL per token" in r and "budget 0.005" in r for r in v3["gate"]["reasons"])

    # the table says so; sampling stays on v1 and tells the user why and what to do
    table = cli(capsys, "models", "list", "-w", ws.root)
    line = next(x for x in table.splitlines() if x.split()[:1] == ["v3"])
    assert "FAILED" in line and "KL per token" in line, table
    listed = {m["id"]: m for m in json.loads(cli(capsys, "models", "list", "-w", ws.root,
                                                 "--json"))}  # fmt: skip
    assert listed["v3"]["promoted"] is False and listed["v1"]["promoted"] is True
    with db.connect(ws) as con:
        assert models.default_version(con) == "v1" and models.latest_version(con) == "v3"
    code = main([*map(str, ("sample", "-w", ws.root, "--limit", 2, "--k", 2,
                            "--max-new-tokens", 4, "--json"))])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out.splitlines()[-1])["model_version"] == "v1", err
    assert "sampling from v1: v3 failed its promotion gate (" in err
    assert "KL per token 0." in err and "> budget 0.005" in err, err
    assert "prefloop models promote v3 --force" in err

    # promotion needs --force, which is recorded
    msg = cli_error(capsys, "models", "promote", "v3", "-w", ws.root)
    assert "failed its promotion gate" in msg and "--force" in msg
    out = cli(capsys, "models", "promote", "v3", "--force", "-w", ws.root)
    assert "forced" in out
    with db.connect(ws) as con:
        v3 = models.get_version(con, "v3")
        assert models.default_version(con) == "v3"
    assert v3["promoted"] and v3["gate"]["forced"] is True
    assert "unknown model version" in cli_error(capsys, "models", "promote", "v9", "-w", ws.root)


def test_round_beta_follows_the_ziegler_rule_once_per_round():
    cfg = DPOConfig(beta=0.1, kl_budget=0.4)  # target: half the budget, 0.2
    parent = {"method": "dpo", "config": {"beta": 0.2}, "gate": {"kl_per_token": 0.3}}
    out = round_beta(cfg, "dpo", parent)
    assert out["beta"] == pytest.approx(0.2 * 1.2)  # KL/target - 1 = 0.5, clipped to +0.2
    parent["gate"]["kl_per_token"] = 0.19
    assert round_beta(cfg, "dpo", parent)["beta"] == pytest.approx(0.2 * (1 + (0.19 / 0.2 - 1)))
    parent["gate"]["kl_per_token"] = 0.0
    assert round_beta(cfg, "dpo", parent)["beta"] == pytest.approx(0.2 * 0.8)
    # another method's parent: start from this run's β; no parent or adapt_beta off: unchanged
    assert round_beta(cfg, "grpo", parent)["beta"] == pytest.approx(0.1 * 0.8)
    assert round_beta(cfg, "dpo", None)["beta"] == 0.1
    cfg.adapt_beta = False
    assert round_beta(cfg, "dpo", parent)["beta"] == 0.1
    cfg = DPOConfig(beta=0.1, kl_target=0.05)
    parent["gate"]["kl_per_token"] = 0.055
    assert round_beta(cfg, "dpo", parent)["beta"] == pytest.approx(0.2 * 1.1)


def test_the_gate_checks_broken_share_kl_and_held_out_accuracy():
    cfg = DPOConfig(kl_budget=0.5)
    assert gate_verdict(_report(0.3, 0.05), cfg, 0.7, 0.6)["passed"]
    g = gate_verdict(_report(0.3, 0.10), cfg, None, None)
    assert not g["passed"] and g["reasons"] == ["broken share 10% > 5% of 20 held-out answers"]
    # where π_ref itself breaks more often than 5%, its own share is the bar
    assert gate_verdict(_report(0.3, 0.10, allowed=0.15), cfg, None, None)["passed"]
    g = gate_verdict(_report(0.6, 0.0), cfg, 0.5, 0.5)
    assert g["reasons"] == ["KL per token 0.600 > budget 0.5"]
    g = gate_verdict(_report(0.1, 0.0), cfg, 0.55, 0.6)
    assert g["reasons"] == ["held-out preference accuracy 0.550 < parent's 0.600"]
    unlearned = gate_verdict(_report(0.0, 0.0), cfg, None, None, kept_epoch=0)
    assert "nothing was learned" in unlearned["reasons"][0]
    assert gate_verdict(_report(0.0, 0.0), cfg, None, None, 2)["passed"]


def test_broken_answers_and_guarded_outcomes_by_hand():
    assert degenerate("") and degenerate("   ")
    assert degenerate("min-zuki, min-zuki, min-zuki, min-zuki, min-zuki, min-zuki, min-zuki")
    assert degenerate("a a a a a a")
    assert not degenerate("A volcano is an opening in the Earth's crust where magma escapes.")
    # seen in a GRPO round-2 answer on the real model (NLL/token under π_ref 1.79, below the
    # 1-nat limit of 2.16): emoji garbage ending in an undecodable byte
    seen = (
        "Sure! Here's a simple breakfast that is perfect for a hungry traveler:\n\n"
        "**Bienvenue au chocolé**\n\n🍧Bienvenue au chocolat\n\n🍧☰🍧\ufffd"
    )
    assert degenerate(seen)
    assert not degenerate("Great job! 🎉 Here are three steps:\n1. Mix.\n2. Bake.\n3. Enjoy 🍰")
    assert not degenerate("| a | b |\n|---|---|\n| 1 | 2 |")  # a Markdown table is not garbage
    assert not degenerate("Title\n=====\n\nSome text here.\n\n***\n\nMore text.")
    # median of π_ref's own NLL/token is 1.5: above 2.5 is broken
    flags = broken_flags([1.0, 2.4, 2.6, 1.2], ["ok one", "ok two", "ok three", ""], [1, 1.5, 2])
    assert flags == [False, False, True, True]
    mine, theirs = [True, False, False, True], [False, True, False, True]
    assert guarded_outcomes([1, 1, 0, 0.5], mine, theirs) == [0.0, 1.0, 0.0, 0.5]


def test_the_researcher_page_shows_the_gate_and_promotes_past_it(ws, capsys, monkeypatch):  # noqa: F811
    from tests.test_app import click, element_values, open_app

    cli(capsys, "tune", "-w", ws.root, "--epochs", 1, "--guard-prompts", 0, "--quiet")
    with db.connect(ws) as con:  # as if its gate had failed
        models.set_gate(con, "v1", {"passed": False, "reasons": ["broken share 40% > 5%"]}, False)
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws.root))
    at = open_app("Researcher")
    (table,) = [d.value for d in at.dataframe if "promotion gate" in d.value.columns]
    row = table[table["id"] == "v1"].iloc[0]
    assert not row["promoted"] and row["promotion gate"] == "FAILED: broken share 40% > 5%"
    assert any("New rounds sample from base" in c for c in element_values(at, "caption"))
    click(at, "promote_version")  # without the checkbox: refused, with the gate's reason
    assert any("failed its promotion gate" in e for e in element_values(at, "error"))
    at.checkbox(key="promote_force").check().run()
    click(at, "promote_version")
    with db.connect(ws) as con:
        assert models.default_version(con) == "v1"
        assert models.get_version(con, "v1")["gate"]["forced"] is True
    assert any("New rounds sample from v1" in c for c in element_values(at, "caption"))
