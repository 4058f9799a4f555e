"""Plain records that cross package borders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, str]]


@dataclass
class PromptRecord:
    """A prompt read from a file: plain text, or a conversation whose last turn is the user's."""

    text: str
    messages: Messages | None = None
    line: int = 0


@dataclass
class ImportedGroup:
    """A prompt with completions ranked once; ranking holds completion indices, best first."""

    prompt: PromptRecord
    completions: list[str]
    ranking: list[list[int]]
    line: int = 0


@dataclass
class LabelRecord:
    """One annotator's ranking of one group; ranking holds candidate ids, best tier first."""

    group_id: int
    annotator: str
    ranking: list[list[int]] | None
    flags: list[str] = field(default_factory=list)
    comment: str | None = None
    line: int = 0
    thumbs: dict[int, bool] | None = None  # thumbs rounds: candidate id -> up (True) / down
    ratings: dict[int, int] | None = None  # optional 1-5 absolute rating per candidate id
    seconds: float | None = None  # time the annotator spent on the group
    render_version: str | None = None  # the renderer that showed the group (None: not the app)
    render_hash: str | None = None  # hash of the candidates' view as shown


@dataclass
class TrainingGroup:
    """A frozen training group: one prompt, its K candidates and the rankings they got.

    Rankings hold candidate positions (0..K-1), best place first; a place may hold ties.
    Written and read by store.datasets, consumed by every tuning method and every export.
    """

    prompt: str
    texts: list[str]
    ranking: list[list[int]]  # the consensus
    rankings: list[list[list[int]]] = field(default_factory=list)  # every annotator's
    messages: Messages | None = None
    finish_reasons: list[str | None] = field(default_factory=list)  # eos | length | None
    model_version: str | None = None  # the version that sampled the candidates (None: outside)
    group_id: int | None = None
    round_id: int | None = None
    candidate_ids: list[int] = field(default_factory=list)
    sample_logprobs: list[float | None] = field(default_factory=list)
    n_labels: int = 1
    thumbs: list[list[int]] | None = None  # [ups, downs] per candidate in thumbs rounds

    def __post_init__(self) -> None:
        if not self.rankings:
            self.rankings = [self.ranking]
        if not self.finish_reasons:
            self.finish_reasons = [None] * len(self.texts)


@dataclass
class ImportReport:
    """What an import stored and what it skipped, with reasons."""

    stored: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
