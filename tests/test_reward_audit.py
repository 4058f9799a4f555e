"""Watching the reward: reward–human agreement on an online run's audit round, per step (CLI,
Researcher page), and `prefloop tune --resume RUN` after a crash or a kill."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.cli import main
from labeling.curation import JUDGE_ANNOTATOR
from labeling.reward_audit import agreement_curve, pair_agreement
from store import db, labels, models, rounds, runs
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import cli, cli_error, run_cli, write_jsonl
from tests.fixtures_app import add_prompts, make_workspace
from tests.judges import crashing

Z = 1.959964
SHORTER = "tests.judges.length:shorter"
CRASHING = "tests.judges.crashing:shorter"


def wilson(p: float, n: int) -> tuple[float, float]:
    """The Wilson score interval, written out independently of the code under test."""
    centre = (p + Z**2 / (2 * n)) / (1 + Z**2 / n)
    half = Z / (1 + Z**2 / n) * math.sqrt(p * (1 - p) / n + Z**2 / (4 * n**2))
    return max(0.0, centre - half), min(1.0, centre + half)


# -- the agreement computation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rewards", "rankings", "hits", "n"),
    [
        ({1: 3.0, 2: 2.0, 3: 1.0}, [[[1], [2], [3]]], 3.0, 3),  # the same order: all agree
        ({1: 3.0, 2: 2.0, 3: 1.0}, [[[3], [2], [1]]], 0.0, 3),  # reversed: none
        ({1: 3.0, 2: 1.0, 3: 1.0}, [[[1], [2], [3]]], 2.5, 3),  # reward tie 2=3 counts half
        ({1: 3.0, 2: 1.0, 3: 1.0}, [[[2, 3], [1]]], 0.0, 2),  # a human tie orders no pair
        ({1: 0.0, 2: 5.0}, [[[2], [1]], [[1], [2]], [[1, 2]]], 1.0, 2),  # per annotator
        ({1: 1.0, 2: 1.0}, [], 0.0, 0),  # nobody ranked
    ],
)
def test_pair_agreement_against_hand_counts(rewards, rankings, hits, n) -> None:
    assert pair_agreement(rewards, rankings) == (pytest.approx(hits), n)


def _audit_ws(tmp_path: Path) -> tuple[db.Workspace, int, dict[str, list[int]]]:
    """A workspace with an online run whose audit round has groups at steps 1, 2 and 3, ranked
    by two people and the judge: step 1 agrees on 3 of 5 pairs, step 2 on 1 of 1, step 3 has
    no ranking yet."""
    ws = make_workspace(tmp_path / "ws")
    pids = add_prompts(ws, ["p1", "p2", "p3", "p4"])
    cands = {}
    with db.connect(ws) as con:
        run_id = runs.start_run(con, "tune", {"method": "grpo", "online": True, "audit": 2})
        source = rounds.audit_source(run_id)
        for step, prompt_ids, rewards in (
            (1, [pids[0]], [[3.0, 1.0, 1.0]]),
            (2, [pids[1], pids[2]], [[0.5, 2.0], [1.0, 0.0]]),
            (3, [pids[3]], [[1.0, 2.0]]),
        ):
            items = [
                (p, [CandidateRecord(f"s{step} c{i}") for i in range(len(r))])
                for p, r in zip(prompt_ids, rewards, strict=True)
            ]
            rounds.add_scored_groups(con, source, {"run_id": run_id}, step, items, rewards)
        audit_id = rounds.run_audit(con, run_id)["round_id"]
        groups = rounds.groups(con, round_id=audit_id)
        a, b, c, d = (g.candidate_ids for g in groups)
        cands = {"a": a, "b": b, "c": c, "d": d}
        labels.add_labels(
            con,
            [
                # step 1, rewards 3, 1, 1: 2.5 of 3 pairs, then 0.5 of 2 pairs
                LabelRecord(groups[0].group_id, "ann1", [[a[0]], [a[1]], [a[2]]]),
                LabelRecord(groups[0].group_id, "ann2", [[a[2]], [a[0], a[1]]]),
                # the judge is not a person: its (reversed) ranking must not count
                LabelRecord(groups[0].group_id, JUDGE_ANNOTATOR, [[a[2]], [a[1]], [a[0]]]),
                # step 2, rewards 0.5, 2: 1 of 1 pair; the other group skipped
                LabelRecord(groups[1].group_id, "ann1", [[b[1]], [b[0]]]),
                LabelRecord(groups[2].group_id, "ann1", None, flags=["skipped"]),
            ],
        )
    return ws, run_id, cands


EXPECTED = [  # step, groups, labelled groups, labels, pairs, agreement
    (1, 1, 1, 2, 5, 0.6),
    (2, 2, 1, 1, 1, 1.0),
    (3, 1, 0, 0, 0, None),
]


def test_agreement_curve_per_step_of_an_audit_round(tmp_path) -> None:
    ws, run_id, _ = _audit_ws(tmp_path)
    curve = agreement_curve(ws, run_id)
    got = [
        (r.step, r.groups, r.labelled_groups, r.labels, r.pairs, r.agreement)
        for r in curve.astype(object).where(curve.notna(), None).itertuples()
    ]
    assert got == EXPECTED
    low, high = wilson(0.6, 5)
    assert (curve["low"][0], curve["high"][0]) == (pytest.approx(low), pytest.approx(high))
    assert curve["low"][1] == pytest.approx(wilson(1.0, 1)[0])
    assert curve["low"].isna().iloc[2] and curve["agreement"].isna().iloc[2]


def test_cli_prints_the_curve_and_refuses_runs_without_an_audit(tmp_path, capsys) -> None:
    ws, run_id, _ = _audit_ws(tmp_path)
    out = cli(capsys, "runs", "audit", str(run_id), "-w", ws.root, "--json")
    steps = json.loads(out)["steps"]
    assert [(s["step"], s["pairs"], s["agreement"]) for s in steps] == [
        (e[0], e[4], e[5]) for e in EXPECTED
    ]
    assert main(["runs", "audit", str(run_id), "-w", str(ws.root)]) == 0
    table, summary = capsys.readouterr()
    assert "agreement" in table.splitlines()[0] and "0.6" in table
    assert "agreement 0.667 over 6 ranked pairs" in summary  # (3 + 1) of 6
    with db.connect(ws) as con:
        offline = runs.start_run(con, "tune", {"method": "dpo"})
        online = runs.start_run(con, "tune", {"method": "rloo", "online": True})
    assert "only online runs" in cli_error(capsys, "runs", "audit", offline, "-w", ws.root)
    assert "started without --audit" in cli_error(capsys, "runs", "audit", online, "-w", ws.root)
    assert "unknown run 999" in cli_error(capsys, "runs", "audit", "999", "-w", ws.root)


def test_researcher_page_charts_the_agreement_curve(tmp_path, monkeypatch) -> None:
    from tests.test_app import open_app

    ws, run_id, _ = _audit_ws(tmp_path)
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws.root))
    at = open_app("Researcher")
    assert at.selectbox(key="run_select").value == run_id
    assert any("the policy games the reward" in c.value for c in at.caption)
    charts = [c for c in at.get("vega_lite_chart") if "Reward audit" in c.proto.spec]
    assert len(charts) == 1
    spec = json.loads(charts[0].proto.spec)
    assert "agreement" in json.dumps(spec["layer"])
    table = next(d.value for d in at.dataframe if "agreement" in d.value.columns)
    assert table["agreement"].tolist()[:2] == [0.6, 1.0]
    assert any("agreement 0.667 over 6 ranked pairs" in t.value for t in at.text)


def test_resuming_drops_the_steps_after_the_checkpoint_but_keeps_labelled_groups(tmp_path):
    ws, run_id, cands = _audit_ws(tmp_path)
    with db.connect(ws) as con:
        for step in (1, 2, 3):
            rounds.add_scored_groups(
                con, rounds.rollout_source(run_id, step), {"step": step}, step,
                [(1, [CandidateRecord("x"), CandidateRecord("y")])], [[1.0, 0.0]],
            )  # fmt: skip
            runs.heartbeat(con, run_id, {"objective/scores": float(step)}, step)
        removed = rounds.drop_run_steps_after(con, run_id, 1)
        runs.resume_run(con, run_id, 1)
        left = rounds.rounds_of_run(con, run_id)
        audit = rounds.run_audit(con, run_id)
        metrics = runs.run_metrics(con, run_id)
    # step rounds 2 and 3 (one group each), and step 3's unranked audit group, are gone
    assert removed == 3
    assert sorted(left["step"].dropna().tolist()) == [1]
    # step 2's groups were ranked (one skipped): a person worked on them, so they stay
    assert sorted(audit["steps"].values()) == [1, 2, 2]
    assert set(cands["d"]).isdisjoint(audit["rewards"])
    assert list(metrics.index) == [1]


# -- tune --resume -------------------------------------------------------------------------------


QUICK = ("--k", "2", "--prompts-per-step", "1", "--max-new-tokens", "4", "--epochs", "1",
         "--guard-prompts", "0", "--gate-prompts", "0", "--quiet")  # fmt: skip


def _init(capsys, root: Path, model: Path, n_prompts: int) -> db.Workspace:
    cli(capsys, "init", "-w", root, "--model", model)
    prompts = root / "prompts.jsonl"
    write_jsonl(prompts, [{"prompt": f"Name thing number {i}."} for i in range(n_prompts)])
    cli(capsys, "prompts", "import", prompts, "-w", root)
    return db.workspace(root)


def _adapter(ws: db.Workspace, version: str) -> dict[str, torch.Tensor]:
    return load_file(ws.artifacts / "adapters" / version / "adapter_model.safetensors")


@pytest.mark.parametrize("method", [("grpo", "--online"), ("ppo",)], ids=["grpo", "ppo"])
def test_a_crashed_run_resumes_to_the_adapter_an_uninterrupted_run_trains(
    tmp_path, tiny_model_dir, capsys, monkeypatch, method
) -> None:
    monkeypatch.setattr(crashing, "calls", 0)
    monkeypatch.setattr(crashing, "crash_at", None)
    whole = _init(capsys, tmp_path / "whole", tiny_model_dir, 3)
    args = ("--method", *method, "--reward", CRASHING, "--audit", "1", *QUICK)
    want = cli(capsys, "tune", "-w", whole.root, *args).split()[-1]

    ws = _init(capsys, tmp_path / "ws", tiny_model_dir, 3)
    # nothing to resume yet, and --resume takes no settings
    assert "unknown run 1" in cli_error(capsys, "tune", "-w", ws.root, "--resume", "1")
    assert "drop --method, --epochs" in cli_error(
        capsys, "tune", "-w", ws.root, "--resume", "1", "--method", "grpo", "--epochs", "2"
    )
    # K=2 samples a step: the reward fails on its 5th call, in step 3, after step 2's checkpoint
    monkeypatch.setattr(crashing, "calls", 0)
    monkeypatch.setattr(crashing, "crash_at", 5)
    from app.cli import main

    with pytest.raises(RuntimeError, match="reward service went away"):
        main(["tune", "-w", str(ws.root), *args])
    with db.connect(ws) as con:
        run = runs.list_runs(con).iloc[0]
        assert run["status"] == "failed" and models.list_versions(con).empty
        assert list(runs.run_metrics(con, int(run["id"])).index) == [1, 2]
    run_id = str(run["id"])
    out = cli(capsys, "tune", "-w", ws.root, "--resume", run_id, "--quiet")
    version = out.split()[-1]
    with db.connect(ws) as con:
        info = models.get_version(con, version)
        row = runs.get_run(con, int(run_id))
        metrics = runs.run_metrics(con, int(run_id))
        steps = rounds.rounds_of_run(con, int(run_id))
        audit = rounds.run_audit(con, int(run_id))
    assert int(info["run_id"]) == int(run_id) and row["status"] == "completed"
    assert list(metrics.index) == [1, 2, 3]
    assert sorted(steps["step"].dropna()) == [1, 2, 3]  # step 3 stored once, not twice
    assert sorted(audit["steps"].values()) == [1, 2, 3]
    # the same adapter, to float precision, as the run that was never interrupted
    got, ref = _adapter(ws, version), _adapter(whole, want)
    assert got.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-6)
    assert not (ws.artifacts / "runs" / run_id / "checkpoint.pt").exists()
    if method[0] == "ppo":
        return  # the refusals below do not depend on the method
    # a finished run, an offline run, a run without a checkpoint: refused with what to do
    assert "finished" in cli_error(capsys, "tune", "-w", ws.root, "--resume", run_id)
    with db.connect(ws) as con:
        dpo = runs.start_run(con, "tune", {"method": "dpo"})
        runs.fail_run(con, dpo, "boom")
        online = runs.start_run(con, "tune", {"method": "rloo", "online": True})
    assert "not an online run" in cli_error(capsys, "tune", "-w", ws.root, "--resume", dpo)
    assert "still running" in cli_error(capsys, "tune", "-w", ws.root, "--resume", online)
    with db.connect(ws) as con:
        runs.fail_run(con, online, "boom")
    assert "has no checkpoint" in cli_error(capsys, "tune", "-w", ws.root, "--resume", online)


# -- on the real default model -------------------------------------------------------------------


@pytest.fixture
def real_ws(tmp_path: Path, default_model_dir: Path, capsys) -> db.Workspace:
    return _init(capsys, tmp_path / "ws", default_model_dir, 2)


@pytest.mark.slow
def test_an_audit_round_ranked_through_labels_import_makes_the_curve(
    real_ws, capsys, monkeypatch
) -> None:
    out = cli(capsys, "tune", "-w", real_ws.root, "--method", "grpo", "--online", "--reward",
              SHORTER, "--audit", "1", *QUICK)  # fmt: skip
    with db.connect(real_ws) as con:
        run_id = int(models.get_version(con, out.split()[-1])["run_id"])
        audit = rounds.run_audit(con, run_id)
        groups = rounds.groups(con, round_id=audit["round_id"])
    assert sorted(audit["steps"].values()) == [1, 2]
    # an annotator who likes longer answers (the reward prefers shorter) at step 1 and agrees
    # with the reward at step 2; expected values from the texts, not the stored rewards
    rows, expected = [], {}
    for g in groups:
        step = audit["steps"][g.group_id]
        lengths = dict(zip(g.candidate_ids, map(len, g.texts), strict=True))
        order = sorted(g.candidate_ids, key=lambda c: lengths[c], reverse=step == 1)
        rows.append({"group_id": g.group_id, "annotator": "ann1", "ranking": [[c] for c in order]})
        first, second = order
        tie = lengths[first] == lengths[second]
        expected[step] = 0.5 if tie else (0.0 if step == 1 else 1.0)
    write_jsonl(real_ws.root / "audit_labels.jsonl", rows)
    cli(capsys, "labels", "import", real_ws.root / "audit_labels.jsonl", "-w", real_ws.root)
    steps = json.loads(cli(capsys, "runs", "audit", run_id, "-w", real_ws.root, "--json"))
    got = {s["step"]: (s["pairs"], s["agreement"]) for s in steps["steps"]}
    assert got == {1: (1, expected[1]), 2: (1, expected[2])}


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint(real_ws, monkeypatch) -> None:
    args = ("tune", "-w", real_ws.root, "--method", "rloo", "--reward", CRASHING, "--audit",
            "1", *QUICK)  # fmt: skip
    # two prompts, K=2: the 3rd reward call is in step 2, after step 1's checkpoint: kill -9
    monkeypatch.setenv(crashing.KILL_ENV, "3")
    proc = run_cli(*args, check=False)
    monkeypatch.delenv(crashing.KILL_ENV)
    assert proc.returncode == -9, proc.stderr[-2000:]
    with db.connect(real_ws) as con:
        assert models.list_versions(con).empty  # a killed run leaves no version
        run_id = int(runs.list_runs(con).iloc[0]["id"])
    assert (real_ws.artifacts / "runs" / str(run_id) / "checkpoint.pt").is_file()
    proc = run_cli("tune", "-w", real_ws.root, "--resume", run_id, "--quiet")
    assert f"resuming run {run_id} after its step 1" in proc.stderr
    version = proc.stdout.split()[-1]
    with db.connect(real_ws) as con:
        info = models.get_version(con, version)
        metrics = runs.run_metrics(con, run_id)
        timeline = runs.metric_timeline(con, run_id, "objective/scores")
        audit = rounds.run_audit(con, run_id)
    assert info["method"] == "rloo" and int(info["run_id"]) == run_id
    assert list(metrics.index) == [1, 2]
    assert timeline["step"].tolist() == [1, 2]  # step 1 was not trained again
    assert sorted(audit["steps"].values()) == [1, 2]


def test_loop_page_shows_a_running_runs_agreement(tmp_path, monkeypatch) -> None:
    from tests.test_app import open_app

    ws, run_id, _ = _audit_ws(tmp_path)  # the run is recorded as running in this process
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws.root))
    at = open_app("Loop")
    lines = [t.value for t in at.text if t.value.startswith(f"run {run_id}:")]
    assert lines and "reward–human agreement 0.667 over 6 ranked pairs" in lines[0]
