"""How candidates are shown: the safe renderer case by case, the annotator page drawing it (and
the label recording the view), and the export flag for pairs judged on a changed view."""

from __future__ import annotations

import json
import re

import duckdb
import pandas as pd
import pytest
from markdown_it import MarkdownIt

from labeling import candidate_render
from labeling.candidate_render import RENDERER_VERSION, render, view_hash, views_differ
from labeling.curation import freeze_versions
from labeling.exporting import export_dataset
from labeling.safe_text import WORD_JOINER
from store import db as storedb
from store import labels
from store.errors import PrefloopError
from store.records import LabelRecord
from tests.cli_helpers import read_jsonl
from tests.fixtures_app import add_prompts, make_workspace, seed_round
from tests.test_app import click, letter_ids, open_app

# A CommonMark + tables reader stands in for the browser's: what it makes of the segments
_READER = MarkdownIt("commonmark", {"html": True}).enable(["table", "strikethrough"])


def html(text: str) -> str:
    """The HTML every Markdown segment of text's view turns into."""
    segments = [s.text for s in render(text).segments if s.kind == "markdown"]
    return _READER.render("\n\n".join(segments))


def literal(text: str) -> str:
    """What a reader sees of text's Markdown segments: escapes and word joiners dropped."""
    joined = "\n".join(s.text for s in render(text).segments if s.kind == "markdown")
    return re.sub(r"\\(.)", r"\1", joined).replace(WORD_JOINER, "")


# ----------------------------------------------------------------------------------------------
# the renderer


def test_fenced_code_becomes_a_code_segment_in_its_language():
    text = "Try this:\n\n```Python\ndef f(x):\n    return x * 2  # <b>\n```\n\nDone."
    kinds = [(s.kind, s.language) for s in render(text).segments]
    assert kinds == [("markdown", None), ("code", "python"), ("markdown", None)]
    code = render(text).segments[1]
    assert code.text == "def f(x):\n    return x * 2  # <b>"  # exact, layout kept
    assert [s.language for s in render("```\nplain\n```").segments] == [None]
    assert [s.language for s in render("```mermaid\ngraph TD\n```").segments] == [None]
    assert render("    indented\n    code").segments[0].kind == "code"


def test_lists_headings_emphasis_and_tables_stay_markdown():
    text = (
        "# Plan\n\n- **first** step\n- *second*\n\n1. one\n2. `two`\n\n"
        "| a | b |\n|---|:-:|\n| 1 | 2 |"
    )
    out = html(text)
    assert "<h3>Plan</h3>" in out  # an answer's heading sits below the page's own
    assert "<ul>" in out and "<strong>first</strong>" in out and "<em>second</em>" in out
    assert "<ol>" in out and "<code>two</code>" in out
    assert "<table>" in out and '<th style="text-align:center">b</th>' in out
    assert not render(text).view_differs


def test_a_code_block_inside_a_list_stays_a_highlighted_fence():
    out = render("- step:\n\n  ```bash\n  ls -l\n  ```").segments
    assert [s.kind for s in out] == ["markdown"]
    assert "```bash\nls -l\n```" in out[0].text.replace("  ", "")


def test_images_are_never_loaded_but_shown_as_text():
    text = "See ![a chart](http://127.0.0.1:9/x.png) here"
    out = html(text)
    assert "<img" not in out
    assert "[image: a chart](http://127.0.0.1:9/x.png)" in literal(text)
    assert render(text).changes["image"] == 1 and render(text).view_differs


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("[click](javascript:alert(1))", "[click](javascript:alert(1))"),
        ("[docs](http://example.com/a)", "[docs](http://example.com/a)"),
        ("<http://example.com>", "<http://example.com>"),
        ("go to http://example.com or www.example.com", "http://example.com or www.example.com"),
    ],
)
def test_links_are_text_not_links(text, shown):
    out = html(text)
    assert "<a " not in out
    assert shown in literal(text)
    joined = "".join(s.text for s in render(text).segments)
    assert "http://" not in joined and "www." not in joined  # Streamlit's autolinks are blocked


@pytest.mark.parametrize(
    "text",
    [
        ":red[verified]",
        ":material/check_circle: done",
        "great job :tada: :streamlit:",
        "$5 and $10",
        "$$x^2$$",
        "<img src=x onerror=alert(1)>",
        "<script>alert(1)</script>",
        "<!-- hidden --> note",
        "a &amp; b &lt;tag&gt;",
    ],
)
def test_extensions_latex_html_and_entities_are_shown_literally(text):
    out = html(text)
    assert "<img" not in out and "<script" not in out and "<!--" not in out
    assert literal(text) == text
    joined = "".join(s.text for s in render(text).segments)
    # Streamlit's directives, icons, emoji and math need these exact unescaped sequences
    assert not re.search(r"(?<!\\):(red\[|material/|tada:|streamlit:)", joined)
    assert not re.search(r"(?<!\\)\$", joined)


def test_what_shows_literally_is_counted_as_a_changed_view():
    changes = render("<b>x</b> :red[y] $5 and $10 ![i](u) [l](http://e.com) a\u200bb").changes
    assert changes == {
        "invisible": 1,
        "html": 2,
        "directive": 1,
        "latex": 1,
        "image": 1,
        "link": 1,
    }
    assert not render(
        "Plain answer: 12:30, costs 5 dollars.\n\n```py\n<b>$x$</b>\n```"
    ).view_differs


@pytest.mark.parametrize(
    ("char", "marker"),
    [
        ("\u200b", "⟨U+200B⟩"),  # zero-width space
        ("\u200d", "⟨U+200D⟩"),  # zero-width joiner
        ("\ufeff", "⟨U+FEFF⟩"),  # byte order mark
        ("\u202e", "⟨U+202E⟩"),  # right-to-left override
        ("\u202a", "⟨U+202A⟩"),
        ("\u2066", "⟨U+2066⟩"),  # left-to-right isolate
        ("\u2069", "⟨U+2069⟩"),
        ("\u00ad", "⟨U+00AD⟩"),  # soft hyphen (another format character)
        ("\U000e0041", "⟨U+E0041⟩"),  # a tag character (hidden ASCII)
        ("\x07", "⟨U+0007⟩"),  # a control character
        ("\x1b", "⟨U+001B⟩"),  # an ANSI escape's start
        ("\u2028", "⟨U+2028⟩"),  # line separator
        ("\u3164", "⟨U+3164⟩"),  # Hangul filler: a blank letter
    ],
)
def test_invisible_characters_are_made_visible_and_counted(char, marker):
    text = f"pay {char}admin{char} now"
    r = render(text)
    assert r.raw == f"pay {marker}admin{marker} now"
    assert f"pay {marker}admin{marker} now" in literal(text)
    assert r.invisible == 2 and r.view_differs
    assert r.invisible_note() == f"2 invisible characters shown as {marker}"


def test_ansi_escapes_inside_code_are_visible_too():
    r = render("```\n\x1b[31mred\x1b[0m\n```")
    assert r.segments[0].text == "⟨U+001B⟩[31mred⟨U+001B⟩[0m"
    assert r.invisible_note() == "2 invisible characters shown as ⟨U+001B⟩"


def test_line_breaks_and_tabs_are_not_invisible_characters():
    r = render("a\r\nb\n\tc")
    assert r.invisible == 0 and r.invisible_note() is None and not r.view_differs
    assert render("a\rb").invisible == 1  # a lone carriage return is


def test_long_candidates_are_marked_long():
    assert not render("x" * 1500).long and render("x" * 1501).long
    assert not render("\n".join(["l"] * 40)).long and render("\n".join(["l"] * 41)).long


def test_view_hash_follows_the_visible_text_not_the_order_shown():
    texts = {3: "a **b**", 1: "c"}
    assert view_hash(texts) == view_hash({1: "c", 3: "a **b**"})
    assert len(view_hash(texts)) == 16 and re.fullmatch(r"[0-9a-f]+", view_hash(texts))
    assert view_hash(texts) != view_hash({3: "a *b*", 1: "c"})
    assert view_hash(texts) != view_hash({3: "c", 1: "a **b**"})  # which candidate is which
    assert candidate_render.label_view([1, 3], ["c", "a **b**"]) == (
        RENDERER_VERSION,
        view_hash(texts),
    )


def test_views_differ_by_text_and_by_recorded_hash():
    ids, texts = [1, 2], ["fine", "has\u200bzero width"]
    current = view_hash(dict(zip(ids, texts, strict=True)))
    assert views_differ(ids, texts, []) == [False, True]
    assert views_differ(ids, texts, [current, None]) == [False, True]
    assert views_differ(ids, texts, [current, "0123456789abcdef"]) == [True, True]
    assert views_differ(ids, ["a", "b"], [None]) == [False, False]  # imported: no hash


# ----------------------------------------------------------------------------------------------
# the annotator page (AppTest on the real script and a real workspace)


@pytest.fixture
def ws(tmp_path, monkeypatch) -> storedb.Workspace:
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


CODE_ANSWER = "Use this:\n\n```python\nprint('hi')\n```\n\nand **done**\u200b."


def test_annotator_page_shows_code_raw_and_long_answers_and_the_label_records_the_view(ws):
    long_answer = "\n".join(f"line {i}" for i in range(60))
    seeded = seed_round(ws, n_groups=1, k=3, first_texts=[CODE_ANSWER, long_answer])
    gid, cids, texts = seeded.group_ids[0], seeded.candidate_ids[0], seeded.texts[0]
    at = open_app(annotator="ula")
    assert not at.exception

    [code] = [c for c in at.code if c.value == "print('hi')"]
    assert code.proto.language == "python"
    markdown = [m.value for m in at.markdown]
    assert any("and **done**⟨U+200B⟩." in m for m in markdown)
    assert "1 invisible character shown as ⟨U+200B⟩" in [w.value for w in at.warning]
    [long_box] = [e for e in at.expander if e.label.startswith("Long answer (60 lines")]
    assert not long_box.proto.expanded
    assert any("line 59" in m.value for m in long_box.markdown)
    letter = {cid: name for name, cid in letter_ids("ula", gid, cids).items()}
    # the long candidate's ranking controls stay outside its collapsed expander
    assert not long_box.button and at.button(key=f"rank_{letter[cids[1]]}")

    at.toggle(key=f"raw_{gid}_{letter[cids[0]]}").set_value(True).run()
    assert not at.exception
    assert CODE_ANSWER.replace("\u200b", "⟨U+200B⟩") in [c.value for c in at.code]

    for key in ("rank_A", "rank_B", "rank_C", "submit"):
        click(at, key)
    with storedb.connect(ws) as con:
        row = labels.labels(con).iloc[0]
    assert row["render_version"] == RENDERER_VERSION
    assert row["render_hash"] == view_hash(dict(zip(cids, texts, strict=True)))


def test_prompts_are_rendered_too(ws):
    from store import prompts, rounds
    from store.records import PromptRecord

    turns = [{"role": "user", "content": "Fix:\n\n```js\nlet x = 1\n```\n:red[now] $5 and $6"}]
    with storedb.connect(ws) as con:
        [pid], _ = prompts.upsert_prompts(con, [PromptRecord("Fix", turns)], "train", "t")
        rid = rounds.create_round(con, "base", "train", 2, {}, "sampled")
        rounds.add_group(con, rid, pid, [rounds.CandidateRecord("a"), rounds.CandidateRecord("b")])
    at = open_app(annotator="vic")
    assert any(c.value == "let x = 1" and c.proto.language == "js" for c in at.code)
    assert "\\:red\\[now\\] \\$5 and \\$6" in [m.value for m in at.markdown]
    assert "[user]" in [t.value for t in at.text]


# ----------------------------------------------------------------------------------------------
# the export flag


def test_exported_pairs_say_when_the_view_differs_from_the_text(tmp_path):
    from store import rounds

    ws = make_workspace(tmp_path / "ws")
    texts = [
        ["clean one", "clean two"],  # labelled on the current view
        ["clean", "hidden\u200bspace"],  # the renderer made a character visible
        ["same", "text"],  # labelled on another view (an older renderer)
        ["imported", "label"],  # no recorded view
    ]
    pids = add_prompts(ws, [f"prompt {g}" for g in range(4)])
    records = []
    with storedb.connect(ws) as con:
        rid = rounds.create_round(con, "base", "train", 2, {}, "sampled")
        for g, (pid, pair) in enumerate(zip(pids, texts, strict=True)):
            gid, cids = rounds.add_group(con, rid, pid, [rounds.CandidateRecord(t) for t in pair])
            version, digest = candidate_render.label_view(cids, pair)
            if g == 2:
                digest = "0" * 16
            if g == 3:
                version = digest = None
            records.append(
                LabelRecord(
                    gid, "ann", [[cids[0]], [cids[1]]], render_version=version, render_hash=digest
                )
            )
        labels.add_labels(con, records)
        stored = labels.labels(con).set_index("group_id")
    assert list(stored["render_hash"].fillna("-"))[2:] == ["0" * 16, "-"]
    assert list(stored["render_version"].fillna("-")) == [RENDERER_VERSION] * 3 + ["-"]

    version = freeze_versions(ws).train
    path, n = export_dataset(ws, "pairs", tmp_path / "out" / "pairs.jsonl", version)
    rows = {row["chosen"]: row for row in read_jsonl(path)}
    assert n == 4
    assert {c: rows[c]["view_differs"] for c in ("clean one", "clean", "same", "imported")} == {
        "clean one": False,
        "clean": True,
        "same": True,
        "imported": False,
    }
    assert "view_differs" in (path.parent / "README.md").read_text()

    path, _ = export_dataset(ws, "listwise", tmp_path / "out2" / "list.jsonl", version)
    flags = {tuple(row["completions"]): row["view_differs"] for row in read_jsonl(path)}
    assert flags[("clean", "hidden\u200bspace")] == [False, True]


# ----------------------------------------------------------------------------------------------
# the schema: an older workspace gains the columns, revisions keep the view they replace


def test_an_older_workspace_migrates_and_its_labels_have_no_view(tmp_path):
    old = storedb.create(tmp_path / "old", base_model="m", upto=6)
    r = seed_round(old, n_groups=1, k=2)
    with duckdb.connect(str(old.db_path)) as raw:  # a label written by the older schema
        raw.execute(
            "INSERT INTO labels (group_id, annotator, ranking, flags) VALUES (?, 'old', ?, '[]')",
            [r.group_ids[0], json.dumps([[c] for c in r.candidate_ids[0]])],
        )
    with storedb.connect(old) as con:
        assert storedb.schema_version(con) == storedb.SCHEMA_VERSION
        row = labels.labels(con).iloc[0]
    assert row["annotator"] == "old" and pd.isna(row["render_hash"])


def test_a_revision_keeps_the_view_of_the_label_it_replaces(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    r = seed_round(ws, n_groups=1, k=2)
    gid, cids = r.group_ids[0], r.candidate_ids[0]
    with storedb.connect(ws) as con:
        labels.add_labels(con, [LabelRecord(gid, "ann", [[cids[0]], [cids[1]]], render_hash="a1")])
        labels.revise_label(
            con,
            LabelRecord(
                gid, "ann", [[cids[1]], [cids[0]]], render_version="md-1", render_hash="b2"
            ),
        )
        current = labels.labels(con).iloc[0]
        kept = con.execute("SELECT render_hash FROM label_revisions").fetchall()
        with pytest.raises(PrefloopError, match="render_hash must be a short string"):
            labels.add_labels(
                con, [LabelRecord(gid, "bob", [[cids[0]], [cids[1]]], render_hash="x" * 100)]
            )
    assert (current["render_version"], current["render_hash"]) == ("md-1", "b2")
    assert kept == [("a1",)]
