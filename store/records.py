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


@dataclass
class ImportReport:
    """What an import stored and what it skipped, with reasons."""

    stored: int = 0
    duplicates: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
