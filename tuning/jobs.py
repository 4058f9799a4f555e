"""Long jobs as the CLI runs them: a run row, heartbeat, metrics, and all-or-nothing results."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict

from store import datasets, models, runs
from store import db as storedb
from store.errors import PrefloopError
from tuning.config import DPOConfig, GRPOConfig, SamplingConfig


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
) -> dict:
    """Run the method's training loop on a dataset version; returns its final metrics."""
    from labeling.curation import snapshot_records

    rows = snapshot_records(datasets.read_snapshot(ws, info))
    init = ws.path(parent["adapter_path"]) if parent else None
    if method == "grpo":
        from tuning.grpo import train_grpo

        with storedb.connect(ws) as con:
            versions = models.list_versions(con)
        adapters = {str(v.id): ws.path(v.adapter_path) for v in versions.itertuples()}
        return train_grpo(
            base,
            rows,
            cfg,
            out_dir,
            adapters=adapters,
            init_adapter=init,
            on_step=on_step,
            show_progress=show_progress,
        )
    from tuning.dpo import train_dpo

    heldout = None
    if cfg.early_stop:
        from labeling.curation import training_rows

        with storedb.connect(ws) as con:
            held_df, _ = training_rows(con, split="heldout")
        heldout = snapshot_records(held_df)
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
        init_adapter=init,
        ref_cache=ws.path(info["path"]),
        on_step=on_step,
        show_progress=show_progress,
        heldout_rows=heldout,
    )


def sample_job(
    ws: storedb.Workspace,
    cfg: SamplingConfig,
    version: str | None,
    show_progress: bool = True,
    options: dict | None = None,
) -> int:
    """Sample a round as a tracked job (options: its labelling options); returns the round id."""
    from tuning.sampling import sample_round

    with storedb.connect(ws) as con:
        version = version or models.latest_version(con)
        models.get_version(con, version)
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

    with storedb.connect(ws) as con:
        models.get_version(con, version)
        run_id = runs.start_run(con, "eval", {**asdict(cfg), "model_version": version})
    try:
        result = evaluate(ws, version, cfg)
    except BaseException as exc:
        _fail(ws, run_id, exc)
        raise
    with storedb.connect(ws) as con:
        runs.finish_run(con, run_id, f"eval {version} vs {cfg.against}")
    return result


def tune_job(
    ws: storedb.Workspace,
    cfg: DPOConfig | GRPOConfig,
    *,
    method: str = "dpo",
    from_version: str | None = None,
    dataset_id: str | None = None,
    show_progress: bool = True,
) -> str:
    """Freeze (or reuse) a dataset version, train an adapter on it, register the new version."""
    from labeling.curation import freeze_dataset

    rank = int(os.environ.get("RANK", "0"))  # set by `accelerate launch` for each process
    if method not in ("dpo", "grpo"):
        raise PrefloopError(f"unknown tuning method {method!r}; available: dpo, grpo")
    with storedb.connect(ws) as con:
        base = models.base_model(con)
        parent = models.get_version(con, from_version) if from_version else None
        if dataset_id:
            datasets.get_dataset(con, dataset_id)
    dataset_id = dataset_id or freeze_dataset(ws)  # same content, same id in every process
    config = {"method": method, "dataset": dataset_id, "from": from_version, **cfg.to_dict()}
    with storedb.connect(ws) as con:
        info = datasets.get_dataset(con, dataset_id)
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
        )
        return ""
    with storedb.connect(ws) as con:
        running = runs.list_runs(con).query("status == 'running'")["id"].tolist()
        run_id = runs.start_run(con, "tune", config)
    _remove_stale_staging(ws, running)
    run_dir = ws.artifacts / "runs" / str(run_id)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    staging = ws.artifacts / "adapters" / f".staging-run{run_id}"

    def on_step(step: int, metrics: dict[str, float]) -> None:
        with storedb.connect(ws) as con:
            runs.heartbeat(con, run_id, metrics, step)

    try:
        final = _train(ws, base, method, cfg, info, parent, staging, on_step, show_progress)
        (run_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        with storedb.connect(ws) as con:
            version = models.register_version(
                ws,
                con,
                staging,
                parent=from_version,
                dataset_id=dataset_id,
                method=method,
                config={**config, "final_metrics": final},
                run_id=run_id,
            )
            runs.finish_run(con, run_id, version)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        _fail(ws, run_id, exc)
        raise
    return version
