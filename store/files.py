"""Readers that turn user files (JSONL, CSV, Parquet) into validated records.

Every reader validates the whole file before returning anything: the first malformed row aborts
the read with ``PrefloopError("<path>:<line>: <what is wrong; what to do>")``. Line numbers are
1-based physical lines (JSONL, JSONL.gz; in CSV the header is line 1). Parquet rows are reported
as ``<path>: row <n>``. A JSON row nested deeper than ``MAX_JSON_DEPTH`` levels and a prompt,
message or completion longer than ``MAX_TEXT_CHARS`` characters are malformed rows too.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from store.access import check_name
from store.errors import PrefloopError
from store.records import ImportedGroup, ImportReport, LabelRecord, Messages, PromptRecord

PathLike = str | os.PathLike

ROLES = ("system", "user", "assistant")
LABEL_FLAGS = ("all_bad", "skipped")

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_GZ_SUFFIXES = tuple(s + ".gz" for s in _JSONL_SUFFIXES)
_PARQUET_SUFFIXES = (".parquet",)
_CSV_SUFFIXES = (".csv",)

# Limits on one row, so a hostile or broken file is refused with FILE:LINE instead of exhausting
# Python's stack (deep JSON) or the tokenizer later (a 50 MB prompt).
MAX_JSON_DEPTH = 100  # nesting levels of one JSON row, the row object itself being level 1
MAX_TEXT_CHARS = 100_000  # characters of one prompt, message or completion

# An HH-RLHF turn marker: a blank line, then "Human:" or "Assistant:".
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# A string prompt that is an HH-RLHF transcript ending with an empty Assistant turn.
_HH_PROMPT = re.compile(r"\A\s*Human:.*\n\nAssistant:\s*\Z", re.DOTALL)

# Reasons a well-formed pair row is skipped (keys of ImportReport.skipped).
SKIP_NO_ASSISTANT = "no Assistant turn"
SKIP_NOT_ENDING_ASSISTANT = "transcript does not end with an Assistant turn"
SKIP_TEXT_BEFORE_FIRST_TURN = "text before the first Human turn"
SKIP_DIVERGE = "chosen and rejected differ before the final Assistant turn"
SKIP_EMPTY_COMPLETION = "empty final Assistant turn"
SKIP_NO_PROMPT = "no Human turn before the final Assistant turn"
SKIP_PROMPT_NOT_USER = "prompt does not end with a user turn"
SKIP_EMPTY_PROMPT = "empty prompt"
SKIP_COMPLETION_NOT_SINGLE = "completion is not a single assistant message"


# --------------------------------------------------------------------------------------------
# Locations and row sources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loc:
    """Where a row sits in a file: a physical line (JSONL, CSV) or a Parquet row."""

    path: str
    line: int
    parquet: bool = False

    def __str__(self) -> str:
        return f"{self.path}: row {self.line}" if self.parquet else f"{self.path}:{self.line}"

    def fail(self, reason: str) -> PrefloopError:
        return PrefloopError(f"{self}: {reason}")


def _kind(path: PathLike, allowed: tuple[str, ...]) -> tuple[Path, str]:
    """Check that the file exists and has a supported extension; return it and its kind."""
    p = Path(path)
    name = p.name.lower()
    kinds = {"jsonl": _JSONL_SUFFIXES, "jsonl.gz": _GZ_SUFFIXES}
    kinds.update({"csv": _CSV_SUFFIXES, "parquet": _PARQUET_SUFFIXES})
    kind = next((k for k, sufs in kinds.items() if name.endswith(sufs)), None)
    want = ", ".join(s for k in allowed for s in kinds[k])
    if kind is None or kind not in allowed:
        raise PrefloopError(f"{path}: unsupported file type; use one of: {want}")
    if not p.exists():
        raise PrefloopError(f"{path}: no such file; check the path")
    if not p.is_file():
        raise PrefloopError(f"{path}: not a regular file; give the path of a file ({want})")
    return p, kind


def _rows(
    path: PathLike,
    allowed: tuple[str, ...],
    *,
    columns: tuple[str, ...] = (),
    csv_keep: tuple[str, ...] = (),
) -> Iterator[tuple[_Loc, dict[str, Any]]]:
    """Yield every non-blank row of a file as a dict, with its location; reject empty files.

    For Parquet, ``columns`` lists the columns of which at least one must exist. CSV files
    must have every ``csv_keep`` column, and their rows keep only those (as strings).
    """
    p, kind = _kind(path, allowed)
    shown = str(path)
    if kind == "parquet":
        source = _parquet_rows(p, shown, columns)
    elif kind == "csv":
        source = _csv_rows(p, shown, csv_keep)
    else:
        source = _jsonl_rows(p, shown, gz=kind == "jsonl.gz")
    seen = False
    for loc, row in source:
        seen = True
        yield loc, row
    if not seen:
        raise PrefloopError(f"{shown}: the file has no rows; add at least one")


_TOO_DEEP = (
    f"the JSON is nested deeper than {MAX_JSON_DEPTH} levels; a row needs only a few levels, "
    "flatten or remove the deep field"
)


def _too_deep(value: Any) -> bool:
    """Whether a parsed JSON row nests lists/objects deeper than MAX_JSON_DEPTH levels."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if depth > MAX_JSON_DEPTH:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def _column_hint(found: list[str], columns: tuple[str, ...]) -> str:
    want = " or ".join(f"'{c}'" for c in columns)
    return f"needs a {want} column; found columns {found}"


def _jsonl_rows(p: Path, shown: str, *, gz: bool) -> Iterator[tuple[_Loc, dict[str, Any]]]:
    opener = gzip.open if gz else open
    try:
        with opener(p, "rb") as fh:
            for n, raw in enumerate(fh, start=1):
                loc = _Loc(shown, n)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise loc.fail("not UTF-8 text; save the file as UTF-8") from exc
                if n == 1:
                    text = text.removeprefix("\ufeff")
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except RecursionError:
                    raise loc.fail(_TOO_DEEP) from None
                except json.JSONDecodeError as exc:
                    hint = "each line must be one JSON object"
                    if n == 1 and text.lstrip().startswith("["):
                        hint = "this looks like a JSON array; write one JSON object per line"
                    raise loc.fail(
                        f"not valid JSON ({exc.msg}, column {exc.colno}); {hint}"
                    ) from None
                if not isinstance(row, dict):
                    raise loc.fail(
                        f"expected a JSON object, got {_type_name(row)}; "
                        "each line must be one JSON object"
                    )
                if _too_deep(row):
                    raise loc.fail(_TOO_DEEP)
                yield loc, row
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise PrefloopError(
            f"{shown}: not a readable gzip file ({exc}); re-compress it or use plain .jsonl"
        ) from exc
    except OSError as exc:
        raise PrefloopError(f"{shown}: cannot read the file ({exc})") from exc


def _csv_rows(p: Path, shown: str, keep: tuple[str, ...]) -> Iterator[tuple[_Loc, dict[str, Any]]]:
    with open(p, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=True)
        header: list[str] | None = None
        start = 1
        while True:
            loc = _Loc(shown, start)
            try:
                fields = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError as exc:
                raise loc.fail("not UTF-8 text; save the file as UTF-8") from exc
            except csv.Error as exc:
                if "field larger than field limit" in str(exc):
                    raise loc.fail(
                        f"a field has more than {csv.field_size_limit():,} characters; "
                        f"a prompt may have at most {MAX_TEXT_CHARS:,} characters"
                    ) from None
                raise loc.fail(f"not valid CSV ({exc}); check the quoting") from exc
            start = reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                missing = [c for c in keep if c not in header]
                if missing:
                    raise loc.fail(
                        f"the CSV header has no {' or '.join(repr(c) for c in missing)} column; "
                        f"found columns {header}"
                    )
                continue
            if len(fields) != len(header):
                raise loc.fail(
                    f"{len(fields)} fields but the header has {len(header)}; "
                    "quote values that contain commas or line breaks"
                )
            row = dict(zip(header, fields, strict=True))
            yield loc, {k: v for k, v in row.items() if k in keep}


def _parquet_rows(
    p: Path, shown: str, columns: tuple[str, ...]
) -> Iterator[tuple[_Loc, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise PrefloopError(f"{shown}: not a readable Parquet file ({exc})") from exc
    if columns and not any(c in table.column_names for c in columns):
        raise PrefloopError(f"{shown}: {_column_hint(table.column_names, columns)}")
    for n, row in enumerate(table.to_pylist(), start=1):
        yield _Loc(shown, n, parquet=True), row


# --------------------------------------------------------------------------------------------
# Field validation
# --------------------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sized(text: str, loc: _Loc, where: str) -> str:
    """The text, unless it is longer than MAX_TEXT_CHARS (then the row is refused)."""
    if len(text) > MAX_TEXT_CHARS:
        raise loc.fail(
            f"{where} has {len(text):,} characters, more than the limit of {MAX_TEXT_CHARS:,} "
            "characters; shorten it or leave the row out"
        )
    return text


def _sized_prompt(record: PromptRecord, loc: _Loc) -> PromptRecord:
    """The prompt, unless its text or one of its messages is over MAX_TEXT_CHARS."""
    _sized(record.text, loc, "the prompt")
    for i, msg in enumerate(record.messages or []):
        _sized(msg["content"], loc, f"message {i} of the prompt")
    return record


def _messages(value: Any, loc: _Loc, field_name: str) -> Messages:
    """Validate a list of chat messages; return them as plain {role, content} dicts."""
    if not isinstance(value, (list, tuple)) or not value:
        raise loc.fail(
            f'\'{field_name}\' must be a non-empty list of {{"role", "content"}} objects, '
            f"got {_type_name(value)}"
        )
    out: Messages = []
    for i, msg in enumerate(value):
        where = f"'{field_name}'[{i}]"
        if not isinstance(msg, dict):
            raise loc.fail(f"{where} must be an object with role and content")
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise loc.fail(f"{where} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise loc.fail(f"{where}.content must be a string, got {_type_name(content)}")
        _sized(content, loc, f"{where}.content")
        out.append({"role": role, "content": content})
    return out


def _prompt_from_row(row: dict[str, Any], loc: _Loc) -> PromptRecord:
    """Read the prompt of a row: 'prompt' (a string, or a message list) or 'messages'."""
    prompt, messages = row.get("prompt"), row.get("messages")
    if prompt is not None and messages is not None:
        raise loc.fail("has both 'prompt' and 'messages'; keep only one of them")
    if prompt is None and messages is None:
        raise loc.fail("missing 'prompt' (a string) or 'messages' (a list of chat messages)")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise loc.fail("'prompt' is empty; give the prompt text or remove the row")
        _sized(prompt, loc, "'prompt'")
        return PromptRecord(text=prompt, messages=None, line=loc.line)
    key = "prompt" if prompt is not None else "messages"
    value = prompt if prompt is not None else messages
    if prompt is not None and not isinstance(prompt, (list, tuple)):
        raise loc.fail(f"'prompt' must be a string or a list of messages, got {_type_name(prompt)}")
    msgs = _messages(value, loc, key)
    last = msgs[-1]
    if last["role"] != "user":
        raise loc.fail(
            f"the last message in '{key}' has role {last['role']!r}; a prompt must end with a "
            "user message"
        )
    if not last["content"].strip():
        raise loc.fail(f"the last user message in '{key}' is empty; give the prompt text")
    return PromptRecord(text=last["content"], messages=msgs, line=loc.line)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def read_prompts(path: PathLike) -> list[PromptRecord]:
    """Read prompts from JSONL(.gz), CSV or Parquet: rows with 'prompt' or 'messages'."""
    allowed = ("jsonl", "jsonl.gz", "csv", "parquet")
    return [
        _prompt_from_row(row, loc)
        for loc, row in _rows(path, allowed, columns=("prompt", "messages"), csv_keep=("prompt",))
    ]


def normalize_prompt(text_or_messages: str | Messages | PromptRecord) -> str:
    """Whitespace-normalised key of a prompt (text or messages) for exact-duplicate detection."""
    value: Any = text_or_messages
    if isinstance(value, PromptRecord):
        value = value.messages if value.messages else value.text
    if isinstance(value, str):
        return " ".join(value.split())
    canon = [[str(m["role"]), " ".join(str(m["content"]).split())] for m in value]
    return json.dumps(canon, ensure_ascii=False, separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def _ranking(value: Any, loc: _Loc, field_name: str = "ranking") -> list[list[int]]:
    """Validate a tiered ranking of ids: a non-empty list of non-empty lists of distinct ints."""
    shape = "a list of tiers like [[3], [1, 2]] (best tier first)"
    if not isinstance(value, (list, tuple)) or not value:
        raise loc.fail(f"'{field_name}' must be {shape}, got {_type_name(value)}")
    seen: set[int] = set()
    tiers: list[list[int]] = []
    for i, tier in enumerate(value):
        if not isinstance(tier, (list, tuple)) or not tier:
            raise loc.fail(f"'{field_name}'[{i}] must be a non-empty list of ids; use {shape}")
        for cid in tier:
            if not _is_int(cid):
                raise loc.fail(f"'{field_name}'[{i}] holds {cid!r}; ids must be integers")
            if cid in seen:
                raise loc.fail(f"'{field_name}' lists id {cid} twice; list each candidate once")
            seen.add(cid)
        tiers.append([int(c) for c in tier])
    return tiers


def read_labels(path: PathLike) -> list[LabelRecord]:
    """Read annotator rankings (group_id, annotator, ranking, flags, comment) from JSONL/Parquet."""
    out: list[LabelRecord] = []
    for loc, row in _rows(path, ("jsonl", "jsonl.gz", "parquet"), columns=("ranking", "flags")):
        group_id = row.get("group_id")
        if not _is_int(group_id):
            raise loc.fail(f"'group_id' must be an integer, got {_type_name(group_id)}")
        annotator = row.get("annotator")
        if not isinstance(annotator, str) or not annotator.strip():
            raise loc.fail("'annotator' must be a non-empty string (the annotator's name)")
        try:
            annotator = check_name(annotator, "'annotator' name")
        except PrefloopError as exc:
            raise loc.fail(str(exc)) from None
        flags_value = row.get("flags")
        flags: list[str] = []
        if flags_value is not None:
            if not isinstance(flags_value, (list, tuple)):
                raise loc.fail(f"'flags' must be a list of strings, got {_type_name(flags_value)}")
            for flag in flags_value:
                if flag not in LABEL_FLAGS:
                    raise loc.fail(
                        f"unknown flag {flag!r}; allowed flags are {', '.join(LABEL_FLAGS)}"
                    )
                if flag not in flags:
                    flags.append(flag)
        ranking_value = row.get("ranking")
        ranking: list[list[int]] | None
        if ranking_value is None:
            if "skipped" not in flags:
                raise loc.fail("missing 'ranking'; give one, or add \"skipped\" to 'flags'")
            ranking = None
        else:
            ranking = _ranking(ranking_value, loc)
        comment = row.get("comment")
        if comment is not None and not isinstance(comment, str):
            raise loc.fail(f"'comment' must be a string or null, got {_type_name(comment)}")
        out.append(
            LabelRecord(
                group_id=int(group_id),
                annotator=annotator,
                ranking=ranking,
                flags=flags,
                comment=comment,
                line=loc.line,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Ranked groups
# --------------------------------------------------------------------------------------------


def ranks_to_tiers(ranks: list[int]) -> list[list[int]]:
    """Turn per-completion ranks (1 = best, equal = tie) into tiers of indices, best first."""
    by_rank: dict[int, list[int]] = {}
    for i, r in enumerate(ranks):
        by_rank.setdefault(r, []).append(i)
    return [by_rank[r] for r in sorted(by_rank)]


def read_ranked_groups(path: PathLike) -> list[ImportedGroup]:
    """Read prompts with K ranked completions ('completions' + 'ranks', 1 = best) from a file."""
    out: list[ImportedGroup] = []
    columns = ("prompt", "messages")
    for loc, row in _rows(path, ("jsonl", "jsonl.gz", "parquet"), columns=columns):
        prompt = _prompt_from_row(row, loc)
        completions = row.get("completions")
        if not isinstance(completions, (list, tuple)) or len(completions) < 2:
            raise loc.fail(
                "'completions' must be a list of at least 2 strings, "
                f"got {_type_name(completions)}"
                + (f" of {len(completions)}" if isinstance(completions, (list, tuple)) else "")
            )
        for i, c in enumerate(completions):
            if not isinstance(c, str) or not c.strip():
                raise loc.fail(f"'completions'[{i}] must be a non-empty string")
            _sized(c, loc, f"'completions'[{i}]")
        ranks = row.get("ranks")
        if not isinstance(ranks, (list, tuple)) or len(ranks) != len(completions):
            raise loc.fail(
                f"'ranks' must be a list of {len(completions)} integers, one per completion "
                "(1 = best, equal numbers = tie)"
            )
        for i, r in enumerate(ranks):
            if not _is_int(r) or r < 1:
                raise loc.fail(f"'ranks'[{i}] is {r!r}; ranks must be integers >= 1 (1 = best)")
        out.append(
            ImportedGroup(
                prompt=prompt,
                completions=list(completions),
                ranking=ranks_to_tiers(list(ranks)),
                line=loc.line,
            )
        )
    return out


# --------------------------------------------------------------------------------------------
# Preference pairs
# --------------------------------------------------------------------------------------------


class _Skip(Exception):
    """A well-formed pair row that cannot become a group; args[0] is the reason."""


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def _same_messages(a: Messages, b: Messages) -> bool:
    return len(a) == len(b) and all(
        x["role"] == y["role"] and _same_text(x["content"], y["content"])
        for x, y in zip(a, b, strict=True)
    )


def _hh_turns(transcript: str) -> Messages:
    """Split an HH-RLHF transcript into alternating messages; contents keep inner newlines."""
    text = transcript.replace("\r\n", "\n")
    if text.lstrip().startswith(("Human:", "Assistant:")):
        text = "\n\n" + text.lstrip()
    parts = _HH_MARKER.split(text)
    if len(parts) == 1:
        raise _Skip(SKIP_NO_ASSISTANT)
    if parts[0].strip():
        raise _Skip(SKIP_TEXT_BEFORE_FIRST_TURN)
    turns: Messages = []
    for marker, raw in zip(parts[1::2], parts[2::2], strict=True):
        role, content = _HH_ROLES[marker], raw.strip()
        if turns and turns[-1]["role"] == role:
            # Two markers of the same speaker in a row are one turn split by an artefact.
            turns[-1]["content"] = f"{turns[-1]['content']}\n\n{content}".strip()
        else:
            turns.append({"role": role, "content": content})
    return turns


def _split_final(turns: Messages) -> tuple[Messages, str]:
    """Split messages into (prefix, final assistant text)."""
    if not any(t["role"] == "assistant" for t in turns):
        raise _Skip(SKIP_NO_ASSISTANT)
    if turns[-1]["role"] != "assistant":
        raise _Skip(SKIP_NOT_ENDING_ASSISTANT)
    return turns[:-1], turns[-1]["content"]


def _prompt_from_prefix(prefix: Messages, line: int) -> PromptRecord:
    if not prefix or not any(m["role"] == "user" for m in prefix):
        raise _Skip(SKIP_NO_PROMPT)
    if prefix[-1]["role"] != "user":
        raise _Skip(SKIP_PROMPT_NOT_USER)
    if not prefix[-1]["content"].strip():
        raise _Skip(SKIP_EMPTY_PROMPT)
    return PromptRecord(text=prefix[-1]["content"], messages=prefix, line=line)


def _pair_from_transcripts(
    chosen: Messages, rejected: Messages, line: int
) -> tuple[PromptRecord, str, str]:
    """Shared prefix + final assistant turns of two full conversations."""
    c_prefix, c_final = _split_final(chosen)
    r_prefix, r_final = _split_final(rejected)
    if not _same_messages(c_prefix, r_prefix):
        raise _Skip(SKIP_DIVERGE)
    if not c_final.strip() or not r_final.strip():
        raise _Skip(SKIP_EMPTY_COMPLETION)
    return _prompt_from_prefix(c_prefix, line), c_final, r_final


def _single_assistant(msgs: Messages) -> str:
    if len(msgs) != 1 or msgs[0]["role"] != "assistant":
        raise _Skip(SKIP_COMPLETION_NOT_SINGLE)
    return msgs[0]["content"]


def _pair_row(row: dict[str, Any], loc: _Loc) -> tuple[str, PromptRecord, str, str]:
    """Classify and split one pair row; return (shape, prompt, chosen, rejected)."""
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            raise loc.fail(
                f"missing '{key}'; a pair row needs 'chosen' and 'rejected' "
                "(and optionally 'prompt')"
            )
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    both_str = isinstance(chosen, str) and isinstance(rejected, str)
    both_list = isinstance(chosen, (list, tuple)) and isinstance(rejected, (list, tuple))
    if not (both_str or both_list):
        raise loc.fail(
            f"'chosen' is {_type_name(chosen)} and 'rejected' is {_type_name(rejected)}; "
            "both must be strings or both lists of messages"
        )
    if prompt is None:
        if both_str:
            c_turns, r_turns = _hh_turns(chosen), _hh_turns(rejected)
            shape = "hh-rlhf"
        else:
            c_turns = _messages(chosen, loc, "chosen")
            r_turns = _messages(rejected, loc, "rejected")
            shape = "trl-implicit-prompt"
        return (shape, *_pair_from_transcripts(c_turns, r_turns, loc.line))
    if isinstance(prompt, str):
        if not both_str:
            raise loc.fail(
                "'prompt' is a string but 'chosen'/'rejected' are lists; "
                "use strings for all three, or message lists for all three"
            )
        if not prompt.strip():
            raise _Skip(SKIP_EMPTY_PROMPT)
        if _HH_PROMPT.match(prompt):
            # An HH-RLHF transcript cut before the final answer, e.g. "\n\nHuman: q\n\nAssistant:".
            if not chosen.strip() or not rejected.strip():
                raise _Skip(SKIP_EMPTY_COMPLETION)
            body = prompt[: prompt.rstrip().rfind("\n\nAssistant:")]
            record = _prompt_from_prefix(_hh_turns(body), loc.line)
            return "trl-standard-hh", record, chosen.strip(), rejected.strip()
        if not chosen.strip() or not rejected.strip():
            raise _Skip(SKIP_EMPTY_COMPLETION)
        return "trl-standard", PromptRecord(text=prompt, line=loc.line), chosen, rejected
    if not isinstance(prompt, (list, tuple)):
        raise loc.fail(f"'prompt' must be a string or a list of messages, got {_type_name(prompt)}")
    if not both_list:
        raise loc.fail(
            "'prompt' is a list of messages but 'chosen'/'rejected' are strings; "
            "use message lists for all three, or strings for all three"
        )
    p_msgs = _messages(prompt, loc, "prompt")
    c_msgs = _messages(chosen, loc, "chosen")
    r_msgs = _messages(rejected, loc, "rejected")
    c_text, r_text = _single_assistant(c_msgs), _single_assistant(r_msgs)
    if not c_text.strip() or not r_text.strip():
        raise _Skip(SKIP_EMPTY_COMPLETION)
    return "trl-conversational", _prompt_from_prefix(p_msgs, loc.line), c_text, r_text


def read_pairs(path: PathLike) -> tuple[list[ImportedGroup], ImportReport]:
    """Read chosen/rejected pairs (TRL standard, conversational, implicit prompt, HH-RLHF).

    Each usable row becomes a group of two completions, [chosen, rejected], ranked [[0], [1]].
    HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") are split at their final
    Assistant turn: the shared conversation before it becomes the prompt (as user/assistant
    messages, contents stripped) and the two final turns (stripped) the completions. Only a
    blank line followed by "Human:"/"Assistant:" starts a turn; consecutive turns of the same
    speaker are joined into one turn (with a blank line between them).
    A row whose chosen and rejected completions are equal up to whitespace is kept as a tie,
    ranking [[0, 1]], and counted in ``report.extra["ties"]``. A string 'prompt' that is itself
    an HH transcript ending in "Assistant:" is converted to messages the same way (completions
    stripped). Well-formed rows that cannot be split into a prompt and two non-empty final
    assistant turns are skipped and counted by reason in ``report.skipped``; structurally
    malformed rows abort with ``path:line``.
    ``report.extra`` also holds ``rows`` (rows read) and ``shapes`` (rows per detected format).
    """
    groups: list[ImportedGroup] = []
    report = ImportReport()
    shapes: dict[str, int] = {}
    rows = ties = 0
    for loc, row in _rows(path, ("jsonl", "jsonl.gz", "parquet"), columns=("chosen",)):
        rows += 1
        try:
            shape, prompt, chosen, rejected = _pair_row(row, loc)
        except _Skip as skip:
            reason = str(skip.args[0])
            report.skipped[reason] = report.skipped.get(reason, 0) + 1
            continue
        _sized_prompt(prompt, loc)
        _sized(chosen, loc, "the chosen completion")
        _sized(rejected, loc, "the rejected completion")
        shapes[shape] = shapes.get(shape, 0) + 1
        tie = _same_text(chosen, rejected)
        ties += tie
        groups.append(
            ImportedGroup(
                prompt=prompt,
                completions=[chosen, rejected],
                ranking=[[0, 1]] if tie else [[0], [1]],
                line=loc.line,
            )
        )
    report.stored = len(groups)
    report.extra.update(rows=rows, ties=ties, shapes=shapes)
    return groups, report


__all__ = [
    "LABEL_FLAGS",
    "MAX_JSON_DEPTH",
    "MAX_TEXT_CHARS",
    "ROLES",
    "normalize_prompt",
    "ranks_to_tiers",
    "read_labels",
    "read_pairs",
    "read_prompts",
    "read_ranked_groups",
]
