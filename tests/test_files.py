"""Tests for store.files: reading prompts, labels, ranked groups and pairs from user files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from store.errors import PrefloopError
from store.files import (
    normalize_prompt,
    read_labels,
    read_pairs,
    read_prompts,
    read_ranked_groups,
)
from store.records import ImportedGroup, LabelRecord, PromptRecord

HH_FILE = Path(__file__).resolve().parents[2] / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    """Write rows (dicts, or raw strings written as-is) one per line."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def error_of(fn, path: Path) -> str:
    with pytest.raises(PrefloopError) as info:
        fn(path)
    return str(info.value)


# --------------------------------------------------------------------------------------------
# Common file handling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [read_prompts, read_labels, read_ranked_groups, read_pairs])
def test_missing_unknown_and_empty_files(tmp_path: Path, fn) -> None:
    assert "no such file" in error_of(fn, tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("hello\n")
    assert "unsupported file type" in error_of(fn, tmp_path / "x.txt")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n\n")
    assert "no rows" in error_of(fn, empty)


def test_csv_only_for_prompts(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("group_id,annotator\n1,a\n")
    assert "unsupported file type" in error_of(read_labels, path)


def test_bad_json_line_and_non_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, "", "{oops"])
    msg = error_of(read_prompts, path)
    assert msg.startswith(f"{path}:3: not valid JSON")
    path = write_jsonl(tmp_path / "q.jsonl", ["[", '{"prompt": "a"}', "]"])
    assert "JSON array" in error_of(read_prompts, path)
    path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "a"}, "42"])
    assert error_of(read_prompts, path).startswith(f"{path}:2: expected a JSON object")


def test_invalid_utf8_and_bad_gzip(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
    assert error_of(read_prompts, path).startswith(f"{path}:2: not UTF-8")
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(b"not gzip at all")
    assert "gzip" in error_of(read_prompts, gz)


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1 nope")
    assert "not a readable Parquet file" in error_of(read_prompts, path)


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def test_read_prompts_jsonl_and_gz(tmp_path: Path) -> None:
    rows = ["", {"prompt": "What is 2+2?"}, "   ", {"messages": CONV, "extra": 1}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    expected = [
        PromptRecord(text="What is 2+2?", messages=None, line=2),
        PromptRecord(text="Name a colour.", messages=CONV, line=4),
    ]
    assert read_prompts(path) == expected
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    assert read_prompts(gz) == expected
    as_json = tmp_path / "p.json"
    as_json.write_bytes(path.read_bytes())
    assert read_prompts(as_json) == expected


def test_read_prompts_csv(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        'id,prompt\n1,Hello there\n\n2,"multi\nline, with comma"\n3,Last\n', encoding="utf-8"
    )
    assert read_prompts(path) == [
        PromptRecord(text="Hello there", line=2),
        PromptRecord(text="multi\nline, with comma", line=4),
        PromptRecord(text="Last", line=6),
    ]


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        ("text\nhello\n", 1, "the CSV header has no 'prompt' column"),
        ("\n\nid,prompt\n1,ok\n2,\n", 5, "'prompt' is empty"),
        ("id,prompt\n1,ok\n2,a,b\n", 3, "3 fields but the header has 2"),
        ("id,prompt\n1,ok\n2\n", 3, "1 fields but the header has 2"),
        ('id,prompt\n1,"ok\nstill ok"\n2,"unterminated\n', 4, "not valid CSV"),
    ],
)
def test_read_prompts_csv_malformed(tmp_path: Path, content: str, line: int, needle: str) -> None:
    path = tmp_path / "p.csv"
    path.write_text(content, encoding="utf-8")
    msg = error_of(read_prompts, path)
    assert msg.startswith(f"{path}:{line}: "), msg
    assert needle in msg


def test_read_prompts_csv_header_only(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt\n\n", encoding="utf-8")
    assert "no rows" in error_of(read_prompts, path)


def test_read_prompts_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", [{"prompt": "one"}, {"prompt": "two"}])
    assert read_prompts(path) == [PromptRecord("one", line=1), PromptRecord("two", line=2)]
    path = write_parquet(tmp_path / "m.parquet", [{"messages": CONV}])
    assert read_prompts(path) == [PromptRecord("Name a colour.", CONV, line=1)]
    path = write_parquet(tmp_path / "bad.parquet", [{"prompt": "one"}, {"prompt": "  "}])
    assert error_of(read_prompts, path).startswith(f"{path}: row 2: 'prompt' is empty")
    path = write_parquet(tmp_path / "col.parquet", [{"text": "one"}])
    assert "needs a 'prompt' or 'messages' column" in error_of(read_prompts, path)


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"prompt": "   "}, "'prompt' is empty"),
        ({"prompt": 3}, "'prompt' must be a string or a list of messages"),
        ({"text": "hi"}, "missing 'prompt'"),
        ({"prompt": "a", "messages": CONV}, "both 'prompt' and 'messages'"),
        ({"messages": []}, "non-empty list"),
        ({"messages": [{"role": "user"}]}, "content must be a string"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "has role 'bot'"),
        ({"messages": CONV[:3]}, "must end with a user message"),
        ({"messages": [{"role": "user", "content": " \n"}]}, "last user message"),
        ({"messages": ["hi"]}, "must be an object"),
    ],
)
def test_read_prompts_malformed(tmp_path: Path, bad: dict, needle: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "fine"}, "", bad, {"prompt": "x"}])
    msg = error_of(read_prompts, path)
    assert msg.startswith(f"{path}:3: "), msg
    assert needle in msg


def test_normalize_prompt_dedups_whitespace_variants() -> None:
    variants = ["Tell me  a joke", " Tell me a joke\n", "Tell\tme\n\na   joke "]
    assert len({normalize_prompt(v) for v in variants}) == 1
    assert normalize_prompt("Tell me a joke") == "Tell me a joke"
    assert normalize_prompt("Tell me a joke") != normalize_prompt("Tell me a joke!")
    a = [{"role": "user", "content": "Hi  there"}, {"role": "assistant", "content": "Yo"}]
    b = [{"role": "user", "content": " Hi there\n"}, {"role": "assistant", "content": "Yo "}]
    c = [{"role": "system", "content": "Hi  there"}, {"role": "assistant", "content": "Yo"}]
    assert normalize_prompt(a) == normalize_prompt(b) != normalize_prompt(c)
    assert normalize_prompt(PromptRecord("Hi", messages=a)) == normalize_prompt(a)
    assert normalize_prompt(PromptRecord(" Hi ")) == "Hi"


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------


def test_read_labels(tmp_path: Path) -> None:
    rows = [
        {"group_id": 7, "annotator": "ann", "ranking": [[3], [1, 2]]},
        "",
        {
            "group_id": 8,
            "annotator": " bob ",
            "ranking": [[4], [5]],
            "flags": ["all_bad"],
            "comment": "meh",
        },
        {"group_id": 9, "annotator": "ann", "flags": ["skipped"], "comment": None},
        {"group_id": 10, "annotator": "ann", "ranking": None, "flags": ["skipped", "skipped"]},
    ]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    assert read_labels(path) == [
        LabelRecord(7, "ann", [[3], [1, 2]], [], None, line=1),
        LabelRecord(8, "bob", [[4], [5]], ["all_bad"], "meh", line=3),
        LabelRecord(9, "ann", None, ["skipped"], None, line=4),
        LabelRecord(10, "ann", None, ["skipped"], None, line=5),
    ]


def test_read_labels_parquet(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "l.parquet",
        [
            {"group_id": 1, "annotator": "a", "ranking": [[2], [1]], "flags": [], "comment": None},
            {
                "group_id": 2,
                "annotator": "a",
                "ranking": None,
                "flags": ["skipped"],
                "comment": "x",
            },
        ],
    )
    assert read_labels(path) == [
        LabelRecord(1, "a", [[2], [1]], [], None, line=1),
        LabelRecord(2, "a", None, ["skipped"], "x", line=2),
    ]


GOOD_LABEL = {"group_id": 1, "annotator": "a", "ranking": [[1], [2]]}


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({**GOOD_LABEL, "group_id": "1"}, "'group_id' must be an integer"),
        ({**GOOD_LABEL, "group_id": True}, "'group_id' must be an integer"),
        ({**GOOD_LABEL, "annotator": "  "}, "'annotator' must be a non-empty string"),
        ({**GOOD_LABEL, "ranking": []}, "'ranking' must be a list of tiers"),
        ({**GOOD_LABEL, "ranking": [[1], []]}, "'ranking'[1] must be a non-empty list"),
        ({**GOOD_LABEL, "ranking": [1, 2]}, "'ranking'[0] must be a non-empty list"),
        ({**GOOD_LABEL, "ranking": [[1], [True]]}, "ids must be integers"),
        ({**GOOD_LABEL, "ranking": [[1], [2.0]]}, "ids must be integers"),
        ({**GOOD_LABEL, "ranking": [[1, 2], [2]]}, "lists id 2 twice"),
        ({**GOOD_LABEL, "ranking": None}, "missing 'ranking'"),
        ({"group_id": 1, "annotator": "a", "flags": ["all_bad"]}, "missing 'ranking'"),
        ({**GOOD_LABEL, "flags": ["meh"]}, "unknown flag 'meh'"),
        ({**GOOD_LABEL, "flags": "skipped"}, "'flags' must be a list"),
        ({**GOOD_LABEL, "comment": 5}, "'comment' must be a string or null"),
    ],
)
def test_read_labels_malformed(tmp_path: Path, bad: dict, needle: str) -> None:
    path = write_jsonl(tmp_path / "l.jsonl", [GOOD_LABEL, GOOD_LABEL, "", bad, GOOD_LABEL])
    msg = error_of(read_labels, path)
    assert msg.startswith(f"{path}:4: "), msg
    assert needle in msg


# --------------------------------------------------------------------------------------------
# Ranked groups
# --------------------------------------------------------------------------------------------


def test_read_ranked_groups(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Q1", "completions": ["a", "b", "c"], "ranks": [3, 1, 3]},
        {"messages": CONV, "completions": ["x", "y"], "ranks": [1, 1]},
        {"prompt": "Q3", "completions": ["p", "q", "r", "s"], "ranks": [2, 4, 1, 3]},
    ]
    expected = [
        ImportedGroup(PromptRecord("Q1", line=1), ["a", "b", "c"], [[1], [0, 2]], line=1),
        ImportedGroup(PromptRecord("Name a colour.", CONV, line=2), ["x", "y"], [[0, 1]], line=2),
        ImportedGroup(
            PromptRecord("Q3", line=3), ["p", "q", "r", "s"], [[2], [0], [3], [1]], line=3
        ),
    ]
    assert read_ranked_groups(write_jsonl(tmp_path / "g.jsonl", rows)) == expected
    assert read_ranked_groups(write_parquet(tmp_path / "g.parquet", [rows[0], rows[2]])) == [
        expected[0],
        ImportedGroup(
            PromptRecord("Q3", line=2), ["p", "q", "r", "s"], [[2], [0], [3], [1]], line=2
        ),
    ]


GOOD_GROUP = {"prompt": "Q", "completions": ["a", "b"], "ranks": [1, 2]}


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({**GOOD_GROUP, "completions": ["a"], "ranks": [1]}, "at least 2 strings"),
        ({**GOOD_GROUP, "completions": "ab"}, "at least 2 strings"),
        ({**GOOD_GROUP, "completions": ["a", " "]}, "'completions'[1] must be a non-empty"),
        ({**GOOD_GROUP, "completions": ["a", 2]}, "'completions'[1] must be a non-empty"),
        ({**GOOD_GROUP, "ranks": [1]}, "'ranks' must be a list of 2 integers"),
        ({**GOOD_GROUP, "ranks": [1, 0]}, "ranks must be integers >= 1"),
        ({**GOOD_GROUP, "ranks": [1, 1.5]}, "ranks must be integers >= 1"),
        ({**GOOD_GROUP, "ranks": [1, False]}, "ranks must be integers >= 1"),
        ({"completions": ["a", "b"], "ranks": [1, 2]}, "missing 'prompt'"),
    ],
)
def test_read_ranked_groups_malformed(tmp_path: Path, bad: dict, needle: str) -> None:
    path = write_jsonl(tmp_path / "g.jsonl", [GOOD_GROUP, bad, GOOD_GROUP])
    msg = error_of(read_ranked_groups, path)
    assert msg.startswith(f"{path}:2: "), msg
    assert needle in msg


def test_read_ranked_groups_parquet_malformed(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "g.parquet", [GOOD_GROUP, {**GOOD_GROUP, "ranks": [1, -2]}])
    assert error_of(read_ranked_groups, path).startswith(f"{path}: row 2: 'ranks'[1]")


# --------------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------------

HH_ROW = {
    "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me\na joke. \n\n"
    "Assistant: Why did the chicken\n\ncross the road?  ",
    "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me\na joke.\n\n"
    "Assistant: No.",
}
HH_PROMPT = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Tell me\na joke."},
]


def test_read_pairs_all_shapes(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Capital of France?", "chosen": " Paris.", "rejected": " Rome."},
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        {
            "chosen": [*CONV, {"role": "assistant", "content": "Blue"}],
            "rejected": [*CONV, {"role": "assistant", "content": "Seven"}],
        },
        HH_ROW,
        "",
        {"prompt": "Same?", "chosen": "yes", "rejected": " yes\n"},
    ]
    groups, report = read_pairs(write_jsonl(tmp_path / "pairs.jsonl", rows))
    assert groups == [
        ImportedGroup(
            PromptRecord("Capital of France?", line=1), [" Paris.", " Rome."], [[0], [1]], 1
        ),
        ImportedGroup(
            PromptRecord("2+2?", [{"role": "user", "content": "2+2?"}], line=2),
            ["4", "5"],
            [[0], [1]],
            2,
        ),
        ImportedGroup(
            PromptRecord("Name a colour.", CONV, line=3), ["Blue", "Seven"], [[0], [1]], 3
        ),
        ImportedGroup(
            PromptRecord("Tell me\na joke.", HH_PROMPT, line=4),
            ["Why did the chicken\n\ncross the road?", "No."],
            [[0], [1]],
            4,
        ),
        ImportedGroup(PromptRecord("Same?", line=6), ["yes", " yes\n"], [[0, 1]], 6),
    ]
    assert report.stored == 5
    assert report.skipped == {}
    assert report.extra["rows"] == 5
    assert report.extra["ties"] == 1
    assert report.extra["shapes"] == {
        "trl-standard": 2,
        "trl-conversational": 1,
        "trl-implicit-prompt": 1,
        "hh-rlhf": 1,
    }


def test_read_pairs_standard_with_hh_prompt(tmp_path: Path) -> None:
    row = {
        "prompt": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me\na joke."
        "\n\nAssistant:",
        "chosen": " Knock knock.",
        "rejected": " No.\n",
    }
    groups, report = read_pairs(write_jsonl(tmp_path / "p.jsonl", [row]))
    assert groups == [
        ImportedGroup(
            PromptRecord("Tell me\na joke.", HH_PROMPT, line=1),
            ["Knock knock.", "No."],
            [[0], [1]],
            1,
        )
    ]
    assert report.extra["shapes"] == {"trl-standard-hh": 1}


def test_read_pairs_parquet(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "p.parquet", [HH_ROW, HH_ROW])
    groups, report = read_pairs(path)
    assert [g.line for g in groups] == [1, 2]
    assert groups[0].prompt.messages == HH_PROMPT
    assert report.stored == 2


def test_read_pairs_hh_edge_cases(tmp_path: Path) -> None:
    rows = [
        # Transcripts diverge before the final Assistant turn.
        {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"},
        # Empty final Assistant turn.
        {"chosen": "\n\nHuman: A\n\nAssistant:", "rejected": "\n\nHuman: A\n\nAssistant: y"},
        {"chosen": "\n\nHuman: A\n\nAssistant: ", "rejected": "\n\nHuman: A\n\nAssistant: y"},
        # No Assistant turn; not ending with one; no Human turn before it.
        {"chosen": "just text", "rejected": "other text"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: B", "rejected": "\n\nHuman: A"},
        {"chosen": "\n\nAssistant: x", "rejected": "\n\nAssistant: y"},
        # Without the leading blank line, and repeated Assistant markers joined into one turn.
        {
            "chosen": "Human: A\n\nAssistant: part one\n\nAssistant: part two",
            "rejected": "Human: A\n\nAssistant: other  Human: fake turn",
        },
    ]
    groups, report = read_pairs(write_jsonl(tmp_path / "hh.jsonl", rows))
    assert groups == [
        ImportedGroup(
            PromptRecord("A", [{"role": "user", "content": "A"}], line=7),
            ["part one\n\npart two", "other  Human: fake turn"],
            [[0], [1]],
            7,
        )
    ]
    assert report.stored == 1
    assert report.skipped == {
        "chosen and rejected differ before the final Assistant turn": 1,
        "empty final Assistant turn": 2,
        "no Assistant turn": 1,
        "transcript does not end with an Assistant turn": 1,
        "no Human turn before the final Assistant turn": 1,
    }


def test_read_pairs_skips_unsplittable_trl_rows(tmp_path: Path) -> None:
    user = [{"role": "user", "content": "Q"}]
    rows = [
        {"prompt": "Q", "chosen": "", "rejected": "b"},
        {"prompt": " ", "chosen": "a", "rejected": "b"},
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "?"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        },
        {
            "chosen": [*user, {"role": "assistant", "content": "a"}],
            "rejected": [
                {"role": "user", "content": "other"},
                {"role": "assistant", "content": "b"},
            ],
        },
    ]
    groups, report = read_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert groups == []
    assert report.stored == 0
    assert report.skipped == {
        "empty final Assistant turn": 1,
        "empty prompt": 1,
        "completion is not a single assistant message": 1,
        "chosen and rejected differ before the final Assistant turn": 1,
    }


GOOD_PAIR = {"prompt": "Q", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        ({"prompt": "Q", "chosen": "a"}, "missing 'rejected'"),
        ({"prompt": "Q", "rejected": "b"}, "missing 'chosen'"),
        ({"prompt": "Q", "chosen": 1, "rejected": "b"}, "both must be strings or both lists"),
        (
            {"prompt": "Q", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
            "both must be strings or both lists",
        ),
        ({"prompt": "Q", "chosen": [], "rejected": []}, "'prompt' is a string but"),
        ({"prompt": 5, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list"),
        (
            {"prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"},
            "'prompt' is a list of messages but",
        ),
        (
            {
                "chosen": [{"role": "x", "content": "a"}],
                "rejected": [{"role": "x", "content": "b"}],
            },
            "has role 'x'",
        ),
        ({"chosen": [], "rejected": []}, "'chosen' must be a non-empty list"),
    ],
)
def test_read_pairs_malformed(tmp_path: Path, bad: dict, needle: str) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD_PAIR, GOOD_PAIR, bad])
    msg = error_of(read_pairs, path)
    assert msg.startswith(f"{path}:3: "), msg
    assert needle in msg


def test_read_pairs_hh_shared_file() -> None:
    if not HH_FILE.exists():
        pytest.skip(f"{HH_FILE} not present")
    groups, report = read_pairs(HH_FILE)
    assert report.extra["rows"] == 2312
    assert report.stored == len(groups) == 2308
    assert report.skipped == {"empty final Assistant turn": 4}
    assert report.extra["ties"] == 0
    assert report.extra["shapes"] == {"hh-rlhf": 2308}
    for g in groups:
        assert g.ranking == [[0], [1]]
        assert all(c and c == c.strip() for c in g.completions)
        msgs = g.prompt.messages
        assert msgs and msgs[-1]["role"] == "user" and msgs[-1]["content"] == g.prompt.text
        roles = [m["role"] for m in msgs]
        assert roles[::2] == ["user"] * len(roles[::2])
        assert roles[1::2] == ["assistant"] * len(roles[1::2])
    first = groups[0]
    assert first.line == 1
    assert first.prompt.text == "okay some of these do not have anything to do with pens"
    assert len(first.prompt.messages) == 5
    assert first.completions[0].startswith("No, sorry!  All of these involve a pen")
