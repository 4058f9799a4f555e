"""Precision and memory: --dtype, --gradient-checkpointing, --target-modules all-linear and
--load-in-4bit, through the real CLI on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from app.cli import build_parser, tune_config
from store import datasets, db, models, rounds, runs
from store.errors import PrefloopError
from tests.cli_helpers import cli, cli_error
from tests.labelled_ws import QUICK_TUNE, labelled_workspace, prefloop
from tuning.batching import GroupTokens, collate, sequence_logps, token_logps
from tuning.config import DPOConfig, PPOConfig, RMConfig
from tuning.evaluation import EvalConfig
from tuning.modeling import load_base, resolve_dtype

# bf16 keeps 8 bits of mantissa (~0.4% per rounding); the tiny model's DPO loss (~6.1 with the
# SFT term) moves by ~4e-4 between float32 and bfloat16 base weights: 0.01 leaves room for
# other CPUs' kernels while catching a wrong precision path (float16 LoRA, bf16 log-softmax)
BF16_LOSS_TOL = 0.01
CAN_4BIT = torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> db.Workspace:
    """A labelled workspace on the tiny model."""
    return labelled_workspace(tmp_path_factory.mktemp("precision") / "ws", tiny_model_dir)


def tune(ws: db.Workspace, *flags: str) -> tuple[dict, list[dict]]:
    """Run a quick `prefloop tune`; the new version's row and its run's metrics per step."""
    prefloop("tune", "-w", ws.root, *QUICK_TUNE, *flags)
    with db.connect(ws) as con:
        run = runs.list_runs(con).iloc[0]
        assert run["status"] == "completed", run["error"]
        info = models.get_version(con, run["result"])
        metrics = runs.run_metrics(con, int(run["id"]))
    return info, metrics.to_dict("records")


@pytest.fixture(scope="module")
def float32_run(ws: db.Workspace) -> tuple[dict, list[dict]]:
    """The reference run: DPO with the base weights in float32."""
    return tune(ws, "--dtype", "float32")


def losses(metrics: list[dict]) -> list[float]:
    return [m["loss"] for m in metrics if not math.isnan(m.get("loss", math.nan))]


def test_bf16_tune_stores_dtype_keeps_a_float32_adapter_and_matches_float32(ws, float32_run):
    info32, metrics32 = float32_run
    info, metrics = tune(ws, "--dtype", "bfloat16")
    assert info["config"]["dtype"] == "bfloat16" and info32["config"]["dtype"] == "float32"
    weights = load_file(str(models.adapter_dir(ws, info) / "adapter_model.safetensors"))
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
    for m in metrics:
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, float)), m
    got, want = losses(metrics), losses(metrics32)
    assert len(got) == len(want) >= 2
    assert got == pytest.approx(want, abs=BF16_LOSS_TOL)
    # the run actually trained in bf16: not bit-identical to float32
    assert got != want


def test_bf16_sampling_makes_a_round(ws, capsys):
    out = cli(capsys, "sample", "-w", ws.root, "--model", "base", "--dtype", "bfloat16",
              "--k", 2, "--max-new-tokens", 6, "--limit", 2, "--json")  # fmt: skip
    round_id = json.loads(out)["id"]
    with db.connect(ws) as con:
        info = rounds.get_round(con, round_id)
        groups = rounds.groups(con, round_id=round_id)
    assert info["settings"]["dtype"] == "bfloat16"
    assert info["settings"]["weights_dtype"] == "bfloat16"
    assert len(groups) == 2 and all(len(g.texts) == 2 for g in groups)


def test_auto_samples_in_bf16_only_where_the_cpu_multiplies_bf16(ws, capsys, monkeypatch):
    """--dtype auto: a round is sampled in bf16 on a CPU with AMX / AVX512-BF16 (what the round
    records), in float32 on one without; training and scoring stay float32 on a CPU."""
    from tuning import modeling

    monkeypatch.setattr(modeling, "device", lambda: torch.device("cpu"))
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(modeling, "cpu_has_native_bf16", lambda native=native: native)
        assert modeling.decoding_dtype("auto") is expected
        assert modeling.decoding_dtype("float32") is torch.float32
        assert modeling.resolve_dtype("auto") is torch.float32
    monkeypatch.undo()

    out = cli(capsys, "sample", "-w", ws.root, "--model", "base", "--k", 2,
              "--max-new-tokens", 4, "--limit", 1, "--json")  # fmt: skip
    with db.connect(ws) as con:
        settings = rounds.get_round(con, json.loads(out)["id"])["settings"]
    assert settings["dtype"] == "auto"
    if modeling.device().type == "cpu":
        want = "bfloat16" if modeling.cpu_has_native_bf16() else "float32"
    else:  # a GPU samples in what training uses there
        want = modeling.dtype_name(modeling.resolve_dtype("auto"))
    assert settings["weights_dtype"] == want


def test_bf16_decoding_keeps_the_default_models_next_token_distribution(default_model_dir):
    """Sampling in bf16 draws from (almost) float32's distribution: along sampled answers of
    the default model the per-token KL(float32 ‖ bf16) stays far under any KL budget (measured
    ~0.0015 nats/token; versions are held to 0.05-0.6), and the greedy token rarely changes."""
    from tuning.generation import HFGenerator
    from tuning.modeling import load_tokenizer, prompt_ids

    tok = load_tokenizer(str(default_model_dir))
    m32 = load_base(str(default_model_dir), "float32")
    m16 = load_base(str(default_model_dir), "bfloat16")
    texts = ["How do volcanoes form?", "Give me a tip for better sleep.", "What is a verb?"]
    prompts = [prompt_ids(tok, t, None) for t in texts]
    groups = HFGenerator(m16, tok).generate(
        prompts, 2, max_new_tokens=40, temperature=1.0, top_p=1.0, seed=0
    )
    kls, agree, n = [], 0, 0
    for p, group in zip(prompts, groups, strict=True):
        for s in group:
            ids = torch.tensor([p + s.token_ids])
            with torch.no_grad():
                l32 = torch.log_softmax(m32(ids).logits[0, len(p) - 1 : -1].float(), -1)
                l16 = torch.log_softmax(m16(ids).logits[0, len(p) - 1 : -1].float(), -1)
            kls.append((l32.exp() * (l32 - l16)).sum(-1))
            agree += int((l32.argmax(-1) == l16.argmax(-1)).sum())
            n += len(s.token_ids)
    kl = torch.cat(kls)
    assert n >= 60
    assert float(kl.mean()) < 0.01, float(kl.mean())
    assert agree / n > 0.9, agree / n


def test_gradient_checkpointing_trains_to_the_same_loss(ws, float32_run):
    info, metrics = tune(ws, "--dtype", "float32", "--gradient-checkpointing")
    assert info["config"]["gradient_checkpointing"] is True
    assert losses(metrics) == pytest.approx(losses(float32_run[1]), abs=1e-4)


def test_gradient_checkpointing_recomputes_the_layers(tiny_model_dir, monkeypatch):
    import transformers.models.llama.modeling_llama as llama

    from tuning.train_loop import new_adapter

    calls: list[int] = []
    forward = llama.LlamaMLP.forward
    monkeypatch.setattr(llama.LlamaMLP, "forward", lambda s, x: calls.append(1) or forward(s, x))
    batch = collate([GroupTokens([1, 2, 3, 4], [[5, 6], [7, 8, 9]])], 0, 64)
    counts = {}
    for on in (False, True):
        cfg = DPOConfig(dtype="float32", gradient_checkpointing=on)
        model = new_adapter(str(tiny_model_dir), cfg)
        model.train()
        calls.clear()
        logps = sequence_logps(model, batch)
        forward_calls = len(calls)
        logps.sum().backward()
        counts[on] = (forward_calls, len(calls) - forward_calls)
    layers = 2  # the tiny model's
    assert counts == {False: (layers, 0), True: (layers, layers)}


def test_all_linear_adapts_every_linear_layer_and_re_runs(ws, capsys, tmp_path):
    info, metrics = tune(ws, "--target-modules", "all-linear")
    assert losses(metrics) and all(math.isfinite(x) for x in losses(metrics))
    adapter = json.loads((models.adapter_dir(ws, info) / "adapter_config.json").read_text())
    targets = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}  # peft: full names
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= targets
    assert "lm_head" not in targets
    # the stored config re-runs as it is
    stored = tmp_path / "config.json"
    capsys.readouterr()  # the tune run's output
    stored.write_text(cli(capsys, "models", "config", "-w", ws.root, info["id"]))
    _, cfg, _, _ = tune_config(build_parser().parse_args(["tune", "--config", str(stored)]))
    assert cfg.lora.target_modules == ["all-linear"]
    assert cfg.lora.peft_target_modules() == "all-linear"
    err = cli_error(capsys, "tune", "-w", ws.root, "--target-modules", "all-linear,q_proj")
    assert "all-linear goes alone" in err


@pytest.mark.skipif(CAN_4BIT, reason="this machine can load 4-bit models")
@pytest.mark.parametrize("command", ["tune", "sample"])
def test_load_in_4bit_is_refused_before_anything_starts(ws, capsys, command):
    with db.connect(ws) as con:
        before = (len(runs.list_runs(con)), len(models.list_versions(con)),
                  len(datasets.list_datasets(con)), len(rounds.list_rounds(con)))  # fmt: skip
    err = cli_error(capsys, command, "-w", ws.root, "--load-in-4bit")
    assert err.count("\n") == 1, err
    assert "--load-in-4bit needs" in err and ("bitsandbytes" in err or "CUDA GPU" in err)
    with db.connect(ws) as con:
        after = (len(runs.list_runs(con)), len(models.list_versions(con)),
                 len(datasets.list_datasets(con)), len(rounds.list_rounds(con)))  # fmt: skip
        assert not (runs.list_runs(con)["status"] == "running").any()
    assert after == before


def test_dtype_names_and_choices(capsys, tmp_path):
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("float16") is torch.float16
    assert resolve_dtype("float32") is torch.float32
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") is torch.float32
    with pytest.raises(PrefloopError, match="auto, float32, bfloat16, float16"):
        resolve_dtype("float8")
    for command in (["tune"], ["sample"], ["eval"], ["judge", "1", "--judge", "llm"]):
        assert build_parser().parse_args([*command, "--dtype", "bfloat16"]).dtype == "bfloat16"
        with pytest.raises(SystemExit):
            build_parser().parse_args([*command, "--dtype", "float8"])
        assert "invalid choice: 'float8'" in capsys.readouterr().err
    assert EvalConfig(dtype="bfloat16").sampling().dtype == "bfloat16"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "dpo", "dtype": "float8"}))
    with pytest.raises(PrefloopError, match="must be one of auto, float32, bfloat16, float16"):
        tune_config(build_parser().parse_args(["tune", "--config", str(bad)]))


def test_bf16_base_gives_float32_log_probs_heads_and_trainable_weights(tiny_model_dir):
    from tuning.ppo import ppo_model
    from tuning.reward_model import reward_model_to_train

    base = str(tiny_model_dir)
    batch = collate([GroupTokens([1, 2, 3, 4], [[5, 6], [7, 8, 9]])], 0, 64)
    bf16, fp32 = load_base(base, "bfloat16"), load_base(base, "float32")
    assert next(bf16.parameters()).dtype is torch.bfloat16
    with torch.no_grad():
        logps, _ = token_logps(bf16, batch)
        want = sequence_logps(fp32, batch)
        got = sequence_logps(bf16, batch)
    assert logps.dtype is torch.float32 and got.dtype is torch.float32
    assert got.tolist() == pytest.approx(want.tolist(), rel=0.02)
    rm = reward_model_to_train(base, RMConfig(dtype="bfloat16"), None)
    ppo = ppo_model(base, PPOConfig(dtype="bfloat16"))
    for model in (rm, ppo):
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and {p.dtype for p in trainable} == {torch.float32}
        assert any(p.dtype is torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    with torch.no_grad():
        assert rm(batch).dtype is torch.float32
        assert ppo.values(batch).dtype is torch.float32


@pytest.mark.slow  # two real jobs started by the app (~25 s)
def test_web_forms_start_jobs_in_the_chosen_dtype(tmp_path, monkeypatch, tiny_model_dir):
    from labeling import annotation
    from store.records import LabelRecord
    from tests.fixtures_app import make_workspace, seed_round
    from tests.test_app import click, finished_run, open_app

    app_ws = make_workspace(tmp_path / "app-ws", base_model=str(tiny_model_dir))
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(app_ws.root))
    seeded = seed_round(app_ws, n_groups=2, k=2)
    for gid, cids in zip(seeded.group_ids, seeded.candidate_ids, strict=True):
        annotation.save_label(app_ws, LabelRecord(gid, "lee", [[c] for c in cids]))
    at = open_app("Researcher")
    assert at.selectbox(key="sample_dtype").value == "auto"
    at.selectbox(key="sample_dtype").set_value("bfloat16")
    at.number_input(key="sample_k").set_value(2)
    at.number_input(key="sample_max_new_tokens").set_value(4)
    at.number_input(key="sample_limit").set_value(1)
    click(at, "start_sampling")
    finished_run(app_ws, "sample")
    with db.connect(app_ws) as con:
        sampled = rounds.list_rounds(con).set_index("id").loc[seeded.round_id + 1]
    assert sampled["settings"]["dtype"] == "bfloat16"

    at.selectbox(key="tune_dtype").set_value("bfloat16")
    at.number_input(key="tune_epochs").set_value(1)
    click(at, "start_tuning")
    row = finished_run(app_ws, "tune")
    with db.connect(app_ws) as con:
        assert models.get_version(con, row["result"])["config"]["dtype"] == "bfloat16"
