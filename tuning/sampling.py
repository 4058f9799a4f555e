"""Sampling a round: K candidates per prompt from a model version."""

from __future__ import annotations

from dataclasses import asdict

from tqdm import tqdm

from store import db as storedb
from store import models, prompts, rounds
from store.errors import PrefloopError
from store.rounds import CandidateRecord
from tuning.config import SamplingConfig


def round_settings(cfg: SamplingConfig, version: str) -> dict:
    """What a round stores as its settings: the config, the version sampled and the dtype its
    weights were loaded in (what --dtype auto chose on this machine)."""
    from tuning.modeling import decoding_dtype, dtype_name

    weights = "4bit" if cfg.load_in_4bit else dtype_name(decoding_dtype(cfg.dtype))
    return {**asdict(cfg), "model_version": version, "weights_dtype": weights}


def sample_round(
    ws: storedb.Workspace,
    cfg: SamplingConfig,
    version: str | None = None,
    *,
    run_id: int | None = None,
    show_progress: bool = True,
    options: dict | None = None,
) -> int:
    """Sample a new round from a model version (default: the newest); returns the round id.

    options: the round's labelling options (mode, overlap, guidelines; see rounds.RoundOptions).
    """
    from tuning.generation import HFGenerator
    from tuning.modeling import (
        decoding_dtype,
        limit_threads,
        load_tokenizer,
        load_version,
        prompt_ids,
    )

    if cfg.k < 1 or cfg.max_new_tokens < 1:
        raise PrefloopError("--k and --max-new-tokens must be at least 1")
    with storedb.connect(ws) as con:
        base = models.base_model(con)
        version = version or models.latest_version(con)
        info = models.get_version(con, version, models.POLICY)
        todo = prompts.list_prompts(con, cfg.split)
    if todo.empty:
        raise PrefloopError(
            f"no {cfg.split} prompts in the workspace; add some with "
            f"`prefloop prompts import FILE --split {cfg.split}`"
        )
    if cfg.limit:
        todo = todo.head(cfg.limit)
    limit_threads(ws)
    tokenizer = load_tokenizer(base)
    adapter = models.adapter_dir(ws, info) if info else None
    dtype = decoding_dtype(cfg.dtype)
    model = load_version(base, adapter, dtype=dtype, load_in_4bit=cfg.load_in_4bit)
    generator = HFGenerator(model, tokenizer)
    records = todo.to_dict("records")
    results: list[tuple[int, list]] = []
    bar = tqdm(
        total=len(records) * cfg.k,
        desc=f"sampling ({version})",
        unit="completion",
        disable=not show_progress,
    )
    for b in range(0, len(records), cfg.prompts_per_batch):
        chunk = records[b : b + cfg.prompts_per_batch]
        ids = [prompt_ids(tokenizer, r["text"], r["messages"]) for r in chunk]
        samples = generator.generate(
            ids,
            cfg.k,
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed * 100_003 + b,
        )
        results.extend((r["id"], s) for r, s in zip(chunk, samples, strict=True))
        bar.update(len(chunk) * cfg.k)
        if run_id is not None:
            from store import runs

            with storedb.connect(ws) as con:
                runs.heartbeat(con, run_id, {"completions": len(results) * cfg.k}, len(results))
    bar.close()
    settings = round_settings(cfg, version)
    with storedb.connect(ws) as con:
        round_id = rounds.create_round(con, version, cfg.split, cfg.k, settings, "sampled")
        if options:
            rounds.set_round_options(con, round_id, **options)
        rounds.add_groups(
            con,
            round_id,
            [
                (
                    int(prompt_id),
                    [
                        CandidateRecord(
                            s.text, s.n_tokens, s.finish_reason, s.logprob, origin=version
                        )
                        for s in group
                    ],
                )
                for prompt_id, group in results
            ],
        )
    return round_id
