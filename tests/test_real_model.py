"""Two rounds of the loop on the real default model, through the `prefloop` CLI as a user runs it.

A scripted annotator who prefers concise answers (tests/rounds_harness.py: fewer tokens first,
answers cut off at the token limit tied last) ranks every sampled group. Round 1 is sampled from
the base model once and labelled once (it is the same for both methods); DPO and GRPO each tune
on it in their own copy of the workspace, sample round 2 from their new version, have it labelled,
and tune again on all labels `--from` that version. After each round `prefloop eval` compares the
version's answers to the held-out prompts with π_ref's (the base model), same seed and settings,
with a programmatic judge of the same taste (fewer words; a cut-off answer loses).

For each method the judged win-rate against π_ref after round 2 must be above its round-1 value
and its Wilson 95% interval must lie above 0.5; the DPO runs must fit their rankings and leave
the records a researcher reads (versions, datasets, runs, step metrics); held-out answers get
shorter. The bench (bench/winrate_rounds.py) runs the same loop at a larger scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.rounds_harness import Cli, LoopSettings, MethodResult, run_loop, table

# Small enough for CI on a 2-core CPU; see MEASURED below for what these settings reach.
K = 4
PROMPTS = 12
MAX_NEW_TOKENS = 48
GROUPS_PER_STEP = 4
EPOCHS = {"dpo": 3, "grpo": 6}
TUNE_ARGS = {
    "dpo": f"--lr 5e-4 --epochs {EPOCHS['dpo']} --beta 0.1 --groups-per-step {GROUPS_PER_STEP}"
    " --sft-weight 0.5",
    "grpo": f"--lr 3e-3 --epochs {EPOCHS['grpo']} --beta 0.0 --groups-per-step {GROUPS_PER_STEP}",
}
SETTINGS = LoopSettings(
    prompts=PROMPTS,
    k=K,
    max_new_tokens=MAX_NEW_TOKENS,
    rounds=2,
    eval_k=4,  # 10 held-out prompts x 4 samples = 40 judged pairs per evaluation
    seed=0,
    tune_args=TUNE_ARGS,
    # one thread per job (the default on 2 cores): the same numerics, hence the same seeded
    # samples, on a machine with more cores; the two methods run concurrently
    env={"PREFLOOP_THREADS": "1"},
)
# Measured with these settings (round 1 / round 2 win-rate against π_ref, Wilson 95% low of
# round 2), one line per seed of SETTINGS.seed:
# (DPO without --sft-weight collapsed on seed 4: KL/token 10, win-rate 0.50; GRPO at lr 2e-3
# stayed near 0.56 on seed 3.)
MEASURED = """
seed 0: DPO 0.500 -> 0.775 (low 0.625); GRPO 0.750 -> 0.988 (low 0.891)
seed 1: DPO 0.675 -> 0.925 (low 0.801); GRPO 0.600 -> 0.988 (low 0.891)
seed 2: DPO 0.713 -> 0.925 (low 0.801); GRPO 0.650 -> 0.900 (low 0.769)
seed 3: DPO 0.550 -> 0.887 (low 0.754)
"""


@pytest.mark.slow
def test_two_rounds_of_dpo_and_grpo_raise_the_win_rate_against_pi_ref(
    default_model_dir: Path, tmp_path: Path
) -> None:
    """sample → rank (shorter is better) → tune, twice, per method; judged on held-out prompts."""
    results, errors = run_loop(tmp_path, ["dpo", "grpo"], SETTINGS, jobs=2, log=print)
    print(f"\n{table(results, settings=False)}")
    for m, res in results.items():
        print(f"{m}: {res.tune_args}; {res.total_s:.0f}s after round 1")
    assert not errors, errors

    dpo_records(results["dpo"])
    grpo_records(results["grpo"])
    for method, res in results.items():
        r1, r2 = res.rounds
        w1, w2 = r1.winrate, r2.winrate
        assert w1["n"] == w2["n"] == 10 * SETTINGS.eval_k, (w1, w2)
        # two rounds beat π_ref on held-out prompts, and round 2 does not fall back
        assert w2["low"] > 0.5, (method, w2)
        assert w2["win_rate"] >= w1["win_rate"], (method, w1, w2)
        # what the annotator and the judge reward: finished, shorter answers to unseen prompts,
        # clearly shorter than π_ref's after round 2 and shorter than after round 1
        d1, d2 = r1.drift, r2.drift
        assert d2["mean_length"] <= 0.8 * d2["mean_length_against"], (method, d2)
        assert d2["mean_length"] < d1["mean_length"], (method, d1, d2)
        assert d2["length_limit_share"] < d2["length_limit_share_against"], (method, d2)


def dpo_records(res: MethodResult) -> None:
    """Both DPO runs fit their rankings and left versions, datasets, runs and step metrics."""
    from store import datasets, db
    from store import runs as store_runs
    from store.db import workspace

    cli = Cli(res.workspace)
    r1, r2 = res.rounds
    models = {m["id"]: m for m in cli.json("models", "list", "--json")}
    assert {r1.version, r2.version} <= set(models), (r1.version, r2.version, sorted(models))
    assert all(m["base_model"] == "SmolLM2-135M-Instruct" for m in models.values()), models
    assert models[r2.version]["parent"] == r1.version, models[r2.version]
    dsets = {d["id"]: d for d in cli.json("dataset", "list", "--json")}
    tunes = [r for r in cli.json("runs", "list", "--json") if r["kind"] == "tune"]
    assert len(tunes) == 2 and all(r["status"] == "completed" for r in tunes), tunes
    labelled = 0
    for row in res.rounds:
        info = models[row.version]
        final = info["config"]["final_metrics"]
        print(f"{row.version} final metrics: {json.dumps(final)}")
        assert final["rewards/accuracies"] >= 0.8, final
        assert final["rewards/margins"] > 0, final
        (run,) = [r for r in tunes if r["result"] == row.version]
        run_dir = res.workspace / "artifacts" / "runs" / str(run["id"])
        run_final = json.loads((run_dir / "final_metrics.json").read_text())
        assert run_final == pytest.approx(final, rel=1e-6)
        # tune freezes every label so far into a new dataset version; every labelled group has a
        # strict order (the harness leaves all-tied groups out), so every group trains
        labelled += row.labelled
        dataset = dsets[info["dataset_id"]]
        assert dataset["n_groups"] == labelled, (dataset, row)
        with db.connect(workspace(res.workspace)) as con:
            steps = store_runs.run_metrics(con, run["id"])
            snapshot = datasets.read_snapshot(
                workspace(res.workspace), datasets.get_dataset(con, dataset["id"])
            )
        assert all(len(r) > 1 for r in snapshot["ranking"]), snapshot["ranking"]
        assert len(steps) == EPOCHS["dpo"] * math.ceil(labelled / GROUPS_PER_STEP), steps
        for name in ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "grad_norm"):
            assert name in steps.columns and steps[name].notna().all(), (name, steps.columns)


def grpo_records(res: MethodResult) -> None:
    """Both GRPO runs completed, one optimizer step per batch of groups per epoch."""
    from store import db
    from store import runs as store_runs
    from store.db import workspace

    cli = Cli(res.workspace)
    models = {m["id"]: m for m in cli.json("models", "list", "--json")}
    tunes = {r["result"]: r for r in cli.json("runs", "list", "--json") if r["kind"] == "tune"}
    labelled = 0
    for row in res.rounds:
        info = models[row.version]
        assert info["config"]["method"] == "grpo", info
        labelled += row.labelled
        with db.connect(workspace(res.workspace)) as con:
            steps = store_runs.run_metrics(con, tunes[row.version]["id"])
        assert len(steps) == EPOCHS["grpo"] * math.ceil(labelled / GROUPS_PER_STEP), steps
        for name in ("loss", "kl", "learning_rate", "grad_norm"):
            assert name in steps.columns and steps[name].notna().all(), (name, steps.columns)
