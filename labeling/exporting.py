"""Exporting a dataset version in TRL's preference format (pairs), TRL's unpaired preference
format (kto), or as ranked lists."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from labeling.candidate_render import views_differ
from labeling.curation import dataset_card, freeze_dataset
from labeling.ranking import ordered_pairs, tiers_to_ranks
from labeling.safe_text import code_block, code_span
from store import datasets, labels
from store import db as storedb
from store.errors import PrefloopError
from store.exports import write_card, write_rows
from store.records import TrainingGroup
from store.rounds import GroupRecord

FORMATS = ("pairs", "listwise", "kto")


def _prompt_fields(record: TrainingGroup, conversational: bool) -> object:
    if not conversational:
        return record.prompt
    return record.messages or [{"role": "user", "content": record.prompt}]


Views = dict[int, list[bool]]  # group id -> per candidate: judged on a view that differs


def candidate_views(records: list[TrainingGroup], recorded: dict[int, list]) -> Views:
    """Per group, which candidates may have been judged on a view that differs from their text
    (recorded: the view hashes of the group's labels; see candidate_render.views_differ)."""
    return {
        int(r.group_id): views_differ(r.candidate_ids, r.texts, recorded.get(int(r.group_id), []))
        for r in records
        if r.group_id is not None and len(r.candidate_ids) == len(r.texts)
    }


def _differs(views: Views, r: TrainingGroup, *positions: int) -> bool:
    flags = views.get(int(r.group_id)) if r.group_id is not None else None
    if flags is None:  # a group without ids: judge by its texts alone
        flags = views_differ(list(range(len(r.texts))), r.texts, [])
    return any(flags[p] for p in positions)


def pair_rows(records: list[TrainingGroup], views: Views | None = None) -> list[dict]:
    """TRL preference rows: prompt/chosen/rejected, conversational when any prompt has messages;
    with views, a view_differs field per pair (either candidate judged on a changed view)."""
    conversational = any(r.messages for r in records)
    rows = []
    for r in records:
        prompt = _prompt_fields(r, conversational)
        for a, b in ordered_pairs(r.ranking):
            chosen, rejected = r.texts[a], r.texts[b]
            if conversational:
                chosen = [{"role": "assistant", "content": chosen}]
                rejected = [{"role": "assistant", "content": rejected}]
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
            if views is not None:
                row["view_differs"] = _differs(views, r, a, b)
            rows.append(row)
    return rows


def kto_rows(records: list[TrainingGroup]) -> list[dict]:
    """TRL unpaired preference rows (prompt, completion, label) from thumbs: one per candidate.

    With several annotators a candidate's label is the majority of their thumbs; candidates
    with as many ups as downs, and groups without thumbs (ranked rounds), give no row.
    Conversational (prompt = messages, completion = one assistant turn) when any prompt has
    messages, as in the pairs export.
    """
    conversational = any(r.messages for r in records)
    rows = []
    for r in records:
        if r.thumbs is None:
            continue
        prompt = _prompt_fields(r, conversational)
        for text, (ups, downs) in zip(r.texts, r.thumbs, strict=True):
            if ups == downs:
                continue
            completion = [{"role": "assistant", "content": text}] if conversational else text
            rows.append({"prompt": prompt, "completion": completion, "label": ups > downs})
    return rows


def listwise_rows(records: list[TrainingGroup], views: Views | None = None) -> list[dict]:
    """Ranked lists: prompt (or messages), completions, ranks (1 = best, equal = tie); with
    views, view_differs per completion."""
    conversational = any(r.messages for r in records)
    key = "messages" if conversational else "prompt"
    rows = []
    for r in records:
        row = {
            key: _prompt_fields(r, conversational),
            "completions": list(r.texts),
            "ranks": tiers_to_ranks(r.ranking, len(r.texts)),
        }
        if views is not None:
            row["view_differs"] = [_differs(views, r, p) for p in range(len(r.texts))]
        rows.append(row)
    return rows


def group_rows(groups: list[GroupRecord]) -> list[dict]:
    """Groups for ranking outside the app: group_id, round, prompt, candidates (id, text)."""
    return [
        {
            "group_id": g.group_id,
            "round": g.round_id,
            "prompt": g.prompt,
            **({"messages": g.messages} if g.messages else {}),
            "candidates": [
                {"id": i, "text": t, "n_tokens": n, "finish_reason": f}
                for i, t, n, f in zip(
                    g.candidate_ids, g.texts, g.n_tokens, g.finish_reasons, strict=True
                )
            ],
        }
        for g in groups
    ]


FORMAT_TEXT = {
    "pairs": "TRL preference (`prompt`, `chosen`, `rejected`, and `view_differs`: true when "
    "the annotators may have judged a view of either text that differs from the text itself)",
    "listwise": "ranked lists (`prompt` or `messages`, `completions`, `ranks`; 1 = best, "
    "equal = tie; `view_differs` per completion)",
    "kto": "TRL unpaired preference (`prompt`, `completion`, `label`: true = thumbs up), one "
    "row per candidate with a majority of thumbs, for TRL's KTOTrainer",
}


def card_text(info: dict, fmt: str, out: Path, n_rows: int, records: list[TrainingGroup]) -> str:
    """The dataset card: what the file holds and where it came from."""
    versions = sorted({str(r.model_version) for r in records if r.model_version})
    load = "json" if out.suffix == ".jsonl" else "parquet"
    snippet = (
        "from datasets import load_dataset\n"
        f'ds = load_dataset("{load}", data_files={out.name!r}, split="train")'
    )
    return f"""# prefloop preference dataset `{info["id"]}`

- file: {code_span(out.name)} ({fmt}, {n_rows} rows)
- dataset version: `{info["id"]}` (sha256 `{info["content_hash"]}`)
- groups: {info["n_groups"]}; ordered pairs: {info["n_pairs"]}
- rounds: {", ".join(str(r) for r in info["rounds"])}
- model versions that sampled the candidates: {", ".join(versions) or "outside data only"}
- exported: {dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}

Format: {FORMAT_TEXT[fmt]}.

{code_block(snippet, "python")}

{dataset_card(info)}"""


def freeze_current(ws: storedb.Workspace) -> tuple[str, bool]:
    """Freeze the current labels as `tune` does (all annotators but the judge, no filters);
    returns the dataset version and whether it is new (an unchanged one is reused)."""
    with storedb.connect(ws) as con:
        known = set(datasets.list_datasets(con)["id"])
    version = freeze_dataset(ws)
    return version, version not in known


def export_dataset(
    ws: storedb.Workspace, fmt: str, out: Path, dataset_id: str | None = None
) -> tuple[Path, int]:
    """Write a dataset version (default: the newest) to out with a card; returns (path, rows)."""
    if fmt not in FORMATS:
        raise PrefloopError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")
    with storedb.connect(ws) as con:
        dataset_id = dataset_id or datasets.latest_dataset(con)
        if dataset_id is None:
            raise PrefloopError(
                "no dataset version yet: run `prefloop dataset freeze` or `prefloop tune` first"
            )
        info = datasets.get_dataset(con, dataset_id)
        recorded = labels.recorded_views(con, datasets.frozen_labels(con, dataset_id))
    records = datasets.read_groups(ws, info)
    if fmt == "kto":
        rows = kto_rows(records)
    else:
        views = candidate_views(records, recorded)
        rows = {"pairs": pair_rows, "listwise": listwise_rows}[fmt](records, views)
    if fmt == "kto" and not rows:
        raise PrefloopError(
            f"dataset version {dataset_id} has no thumbs with a majority up or down; the kto "
            "export needs a thumbs round (`prefloop rounds set ROUND --mode thumbs`) or use "
            "--format pairs"
        )
    path = write_rows(rows, Path(out))
    write_card(path, card_text(info, fmt, path, len(rows), records))
    return path, len(rows)
