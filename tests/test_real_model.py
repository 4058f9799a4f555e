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

# Small enough for CI on a 2-core CPU: 4:55-5:04 for the whole file on an idle one (the methods
# run concurrently, one thread each; GRPO's round-2 tuning, ~130 s, is the longest step).
K = 4
PROMPTS = 12
MAX_NEW_TOKENS = 48
GROUPS_PER_STEP = 4
EPOCHS = {"dpo": 3, "grpo": 6}
# DPO: the bench's settings plus an SFT term on each group's top-ranked answer (RPO). Without it,
# on one seed in five round 2 over-shoots into empty answers (KL 10 nats/token), which the
# judge ranks last: win-rate 0.50. GRPO: lr 3e-3 instead of the bench's 2e-3, which needs the
# bench's 32 prompts a round (with 12 it stayed at 0.56 after round 2 on one seed in five);
# 4e-3 over-shoots (round 2 fell back to 0.58 on one seed in five).
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
# Measured with these settings for SETTINGS.seed = 0..6 (the test runs seed 0): win-rate
# against π_ref after round 1 -> after round 2 (Wilson 95% lower bound after round 2).
#   seed  DPO                      GRPO
#   0     0.500 -> 0.775 (0.625)   0.750 -> 0.988 (0.891)
#   1     0.675 -> 0.925 (0.801)   0.600 -> 0.988 (0.891)
#   2     0.713 -> 0.925 (0.801)   0.650 -> 0.900 (0.769)
#   3     0.550 -> 0.887 (0.754)   0.662 -> 0.900 (0.769)
#   4     0.700 -> 0.963 (0.853)   0.825 -> 0.950 (0.835)
#   5     0.600 -> 0.850 (0.709)   0.675 -> 0.975 (0.871)
#   6     0.637 -> 0.825 (0.681)   0.700 -> 0.963 (0.853)
# Round 2 gains 0.19-0.34 (DPO) and 0.125-0.39 (GRPO) over round 1; its lower bound is at least
# 0.625. Held-out answers after round 2: 11.6-24.4 (DPO) and 17.7-28.8 (GRPO) tokens shorter
# than π_ref's ~47 (at most 0.75 of their length), 10 or more shorter than after round 1;
# KL 0.25-0.48 (DPO) and 0.55-0.94 (GRPO) nats/token.
MAX_LENGTH_RATIO = 0.85


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
        # two rounds beat π_ref on held-out prompts, and round 2 beats round 1
        assert w2["low"] > 0.5, (method, w2)
        assert w2["win_rate"] > w1["win_rate"], (method, w1, w2)
        # what the annotator and the judge reward: finished, shorter answers to unseen prompts,
        # clearly shorter than π_ref's after round 2 and shorter than after round 1
        d1, d2 = r1.drift, r2.drift
        assert d2["mean_length"] <= MAX_LENGTH_RATIO * d2["mean_length_against"], (method, d2)
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
