"""The whole loop on the real default model, through the `prefloop` CLI as a user runs it.

A scripted annotator who prefers concise answers ranks every sampled group (fewer tokens first,
answers cut off at the token limit tied last); DPO on those rankings must fit them, and the tuned
version's answers to held-out prompts must get clearly shorter than the base model's.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "labeling" / "data"

# Settings found to work reliably on SmolLM2-135M-Instruct on a 2-core CPU: about 3-3.5 minutes
# (sampling ~50 s, DPO ~85 s, held-out sampling 2 x ~35 s), up to ~5 when the CPU is shared.
# With the CLI's default --lr 1e-4 and 3 epochs the run fits the rankings (accuracy 1.0) but
# the policy barely moves: held-out lengths do not change.
SEED = 0
K = 4
TRAIN_PROMPTS = 16
MAX_NEW_TOKENS = 64
EPOCHS = 6
GROUPS_PER_STEP = 4
TUNE_ARGS = [
    *("--lr", "1e-3", "--beta", "0.1"),
    *("--epochs", str(EPOCHS), "--groups-per-step", str(GROUPS_PER_STEP)),
]
# The tuned version's held-out answers must be at most this fraction of the base's mean length.
MAX_LENGTH_RATIO = 0.8


class Cli:
    """Runs `python -m app.cli ... --workspace WS` in a subprocess and times each stage."""

    def __init__(self, workspace: Path) -> None:
        self.workspace = workspace
        self.timings: list[tuple[str, float, float]] = []

    def __call__(self, *args: str, stage: str | None = None) -> str:
        """The command's stdout; a non-zero exit fails the test with its stderr."""
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", *args, "--workspace", str(self.workspace)],
            cwd=REPO,
            capture_output=True,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        self.timings.append((stage or " ".join(args[:2]), wall, cpu))
        assert proc.returncode == 0, (
            f"`prefloop {' '.join(args)}` exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
        return proc.stdout

    def json(self, *args: str, stage: str | None = None):
        """The command's stdout parsed as JSON (its last line)."""
        return json.loads(self(*args, stage=stage).strip().splitlines()[-1])

    def report(self) -> str:
        """One line per command: wall and CPU seconds."""
        lines = [f"  {name:<28} {wall:6.1f} s wall {cpu:6.1f} s cpu" for name, wall, cpu in self]
        total = sum(w for _, w, _ in self.timings)
        return "\n".join([*lines, f"  {'total':<28} {total:6.1f} s wall"])

    def __iter__(self):
        return iter(self.timings)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def concise_annotator(groups: list[dict], n_tokens) -> list[dict]:
    """Labels from an annotator who ranks every group's candidates shortest first.

    Length is counted in tokens; answers that ran into the token limit are all "too long" and
    tie in the last tier (ranking cut-off answers by characters would reward text that packs
    few characters into many tokens, such as "1.1.1.1.", which DPO then learns). A group whose
    candidates all ran into the limit is one tie and is left out of training.
    """
    labels = []
    for g in groups:
        tiers: dict[int, list[int]] = {}
        for c in g["candidates"]:
            length = min(n_tokens(c["text"]), MAX_NEW_TOKENS - 2)  # re-tokenising varies by ±2
            tiers.setdefault(length, []).append(c["id"])
        labels.append(
            {
                "group_id": g["group_id"],
                "annotator": "concise-bot",
                "ranking": [tiers[n] for n in sorted(tiers)],
            }
        )
    return labels


@pytest.mark.slow
def test_dpo_on_real_model_learns_a_length_preference(
    default_model_dir: Path, tmp_path: Path
) -> None:
    """init → import → sample → rank (shorter is better) → tune → held-out answers are shorter."""
    from transformers import AutoTokenizer

    ws = tmp_path / "ws"
    cli = Cli(ws)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    # 1. a workspace on the default model, train and held-out prompts
    cli("init")
    assert cli.json("models", "list", "--json")[0]["base_model"] == "SmolLM2-135M-Instruct"
    cli("prompts", "import", str(DATA / "demo_prompts.jsonl"), "--split", "train")
    cli("prompts", "import", str(DATA / "demo_prompts_heldout.jsonl"), "--split", "heldout")

    # 2. sample K candidates for the first TRAIN_PROMPTS train prompts
    sampling = ["--k", str(K), "--max-new-tokens", str(MAX_NEW_TOKENS), "--json"]
    train_round = cli.json(
        "sample",
        *sampling,
        "--limit",
        str(TRAIN_PROMPTS),
        "--seed",
        str(SEED),
        stage="sample train (base)",
    )
    assert train_round["groups"] == TRAIN_PROMPTS

    # 3. the scripted annotator ranks every group; its labels go in through the CLI
    groups_file = tmp_path / "groups.jsonl"
    cli("groups", "export", "--round", str(train_round["id"]), "--out", str(groups_file))
    groups = read_jsonl(groups_file)
    assert len(groups) == TRAIN_PROMPTS
    assert all(len(g["candidates"]) == K for g in groups)
    labels_file = tmp_path / "labels.jsonl"
    labels_file.write_text(
        "".join(json.dumps(r) + "\n" for r in concise_annotator(groups, n_tokens))
    )
    assert f"imported {TRAIN_PROMPTS} labels" in cli("labels", "import", str(labels_file))

    # 4. DPO on the labelled groups (tune freezes them into a dataset version first)
    version = (
        cli("tune", "--method", "dpo", *TUNE_ARGS, "--seed", str(SEED), "--quiet", stage="tune dpo")
        .strip()
        .splitlines()[-1]
    )

    # 5. the run fits the rankings: final evaluation over all training groups
    models = {m["id"]: m for m in cli.json("models", "list", "--json")}
    assert version in models, f"tune printed {version!r}, models list has {sorted(models)}"
    final = models[version]["config"]["final_metrics"]
    runs = cli.json("runs", "list", "--json")
    tune_run = next(r for r in runs if r["kind"] == "tune")
    assert tune_run["status"] == "completed" and tune_run["result"] == version
    run_final = json.loads(
        (ws / "artifacts" / "runs" / str(tune_run["id"]) / "final_metrics.json").read_text()
    )
    assert run_final == pytest.approx(final, rel=1e-6)
    (dataset,) = cli.json("dataset", "list", "--json")
    assert models[version]["dataset_id"] == dataset["id"]
    print(
        f"\ndataset {dataset['id']}: {dataset['n_groups']} labelled groups "
        f"(of {TRAIN_PROMPTS}), {dataset['n_pairs']} pairs"
    )
    print(f"final metrics of {version}: {json.dumps(final, indent=1)}")
    assert final["rewards/accuracies"] >= 0.8, final
    assert final["rewards/margins"] > 0, final

    from store import datasets, db
    from store import runs as store_runs
    from store.db import workspace

    with db.connect(workspace(ws)) as con:
        steps = store_runs.run_metrics(con, tune_run["id"])
        info = datasets.get_dataset(con, dataset["id"])
    # all-tied groups stay in the snapshot (GRPO counts them) but give DPO no pair to train on
    ordered = sum(len(r) > 1 for r in datasets.read_snapshot(workspace(ws), info)["ranking"])
    assert ordered >= 4, dataset  # enough groups with a shorter finished answer
    n_steps = EPOCHS * -(-ordered // GROUPS_PER_STEP)
    assert len(steps) == n_steps, steps
    for name in ("loss", "rewards/accuracies", "rewards/margins", "learning_rate", "grad_norm"):
        assert name in steps.columns and steps[name].notna().all(), (name, steps.columns)

    # 6. held-out prompts, base and tuned, same seed and settings: tuned answers are shorter
    def heldout_lengths(model: str) -> list[int]:
        info = cli.json(
            "sample",
            *sampling,
            "--split",
            "heldout",
            "--model",
            model,
            "--seed",
            str(SEED + 1),
            stage=f"sample heldout ({model})",
        )
        assert info["model_version"] == model and info["split"] == "heldout"
        out = tmp_path / f"heldout-{model}.jsonl"
        cli("groups", "export", "--round", str(info["id"]), "--out", str(out))
        return [n_tokens(c["text"]) for g in read_jsonl(out) for c in g["candidates"]]

    base_lengths = heldout_lengths("base")
    tuned_lengths = heldout_lengths(version)
    assert len(base_lengths) == len(tuned_lengths) == 10 * K
    base_mean, tuned_mean = statistics.mean(base_lengths), statistics.mean(tuned_lengths)
    print(
        f"held-out mean completion length: base {base_mean:.1f} tokens, "
        f"{version} {tuned_mean:.1f} tokens (ratio {tuned_mean / base_mean:.2f})"
    )
    print(f"timings:\n{cli.report()}")
    assert tuned_mean <= MAX_LENGTH_RATIO * base_mean, (base_mean, tuned_mean)
