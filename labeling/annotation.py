"""Ranking a group in the annotator page: display order, picks, ties, undo, and the stored label.

Plain Python, no Streamlit: the web page keeps a RankingState per group in its session and
calls these functions; tests drive them directly.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from store import db as storedb
from store import labels, rounds
from store.errors import PrefloopError
from store.records import LabelRecord
from store.rounds import GroupRecord

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
WEB_SOURCE = "web"


def letter(index: int) -> str:
    """The letter shown for the candidate in display slot index (A, B, …, Z, A2, B2, …)."""
    base = LETTERS[index % len(LETTERS)]
    return base if index < len(LETTERS) else f"{base}{index // len(LETTERS) + 1}"


def display_order(annotator: str, group_id: int, n: int) -> list[int]:
    """Candidate positions in the order one annotator sees them (stable per annotator and group)."""
    digest = hashlib.sha256(f"{annotator.strip()}\x00{int(group_id)}".encode()).digest()
    order = list(range(n))
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def clean_annotator(name: str | None) -> str:
    """The annotator name as stored; an empty name raises."""
    name = (name or "").strip()
    if not name:
        raise PrefloopError("enter your annotator name first")
    return name


@dataclass
class RankingState:
    """One annotator's ranking in progress: tiers of letters, best first; ties share a tier."""

    group_id: int
    annotator: str
    candidate_ids: list[int]
    texts: list[str]
    tiers: list[list[str]] = field(default_factory=list)

    @property
    def letters(self) -> list[str]:
        """The letters of all candidates, in display order."""
        return [letter(i) for i in range(len(self.candidate_ids))]

    def text_of(self, name: str) -> str:
        """The candidate text shown under a letter."""
        return self.texts[self._index(name)]

    def _index(self, name: str) -> int:
        try:
            return self.letters.index(name)
        except ValueError:
            raise PrefloopError(f"no candidate {name!r} in this group") from None

    @property
    def placed(self) -> list[str]:
        """Letters already ranked, in the order they were picked."""
        return [name for tier in self.tiers for name in tier]

    @property
    def unranked(self) -> list[str]:
        """Letters not ranked yet, in display order."""
        done = set(self.placed)
        return [name for name in self.letters if name not in done]

    @property
    def complete(self) -> bool:
        """Whether every candidate has a place."""
        return not self.unranked

    def place_of(self, name: str) -> int | None:
        """The 1-based place of a letter, or None while it is unranked."""
        for i, tier in enumerate(self.tiers):
            if name in tier:
                return i + 1
        return None

    def _check_free(self, name: str) -> None:
        self._index(name)
        if name in self.placed:
            raise PrefloopError(f"candidate {name} is ranked already; undo to change it")

    def rank_next(self, name: str) -> None:
        """Put a candidate into the next place."""
        self._check_free(name)
        self.tiers.append([name])

    def tie_with_last(self, name: str) -> None:
        """Put a candidate into the same place as the last pick."""
        self._check_free(name)
        if not self.tiers:
            raise PrefloopError("rank a candidate first; there is no place to tie with")
        self.tiers[-1].append(name)

    def undo(self) -> str | None:
        """Take back the last pick; returns its letter (None when nothing was ranked)."""
        if not self.tiers:
            return None
        name = self.tiers[-1].pop()
        if not self.tiers[-1]:
            self.tiers.pop()
        return name

    def reset(self) -> None:
        """Clear the ranking."""
        self.tiers.clear()

    def summary(self) -> str:
        """The ranking so far, e.g. '1. B  2. A = D'."""
        return "  ".join(f"{i + 1}. {' = '.join(tier)}" for i, tier in enumerate(self.tiers))

    def can_submit(self, all_bad: bool = False) -> bool:
        """Whether Submit may store this ranking (complete, or flagged all bad)."""
        return self.complete or all_bad

    def to_label(self, *, all_bad: bool = False, comment: str | None = None) -> LabelRecord:
        """The label to store, in candidate ids; all bad with an unfinished ranking ties all."""
        if not self.complete and not all_bad:
            missing = ", ".join(self.unranked)
            raise PrefloopError(
                f"rank every candidate before submitting (still unranked: {missing})"
            )
        ids = dict(zip(self.letters, self.candidate_ids, strict=True))
        if self.complete:
            ranking = [[ids[name] for name in tier] for tier in self.tiers]
        else:
            ranking = [sorted(self.candidate_ids)]
        return LabelRecord(
            group_id=self.group_id,
            annotator=self.annotator,
            ranking=ranking,
            flags=["all_bad"] if all_bad else [],
            comment=_clean_comment(comment),
        )

    def skip_label(self, comment: str | None = None) -> LabelRecord:
        """The label that records a skipped group (no ranking)."""
        return LabelRecord(
            group_id=self.group_id,
            annotator=self.annotator,
            ranking=None,
            flags=["skipped"],
            comment=_clean_comment(comment),
        )


def _clean_comment(comment: str | None) -> str | None:
    comment = (comment or "").strip()
    return comment or None


def start_ranking(group: GroupRecord, annotator: str) -> RankingState:
    """A fresh ranking of a group, candidates shuffled for this annotator."""
    annotator = clean_annotator(annotator)
    order = display_order(annotator, group.group_id, len(group.candidate_ids))
    return RankingState(
        group_id=group.group_id,
        annotator=annotator,
        candidate_ids=[group.candidate_ids[i] for i in order],
        texts=[group.texts[i] for i in order],
    )


@dataclass
class Assignment:
    """What the annotator page shows: the next group (or None) and the annotator's progress."""

    round_id: int
    group: GroupRecord | None
    done: int
    left: int


def next_assignment(ws: storedb.Workspace, annotator: str, round_id: int) -> Assignment:
    """The next group of a round this annotator has not labelled, with done/left counts."""
    annotator = clean_annotator(annotator)
    with storedb.connect(ws) as con:
        rounds.get_round(con, round_id)
        group = labels.next_group(con, annotator, round_id)
        done, left = labels.progress(con, annotator, round_id)
    return Assignment(round_id=int(round_id), group=group, done=done, left=left)


def save_label(ws: storedb.Workspace, record: LabelRecord) -> None:
    """Store one label atomically, validated like `prefloop labels import`."""
    with storedb.connect(ws) as con:
        labels.add_labels(con, [record], source=WEB_SOURCE)


def round_title(round_id: int, model_version: str | None, source: str | None = None) -> str:
    """How a round is named in the annotator page."""
    if model_version:
        return f"Ranking round {round_id} (model version {model_version})"
    origin = f"imported: {source.removeprefix('import:')}" if source else "imported"
    return f"Ranking round {round_id} ({origin})"
