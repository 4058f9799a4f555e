"""Untrusted text stays text: the safe renderer on hostile inputs, annotator names checked
where they are created, and the pages that show names, filters and guidelines."""

from __future__ import annotations

import re

import pytest
from markdown_it import MarkdownIt

from labeling.safe_text import WORD_JOINER, code_span, plain, safe_markdown
from store import db as storedb
from store import gold, labels, rounds, users
from store.records import LabelRecord
from tests.cli_helpers import cli, cli_error, write_jsonl
from tests.fixtures_app import make_workspace, seed_round
from tests.test_app import click, open_app

SINK = "http://127.0.0.1:9/x.png"
HOSTILE_NAME = f"![a]({SINK}) :red[EVIL]"
HOSTILE_GUIDELINES = f"Prefer **short** answers.\n\n![a]({SINK}) :red[EVIL] $x^2$"
HOSTILE = [
    f"![a]({SINK})",
    "[click](http://example.org) <http://example.org>",
    "<img src=x onerror=alert(1)><b>bold</b>",
    ":red[EVIL] :blue-background[x] ::red[t]",
    "$x$ and $$x^2$$ and \\(y\\)",
    "[[a](b)](c) ![[x]](y)",
    "a\\b \\[x] \\:red[y] trailing\\",
    ":material/warning: :streamlit: :smile:",
    "www.example.org ann@example.org https://example.org",
    "a -> b <- c -- d >= e",
    "# heading\n1. item\n2) item\n- dash\n+ plus\n> quote\n===\n    indented code",
    "**bold** _em_ ~~gone~~ `code` | a | b |",
    "&amp; &#60;b&#62; &lt;",
    "```mermaid\ngraph TD; A-->B\n```",
]
# Streamlit's own passes over the text after parsing (see labeling/safe_text.py)
STREAMLIT_TEXT_EFFECTS = {
    "icon": re.compile(r":material_\w+:"),
    "logo": re.compile(r":streamlit:"),
    "emoji": re.compile(r":(?=[\w+-]*[A-Za-z_+-])[\w+-]+:"),  # not a time's ":50:"
    "url link": re.compile(r"https?://|www\.", re.I),
    "e-mail link": re.compile(r"[-.\w+]+@[-\w]+\."),
    "arrow": re.compile(r"(^|\s)(<->|->|<-|--|>=|<=|~=)(\s|$)"),
}
SPEC = MarkdownIt("commonmark").enable(["strikethrough", "table"])


def rendered(md: str) -> tuple[str, set[str]]:
    """What the CommonMark spec (with GFM's strikethrough and tables) makes of md: the text a
    reader sees (word joiners and no-break spaces as nothing and spaces) and its node kinds."""
    kinds: set[str] = set()
    parts: list[str] = []

    def walk(tokens) -> None:
        for t in tokens:
            kinds.add(t.type.removesuffix("_open").removesuffix("_close"))
            if t.type in ("text", "code_inline", "code_block", "fence", "html_inline"):
                parts.append(t.content)
            elif t.type in ("softbreak", "hardbreak") or t.type.endswith("_close") and t.block:
                parts.append("\n")
            if t.children:
                walk(t.children)

    walk(SPEC.parse(md))
    text = "".join(parts).replace(WORD_JOINER, "").replace("\u00a0", " ")
    return text, kinds


def streamlit_effects(md: str) -> list[str]:
    """What Streamlit would turn md's text into beyond Markdown: math, directives, icons,
    logo, emoji, links, arrows (empty when it shows the text as it is)."""
    found = []
    # outside code and escapes (as Streamlit decides whether to typeset math), no $ and no
    # directive (:name[...], :name)
    bare = re.sub(r"(?m)^ {0,3}(`{3,}|~{3,})[\s\S]*?(?:\n[ \t]*\1|\Z)", "_", md)
    bare = re.sub(r"(?<!`)(`+)[^`\n]+\1(?!`)", "_", bare)
    bare = re.sub(r"\\.", "_", bare)
    if "$" in bare:
        found.append("math")
    if re.search(r":[A-Za-z]", bare):
        found.append("directive")
    # the text nodes, which Streamlit rewrites after parsing (it also turns every
    # ':material/' of the source into ':material_')
    texts: list[str] = []

    def walk(tokens) -> None:
        for t in tokens:
            if t.type == "text":
                texts.append(t.content)
            walk(t.children or [])

    walk(SPEC.parse(md.replace(":material/", ":material_")))
    for text in texts:
        found += [what for what, p in STREAMLIT_TEXT_EFFECTS.items() if p.search(text)]
    return found


def squash(text: str) -> str:
    return " ".join(text.split())


def assert_inert(md: str, literal: str | None = None) -> None:
    """md shows only text (no image, link, HTML, colour, icon, math): `literal` if given."""
    text, kinds = rendered(md)
    assert not kinds & {"image", "link", "html_inline", "html_block"}, (md, kinds)
    assert streamlit_effects(md) == [], md
    if literal is not None:
        assert squash(literal) in squash(text), (md, text)


# ----------------------------------------------------------------------------------------------
# the renderer


@pytest.mark.parametrize("hostile", HOSTILE)
def test_plain_shows_hostile_text_as_exactly_that_text(hostile):
    md = plain(hostile)
    text, kinds = rendered(md)
    assert kinds <= {"paragraph", "inline", "text", "softbreak", "hardbreak"}, (md, kinds)
    assert streamlit_effects(md) == [], md
    lines = [line.strip() for line in hostile.splitlines()]
    assert [line.strip() for line in text.strip().splitlines()] == lines


@pytest.mark.parametrize("hostile", HOSTILE)
def test_safe_markdown_never_loads_links_or_directives(hostile):
    md = safe_markdown(hostile)
    _, kinds = rendered(md)
    assert not kinds & {"image", "link", "html_inline", "html_block", "heading"}, (md, kinds)
    assert streamlit_effects(md) == [], md


def test_safe_markdown_keeps_the_authors_formatting_and_shows_the_rest_as_text():
    source = (
        "# Rules\n\n"
        "1. Prefer **short** and *polite* answers, ~~not~~ `:material/x:` as code\n"
        "2. See [the guide](http://example.org/guide)\n"
        "   - nested ![diagram](http://127.0.0.1:9/d.png) :red[EVIL] $x^2$\n\n"
        "> quoted <b>tag</b>\n\n"
        "```python\nprint('$x$')\n```\n\n"
        "```mermaid\ngraph TD; A-->B\n```\n"
    )
    md = safe_markdown(source)
    text, kinds = rendered(md)
    assert {"ordered_list", "bullet_list", "strong", "em", "s", "code_inline", "fence"} <= kinds
    assert "blockquote" in kinds and "heading" not in kinds and "image" not in kinds
    assert streamlit_effects(md) == []
    for shown in ("Rules", "the guide", "diagram", ":red[EVIL] $x^2$", "<b>tag</b>"):
        assert shown in text
    assert "http://example.org/guide" not in text and "d.png" not in text
    assert "```python\nprint('$x$')\n```" in md  # code is kept and highlighted
    assert "```mermaid" not in md and "graph TD; A-->B" in md  # a diagram only as code
    assert ":material/x:" in text  # not rewritten to an icon name, even in code


def test_code_span_holds_backticks_and_spaces():
    for text in ("a`b", "``x``", " padded ", "`"):
        md = code_span(text)
        tokens = SPEC.parseInline(md)[0].children
        assert [t.type for t in tokens] == ["code_inline"] and tokens[0].content == text


# ----------------------------------------------------------------------------------------------
# annotator names where they are created


@pytest.fixture
def ws(tmp_path, monkeypatch) -> storedb.Workspace:
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


@pytest.mark.parametrize("name", [HOSTILE_NAME, "ann bob", "x" * 65, "tab\there", "é"])
def test_labels_import_refuses_bad_annotator_names_and_stores_nothing(ws, tmp_path, capsys, name):
    seeded = seed_round(ws, n_groups=2, k=2)
    rows = [
        {"group_id": g, "annotator": a, "ranking": [[c[0]], [c[1]]]}
        for g, c, a in zip(seeded.group_ids, seeded.candidate_ids, ["ann", name], strict=True)
    ]
    path = write_jsonl(tmp_path / "labels.jsonl", rows)
    err = cli_error(capsys, "labels", "import", path, "-w", ws.root)
    assert f"{path}:2" in err and "invalid 'annotator' name" in err
    assert "letters, digits, '_', '.', '@' or '-'" in err and "at most 64 characters" in err
    with storedb.connect(ws) as con:
        assert labels.labels(con).empty


def test_users_add_refuses_bad_names_with_a_short_clear_message(ws, capsys, monkeypatch):
    monkeypatch.setenv("PREFLOOP_PASSWORD", "correct horse battery")
    for name in (HOSTILE_NAME, "n" * (1 << 20), "ann\nbob"):
        err = cli_error(capsys, "users", "add", name, "--role", "annotator", "-w", ws.root)
        assert "invalid account name" in err and "letters, digits" in err
        assert len(err) < 300  # a megabyte of name is not echoed back
    cli(capsys, "users", "add", "ann.lee@example.org", "--role", "annotator", "-w", ws.root)
    with storedb.connect(ws) as con:
        assert list(users.list_users(con)["name"]) == ["ann.lee@example.org"]


def test_gold_author_typed_on_the_command_line_is_checked(ws, capsys):
    seeded = seed_round(ws, n_groups=1, k=2)
    g, c = seeded.group_ids[0], seeded.candidate_ids[0]
    ranking = f"{c[0]}>{c[1]}"
    err = cli_error(capsys, "gold", "set", g, "--ranking", ranking, "--author", HOSTILE_NAME)
    assert "invalid author name" in err
    with storedb.connect(ws) as con:
        assert gold.gold(con) == {}


# ----------------------------------------------------------------------------------------------
# the pages


def markdown_values(at) -> list[str]:
    """Every string the page hands to Streamlit's Markdown renderer."""
    kinds = ("markdown", "caption", "warning", "error", "info", "success")
    return [str(e.value) for kind in kinds for e in getattr(at, kind)]


def hostile_labels(ws) -> None:
    """Three groups: ann, bob and cy agree; a stored hostile name (from before names were
    checked) ranks every group the other way, so the agreement report flags it."""
    seeded = seed_round(ws, n_groups=3, k=3)
    records = []
    for g, c in zip(seeded.group_ids, seeded.candidate_ids, strict=True):
        for who in ("ann", "bob", "cy"):
            records.append(LabelRecord(g, who, [[x] for x in c]))
        records.append(LabelRecord(g, HOSTILE_NAME, [[x] for x in reversed(c)]))
    with storedb.connect(ws) as con:
        labels.add_labels(con, records)


def test_team_page_shows_a_hostile_flagged_name_as_text(ws):
    hostile_labels(ws)
    at = open_app("Team")
    [warning] = [w.value for w in at.warning if "agreement threshold" in w.value]
    assert_inert(warning, HOSTILE_NAME)
    for md in markdown_values(at):
        assert_inert(md)


def test_dataset_card_shows_hostile_names_and_filters_as_text(ws):
    hostile_labels(ws)
    at = open_app("Researcher")
    typed = f"bob, ![f]({SINK}) :red[FILTER] $y$"
    at.text_input(key="cur_exclude").input(typed)
    click(at, "freeze_submit")
    card = next(m for m in markdown_values(at) if "Dataset version" in m)
    assert_inert(card)
    text, _ = rendered(card)
    assert f"excluded: bob, ![f]({SINK}) :red[FILTER] $y$" in text
    assert f"annotators (3): {HOSTILE_NAME}, ann, cy" in text
    for md in markdown_values(at):
        assert_inert(md)


def test_annotator_page_renders_guidelines_safely(ws):
    seeded = seed_round(ws, n_groups=1, k=2)
    with storedb.connect(ws) as con:
        rounds.set_round_options(con, seeded.round_id, guidelines=HOSTILE_GUIDELINES)
    at = open_app(annotator="nina")
    [guide] = [m for m in markdown_values(at) if "short" in m]
    text, kinds = rendered(guide)
    assert "strong" in kinds  # the researcher's formatting stays
    assert "Prefer short answers." in text and "a :red[EVIL] $x^2$" in text
    for md in markdown_values(at):
        assert_inert(md)


def test_dataset_card_in_an_export_escapes_names(ws, tmp_path, capsys):
    hostile_labels(ws)
    cli(capsys, "dataset", "freeze", "--exclude-annotators", "bob,:red[X]", "-w", ws.root)
    out = tmp_path / "out" / "pairs`x.jsonl"
    cli(capsys, "export", "--dataset", "d1", "--format", "pairs", "--out", out, "-w", ws.root)
    card = (out.parent / "README.md").read_text()
    assert_inert(card)
    text, _ = rendered(card)
    assert HOSTILE_NAME in text and ":red[X]" in text and "pairs`x.jsonl" in text
    assert "data_files='pairs`x.jsonl'" in text
