"""Ranking a group in the annotator page: display order, picks, ties, undo, and the stored label.

Plain Python, no Streamlit: the web page keeps a RankingState per group in its session and
calls these functions; tests drive them directly.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from labeling import differences, queue
from store import db as storedb
from store import rounds
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
    tie_armed: bool = False  # the next key press ties with the last pick (keyboard "t")

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

    def tie_near_identical(self) -> list[str]:
        """Tie the unranked near-identical candidates of the last pick with it; returns them."""
        groups = differences.near_identical_groups(self.texts)
        if not groups:
            raise PrefloopError("no candidates in this group are near-identical; nothing to tie")
        if not self.tiers:
            raise PrefloopError(
                "rank one of the near-identical candidates first; = then ties the others with it"
            )
        last = self.tiers[-1]
        letters = self.letters
        placed = set(self.placed)
        twins = [
            letters[i]
            for g in groups
            if any(letters[i] in last for i in g.members)
            for i in g.members
            if letters[i] not in placed
        ]
        if not twins:
            raise PrefloopError(
                f"your last pick ({' = '.join(last)}) has no unranked near-identical candidate"
            )
        last.extend(twins)
        return twins

    def key_name(self, key: int) -> str:
        """The letter of the candidate shown in slot key (1-based, as typed on the keyboard)."""
        if not 1 <= key <= len(self.candidate_ids):
            raise PrefloopError(f"there is no candidate {key}; keys 1..{len(self.candidate_ids)}")
        return self.letters[key - 1]

    def press(self, name: str) -> None:
        """A candidate key: tie it with the last pick if tie was armed, else rank it next."""
        armed, self.tie_armed = self.tie_armed, False
        if armed:
            self.tie_with_last(name)
        else:
            self.rank_next(name)

    def arm_tie(self) -> None:
        """Make the next candidate key tie with the last pick."""
        if not self.tiers:
            raise PrefloopError("rank a candidate first; there is no place to tie with")
        self.tie_armed = True

    def undo(self) -> str | None:
        """Take back the last pick; returns its letter (None when nothing was ranked)."""
        self.tie_armed = False
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

    def thumbs_label(
        self, thumbs: dict[int, bool], *, all_bad: bool = False, comment: str | None = None
    ) -> LabelRecord:
        """The label of a thumbs round: every candidate up or down; ups rank above downs."""
        pairs = zip(self.letters, self.candidate_ids, strict=True)
        missing = ", ".join(n for n, c in pairs if c not in thumbs)
        if missing:
            raise PrefloopError(f"give every candidate a thumb first (missing: {missing})")
        ups = sorted(c for c in self.candidate_ids if thumbs[c])
        downs = sorted(c for c in self.candidate_ids if not thumbs[c])
        return LabelRecord(
            group_id=self.group_id,
            annotator=self.annotator,
            ranking=[tier for tier in (ups, downs) if tier],
            flags=["all_bad"] if all_bad else [],
            comment=_clean_comment(comment),
            thumbs={c: bool(thumbs[c]) for c in self.candidate_ids},
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


KEY_ACTIONS = {"Enter": "submit", "s": "skip", "b": "all_bad"}


@dataclass
class KeyResult:
    """What a run of typed keys did: keys consumed, the group action they ended with, errors."""

    consumed: int
    action: str | None = None  # submit | skip | all_bad, for the page to carry out
    errors: list[str] = field(default_factory=list)


def apply_keys(state: RankingState, keys: list[str], thumbs_mode: bool = False) -> KeyResult:
    """Apply typed keys in order (1..9 rank, t tie next, = tie near-identical, u undo); stop
    after s, b or Enter.

    A key that does not apply (a number without a candidate, t before a pick, Enter on an
    unfinished ranking) is reported and skipped, so later keys still count. Keys after the
    group action are left for the next group.
    """
    result = KeyResult(0)
    for key in keys:
        result.consumed += 1
        try:
            if key in KEY_ACTIONS:
                if key == "Enter" and not thumbs_mode and not state.can_submit():
                    raise PrefloopError(
                        f"Enter: rank every candidate first (still unranked: "
                        f"{', '.join(state.unranked)})"
                    )
                result.action = KEY_ACTIONS[key]
                return result
            if thumbs_mode:
                raise PrefloopError(f"key {key!r} does nothing in a thumbs round")
            if key == "t":
                state.arm_tie()
            elif key == "=":
                state.tie_near_identical()
                state.tie_armed = False
            elif key == "u":
                state.undo()
            elif key.isdigit():
                state.press(state.key_name(int(key)))
            else:
                raise PrefloopError(f"key {key!r} does nothing here")
        except PrefloopError as exc:
            result.errors.append(str(exc))
    return result


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
    hint: list[list[int]] | None = None  # the judge's ranking, when the round shows it


def next_assignment(
    ws: storedb.Workspace, annotator: str, round_id: int, lease_s: float | None = None
) -> Assignment:
    """The annotator's next group from the round's queue (leased to them), with done/left counts.

    Reloading returns the same group while the lease holds; `left` counts the groups this
    annotator could still get, the shown one included.
    """
    ticket = queue.take(ws, clean_annotator(annotator), round_id, lease_s)
    return Assignment(ticket.round_id, ticket.group, ticket.done, ticket.left, ticket.hint)


def save_label(ws: storedb.Workspace, record: LabelRecord) -> None:
    """Store one label atomically, validated like `prefloop labels import`.

    A new label goes through the queue (its lease ends; refused if the annotator's lease ran out
    and the group filled up meanwhile); a second label on the same group revises the first
    (the old one is kept in the label's history; an identical one is refused).
    """
    queue.save(ws, record)


def is_rollout_source(source: str | None) -> bool:
    """Whether a round holds an online run's step samples (kept off the annotators' list; the
    run's audit round is theirs)."""
    return bool(source) and str(source).startswith(rounds.ROLLOUT_SOURCE)


def round_title(
    round_id: int, model_version: str | None, source: str | None = None, mode: str | None = None
) -> str:
    """How a round is named in the annotator page."""
    kind = "Thumbs" if mode == "thumbs" else "Ranking"
    if source and source.startswith(rounds.AUDIT_SOURCE):
        return f"{kind} round {round_id} (samples of tuning {source.removeprefix('audit:')})"
    if model_version:
        return f"{kind} round {round_id} (model version {model_version})"
    origin = f"imported: {source.removeprefix('import:')}" if source else "imported"
    return f"{kind} round {round_id} ({origin})"
