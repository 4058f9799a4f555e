"""Import edge cases: hostile files and pipes give one clear line, and nothing half-stored."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from store import db
from store.files import MAX_JSON_DEPTH, MAX_TEXT_CHARS
from tests.cli_helpers import ROOT, cli, cli_error, write_jsonl

GOOD_ROWS = {
    "prompts": {"prompt": "Say hi."},
    "labels": {"group_id": 1, "annotator": "ann", "ranking": [[1], [2]]},
    "groups": {"prompt": "Say hi.", "completions": ["hi", "hello"], "ranks": [1, 2]},
    "pairs": {"prompt": "Say hi.", "chosen": "hi", "rejected": "go away"},
}


def _snapshot(ws: Path) -> dict[str, object]:
    """Row counts of every main table plus the stored prompts, groups and labels themselves."""
    with db.connect(db.workspace(ws)) as con:
        return {
            **db.table_counts(con),
            "prompt_rows": con.execute("SELECT * FROM prompts ORDER BY id").fetchall(),
            "candidate_rows": con.execute("SELECT * FROM candidates ORDER BY id").fetchall(),
            "label_rows": con.execute("SELECT * FROM labels ORDER BY 1").fetchall(),
        }


@pytest.fixture
def ws(tmp_path: Path, capsys) -> Path:
    """A workspace with one imported ranked group (so labels can refer to group 1)."""
    root = tmp_path / "ws"
    cli(capsys, "init", "-w", root, "--model", "unused")
    src = write_jsonl(tmp_path / "seed.jsonl", [GOOD_ROWS["groups"]])
    cli(capsys, "groups", "import", src, "-w", root)
    return root


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _with_extra(what: str, depth: int, annotator: str = "ann") -> str:
    """A good row of `what` whose ignored 'extra' field makes the row `depth` levels deep."""
    row = {**GOOD_ROWS[what], "annotator": annotator} if what == "labels" else GOOD_ROWS[what]
    nested = "[" * (depth - 1) + "]" * (depth - 1)
    return json.dumps(row)[:-1] + f', "extra": {nested}}}'


@pytest.mark.parametrize("what", ["prompts", "labels", "groups", "pairs"])
def test_deeply_nested_json_is_refused_with_file_line(what, ws: Path, tmp_path: Path, capsys):
    before = _snapshot(ws)
    src = tmp_path / f"deep-{what}.jsonl"
    good = json.dumps(GOOD_ROWS[what])
    src.write_text(f"{good}\n\n{_with_extra(what, 5000, 'other')}\n")  # line 3 is the bad one
    err = cli_error(capsys, what, "import", src, "-w", ws)
    assert f"{src}:3: " in err
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in err
    assert "Recursion" not in err
    # one level past the limit (which Python itself parses) is refused the same way
    src.write_text(f"{good}\n{_with_extra(what, MAX_JSON_DEPTH + 1, 'other')}\n")
    err = cli_error(capsys, what, "import", src, "-w", ws)
    assert f"{src}:2: " in err and f"nested deeper than {MAX_JSON_DEPTH} levels" in err
    assert _snapshot(ws) == before
    # at the limit the row is read like any other
    src.write_text(f"{good}\n{_with_extra(what, MAX_JSON_DEPTH, 'other')}\n")
    cli(capsys, what, "import", src, "-w", ws)


def test_password_stdin_that_is_not_utf8_is_a_clear_error(ws: Path, capsys, monkeypatch):
    for errors in ("strict", "surrogateescape"):  # how Python decodes stdin depends on the locale
        raw = io.BytesIO(b"correct-horse\xff\xfebattery\n")
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(raw, "utf-8", errors=errors))
        err = cli_error(
            capsys, "users", "add", "bob", "--role", "annotator", "--password-stdin", "-w", ws
        )
        assert "not UTF-8" in err and "nothing was changed" in err
    # as a user runs it: a real process reading a real pipe
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "users",
            "add",
            "bob",
            "--role",
            "annotator",
            "--password-stdin",
            "-w",
            str(ws),
        ],
        input=b"correct-horse\xff\xfebattery\n",
        capture_output=True,
        cwd=ROOT,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr and b"not UTF-8" in proc.stderr
    assert "bob" not in cli(capsys, "users", "list", "-w", ws)


def test_pairs_import_with_every_row_skipped_fails_and_says_why(ws: Path, tmp_path: Path, capsys):
    before = _snapshot(ws)
    src = write_jsonl(
        tmp_path / "useless.jsonl",
        [
            {"chosen": "no turns at all", "rejected": "none here either"},
            {"prompt": "Say hi.", "chosen": "", "rejected": "hello"},
            {"prompt": "Say bye.", "chosen": "bye", "rejected": "  "},
        ],
    )
    err = cli_error(capsys, "pairs", "import", src, "-w", ws)
    assert "round None" not in err
    assert "none of the 3 rows" in err
    assert "2 empty final Assistant turn" in err and "1 no Assistant turn" in err
    assert "nothing was imported" in err
    assert _snapshot(ws) == before


def test_duplicate_rows_in_groups_import_are_counted_and_skipped(ws, tmp_path, capsys):
    before = _snapshot(ws)
    row = {"prompt": "Name a colour.", "completions": ["red", "blue", "green"], "ranks": [1, 2, 3]}
    same = {
        "prompt": " Name  a colour. ",
        "completions": ["green", "red", "blue"],
        "ranks": [3, 1, 2],
    }
    other = {**row, "ranks": [3, 2, 1]}  # the same candidates ranked otherwise: a new opinion
    src = write_jsonl(tmp_path / "g.jsonl", [row, row, same, other])
    out = cli(capsys, "groups", "import", src, "-w", ws)
    assert "imported 2 ranked groups as round 2; skipped 2 duplicate rows" in out
    after = _snapshot(ws)
    assert after["groups"] == before["groups"] + 2
    assert after["labels"] == before["labels"] + 2


def test_duplicate_rows_in_pairs_import_are_counted_and_skipped(ws, tmp_path, capsys):
    before = _snapshot(ws)
    pair = {"prompt": "Say hi.", "chosen": "hi", "rejected": "go away"}
    hh = {
        "chosen": "\n\nHuman: Say bye.\n\nAssistant: bye",
        "rejected": "\n\nHuman: Say bye.\n\nAssistant: no",
    }
    swapped = {**pair, "chosen": "go away", "rejected": "hi"}  # a contradiction, not a copy
    src = write_jsonl(
        tmp_path / "p.jsonl", [pair, hh, pair, {**pair, "chosen": " hi "}, hh, swapped]
    )
    out = cli(capsys, "pairs", "import", src, "-w", ws)
    assert "imported 3 pairs as groups of two in round 2" in out
    assert "skipped 3 duplicate rows" in out
    after = _snapshot(ws)
    assert after["groups"] == before["groups"] + 3
    assert after["candidates"] == before["candidates"] + 6


def test_texts_over_the_size_limit_are_refused_per_row(ws: Path, tmp_path: Path, capsys):
    before = _snapshot(ws)
    huge = "x" * (5 * 1024 * 1024)  # one 5 MB line, as a scraped page would be
    limit = f"{MAX_TEXT_CHARS:,} characters"
    cases = [
        ("prompts", "p.jsonl", {"prompt": huge}),
        (
            "prompts",
            "m.jsonl",
            {"messages": [{"role": "system", "content": huge}, {"role": "user", "content": "hi"}]},
        ),
        ("groups", "g.jsonl", {"prompt": "q", "completions": ["a", huge], "ranks": [1, 2]}),
        ("pairs", "t.jsonl", {"prompt": "q", "chosen": huge, "rejected": "b"}),
        (
            "pairs",
            "h.jsonl",
            {
                "chosen": f"\n\nHuman: {huge}\n\nAssistant: a",
                "rejected": f"\n\nHuman: {huge}\n\nAssistant: b",
            },
        ),
    ]
    for what, name, bad in cases:
        src = write_jsonl(tmp_path / name, [GOOD_ROWS[what], bad])
        err = cli_error(capsys, what, "import", src, "-w", ws)
        assert f"{src}:2: " in err and limit in err, err
    (tmp_path / "p.csv").write_text(f"prompt\nhello\n{huge}\n")
    err = cli_error(capsys, "prompts", "import", tmp_path / "p.csv", "-w", ws)
    assert f"{tmp_path / 'p.csv'}:3: " in err and limit in err
    assert _snapshot(ws) == before
    at_limit = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "y" * MAX_TEXT_CHARS}])
    assert "imported 1 prompts" in cli(capsys, "prompts", "import", at_limit, "-w", ws)


@pytest.mark.parametrize("args", [["rounds", "list"], ["status"]], ids=" ".join)
def test_output_into_a_closed_pipe_exits_quietly(args, ws: Path):
    """`prefloop … | head -1`: the reader went away before prefloop wrote; no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already exited
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", *args, "-w", str(ws)],
            stdout=write_end,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=_env(),
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert proc.stderr.decode() == ""  # no traceback, no "Exception ignored"
    assert proc.returncode == 141  # as a process killed by SIGPIPE reports it
