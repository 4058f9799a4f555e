"""The whole loop through the CLI on a tiny random model, ending in TRL-ready files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_helpers import ROOT, cli, rank_by_length, read_jsonl, run_cli, write_jsonl

PROMPTS = ROOT / "labeling" / "data" / "demo_prompts.jsonl"


def test_whole_loop_on_tiny_model(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    ws = tmp_path / "ws"
    cli(capsys, "init", "--workspace", ws, "--model", tiny_model_dir)
    out = cli(capsys, "prompts", "import", PROMPTS, "--workspace", ws)
    assert "imported 40 prompts" in out

    sample = run_cli("sample", "--workspace", ws, "--k", 4, "--limit", 6, "--max-new-tokens", 12)
    round1 = int(sample.stdout.strip().splitlines()[-1])
    assert round1 == 1

    cli(
        capsys,
        "groups",
        "export",
        "--workspace",
        ws,
        "--round",
        round1,
        "--out",
        tmp_path / "g.jsonl",
    )
    groups = read_jsonl(tmp_path / "g.jsonl")
    assert len(groups) == 6 and all(len(g["candidates"]) == 4 for g in groups)
    assert {"group_id", "round", "prompt", "candidates"} <= set(groups[0])

    write_jsonl(tmp_path / "labels.jsonl", rank_by_length(groups))
    assert "imported 6 labels" in cli(
        capsys, "labels", "import", tmp_path / "labels.jsonl", "-w", ws
    )
    pending = tmp_path / "pending.jsonl"
    cli(capsys, "groups", "export", "-w", ws, "--pending", "--out", pending)
    assert read_jsonl(pending) == []

    tune = run_cli("tune", "--workspace", ws, "--epochs", 2, "--groups-per-step", 2, "--quiet")
    version = tune.stdout.strip().splitlines()[-1]
    assert version == "v1"
    models = json.loads(cli(capsys, "models", "list", "-w", ws, "--json"))
    v1 = next(m for m in models if m["id"] == "v1")
    assert v1["parent"] is None and v1["dataset_id"] == "d1" and v1["method"] == "dpo"
    assert v1["config"]["beta"] == 0.1 and v1["config"]["lora"]["r"] == 16
    adapter = ws / v1["adapter_path"]
    assert (adapter / "adapter_config.json").exists()

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)

    runs = json.loads(cli(capsys, "runs", "list", "-w", ws, "--json"))
    tune_run = next(r for r in runs if r["kind"] == "tune")
    assert tune_run["status"] == "completed" and tune_run["result"] == "v1"
    from store import db
    from store import runs as store_runs

    with db.connect(db.workspace(ws)) as con:
        metrics = store_runs.run_metrics(con, tune_run["id"])
    for name in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "learning_rate",
    ):
        assert name in metrics.columns, name
    # 3 steps per epoch, for every epoch of every attempt (the guard may restart at half the rate)
    training = v1["config"]["training"]
    attempts = training["epochs_run"] + sum(b["epochs_run"] for b in training["backoffs"])
    assert len(metrics) == 3 * attempts and training["epochs_run"] >= 1, training

    # named: a random model's gate (broken share against π_ref's) passes or fails by chance;
    # sampling from the promoted default is tested in test_guard_gate.py
    round2 = int(
        cli(
            capsys, "sample", "-w", ws, "--model", "v1", "--limit", 3, "--max-new-tokens", 8
        ).splitlines()[-1]
    )
    rounds = json.loads(cli(capsys, "rounds", "list", "-w", ws, "--json"))
    assert [r["model_version"] for r in rounds] == ["base", "v1"]
    assert rounds[0]["labelled_groups"] == 6 and rounds[1]["id"] == round2

    # --from continues v1's adapter; the same dataset version is reused
    v2 = run_cli("tune", "-w", ws, "--from", "v1", "--epochs", 1, "--quiet").stdout.split()[-1]
    models = json.loads(cli(capsys, "models", "list", "-w", ws, "--json"))
    assert next(m for m in models if m["id"] == v2)["parent"] == "v1"
    assert next(m for m in models if m["id"] == v2)["dataset_id"] == "d1"

    pairs = tmp_path / "export" / "pairs.jsonl"
    cli(capsys, "export", "-w", ws, "--format", "pairs", "--out", pairs)
    listwise = tmp_path / "export2" / "list.parquet"
    cli(capsys, "export", "-w", ws, "--format", "listwise", "--out", listwise)
    card = (pairs.parent / "README.md").read_text()
    assert "36" in card and "round" in card.lower() and "base" in card

    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(pairs), split="train")
    assert ds.num_rows == 36
    assert set(ds.column_names) == {"prompt", "chosen", "rejected", "view_differs"}
    lw = load_dataset("parquet", data_files=str(listwise), split="train")
    assert lw.num_rows == 6 and sorted(lw[0]["ranks"]) == [1, 2, 3, 4]
    by_prompt = {g["prompt"]: g for g in groups}
    row = lw[0]
    best = row["completions"][row["ranks"].index(1)]
    assert len(best) == min(len(c["text"]) for c in by_prompt[row["prompt"]]["candidates"])

    assert _trl_train(pairs, tiny_model_dir, tmp_path / "trl") == 2

    # export -> import round-trips as a new round with one ranking per group
    out = cli(capsys, "groups", "import", listwise, "-w", ws)
    assert "imported 6 ranked groups" in out


def _trl_train(pairs_file: Path, model_dir: Path, out: Path) -> int:
    """Train TRL's DPOTrainer for two steps on a file exactly as prefloop exported it."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ds = load_dataset("json", data_files=str(pairs_file), split="train")
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=2,
        max_steps=2,
        max_length=256,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=ds,
        processing_class=AutoTokenizer.from_pretrained(model_dir),
    )
    return trainer.train().global_step


HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


@pytest.mark.skipif(not HH.exists(), reason="shared HH-RLHF file not present")
def test_conversational_export_from_hh_pairs_trains_in_trl(
    tmp_path: Path, tiny_model_dir: Path, capsys
) -> None:
    import gzip

    ws = tmp_path / "ws"
    cli(capsys, "init", "-w", ws, "--model", tiny_model_dir)
    with gzip.open(HH, "rt") as fh:
        head = [json.loads(next(fh)) for _ in range(6)]
    src = write_jsonl(tmp_path / "hh.jsonl", head)
    assert "imported 6 pairs" in cli(capsys, "pairs", "import", src, "-w", ws)
    cli(capsys, "dataset", "freeze", "-w", ws)
    pairs = tmp_path / "out" / "pairs.jsonl"
    cli(capsys, "export", "-w", ws, "--format", "pairs", "--out", pairs)
    rows = read_jsonl(pairs)
    assert len(rows) == 6
    assert rows[0]["prompt"][-1]["role"] == "user"
    assert rows[0]["chosen"][0]["role"] == "assistant"
    assert rows[0]["chosen"][0]["content"] in head[0]["chosen"]
    assert _trl_train(pairs, tiny_model_dir, tmp_path / "trl") == 2
