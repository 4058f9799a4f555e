"""Untrusted text (names, filters, comments, guidelines, model output) made safe for Markdown.

`plain` turns any text into Markdown that Streamlit's `st.markdown` (and `st.caption`,
`st.warning`, ...) shows as exactly that text. `safe_markdown` keeps a small subset of the
author's Markdown (paragraphs, emphasis, strikethrough, lists, quotes, code, rules; headings
become bold lines) and shows everything else as text: no raw HTML, no images (their alt text
stays), no links (their text stays), no Streamlit directives (`:red[…]`, `:material/…:` icons,
`:streamlit:`, emoji shortcodes), no LaTeX, no Mermaid diagrams.

Escaping alone is not enough for Streamlit: after parsing it rewrites the text itself (icons,
emoji, the logo, bare URLs and e-mail addresses into links, `->` into arrows). A word joiner
(U+2060, invisible and zero-width) between the characters such a pattern needs keeps it from
matching.
"""

from __future__ import annotations

import re

from markdown_it import MarkdownIt
from markdown_it.tree import SyntaxTreeNode

WORD_JOINER = "\u2060"
NBSP = "\u00a0"
# Characters that can start markup anywhere in a line (GFM, Streamlit's math and directives),
# and those that only do at the start of a line (headings, quotes, list items, setext rules).
# The rest (. , ; ? ' " / ( ) ! and so on) stay as typed: inert once these are escaped.
_ESCAPED = frozenset("\\`*_[]<|~$&:")
_LINE_START = frozenset("#>-+=")
_ORDERED_ITEM = re.compile(r"\d{1,9}(?=[.)])")
# after a colon: a URL's //, an icon's material/, or the name and closing colon of an emoji
# shortcode (or of :streamlit:, the logo); the colon is escaped anyway against directives
_REWRITTEN_AFTER_COLON = re.compile(r"//|material/|[\w+-]+:")
_JOINED_PAIRS = frozenset({"->", "<-", "--", ">=", "<=", "~="})  # Streamlit's typographic arrows
_FENCE_LANGUAGE = re.compile(r"^[A-Za-z0-9_+-]{1,32}$")
_PARSER = MarkdownIt("commonmark", {"html": False}).enable("strikethrough")


def _escape(text: str) -> str:
    """Text of one line as Markdown inline content that renders as the same characters."""
    number = _ORDERED_ITEM.match(text)
    after_number = number.end() if number else -1
    out: list[str] = []
    for i, c in enumerate(text):
        if c == "@" or (c == "." and text[max(0, i - 3) : i].lower() == "www"):
            out.append(WORD_JOINER)  # no e-mail or www. autolink
        markup = c in _ESCAPED or (i == 0 and c in _LINE_START) or i == after_number
        out.append("\\" + c if markup else c)
        rewritten = c == ":" and _REWRITTEN_AFTER_COLON.match(text, i + 1)
        if rewritten or text[i : i + 2] in _JOINED_PAIRS:
            out.append(WORD_JOINER)  # no icon, emoji, logo, URL or arrow
    return "".join(out)


def escape_text(text: str) -> str:
    """One line of text as inline Markdown that renders as exactly those characters."""
    return _escape(text)


def plain(text: object) -> str:
    """Markdown that renders as exactly `text` (line breaks and indentation kept)."""
    lines = str(text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out = []
    for line in lines:
        body = line.lstrip(" \t")
        # leading blanks as no-break spaces: four spaces would start a code block
        indent = line[: len(line) - len(body)].replace("\t", "    ").replace(" ", NBSP)
        out.append(indent + _escape(body.rstrip(" \t")))
    return "  \n".join(out)  # two trailing spaces: a hard line break


def plain_list(names: list[str] | tuple[str, ...], sep: str = ", ") -> str:
    """Names (or other short strings) joined by sep, each shown as plain text."""
    return sep.join(plain(n) for n in names)


def code_span(text: str) -> str:
    """An inline code span showing exactly `text` (on one line)."""
    text = _unrewritten(" ".join(str(text).splitlines()))
    fence = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    both_spaced = text[:1] == text[-1:] == " " and text.strip()
    if text.startswith("`") or text.endswith("`") or both_spaced:  # a space each side is cut
        text = f" {text} "
    return f"{fence}{text}{fence}"


def _unrewritten(code: str) -> str:
    # Streamlit turns ':material/' into ':material_' in the whole source, code included
    return code.replace(":material/", ":" + WORD_JOINER + "material/")


def code_block(code: str, info: str = "") -> str:
    """A fenced code block showing exactly `code`, highlighted as `info`'s language if plain."""
    code = _unrewritten(code.rstrip("\n"))
    fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", code)), default=0) + 1)
    lang = info.split()[0] if info.split() else ""
    word = re.match(r"\w*", lang).group().lower()
    if not _FENCE_LANGUAGE.match(lang) or word == "mermaid":  # ```mermaid draws a diagram
        lang = ""
    return f"{fence}{lang}\n{code}\n{fence}"


def _flat(node: SyntaxTreeNode) -> str:
    """The text of an inline tree, markup dropped."""
    if node.type in ("text", "code_inline", "html_inline"):
        return node.content
    if node.type in ("softbreak", "hardbreak"):
        return " "
    return "".join(_flat(child) for child in node.children)


def _inline(node: SyntaxTreeNode) -> str:
    parts: list[str] = []
    for child in node.children:
        kind = child.type
        if kind == "text" or kind == "html_inline":
            parts.append(_escape(child.content))
        elif kind == "code_inline":
            parts.append(code_span(child.content))
        elif kind == "softbreak":
            parts.append("\n")
        elif kind == "hardbreak":
            parts.append("  \n")
        elif kind == "em":
            parts.append(f"*{_inline(child)}*")
        elif kind == "strong":
            parts.append(f"**{_inline(child)}**")
        elif kind == "s":
            parts.append(f"~~{_inline(child)}~~")
        elif kind in ("link", "image"):  # the text (an image's alt text) without the target
            parts.append(_inline(child))
        else:
            parts.append(_escape(_flat(child)))
    return "".join(parts)


def _indent(text: str, prefix: str, first: str) -> str:
    lines = text.split("\n")
    rest = [(prefix + line) if line else "" for line in lines[1:]]
    return "\n".join([first + lines[0], *rest])


def _list(node: SyntaxTreeNode) -> str:
    ordered = node.type == "ordered_list"
    start = int(node.attrs.get("start", 1)) if ordered else 1
    # markdown-it hides the paragraphs of a tight list (items not separated by blank lines)
    tight = any(c.type == "paragraph" and c.hidden for item in node.children for c in item.children)
    sep = "\n" if tight else "\n\n"
    items = []
    for i, item in enumerate(node.children):
        marker = f"{start + i}." if ordered else "-"
        body = sep.join(b for b in _blocks(item.children) if b)
        items.append(_indent(body, " " * (len(marker) + 1), marker + " ") if body else marker)
    return sep.join(items)


def _block(node: SyntaxTreeNode) -> str:
    kind = node.type
    if kind == "paragraph":
        return "".join(_inline(c) for c in node.children)
    if kind == "heading":
        text = " ".join("".join(_flat(c) for c in node.children).split())
        return f"**{_escape(text)}**" if text else ""
    if kind in ("bullet_list", "ordered_list"):
        return _list(node)
    if kind == "blockquote":
        body = "\n\n".join(b for b in _blocks(node.children) if b)
        return "\n".join(f"> {line}" if line else ">" for line in body.split("\n"))
    if kind in ("fence", "code_block"):
        return code_block(node.content, node.info if kind == "fence" else "")
    if kind == "hr":
        return "***"
    return plain(node.content)


def _blocks(nodes: list[SyntaxTreeNode]) -> list[str]:
    return [_block(n) for n in nodes]


def safe_markdown(text: str | None) -> str:
    """Markdown limited to a safe subset (see the module's docstring); the rest shows as text."""
    tree = SyntaxTreeNode(_PARSER.parse(str(text or "")))
    return "\n\n".join(b for b in _blocks(tree.children) if b)
