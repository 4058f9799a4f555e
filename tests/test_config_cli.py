"""CLI options generated from the config dataclasses, `tune --config FILE` and `models config`."""

from __future__ import annotations

import argparse
import json
import re
import typing
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from app.cli import build_parser, tune_config
from app.config_options import config_from_args, format_default
from store import db, models
from store.errors import PrefloopError
from tests.cli_helpers import cli, cli_error
from tests.fixtures_app import make_workspace
from tuning.config import (
    DPOConfig,
    GRPOConfig,
    LoraSettings,
    PPOConfig,
    RLOOConfig,
    RMConfig,
    SamplingConfig,
    method_config,
)

# the option names users had before the options were generated; they must keep working
OLD_TUNE_FLAGS = [
    "--method", "--beta", "--loss", "--label-smoothing", "--sft-weight", "--listwise",
    "--soft-labels", "--hard-labels", "--early-stop", "--gains", "--scale-rewards", "--epsilon",
    "--epsilon-high", "--target-kl", "--loss-type", "--ppo-epochs", "--entropy-coef",
    "--gain-source", "--epochs", "--lr", "--lora-r", "--lora-alpha", "--target-modules",
    "--max-length", "--groups-per-step", "--from", "--dataset", "--seed", "--quiet",
]  # fmt: skip
OLD_SAMPLE_FLAGS = [
    "--model", "--split", "--k", "--max-new-tokens", "--temperature", "--top-p", "--seed",
    "--limit", "--prompts-per-batch", "--mode", "--overlap", "--guidelines", "--json",
]  # fmt: skip


def parse(*argv: str) -> argparse.Namespace:
    """The namespace the real `prefloop` parser makes of a command line."""
    return build_parser().parse_args([str(a) for a in argv])


def subcommand_actions(name: str) -> dict[str, argparse.Action]:
    """The options of a `prefloop NAME` subcommand, by flag."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag: a for a in sub.choices[name]._actions for flag in a.option_strings}


def dataclass_fields(cls: type, defaults=None, prefix: tuple[str, ...] = ()):
    """(path, field, default) of every field of a config dataclass, nested ones included."""
    types, defaults = typing.get_type_hints(cls), cls() if defaults is None else defaults
    for f in fields(cls):
        value = getattr(defaults, f.name)
        if is_dataclass(types[f.name]):
            yield from dataclass_fields(types[f.name], value, (*prefix, f.name))
        else:
            yield (*prefix, f.name), f, value


def flag_of(path: tuple[str, ...], f) -> str:
    return "--" + (f.metadata.get("flag") or "-".join(path).replace("_", "-"))


def default_in_help(action: argparse.Action) -> str:
    match = re.search(r"\(default: ([^()]*)\)$", action.help.replace("%%", "%"))
    assert match, f"{action.option_strings}: no '(default: X)' in {action.help!r}"
    return match.group(1)


# ----------------------------------------------------------------------------------------------
# (a) the CLI's defaults are the dataclasses' defaults


def test_no_flags_build_the_dataclass_defaults():
    assert tune_config(parse("tune")) == ("dpo", DPOConfig(), None, None)
    assert tune_config(parse("tune", "--method", "dpo")) == ("dpo", DPOConfig(), None, None)
    assert tune_config(parse("tune", "--method", "grpo")) == ("grpo", GRPOConfig(), None, None)
    assert tune_config(parse("tune", "--method", "rm")) == ("rm", RMConfig(), None, None)
    assert tune_config(parse("tune", "--method", "ppo")) == ("ppo", PPOConfig(), None, None)
    assert config_from_args(SamplingConfig, parse("sample")) == SamplingConfig()


@pytest.mark.parametrize(
    "command, method, cls",
    [
        ("tune", "dpo", DPOConfig),
        ("tune", "grpo", GRPOConfig),
        ("tune", "rm", RMConfig),
        ("tune", "rloo", RLOOConfig),
        ("tune", "ppo", PPOConfig),
        ("sample", None, SamplingConfig),
    ],
)
def test_every_field_has_an_option_with_the_dataclass_default(command, method, cls):
    actions = subcommand_actions(command)
    extra = ["--method", method] if method else []
    for path, f, default in dataclass_fields(cls):
        flag = flag_of(path, f)
        assert flag in actions, f"{cls.__name__}.{'.'.join(path)} has no option {flag}"
        assert f.metadata.get("help"), f"{cls.__name__}.{'.'.join(path)} has no help"
        shown = default_in_help(actions[flag])
        assert shown == format_default(default) or f"{method} {format_default(default)}" in (
            shown.split(", ")
        ), f"{flag}: help says (default: {shown}), {cls.__name__} has {default!r}"
        if f.metadata.get("choices"):  # a flag shared by methods takes each method's choices
            assert set(f.metadata["choices"]) <= set(actions[flag].choices)
        # typing the default back in gives the default config again
        if isinstance(default, bool):
            typed = [flag if default else "--no-" + flag[2:]]
        else:
            typed = [flag, format_default(default)]
        ns = parse(command, *extra, *typed)
        built = tune_config(ns)[1] if command == "tune" else config_from_args(cls, ns)
        assert built == cls(), flag


def test_old_option_names_still_exist():
    assert set(OLD_TUNE_FLAGS) <= set(subcommand_actions("tune"))
    assert set(OLD_SAMPLE_FLAGS) <= set(subcommand_actions("sample"))


def test_shared_options_appear_once_and_name_both_defaults():
    actions = subcommand_actions("tune")
    beta = actions["--beta"]
    assert default_in_help(beta) == "dpo 0.1, grpo 0.0, rloo 0.0, ppo 0.05"
    assert default_in_help(actions["--epochs"]) == "dpo 3, grpo 6, rm 3, rloo 6, ppo 3"
    assert default_in_help(actions["--lr"]) == (
        "dpo 0.0005, grpo 0.003, rm 0.0005, rloo 0.003, ppo 0.0005"
    )
    assert default_in_help(actions["--ppo-epochs"]) == "grpo 1, rloo 1, ppo 4"
    assert default_in_help(actions["--k"]) == "grpo 4, rloo 4, ppo 1"
    assert default_in_help(actions["--max-length"]) == "512"
    assert default_in_help(actions["--loss"]) == "dpo sigmoid, rm pairwise"
    assert tune_config(parse("tune", "--method", "rm", "--loss", "listwise"))[1] == RMConfig(
        loss_type="listwise"
    )
    assert default_in_help(actions["--loss-type"]) == "grpo"
    assert actions["--loss"] is not actions["--loss-type"]
    assert tune_config(parse("tune", "--method", "grpo"))[1].beta == GRPOConfig().beta == 0.0
    assert tune_config(parse("tune"))[1].beta == 0.1
    help_text = build_parser()._subparsers._group_actions[0].choices["tune"].format_help()
    assert help_text.count("--beta BETA ") == 1 and "--no-adapt-beta" in help_text


# ----------------------------------------------------------------------------------------------
# (b) flags override, --config files


def test_flags_override_the_defaults():
    _, cfg, _, _ = tune_config(
        parse(
            "tune", "--method", "grpo", "--beta", "0.5", "--lora-r", "8", "--lora-dropout",
            "0.1", "--target-modules", "q_proj, v_proj", "--no-adapt-beta", "--epsilon-high",
            "0.3", "--loss-type", "dr_grpo", "--kl-target", "0.2", "--gain-source", "bt",
        )
    )  # fmt: skip
    assert cfg == GRPOConfig(
        beta=0.5,
        lora=LoraSettings(r=8, dropout=0.1, target_modules=["q_proj", "v_proj"]),
        adapt_beta=False,
        epsilon_high=0.3,
        loss_type="dr_grpo",
        kl_target=0.2,
        gain_source="bt",
    )
    _, cfg, _, _ = tune_config(parse("tune", "--loss", "ipo", "--hard-labels", "--listwise"))
    assert cfg == DPOConfig(loss_type="ipo", soft_labels="hard", listwise=True)
    cfg = config_from_args(SamplingConfig, parse("sample", "--k", "2", "--limit", "5"))
    assert cfg == SamplingConfig(k=2, limit=5)
    with pytest.raises(SystemExit):
        parse("tune", "--soft-labels", "soft")


def test_an_option_of_the_other_method_is_a_user_error(capsys):
    err = cli_error(capsys, "tune", "--method", "grpo", "--loss", "ipo")
    assert "--loss is not a setting of --method grpo" in err
    err = cli_error(capsys, "tune", "--gains", "dcg")
    assert "--gains is not a setting of --method dpo" in err


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_config_file_flat_and_overridden_by_flags(tmp_path):
    flat = write_json(tmp_path / "c.json", {"method": "grpo", "beta": 0.2, "lora": {"r": 4}})
    assert tune_config(parse("tune", "--config", flat)) == (
        "grpo",
        GRPOConfig(beta=0.2, lora=LoraSettings(r=4)),
        None,
        None,
    )
    _, cfg, _, _ = tune_config(parse("tune", "--config", flat, "--beta", "0.3", "--lora-alpha", 8))
    assert cfg == GRPOConfig(beta=0.3, lora=LoraSettings(r=4, alpha=8))
    # --method overrides the file's; the file's other settings then belong to that method
    both = write_json(tmp_path / "d.json", {"method": "grpo", "epochs": 2, "lr": 1})
    assert tune_config(parse("tune", "--config", both, "--method", "dpo")) == (
        "dpo",
        DPOConfig(epochs=2, lr=1.0),
        None,
        None,
    )


def test_config_file_as_a_version_stores_it(tmp_path):
    cfg = DPOConfig(beta=0.3, soft_labels="bt", lora=LoraSettings(r=8, target_modules=["q_proj"]))
    stored = {
        "method": "dpo",
        "dataset": "d3",
        "from": "v1",
        **cfg.to_dict(),
        "final_metrics": {"loss": 0.4},
        "gate": {"passed": True},
    }
    path = write_json(tmp_path / "stored.json", stored)
    assert tune_config(parse("tune", "--config", path)) == ("dpo", cfg, "v1", "d3")
    ns = parse("tune", "--config", path, "--from", "v2", "--dataset", "d4", "--epochs", 1)
    assert tune_config(ns) == ("dpo", DPOConfig(**{**vars(cfg), "epochs": 1}), "v2", "d4")
    assert tune_config(parse("tune", "--config", path, "--from", "base"))[2] is None
    legacy = write_json(tmp_path / "old.json", {"method": "dpo", "soft_labels": False})
    assert tune_config(parse("tune", "--config", legacy))[1] == DPOConfig(soft_labels="hard")


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "cannot read config file"),
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "not an object of settings"),
        ('{"betaa": 0.2}', "unknown setting 'betaa' (did you mean 'beta'?)"),
        ('{"epochs": "3"}', "setting 'epochs' must be an integer; got '3'"),
        ('{"lr": true}', "setting 'lr' must be a number"),
        ('{"lora": {"rank": 4}}', "unknown setting 'lora.rank'"),
        ('{"lora": 4}', "setting 'lora' must be an object of settings"),
        ('{"target_modules": "q_proj"}', "unknown setting 'target_modules'"),
        ('{"lora": {"target_modules": "q_proj"}}', "'lora.target_modules' must be a list"),
        ('{"loss_type": "kto"}', "'loss_type' must be one of sigmoid, ipo, hinge, robust"),
        ('{"method": "kto"}', "unknown tuning method 'kto'"),
        ('{"method": 1}', "'method' must be a string or null"),
        ('{"method": "grpo", "loss_type": "ipo"}', "must be one of grpo, bnpo, dr_grpo"),
        ('{"method": "grpo", "soft_labels": "bt"}', "unknown setting 'soft_labels'"),
        ('{"backoff_factor": 2}', "backoff_factor must be between 0 and 1"),
        ('{"method": "ppo", "backoff_factor": 0}', "backoff_factor must be between 0 and 1"),
        ('{"method": "grpo", "guard_samples": 0}', "guard_samples must be at least 1; got 0"),
    ],
)
def test_bad_config_files_say_what_to_fix(tmp_path, capsys, content, expected):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    err = cli_error(capsys, "tune", "--config", path)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(path) in err and expected in err, err


def test_method_config_checks_keys_and_types():
    assert method_config("grpo", {"beta": 0, "lora": {"r": 2}}) == GRPOConfig(
        beta=0.0, lora=LoraSettings(r=2)
    )
    assert method_config("dpo", {}) == DPOConfig()
    with pytest.raises(PrefloopError, match="unknown tuning method 'kto'"):
        method_config("kto", {})
    assert method_config("ppo", {"gamma": 1, "lam": 0.9}) == PPOConfig(gamma=1.0, lam=0.9)
    with pytest.raises(PrefloopError, match="'gains'"):
        method_config("dpo", {"gains": "dcg"})
    with pytest.raises(PrefloopError, match="'max_length' must be an integer"):
        method_config("dpo", {"max_length": 1.5})
    with pytest.raises(PrefloopError, match="'epsilon_high' must be a number or null"):
        method_config("grpo", {"epsilon_high": "0.3"})


def test_from_dict_ignores_what_a_version_stores_besides_settings():
    cfg = GRPOConfig(beta=0.1, gains="dcg")
    stored = {"method": "grpo", "dataset": "d1", "from": None, "final_metrics": {}, "gate": {}}
    assert GRPOConfig.from_dict({**stored, **cfg.to_dict()}) == cfg


# ----------------------------------------------------------------------------------------------
# (c) models config re-runs a version


def register(ws: db.Workspace, tmp_path: Path, config: dict) -> str:
    """A model version with a dummy adapter folder and the given stored config."""
    staged = tmp_path / f"staged-{len(list(tmp_path.iterdir()))}"
    staged.mkdir()
    (staged / "adapter_config.json").write_text("{}")
    with db.connect(ws, read_only=False) as con:
        return models.register_version(
            ws,
            con,
            staged,
            parent=config.get("from"),
            dataset_id=config.get("dataset"),
            method=config["method"],
            config=config,
            run_id=None,
        )


def test_models_config_prints_what_tune_config_re_runs(tmp_path, capsys, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    cfg = GRPOConfig(beta=0.2, gains="dcg", epochs=1, lora=LoraSettings(r=4, alpha=8))
    stored = {"method": "grpo", "dataset": "d1", "from": None, **cfg.to_dict()}
    version = register(ws, tmp_path, {**stored, "final_metrics": {"loss": 0.3}})
    out = cli(capsys, "models", "config", version, "-w", ws.root)
    assert json.loads(out) == stored
    path = tmp_path / "c.json"
    path.write_text(out)

    calls = []

    def fake_tune_job(ws_, cfg_, *, method, from_version, dataset_id, show_progress):
        calls.append((ws_.root, cfg_, method, from_version, dataset_id, show_progress))
        return "v9"

    monkeypatch.setattr("tuning.jobs.tune_job", fake_tune_job)
    assert cli(capsys, "tune", "-w", ws.root, "--config", path, "--quiet").split() == ["v9"]
    assert calls == [(ws.root, cfg, "grpo", None, "d1", False)]

    # an older version: settings added since get their defaults; soft_labels was a bool
    old = register(ws, tmp_path, {"method": "dpo", "dataset": "d2", "from": version,
                                  "beta": 0.3, "soft_labels": False})  # fmt: skip
    printed = json.loads(cli(capsys, "models", "config", old, "-w", ws.root))
    expected = DPOConfig(beta=0.3, soft_labels="hard")
    assert printed == {"method": "dpo", "from": version, "dataset": "d2", **expected.to_dict()}

    assert "unknown model version 'v7'" in cli_error(
        capsys, "models", "config", "v7", "-w", ws.root
    )
    assert "no config" in cli_error(capsys, "models", "config", "base", "-w", ws.root)


def test_a_backoff_factor_that_would_not_lower_the_rate_is_a_user_error(tmp_path, capsys):
    err = cli_error(capsys, "tune", "-w", tmp_path, "--backoff-factor", "1.5")
    assert "backoff_factor must be between 0 and 1 (a restart lowers the rate); got 1.5" in err
