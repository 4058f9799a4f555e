"""Model output (candidates, prompts) as safe segments to draw: Markdown text and code blocks.

The view keeps what helps an annotator read an answer (paragraphs, emphasis, lists, headings,
tables, quotes, highlighted code) and shows everything that could load, link, execute or fake
the page as the characters the model wrote: raw HTML, images (as `[image: alt](url)`), links
(as `[text](url)`, not clickable), Streamlit's directives (`:red[…]`, `:material/…:`, emoji
shortcodes) and `$…$` LaTeX. Invisible and direction-changing characters (zero-width, bidi
controls, other format characters, ANSI escapes and other control characters) are replaced by a
visible marker such as `⟨U+200B⟩` and counted.

A label records RENDERER_VERSION and `view_hash` of its group, so an export can tell pairs
judged on a view that differs from the text a model is trained on.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

from labeling.safe_text import code_block, code_span, escape_text, plain

RENDERER_VERSION = "md-1"  # bump whenever the view of some text changes
LONG_CHARS = 1500
LONG_LINES = 40
MARKER = "⟨U+{:04X}⟩"
# invisible or blank-looking letters that are not format characters (Hangul fillers, the
# combining grapheme joiner)
_INVISIBLE_EXTRA = frozenset("\u034f\u115f\u1160\u3164\uffa0")
_HTML_TAG = re.compile(r"<(?:/?[A-Za-z][\w:-]*(?:\s[^<>]*)?/?>|!--)")
_DIRECTIVE = re.compile(
    r":(?:[A-Za-z]+\[|material/[\w-]+:|streamlit:|[a-z0-9_+-]*[a-z][a-z0-9_+-]*:)"
)
_FENCE_LANGUAGE = re.compile(r"^[A-Za-z0-9_+#.-]{1,32}$")
_PARSER = MarkdownIt("commonmark", {"html": False}).enable(["strikethrough", "table"])
_PARSER.disable("entity")  # `&amp;` shows as written, not as the character it names


def _hidden(c: str) -> bool:
    if c in "\n\t":
        return False
    return c in _INVISIBLE_EXTRA or unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")


def reveal(text: str) -> tuple[str, list[str]]:
    """text with each invisible or control character replaced by its ⟨U+XXXX⟩ marker; also
    the markers used, one per character replaced (a CR before LF is a line end, kept)."""
    out: list[str] = []
    found: list[str] = []
    for i, c in enumerate(text):
        if c == "\r" and text[i + 1 : i + 2] == "\n":
            out.append(c)
        elif _hidden(c):
            marker = MARKER.format(ord(c))
            out.append(marker)
            found.append(marker)
        else:
            out.append(c)
    return "".join(out), found


@dataclass(frozen=True)
class Segment:
    """A piece of a rendered text: Markdown for st.markdown, or code for st.code(language)."""

    kind: str  # "markdown" | "code"
    text: str
    language: str | None = None


@dataclass
class Rendered:
    """A text as the annotator sees it."""

    segments: list[Segment]
    raw: str  # the exact text, invisible characters made visible
    markers: list[str]  # one per invisible character made visible
    changes: dict[str, int] = field(default_factory=dict)  # what shows as text, not as markup
    long: bool = False

    @property
    def invisible(self) -> int:
        """How many invisible characters were made visible."""
        return len(self.markers)

    @property
    def view_differs(self) -> bool:
        """Whether the view shows characters a Markdown reader would not (or would hide)."""
        return any(self.changes.values())

    def visible_text(self) -> str:
        """The text handed to the page, segment by segment (what the view hash covers)."""
        return json.dumps([[s.kind, s.language, s.text] for s in self.segments])

    def invisible_note(self) -> str | None:
        """A warning line for the annotator, or None when nothing was invisible."""
        if not self.markers:
            return None
        kinds = ", ".join(dict.fromkeys(self.markers))
        n = len(self.markers)
        return f"{n} invisible character{'s' if n != 1 else ''} shown as {kinds}"


def _flat(node: SyntaxTreeNode) -> str:
    """The text of an inline tree, markup dropped."""
    if node.type in ("text", "code_inline", "html_inline"):
        return node.content
    if node.type in ("softbreak", "hardbreak"):
        return " "
    return "".join(_flat(child) for child in node.children)


def _language(info: str) -> str | None:
    word = info.split()[0] if info.split() else ""
    if not _FENCE_LANGUAGE.match(word) or word.lower() == "mermaid":
        return None
    return word.lower()


class _Writer:
    """Walks a markdown-it tree, writing safe Markdown and counting what it shows literally."""

    def __init__(self) -> None:
        self.changes = {"invisible": 0, "html": 0, "image": 0, "link": 0, "directive": 0}
        self.dollars = 0

    def _text(self, content: str) -> str:
        self.changes["html"] += len(_HTML_TAG.findall(content))
        self.changes["directive"] += len(_DIRECTIVE.findall(content))
        self.dollars += content.count("$")
        return escape_text(content)

    def inline(self, node: SyntaxTreeNode, in_table: bool = False) -> str:
        parts: list[str] = []
        for child in node.children:
            kind = child.type
            if kind in ("text", "html_inline"):
                parts.append(self._text(child.content))
            elif kind == "code_inline":
                span = code_span(child.content)
                parts.append(span.replace("|", "\\|") if in_table else span)
            elif kind == "softbreak":
                parts.append("\n")
            elif kind == "hardbreak":
                parts.append("  \n")
            elif kind in ("em", "strong", "s"):
                mark = {"em": "*", "strong": "**", "s": "~~"}[kind]
                parts.append(f"{mark}{self.inline(child, in_table)}{mark}")
            elif kind == "image":
                self.changes["image"] += 1
                src = child.attrs.get("src", "")
                parts.append(escape_text(f"[image: {_flat(child)}]({src})"))
            elif kind == "link":
                self.changes["link"] += 1
                href = str(child.attrs.get("href", ""))
                if child.markup == "autolink":
                    parts.append(escape_text(f"<{_flat(child)}>"))
                else:
                    inner = self.inline(child, in_table)
                    parts.append(f"{escape_text('[')}{inner}{escape_text(f']({href})')}")
            else:
                parts.append(self._text(_flat(child)))
        return "".join(parts)

    def table(self, node: SyntaxTreeNode) -> str:
        rows: list[list[str]] = []
        aligns: list[str] = []
        for section in node.children:
            for tr in section.children:
                cells = []
                for cell in tr.children:
                    if section.type == "thead":
                        style = str(cell.attrs.get("style", ""))
                        aligns.append(
                            {"text-align:left": ":--", "text-align:center": ":-:"}.get(
                                style, "--:" if style == "text-align:right" else "---"
                            )
                        )
                    text = "".join(self.inline(c, in_table=True) for c in cell.children)
                    cells.append(text or " ")
                rows.append(cells)
        if not rows:
            return ""
        lines = ["| " + " | ".join(rows[0]) + " |", "| " + " | ".join(aligns) + " |"]
        lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        return "\n".join(lines)

    def list_(self, node: SyntaxTreeNode) -> str:
        ordered = node.type == "ordered_list"
        start = int(node.attrs.get("start", 1)) if ordered else 1
        tight = any(
            c.type == "paragraph" and c.hidden for item in node.children for c in item.children
        )
        sep = "\n" if tight else "\n\n"
        items = []
        for i, item in enumerate(node.children):
            marker = f"{start + i}." if ordered else "-"
            body = sep.join(b for b in (self.block(c) for c in item.children) if b)
            pad = " " * (len(marker) + 1)
            lines = body.split("\n")
            rest = [(pad + line) if line else "" for line in lines[1:]]
            items.append("\n".join([f"{marker} {lines[0]}", *rest]) if body else marker)
        return sep.join(items)

    def block(self, node: SyntaxTreeNode) -> str:
        """A block nested anywhere, as safe Markdown (code as a fenced block)."""
        kind = node.type
        if kind == "paragraph":
            return "".join(self.inline(c) for c in node.children)
        if kind == "heading":
            level = min(int(node.tag[1:]) + 2, 6)  # an answer's h1 sits below the page's titles
            text = "".join(self.inline(c) for c in node.children).replace("\n", " ")
            return f"{'#' * level} {text}" if text.strip() else ""
        if kind in ("bullet_list", "ordered_list"):
            return self.list_(node)
        if kind == "blockquote":
            body = "\n\n".join(b for b in (self.block(c) for c in node.children) if b)
            return "\n".join(f"> {line}" if line else ">" for line in body.split("\n"))
        if kind in ("fence", "code_block"):
            return code_block(node.content, (_language(node.info) or "") if kind == "fence" else "")
        if kind == "table":
            return self.table(node)
        if kind == "hr":
            return "***"
        return plain(node.content)


def render(text: str | None) -> Rendered:
    """The safe view of a model's text (see the module's docstring)."""
    source = str(text or "")
    shown, markers = reveal(source)
    writer = _Writer()
    segments: list[Segment] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            segments.append(Segment("markdown", "\n\n".join(pending)))
            pending.clear()

    for node in SyntaxTreeNode(_PARSER.parse(shown)).children:
        if node.type in ("fence", "code_block"):
            flush()
            language = _language(node.info) if node.type == "fence" else None
            segments.append(Segment("code", node.content.rstrip("\n"), language))
            continue
        markdown = writer.block(node)
        if markdown:
            pending.append(markdown)
    flush()
    changes = dict(writer.changes, invisible=len(markers), latex=writer.dollars // 2)
    lines = source.count("\n") + 1
    long = len(source) > LONG_CHARS or lines > LONG_LINES
    return Rendered(segments, shown, markers, changes, long)


def view_hash(texts: dict[int, str]) -> str:
    """A short sha256 (hex) of the rendered candidates of a group, taken in candidate id order
    (so it does not depend on the order one annotator saw them in)."""
    payload = json.dumps(
        [RENDERER_VERSION, [render(texts[c]).visible_text() for c in sorted(texts)]]
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def label_view(candidate_ids: list[int], texts: list[str]) -> tuple[str, str]:
    """(renderer version, view hash) to store with a label of a group shown by this renderer."""
    return RENDERER_VERSION, view_hash(dict(zip(candidate_ids, texts, strict=True)))


def views_differ(
    candidate_ids: list[int], texts: list[str], recorded: list[str | None]
) -> list[bool]:
    """Per candidate: whether annotators may have judged a view that differs from its text.

    True when the renderer shows the text differently from what a Markdown reader would (see
    Rendered.changes), or when a label's recorded view hash differs from the current one (the
    text or the renderer changed since). Labels without a hash (imported, or older than the
    renderer) count as matching.
    """
    hashes = {h for h in recorded if h}
    current = view_hash(dict(zip(candidate_ids, texts, strict=True))) if hashes else None
    stale = bool(hashes) and hashes != {current}
    return [stale or render(t).view_differs for t in texts]
