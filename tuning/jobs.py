"""Long jobs as the CLI runs them: a run row, heartbeat, metrics, and all-or-nothing results."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, replace

from store import datasets, models, runs
from store import db as storedb
from store.errors import PrefloopError
from tuning.config import (
    METHOD_CONFIGS,
    ONLINE_METHODS,
    DPOConfig,
    GRPOConfig,
    RMConfig,
    SamplingConfig,
)


def _fail(ws: storedb.Workspace, run_id: int, exc: BaseException) -> None:
    message = str(exc) or type(exc).__name__
    with storedb.connect(ws) as con:
        runs.fail_run(con, run_id, message)


def _remove_stale_staging(ws: storedb.Workspace, running: list[int]) -> None:
    """Delete adapter folders that killed runs left half-written."""
    keep = {f".staging-run{r}" for r in running}
    for path in (ws.artifacts / "adapters").glob(".staging-run*"):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def _guard_prompts(ws: storedb.Workspace, base: str) -> tuple[list[list[int]], str]:
    """Token ids of the prompts the fluency guard and the gate sample: held-out, else train."""
    from store import prompts as storeprompts
    from tuning.modeling import load_tokenizer, prompt_ids

    with storedb.connect(ws) as con:
        split = "heldout"
        df = storeprompts.list_prompts(con, split)
        if df.empty:
            split, df = "train", storeprompts.list_prompts(con, "train")
    tokenizer = load_tokenizer(base)
    return [prompt_ids(tokenizer, r.text, r.messages) for r in df.itertuples()], split


def _train(
    ws: storedb.Workspace,
    base: str,
    method: str,
    cfg: DPOConfig | GRPOConfig,
    info: dict,
    parent: dict | None,
    out_dir,
    on_step=None,
    show_progress: bool = True,
    guard_prompts: list[list[int]] | None = None,
    run_id: int | None = None,
    resume: dict | None = None,
):
    """Run the method's training loop on a dataset version (online methods: on fresh samples
    of the prompts, checkpointed into the run folder; resumed from `resume`, a checkpoint);
    returns its TrainResult."""
    init = models.adapter_dir(ws, parent) if parent else None
    common = dict(
        init_adapter=init,
        on_step=on_step,
        show_progress=show_progress,
        guard_prompts=guard_prompts,
    )
    if is_online(method, cfg):
        from tuning.train_loop import Checkpointing

        checkpoint = None
        if run_id is not None:
            checkpoint = Checkpointing(checkpoint_path(ws, run_id), cfg.checkpoint_every, resume)
        if method == "ppo":
            from tuning.ppo import train_ppo

            return train_ppo(ws, base, cfg, out_dir, run_id=run_id, checkpoint=checkpoint, **common)
        from tuning.online import train_online

        return train_online(
            ws, base, method, cfg, out_dir, run_id=run_id, checkpoint=checkpoint, **common
        )
    rows = datasets.read_groups(ws, info)
    if method == "grpo":
        from tuning.grpo import train_grpo

        with storedb.connect(ws) as con:
            versions = models.list_versions(con)
        sampled_by = {g.model_version for g in rows}  # only the adapters these groups need
        adapters = {
            str(v["id"]): models.adapter_dir(ws, v)
            for v in versions.to_dict("records")
            if v["id"] in sampled_by
        }
        return train_grpo(base, rows, cfg, out_dir, adapters=adapters, **common)
    from tuning.dpo import train_dpo

    heldout = None
    if cfg.early_stop:
        from labeling.curation import training_rows

        with storedb.connect(ws) as con:
            held_df, _ = training_rows(con, split="heldout")
        heldout = datasets.training_groups(held_df)
        if not heldout:
            raise PrefloopError(
                "--early-stop needs labelled held-out groups: sample and rank a round with "
                "--split heldout first"
            )
    return train_dpo(
        base,
        rows,
        cfg,
        out_dir,
        ref_cache=datasets.snapshot_path(ws, info),
        heldout_rows=heldout,
        **common,
    )


def is_online(method: str, cfg) -> bool:
    """Whether the run trains on fresh samples (rloo, grpo with online) rather than labels."""
    return method in ONLINE_METHODS and bool(getattr(cfg, "online", False))


def gate_note(con, chosen: str) -> str | None:
    """Why sampling uses `chosen` rather than a newer version that failed its gate."""
    df = models.list_versions(con)
    newer = df[~df["promoted"]]
    if chosen != models.BASE:
        newer = newer[newer["created"] > df[df["id"] == chosen]["created"].iloc[0]]
    if newer.empty:
        return None
    row = newer.iloc[-1]
    reasons = "; ".join((row["gate"] or {}).get("reasons", [])) or "it is not promoted"
    return (
        f"sampling from {chosen}: {row['id']} failed its promotion gate ({reasons}); "
        f"`prefloop models promote {row['id']} --force` makes it the default, "
        f"`--model {row['id']}` samples from it once"
    )


def sample_job(
    ws: storedb.Workspace,
    cfg: SamplingConfig,
    version: str | None,
    show_progress: bool = True,
    options: dict | None = None,
) -> int:
    """Sample a round as a tracked job (options: its labelling options); returns the round id."""
    from tuning.modeling import check_precision
    from tuning.sampling import sample_round

    check_precision(cfg.dtype, cfg.load_in_4bit)
    with storedb.connect(ws) as con:
        runs.record_dead(con)
        if not version:
            version = models.default_version(con)
            note = gate_note(con, version)
            if note:
                print(note, file=sys.stderr)
        models.get_version(con, version, models.POLICY)
        run_id = runs.start_run(con, "sample", {**asdict(cfg), "model_version": version})
    try:
        round_id = sample_round(
            ws, cfg, version, run_id=run_id, show_progress=show_progress, options=options
        )
    except BaseException as exc:
        _fail(ws, run_id, exc)
        raise
    with storedb.connect(ws) as con:
        runs.finish_run(con, run_id, f"round {round_id}")
    return round_id


def eval_job(ws: storedb.Workspace, version: str, cfg) -> dict:
    """Evaluate a version as a tracked job; returns the results."""
    from tuning.evaluation import evaluate
    from tuning.modeling import check_precision, limit_threads

    check_precision(cfg.dtype)
    limit_threads(ws)
    with storedb.connect(ws) as con:
        runs.record_dead(con)
        models.get_version(con, version, models.POLICY)
        run_id = runs.start_run(con, "eval", {**asdict(cfg), "model_version": version})
    try:
        result = evaluate(ws, version, cfg)
    except BaseException as exc:
        _fail(ws, run_id, exc)
        raise
    with storedb.connect(ws) as con:
        runs.finish_run(con, run_id, f"eval {version} vs {cfg.against}")
    return result


def round_beta(cfg: DPOConfig | GRPOConfig, method: str, parent: dict | None) -> dict:
    """β for a round continued from `parent`, by the Ziegler rule once per round.

    β_r = β_parent · (1 + clip(KL_parent / target − 1, −0.2, 0.2)), where KL_parent is the KL
    per token the parent's gate measured and target is cfg.kl_target (default: half the KL
    budget). Returns the adapted β and what it came from; β stays as given without a parent,
    without a measured KL, or with adapt_beta off.
    """
    out = {"beta": cfg.beta, "beta_requested": cfg.beta}
    gate = (parent or {}).get("gate") or {}
    kl = gate.get("kl_per_token")
    if not (cfg.adapt_beta and parent and kl is not None):
        return out
    pconf = parent["config"]
    start = pconf.get("beta", cfg.beta) if parent.get("method") == method else cfg.beta
    target = cfg.kl_target or cfg.kl_budget / 2
    error = max(-0.2, min(0.2, kl / target - 1))
    return {**out, "beta": start * (1 + error), "beta_parent": start, "kl_parent": kl,
            "kl_target": target}  # fmt: skip


def gate_verdict(
    report,
    cfg: DPOConfig | GRPOConfig,
    accuracy: float | None,
    parent_accuracy: float | None,
    kept_epoch: int | None = None,
) -> dict:
    """The promotion gate: broken share ≤ 5% (or π_ref's own, where higher), KL within budget,
    held-out preference accuracy at least the parent's (0.5 for the base model) when held-out
    labels exist."""
    from tuning.fluency import MAX_BROKEN_SHARE

    reasons = []
    gate: dict = {"kl_budget": cfg.kl_budget, "max_broken_share": MAX_BROKEN_SHARE}
    if report is not None:
        gate.update(
            max_broken_share=report.max_broken_share,
            broken_share_ref=report.broken_share_ref,
            kl_per_token=report.kl_per_token,
            broken_share=report.broken_share,
            nll_per_token=report.nll_per_token,
            nll_per_token_ref=report.nll_per_token_ref,
            answers=report.answers,
            examples=report.examples,
        )
        if report.broken_share > report.max_broken_share:
            reasons.append(
                f"broken share {report.broken_share:.0%} > {report.max_broken_share:.0%} of "
                f"{report.answers} held-out answers"
            )
        if report.kl_per_token > cfg.kl_budget:
            reasons.append(f"KL per token {report.kl_per_token:.3f} > budget {cfg.kl_budget:g}")
    else:
        gate["unmeasured"] = "no prompts to sample (gate_prompts 0)"
    if kept_epoch == 0:
        restarts = (
            f", after {cfg.lr_backoffs} restarts, each at {cfg.backoff_factor:g}× the last rate"
            if cfg.lr_backoffs
            else ""
        )
        reasons.append(
            "no epoch stayed within the guard's budget, so nothing was learned (the starting "
            f"adapter was kept{restarts}); lower --lr or raise --beta"
        )
    if accuracy is not None:
        gate["preference_accuracy"] = accuracy
        gate["preference_accuracy_parent"] = parent_accuracy
        if parent_accuracy is not None and accuracy < parent_accuracy:
            reasons.append(
                f"held-out preference accuracy {accuracy:.3f} < parent's {parent_accuracy:.3f}"
            )
    gate["passed"] = not reasons
    gate["reasons"] = reasons
    return gate


def _preference_accuracy(
    ws: storedb.Workspace, version: str, beta: float, dtype: str = "auto"
) -> float | None:
    from tuning.evaluation import preference_accuracy

    result = preference_accuracy(ws, version, beta or 0.1, dtype=dtype)
    return None if result is None else float(result[0]["accuracy"])


def tune_job(
    ws: storedb.Workspace,
    cfg: DPOConfig | GRPOConfig | RMConfig,
    *,
    method: str = "dpo",
    from_version: str | None = None,
    dataset_id: str | None = None,
    show_progress: bool = True,
) -> str:
    """Freeze (or reuse) a dataset version, train an adapter on it, register the new version,
    and run its promotion gate."""
    from labeling.curation import freeze_dataset
    from tuning.modeling import check_precision, limit_threads

    check_precision(cfg.dtype, cfg.load_in_4bit)  # before a dataset, a run or a model
    limit_threads(ws)
    rank = int(os.environ.get("RANK", "0"))  # set by `accelerate launch` for each process
    if method not in METHOD_CONFIGS:
        raise PrefloopError(
            f"unknown tuning method {method!r}; available: {', '.join(METHOD_CONFIGS)}"
        )
    kind = models.REWARD if method == "rm" else models.POLICY
    online = is_online(method, cfg)
    if method in ONLINE_METHODS:
        from tuning.online import check_online, check_rewards

        check_online(method, cfg)
        if online:
            check_rewards(ws, cfg.reward)
        if online and dataset_id:
            raise PrefloopError("an online run samples its own data; drop --dataset")
    with storedb.connect(ws) as con:
        base = models.base_model(con)
        parent = models.get_version(con, from_version, kind) if from_version else None
        if dataset_id:
            datasets.get_dataset(con, dataset_id)
    if not online:
        dataset_id = dataset_id or freeze_dataset(ws)  # same content, same id in every process
    if method == "rm":
        return _tune_reward_model(
            ws, cfg, base, parent, from_version, dataset_id, rank, show_progress
        )
    beta = round_beta(cfg, method, parent)
    cfg = replace(cfg, beta=beta["beta"])
    config = {"method": method, "dataset": dataset_id, "from": from_version, **cfg.to_dict()}
    info = None
    if dataset_id:
        with storedb.connect(ws) as con:
            info = datasets.get_dataset(con, dataset_id)
    guard_prompts, guard_split = (
        _guard_prompts(ws, base) if cfg.guard_prompts > 0 or cfg.gate_prompts > 0 else ([], "")
    )
    if rank != 0:  # a non-main process of a multi-process run: train its shard, record nothing
        _train(
            ws,
            base,
            method,
            cfg,
            info,
            parent,
            ws.artifacts / "adapters" / ".unused",
            show_progress=False,
            guard_prompts=guard_prompts,
        )
        return ""
    run_id, run_dir, staging, on_step = _start_tune_run(ws, config)
    (run_dir / BETA_FILE).write_text(json.dumps(beta))
    return _policy_run(
        ws, run_id, config, cfg, base=base, method=method, info=info, parent=parent,
        beta=beta, show_progress=show_progress, guard_prompts=guard_prompts,
        guard_split=guard_split,
    )  # fmt: skip


BETA_FILE = "beta.json"  # in the run folder: the β a run used and what it was adapted from
CHECKPOINT_FILE = "checkpoint.pt"


def checkpoint_path(ws: storedb.Workspace, run_id: int):
    """Where an online run keeps its last checkpoint."""
    return ws.artifacts / "runs" / str(run_id) / CHECKPOINT_FILE


def _policy_run(
    ws: storedb.Workspace,
    run_id: int,
    config: dict,
    cfg,
    *,
    base: str,
    method: str,
    info: dict | None,
    parent: dict | None,
    beta: dict,
    show_progress: bool,
    guard_prompts: list[list[int]],
    guard_split: str,
    resume: dict | None = None,
) -> str:
    """Train a recorded run (from its start, or from a checkpoint), register its version, run
    the promotion gate and finish the run; a failure fails it and leaves no version."""
    run_dir = ws.artifacts / "runs" / str(run_id)
    staging = ws.artifacts / "adapters" / f".staging-run{run_id}"
    on_step = _heartbeat(ws, run_id)
    from_version = config.get("from")
    dataset_id = config.get("dataset")
    try:
        result = _train(
            ws, base, method, cfg, info, parent, staging, on_step, show_progress, guard_prompts,
            run_id, resume,
        )  # fmt: skip
        final = result.metrics
        training = {
            "epochs_run": result.epochs_run,
            "kept_epoch": result.kept_epoch,
            "stopped_by": result.stopped_by,
            "guard": result.guard,
            "guard_split": guard_split,
            "lr": result.lr if result.lr is not None else cfg.lr,
            "backoffs": result.backoffs,
            **{k: v for k, v in beta.items() if k != "beta"},
        }
        (run_dir / "final_metrics.json").write_text(
            json.dumps({**final, "training": training}, indent=2, default=float)
        )
        with storedb.connect(ws) as con:
            version = models.register_version(
                ws,
                con,
                staging,
                parent=from_version,
                dataset_id=dataset_id,
                method=method,
                config={**config, "final_metrics": final, "training": training},
                run_id=run_id,
                promoted=False,
            )
        accuracy = _preference_accuracy(ws, version, cfg.beta, cfg.dtype)
        parent_accuracy = None
        if accuracy is not None:
            parent_gate = (parent or {}).get("gate") or {}
            parent_accuracy = parent_gate.get("preference_accuracy")
            if parent is None:
                parent_accuracy = 0.5  # the base model's implicit reward orders nothing
            elif parent_accuracy is None:
                parent_accuracy = _preference_accuracy(
                    ws, from_version, parent["config"].get("beta", cfg.beta), cfg.dtype
                )
        gate = gate_verdict(result.gate, cfg, accuracy, parent_accuracy, result.kept_epoch)
        gate["split"] = guard_split
        with storedb.connect(ws) as con:
            models.set_gate(con, version, gate, gate["passed"])
            runs.finish_run(con, run_id, version)
        checkpoint_path(ws, run_id).unlink(missing_ok=True)  # a finished run does not resume
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _fail(ws, run_id, exc)
        raise
    print(gate_summary(version, gate, result), file=sys.stderr)
    return version


def resume_job(ws: storedb.Workspace, run_id: int, show_progress: bool = True) -> str:
    """Continue a crashed or killed online run from its last checkpoint, with the run's stored
    config, under the same run id; returns the new version's id."""
    import socket

    from store import rounds
    from tuning.modeling import limit_threads
    from tuning.train_loop import load_checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PrefloopError("--resume runs in one process; run it without `accelerate launch`")
    limit_threads(ws)
    with storedb.connect(ws) as con:
        runs.record_dead(con)
        row = runs.get_run(con, run_id)
        base = models.base_model(con)
    config = row["config"]
    method = config.get("method")
    if (
        row["kind"] != "tune"
        or method not in ONLINE_METHODS
        or not (method in ("rloo", "ppo") or config.get("online"))
    ):
        what = f"a {row['kind']} job" if row["kind"] != "tune" else f"a {method} run on labels"
        raise PrefloopError(
            f"run {run_id} is {what}, not an online run: only online runs (--method grpo "
            "--online, --method rloo, --method ppo) checkpoint and resume; start it again instead"
        )
    alive = row["host"] == socket.gethostname() and runs.process_alive(row["pid"], row["host"])
    if row["status"] == "running" or (row["error"] == runs.STOPPED_SILENTLY and alive):
        raise PrefloopError(
            f"run {run_id} is still running (process {row['pid']} on {row['host']}); wait for "
            "it, or stop that process first, then resume it"
        )
    if row["status"] == "completed":
        raise PrefloopError(
            f"run {run_id} finished (its result: {row['result']}); there is nothing to resume"
        )
    path = checkpoint_path(ws, run_id)
    if not path.is_file():
        raise PrefloopError(
            f"run {run_id} has no checkpoint (it stopped before its first, or ran with "
            "--checkpoint-every 0), so it cannot resume; start it again: `prefloop tune "
            f"--config {ws.artifacts / 'runs' / str(run_id) / 'config.json'}`"
        )
    cfg = METHOD_CONFIGS[method].from_dict(config)
    state = load_checkpoint(path)
    done = int(state["batches"])  # the last rollout step the checkpoint holds
    from_version = config.get("from")
    with storedb.connect(ws) as con:
        parent = models.get_version(con, from_version) if from_version else None
        runs.resume_run(con, run_id, done)
        rounds.drop_run_steps_after(con, run_id, done)
    run_dir = ws.artifacts / "runs" / str(run_id)
    beta_file = run_dir / BETA_FILE
    beta = (
        json.loads(beta_file.read_text())
        if beta_file.is_file()
        else {"beta": cfg.beta, "beta_requested": cfg.beta}
    )
    shutil.rmtree(ws.artifacts / "adapters" / f".staging-run{run_id}", ignore_errors=True)
    print(f"resuming run {run_id} after its step {done}", file=sys.stderr)
    guard_prompts, guard_split = (
        _guard_prompts(ws, base) if cfg.guard_prompts > 0 or cfg.gate_prompts > 0 else ([], "")
    )
    return _policy_run(
        ws, run_id, config, cfg, base=base, method=method, info=None, parent=parent,
        beta=beta, show_progress=show_progress, guard_prompts=guard_prompts,
        guard_split=guard_split, resume=state,
    )  # fmt: skip


def _start_tune_run(ws: storedb.Workspace, config: dict):
    """Record a tuning run and prepare its folders: (run id, run folder, staging adapter
    folder, the heartbeat callback)."""
    with storedb.connect(ws) as con:
        runs.record_dead(con)
        orphans = models.set_aside_orphans(ws, con)
        running = runs.list_runs(con).query("status == 'running'")["id"].tolist()
        run_id = runs.start_run(con, "tune", config)
    _remove_stale_staging(ws, running)
    for name, place in orphans:
        print(
            f"moved {name}, an adapter folder that no model version records (a killed run's), "
            f"to {place}",
            file=sys.stderr,
        )
    run_dir = ws.artifacts / "runs" / str(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    staging = ws.artifacts / "adapters" / f".staging-run{run_id}"

    return run_id, run_dir, staging, _heartbeat(ws, run_id)


def _heartbeat(ws: storedb.Workspace, run_id: int):
    """The callback that records a run's step metrics (and that it is alive)."""

    def on_step(step: int, metrics: dict[str, float]) -> None:
        with storedb.connect(ws) as con:
            runs.heartbeat(con, run_id, metrics, step)

    return on_step


def _heldout_groups(ws: storedb.Workspace) -> list:
    """The labelled held-out groups (consensus of all annotators but the judge), if any."""
    from labeling.curation import training_rows

    with storedb.connect(ws) as con:
        held_df, _ = training_rows(con, split="heldout")
    return datasets.training_groups(held_df)


def _tune_reward_model(
    ws: storedb.Workspace,
    cfg: RMConfig,
    base: str,
    parent: dict | None,
    from_version: str | None,
    dataset_id: str,
    rank: int,
    show_progress: bool,
) -> str:
    """Train a reward model on a dataset version and register it as a version of kind reward
    (never promoted: it judges, it does not sample)."""
    from tuning.reward_model import train_reward_model

    config = {"method": "rm", "dataset": dataset_id, "from": from_version, **cfg.to_dict()}
    with storedb.connect(ws) as con:
        info = datasets.get_dataset(con, dataset_id)
    rows = datasets.read_groups(ws, info)
    heldout = _heldout_groups(ws)
    init = models.adapter_dir(ws, parent) if parent else None
    if rank != 0:  # a non-main process of a multi-process run: train its shard, record nothing
        train_reward_model(
            base, rows, cfg, ws.artifacts / "adapters" / ".unused", init_adapter=init,
            heldout_rows=heldout, show_progress=False,
        )  # fmt: skip
        return ""
    run_id, run_dir, staging, on_step = _start_tune_run(ws, config)
    try:
        result = train_reward_model(
            base, rows, cfg, staging, init_adapter=init, heldout_rows=heldout,
            on_step=on_step, show_progress=show_progress,
        )  # fmt: skip
        final = result.metrics
        training = {
            "epochs_run": result.epochs_run,
            "kept_epoch": result.kept_epoch,
            "heldout_groups": len(heldout),
        }
        (run_dir / "final_metrics.json").write_text(
            json.dumps({**final, "training": training}, indent=2, default=float)
        )
        gate = {"kind": models.REWARD, "passed": True, "reasons": []}
        if "eval/accuracy" in final:
            gate["heldout_accuracy"] = final["eval/accuracy"]
        with storedb.connect(ws) as con:
            version = models.register_version(
                ws,
                con,
                staging,
                parent=from_version,
                dataset_id=dataset_id,
                method="rm",
                config={**config, "final_metrics": final, "training": training},
                run_id=run_id,
                promoted=False,
                kind=models.REWARD,
            )
            models.set_gate(con, version, gate, False)
            runs.finish_run(con, run_id, version)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _fail(ws, run_id, exc)
        raise
    held = (
        f", held-out accuracy {final['eval/accuracy']:.3f} (best epoch {result.kept_epoch})"
        if "eval/accuracy" in final
        else " (no labelled held-out groups to measure it on)"
    )
    print(
        f"{version}: reward model, train accuracy {final.get('accuracy', float('nan')):.3f}"
        f"{held}; use it as a judge: --judge rm:{version}",
        file=sys.stderr,
    )
    return version


def gate_text(gate) -> str:
    """A version's promotion-gate verdict in a few words, for tables."""
    if not isinstance(gate, dict):
        return "(made before the gate)"
    if gate.get("kind") == "reward":
        return "reward model (judges, never sampled)"
    reasons = "; ".join(gate.get("reasons", []))
    if gate.get("forced"):
        return f"forced past: {reasons}"
    return "passed" if gate.get("passed") else f"FAILED: {reasons}"


def gate_summary(version: str, gate: dict, result=None) -> str:
    """One or two lines for the user: the gate's verdict and what to do about a failure."""
    parts = []
    demoted = int((getattr(result, "metrics", None) or {}).get("data/demoted_groups", 0))
    if demoted:
        parts.append(
            f"{demoted} group(s) ranked an answer π_ref finds broken above a fluent one: trained "
            "with the broken answers ranked last"
        )
    for backoff in getattr(result, "backoffs", None) or []:
        last = backoff["guard"][-1]
        parts.append(
            f"at lr {backoff['lr']:g} epoch {backoff['epochs_run']} broke the guard's budget "
            f"before any epoch was kept (KL/token {last['kl_per_token']:.3f}, broken "
            f"{last['broken_share']:.0%}): started again from the starting adapter at lr "
            f"{backoff.get('next_lr', backoff['lr'] / 2):g}"
        )
    if result is not None and result.stopped_by == "guard":
        last = result.guard[-1]
        parts.append(
            f"the fluency guard stopped training after epoch {result.epochs_run} (KL/token "
            f"{last['kl_per_token']:.3f}, budget {gate['kl_budget']:g}; broken "
            f"{last['broken_share']:.0%}) and kept epoch {result.kept_epoch}, the last within "
            "the budget"
        )
    measured = (
        f"KL/token {gate['kl_per_token']:.3f} (budget {gate['kl_budget']:g}), "
        f"broken {gate['broken_share']:.0%}"
        if "kl_per_token" in gate
        else "fluency not measured"
    )
    if "preference_accuracy" in gate:
        measured += f", held-out preference accuracy {gate['preference_accuracy']:.3f}"
    if gate["passed"]:
        parts.append(f"{version} passed its promotion gate ({measured}); new rounds sample from it")
    else:
        parts.append(
            f"{version} FAILED its promotion gate: {'; '.join(gate['reasons'])}. It is kept but "
            f"not promoted: new rounds keep sampling from the previous version. "
            f"`prefloop models promote {version} --force` overrides."
        )
    return "\n".join(parts)
