"""PPO: the per-token reward, GAE returns, one minibatch update on a tiny model, the four models
on one copy of the base weights, the settings' checks, and a short real run on the default
model that makes a policy version and records every step metric."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from store import db, models, rounds, runs
from tests.cli_helpers import ROOT, cli, cli_error
from tests.judges.length import shorter
from tests.test_app import model_ws  # noqa: F401  (a fixture)
from tuning.config import PPOConfig
from tuning.generation import Sample
from tuning.online import RolloutPrompt, fill_logprobs, sample_groups
from tuning.rl_math import adaptive_beta, gae, whiten

SHORTER = "tests.judges.length:shorter"

# the metrics every PPO step records, under the names TRL/verl users read
PPO_METRICS = (
    "objective/rlhf_reward", "objective/scores", "objective/kl", "objective/entropy", "beta",
    "policy/clipfrac_avg", "policy/approxkl_avg", "loss/policy_avg", "loss/value_avg",
    "val/clipfrac_avg", "completions/mean_length", "completions/clipped_ratio",
    "time/generate_s", "time/train_s",
)  # fmt: skip


# -- per-token rewards and advantages ------------------------------------------------------------


def test_per_token_reward_is_the_kl_penalty_plus_the_score_at_the_last_token() -> None:
    from tuning.ppo import token_rewards

    # two samples: 3 response tokens, and 2 followed by padding
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -2.2, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    scores = torch.tensor([2.0, -1.0])
    beta = 0.1
    rewards, kl = token_rewards(scores, logps, ref, mask, beta)
    # by hand: −β·(log π − log π_ref) per token, the score added at the last real token
    expected = [
        [-0.1 * 0.5, -0.1 * -1.0, -0.1 * 0.0 + 2.0],
        [-0.1 * -0.2, -0.1 * 1.0 - 1.0, 0.0],
    ]
    torch.testing.assert_close(rewards, torch.tensor(expected), atol=1e-6, rtol=0)
    expected_kl = torch.tensor([[0.5, -1.0, 0.0], [-0.2, 1.0, 0.0]])
    torch.testing.assert_close(kl, expected_kl, atol=1e-6, rtol=0)


def _rollout_group(prompt_id: int, lengths: list[int], score: list[float]):
    from tuning.batching import GroupTokens
    from tuning.ppo import PPOGroup

    prompt = RolloutPrompt(prompt_id, f"p{prompt_id}", [1, 2])
    samples = [Sample("x" * n, n, "length", 0.0, list(range(3, 3 + n))) for n in lengths]
    group = PPOGroup(prompt, samples, GroupTokens(prompt.ids, [s.token_ids for s in samples]))
    group.rewards = torch.tensor(score)
    group.old = [torch.full((n,), -1.0) for n in lengths]
    group.ref = [torch.full((n,), -1.5) for n in lengths]
    group.values = [torch.zeros(n) for n in lengths]
    return group


def test_gae_with_a_zero_critic_gives_the_rewards_to_go_as_returns() -> None:
    from tuning.ppo import set_ppo_advantages

    groups = [_rollout_group(1, [3], [2.0]), _rollout_group(2, [2], [-1.0])]
    beta = 0.2
    set_ppo_advantages(groups, beta, PPOConfig(gamma=1.0, lam=1.0))
    # KL per token 0.5 everywhere: reward −0.1 per token, the score on the last one
    assert groups[0].returns[0].tolist() == pytest.approx([1.7, 1.8, 1.9], abs=1e-6)
    assert groups[1].returns[0].tolist() == pytest.approx([-1.2, -1.1], abs=1e-6)
    # the advantages are those returns (V = 0) whitened over all five response tokens
    flat = torch.tensor([1.7, 1.8, 1.9, -1.2, -1.1])
    white = (flat - flat.mean()) / flat.std()
    got = torch.cat([groups[0].token_advantages[0], groups[1].token_advantages[0]])
    assert got.tolist() == pytest.approx(white.tolist(), abs=1e-5)
    # γ, λ < 1: the same as rl_math's GAE on the padded batch
    set_ppo_advantages(groups, beta, PPOConfig(gamma=0.9, lam=0.8))
    rewards = torch.tensor([[-0.1, -0.1, 1.9], [-0.1, -1.1, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, torch.zeros(2, 3), mask, 0.9, 0.8)
    assert groups[0].returns[0].tolist() == pytest.approx(ret[0].tolist(), abs=1e-6)
    assert groups[1].token_advantages[0].tolist() == pytest.approx(
        whiten(adv, mask)[1, :2].tolist(), abs=1e-5
    )


# -- the model: policy, critic and reward model on one base --------------------------------------


def _tiny_rollout(tiny_model_dir: Path, cfg: PPOConfig):
    from tuning.modeling import load_tokenizer, prompt_ids
    from tuning.ppo import PPOGroup, fill_values, ppo_model, set_ppo_advantages

    torch.manual_seed(0)
    tok = load_tokenizer(str(tiny_model_dir))
    model = ppo_model(str(tiny_model_dir), cfg)
    texts = ["Say hi.", "Name a colour."]
    prompts = [RolloutPrompt(i, t, prompt_ids(tok, t, None)) for i, t in enumerate(texts)]
    groups = [PPOGroup(**vars(g)) for g in sample_groups(model.lm, tok, prompts, cfg, seed=0)]
    for g, score in zip(groups, ([1.0, -1.0], [0.5, 2.0]), strict=True):
        g.rewards = torch.tensor(score)
    fill_logprobs(model.lm, groups, tok.pad_token_id, cfg)
    fill_values(model, groups, tok.pad_token_id, cfg)
    set_ppo_advantages(groups, cfg.beta, cfg)
    return model, tok, groups


def test_the_samplers_log_probs_stand_in_for_a_forward_pass_over_the_samples(tiny_model_dir):
    """π_old comes from the log-probs recorded while sampling (no second pass), and they are what
    a forward pass gives; a sample cut to fit max_length gets the forward pass instead."""
    from tuning.grpo import _fill

    cfg = PPOConfig(k=2, max_new_tokens=6)
    model, tok, groups = _tiny_rollout(tiny_model_dir, cfg)
    sampled = [g.old for g in groups]
    for g, old in zip(groups, sampled, strict=True):
        assert [t.tolist() for t in old] == [s.token_logps for s in g.samples]
    model.lm.eval()
    _fill(model.lm, groups, "old", tok.pad_token_id, cfg)
    for g, old in zip(groups, sampled, strict=True):
        for a, b in zip(old, g.old, strict=True):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4), (a, b)

    short = PPOConfig(k=2, max_new_tokens=6, max_length=len(groups[0].prompt.ids) + 3)
    fill_logprobs(model.lm, groups, tok.pad_token_id, short)
    lengths = [s.n_tokens for s in groups[0].samples]
    assert max(lengths) > 3  # so one sample is cut: the forward pass covers what is kept
    assert [len(t) for t in groups[0].old] == [min(3, n) for n in lengths]


def test_one_minibatch_update_lowers_the_clipped_objective_and_the_value_loss(tiny_model_dir):
    from tuning.ppo import ppo_loss
    from tuning.train_loop import make_optimizer

    cfg = PPOConfig(k=2, max_new_tokens=6, lr=1e-3)
    model, tok, groups = _tiny_rollout(tiny_model_dir, cfg)
    _, optimizer, _ = make_optimizer(model, cfg, total_steps=1)
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    critic = [p for n, p in model.named_parameters() if ".critic." in n]
    assert critic and all(id(p) in trained for p in critic)  # the critic's adapter trains too
    assert id(model.value_head.weight) in trained

    def losses():
        loss, metrics = ppo_loss(model, groups, tok.pad_token_id, cfg)
        return loss, float(metrics["loss/policy_avg"]), float(metrics["loss/value_avg"])

    loss, policy0, value0 = losses()
    assert abs(policy0) < 1e-5  # π = π_old: the surrogate is −mean(whitened A) = 0
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    _, policy1, value1 = losses()
    assert policy1 < policy0 - 1e-4
    assert value1 < value0


def test_the_critic_backward_first_gives_the_gradients_of_the_summed_loss(tiny_model_dir):
    """ppo_loss back-propagates the value loss before the policy's forward pass (to hold one set
    of activations at a time); the gradients must equal those of policy + vf_coef × value."""
    from tuning.batching import collate, per_candidate, token_logps
    from tuning.online import _padded
    from tuning.ppo import _samples, ppo_loss
    from tuning.rl_math import ppo_policy_loss, ppo_value_loss

    cfg = PPOConfig(k=2, max_new_tokens=6, vf_coef=0.3)
    model, tok, groups = _tiny_rollout(tiny_model_dir, cfg)
    model.set_trainable()
    # move the policy off π_old so the surrogate's gradient is not trivial
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.01 * torch.randn_like(p))
    params = [p for p in model.parameters() if p.requires_grad]

    batch = collate([g.tokens for g in groups], tok.pad_token_id, cfg.max_length)
    logps, mask = _padded(per_candidate(token_logps(model, batch)[0], batch))
    values, _ = _padded(per_candidate(model.values(batch), batch))
    pad = lambda name: _padded(_samples(groups, name))[0]  # noqa: E731
    policy, _ = ppo_policy_loss(logps, pad("old"), pad("token_advantages"), mask, cfg.epsilon)
    value, _ = ppo_value_loss(values, pad("values"), pad("returns"), mask, cfg.cliprange_value)
    expected_loss = policy + cfg.vf_coef * value
    expected_loss.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)

    loss, _ = ppo_loss(model, groups, tok.pad_token_id, cfg)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(expected_loss.detach()), abs=1e-6)
    for p, want in zip(params, expected, strict=True):
        assert torch.allclose(p.grad, want, atol=1e-6)
    assert any(float(w.abs().sum()) > 0 for w in expected)


def test_policy_critic_and_reward_model_share_one_copy_of_the_base(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tuning.batching import collate, sequence_logps
    from tuning.modeling import load_base, load_version
    from tuning.reward_model import RewardModel, attach_reward_model, new_head, score_texts

    cfg = PPOConfig(k=2, max_new_tokens=6)
    model, tok, groups = _tiny_rollout(tiny_model_dir, cfg)
    # a reward model on the tiny base, saved as a reward version's folder is
    torch.manual_seed(1)
    rm_lm = get_peft_model(
        load_base(str(tiny_model_dir)), LoraConfig(r=2, target_modules=["q_proj"])
    )
    for n, p in rm_lm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)
    standalone = RewardModel(rm_lm, new_head(64)).eval()
    standalone.save_pretrained(tmp_path / "rm")
    shared = attach_reward_model(model.lm, tmp_path / "rm")
    model.set_trainable()
    assert shared.lm is model.lm
    assert set(model.lm.peft_config) == {"default", "critic", "reward"}

    # one copy: the PeftModel holds the base's parameters once, plus the adapters and the head
    base_count = sum(p.numel() for p in load_base(str(tiny_model_dir)).parameters())
    lora_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head_count = sum(p.numel() for p in model.value_head.parameters())
    assert sum(p.numel() for p in model.parameters()) == base_count + lora_count + head_count
    weight = model.lm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert any(p.data_ptr() == weight.data_ptr() for p in shared.lm.parameters())

    # each adapter does its own job on the shared weights: the attached reward model scores as
    # the standalone one does, and the policy (still the active adapter) is unchanged after
    batch = collate([groups[0].tokens], tok.pad_token_id, cfg.max_length)
    with torch.no_grad():
        before = sequence_logps(model, batch)
    texts = [s.text or "x" for s in groups[0].samples]
    prompts = [groups[0].prompt.text] * len(texts)
    assert score_texts(shared, tok, prompts, texts) == pytest.approx(
        score_texts(standalone, tok, prompts, texts), abs=1e-5
    )
    assert model.lm.active_adapter == "default"
    with torch.no_grad():
        assert torch.allclose(sequence_logps(model, batch), before)
    # the critic trains, the reward model stays frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".reward." in n for n in trainable) and any(".critic." in n for n in trainable)

    # the model version holds the policy's adapter only; the critic goes to the run folder
    model.critic_dir = tmp_path / "run" / "critic"
    model.save_pretrained(tmp_path / "version")
    saved = sorted(p.name for p in (tmp_path / "version").iterdir())
    assert "adapter_config.json" in saved and not {"critic", "reward"} & set(saved)
    assert (model.critic_dir / "value_head.safetensors").exists()
    reloaded = load_version(str(tiny_model_dir), tmp_path / "version")
    with torch.no_grad():
        assert torch.allclose(sequence_logps(reloaded, batch), before, atol=1e-5)


# -- the command line ----------------------------------------------------------------------------


@pytest.fixture
def online_ws(tmp_path: Path, default_model_dir: Path, capsys) -> db.Workspace:
    root = tmp_path / "ws"
    cli(capsys, "init", "-w", root, "--model", default_model_dir)
    cli(capsys, "prompts", "import", ROOT / "labeling" / "data" / "demo_prompts.jsonl", "-w", root)
    return db.workspace(root)


def test_ppo_settings_are_checked_before_a_run_starts(online_ws, capsys) -> None:
    root = online_ws.root

    def error(*args: str) -> str:
        return cli_error(capsys, "tune", "-w", root, "--method", "ppo", *args)

    assert "needs a reward" in error()
    assert "always trains online" in error("--reward", SHORTER, "--no-online")
    assert "--audit needs --k 2 or more" in error("--reward", SHORTER, "--audit", "1")
    assert "--gamma must be between 0 and 1" in error("--reward", SHORTER, "--gamma", "1.5")
    assert "--ppo-epochs must be at least 1" in error("--reward", SHORTER, "--ppo-epochs", "0")
    assert "--target-kl must be more than 0" in error("--reward", SHORTER, "--target-kl", "0")
    assert "--gains is not a setting of --method ppo" in error(
        "--reward", SHORTER, "--gains", "dcg"
    )
    with db.connect(online_ws) as con:
        assert runs.list_runs(con).empty  # nothing started


@pytest.mark.slow
def test_ppo_run_makes_a_policy_version_and_records_every_step(
    online_ws, capsys, tmp_path, monkeypatch
):
    import tuning.ppo

    built = []
    real = tuning.ppo.ppo_model

    def spy(*args, **kwargs):
        built.append(real(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(tuning.ppo, "ppo_model", spy)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Say hi."}\n{"prompt": "Name a colour."}\n')
    out = cli(
        capsys, "tune", "-w", online_ws.root, "--method", "ppo", "--reward", SHORTER,
        "--prompts", prompts, "--prompts-per-step", "1", "--max-new-tokens", "6", "--epochs",
        "1", "--ppo-epochs", "2", "--guard-prompts", "0", "--gate-prompts", "0", "--quiet",
        "--target-kl", "0.05", "--kl-horizon", "10",
    )  # fmt: skip
    version = out.strip().splitlines()[-1]  # the new version's id, printed last
    with db.connect(online_ws) as con:
        info = models.get_version(con, version, models.POLICY)
        run_id = int(info["run_id"])
        metrics = runs.run_metrics(con, run_id)
        run_rounds = rounds.rounds_of_run(con, run_id)
        steps = run_rounds[run_rounds["source"].str.startswith("rollout:")]
        cands = [rounds.candidates(con, int(r)) for r in steps["id"]]
        rewards = [rounds.candidate_rewards(con, int(r)) for r in steps["id"]]
    assert info["method"] == "ppo" and info["config"]["reward"] == [SHORTER]
    assert info["config"]["ppo_epochs"] == 2 and info["config"]["vf_coef"] == 0.1
    # two prompts, one per step: two rollout steps, every metric each step
    assert list(metrics.index) == [1, 2]
    for name in PPO_METRICS:
        assert metrics[name].notna().all(), name
    assert steps["step"].tolist() == [1, 2]
    for step_cands, step_rewards in zip(cands, rewards, strict=True):
        assert len(step_cands) == 1  # PPO's K = 1
        for c in step_cands.itertuples():
            assert step_rewards[int(c.id)] == pytest.approx(shorter("", c.text))
    # the adaptive β: the start value, then Ziegler's rule from step 1's KL
    beta = metrics["beta"].tolist()
    assert beta[0] == pytest.approx(0.05)
    kl = metrics["kl_per_token"].iloc[0]
    assert beta[1] == pytest.approx(adaptive_beta(0.05, kl, 0.05, 1, 10.0))
    # the version is the policy's adapter alone; the critic is kept in the run's folder
    folder = online_ws.artifacts / "adapters" / version
    assert (folder / "adapter_config.json").exists() and not (folder / "critic").exists()
    critic = online_ws.artifacts / "runs" / str(run_id) / "critic"
    assert (critic / "adapter_model.safetensors").exists()
    assert (critic / "value_head.safetensors").exists()
    # policy, π_ref and critic were one copy of the base weights: the model held the base's
    # parameters once plus the two adapters and the value head
    (model,) = built
    assert set(model.lm.peft_config) == {"default", "critic"}
    from tuning.modeling import load_base

    with db.connect(online_ws) as con:
        base = models.base_model(con)
    base_count = sum(p.numel() for p in load_base(base).parameters())
    lora_count = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head_count = sum(p.numel() for p in model.value_head.parameters())
    assert sum(p.numel() for p in model.parameters()) == base_count + lora_count + head_count


# -- the Researcher page -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("model_ws")
def test_researcher_form_starts_a_ppo_run_with_a_registered_reward():
    from labeling.judges import register_judge
    from tests.fixtures_app import add_prompts
    from tests.test_app import click, element_values, finished_run, open_app

    app_ws = db.workspace()  # the tiny-model workspace the app opens
    add_prompts(app_ws, ["Name a colour.", "Say hi."])
    register_judge(app_ws, "brevity", SHORTER, "rita")
    at = open_app("Researcher")
    at.selectbox(key="tune_method").set_value("PPO online (reward, adaptive KL)").run()
    assert at.number_input(key="tune_online_k").value == PPOConfig().k == 1
    assert at.number_input(key="tune_beta").value == PPOConfig().beta
    at.multiselect(key="tune_reward").set_value(["brevity"])
    at.number_input(key="tune_epochs").set_value(1)
    at.number_input(key="tune_target_kl").set_value(0.1)
    click(at, "start_tuning")
    assert any("Started a PPO online" in v for v in element_values(at, "success"))
    row = finished_run(app_ws, "tune")
    with db.connect(app_ws) as con:
        version = models.get_version(con, row["result"])
        metrics = runs.run_metrics(con, int(row["id"]))
    assert version["method"] == "ppo" and version["config"]["reward"] == ["brevity"]
    assert version["config"]["target_kl"] == 0.1 and version["config"]["k"] == 1
    assert {"loss/value_avg", "val/clipfrac_avg", "objective/scores"} <= set(metrics.columns)
