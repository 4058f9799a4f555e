"""Bringing outside files in: prompts, labels, ranked groups and preference pairs."""

from __future__ import annotations

from pathlib import Path

from labeling.curation import JUDGE_ANNOTATOR
from store import db as storedb
from store import labels, prompts, rounds
from store.errors import PrefloopError
from store.files import (
    normalize_prompt,
    read_labels,
    read_pairs,
    read_prompts,
    read_ranked_groups,
)
from store.records import ImportedGroup, ImportReport, LabelRecord
from store.rounds import CandidateRecord


def import_prompts(ws: storedb.Workspace, path: Path, split: str = "train") -> ImportReport:
    """Store a file's prompts in one transaction; duplicates are skipped and counted."""
    prompts.check_split(split)
    records = read_prompts(path)
    with storedb.connect(ws) as con:
        return prompts.add_prompts(con, records, split, Path(path).name)


def import_labels(ws: storedb.Workspace, path: Path) -> int:
    """Store a file's rankings; any bad row rejects the whole file."""
    return import_labels_noting(ws, path)[0]


def import_labels_noting(ws: storedb.Workspace, path: Path) -> tuple[int, list[str]]:
    """Store a file's rankings (all rows or none); returns how many and warnings for the user."""
    records = read_labels(path)
    with storedb.connect(ws) as con:
        n = labels.add_labels(con, records, source=str(path))
    notes = []
    by_judge = sum(r.annotator == JUDGE_ANNOTATOR for r in records)
    if by_judge:
        notes.append(
            f"{by_judge} of these labels are by annotator {JUDGE_ANNOTATOR!r}, the name reserved "
            "for the judge: dataset versions (`prefloop dataset freeze`, `prefloop tune`, "
            "`prefloop export`) leave them out unless named, e.g. `prefloop dataset freeze "
            f"--annotators {JUDGE_ANNOTATOR},OTHER,...`; import them under another annotator "
            "name to use them like a person's labels"
        )
    return n, notes


def drop_duplicate_groups(groups: list[ImportedGroup]) -> tuple[list[ImportedGroup], int]:
    """The groups without repeats of an earlier one, and how many were dropped.

    A repeat has the same prompt and the same completions in the same order of preference, up to
    whitespace and the order the completions are listed in; the same completions ranked
    otherwise are a different opinion and are kept.
    """
    seen: set[tuple] = set()
    kept: list[ImportedGroup] = []
    for g in groups:
        texts = [" ".join(c.split()) for c in g.completions]
        key = (
            normalize_prompt(g.prompt),
            tuple(tuple(sorted(texts[i] for i in tier)) for tier in g.ranking),
        )
        if key not in seen:
            seen.add(key)
            kept.append(g)
    return kept, len(groups) - len(kept)


def store_groups(
    ws: storedb.Workspace, groups: list[ImportedGroup], source: str, split: str
) -> tuple[int | None, int]:
    """Store ranked outside groups as one round, each ranked once by annotator `import`."""
    if not groups:
        return None, 0
    annotator = f"import:{source}"
    with storedb.connect(ws) as con:
        k = max(len(g.completions) for g in groups)
        round_id = rounds.create_round(con, None, split, k, {"file": source}, f"import:{source}")
        prompt_ids, _ = prompts.upsert_prompts(con, [g.prompt for g in groups], split, source)
        stored = rounds.add_groups(
            con,
            round_id,
            [
                (pid, [CandidateRecord(t) for t in g.completions])
                for pid, g in zip(prompt_ids, groups, strict=True)
            ],
        )
        to_label = [
            LabelRecord(gid, annotator, [[cand_ids[i] for i in tier] for tier in g.ranking])
            for (gid, cand_ids), g in zip(stored, groups, strict=True)
        ]
        labels.add_labels(con, to_label, source=source)
    return round_id, len(groups)


def import_ranked_groups(
    ws: storedb.Workspace, path: Path, split: str = "train"
) -> tuple[int | None, ImportReport]:
    """Import listwise ranked groups (the listwise export's format) as a new round.

    Rows repeating an earlier row of the file are skipped and counted as duplicates.
    """
    prompts.check_split(split)
    groups, duplicates = drop_duplicate_groups(read_ranked_groups(path))
    round_id, n = store_groups(ws, groups, Path(path).name, split)
    return round_id, ImportReport(stored=n, duplicates=duplicates)


def import_pairs(
    ws: storedb.Workspace, path: Path, split: str = "train"
) -> tuple[int | None, ImportReport]:
    """Import TRL-format or HH-RLHF pairs as groups of two with one ranking.

    Rows repeating an earlier row of the file are skipped and counted as duplicates; a file
    with no usable row is refused and nothing is stored.
    """
    prompts.check_split(split)
    groups, report = read_pairs(path)
    if not groups:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(report.skipped.items()))
        raise PrefloopError(
            f"{path}: none of the {report.extra['rows']} rows is a usable pair (skipped: "
            f"{reasons}); nothing was imported. Each row needs a prompt and two non-empty "
            "final assistant answers (see the README's file formats)"
        )
    groups, report.duplicates = drop_duplicate_groups(groups)
    round_id, report.stored = store_groups(ws, groups, Path(path).name, split)
    return round_id, report
