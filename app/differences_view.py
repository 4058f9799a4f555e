"""The annotator page's differences view: near-identical hints, the text every candidate shares
collapsed, where each candidate departs highlighted, and a side-by-side word diff of two.

Drawing only; the text work is labeling.differences. Candidate text is html.escape'd before
any highlighting markup is put around it, so it always shows literally.
"""

from __future__ import annotations

import html

import streamlit as st

from labeling import differences
from labeling.annotation import RankingState

BOX = "white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.6"
DEPARTS = "background: rgba(255, 165, 0, 0.35); border-radius: 3px"
ONLY_A = "background: rgba(255, 75, 75, 0.30); border-radius: 3px"
ONLY_B = "background: rgba(33, 195, 84, 0.30); border-radius: 3px"
SHARED = "color: gray; font-style: italic"


def _visible(text: str) -> str:
    """Escaped text; a run that is only whitespace gets visible marks (else a change is blank)."""
    if text.strip():
        return html.escape(text)
    marks = text.replace(" ", "·").replace("\t", "→").replace("\n", "↵\n")
    return html.escape(marks)


def _mark(text: str, style: str) -> str:
    return f'<span style="{style}">{_visible(text)}</span>'


def _words(n: int) -> str:
    return f"{n} word" if n == 1 else f"{n} words"


def _shared_tag(what: str, words: int) -> str:
    return f'<span style="{SHARED}">[{what}: {_words(words)}]</span>'


def _departure(name: str, parts: differences.SharedParts, middle: str) -> str:
    body = []
    if parts.prefix:
        body.append(_shared_tag("shared opening", parts.prefix_words))
    body.append(_mark(middle, DEPARTS) if middle else f'<i style="{SHARED}">(nothing else)</i>')
    if parts.suffix:
        body.append(_shared_tag("shared ending", parts.suffix_words))
    return f'<div style="{BOX}"><b>{html.escape(name)}</b>  {" ".join(body)}</div>'


def _side(segments: list[differences.Segment], which: str, style: str) -> str:
    runs = differences.side(segments, which)  # type: ignore[arg-type]
    body = "".join(_mark(s.text, style) if s.kind == which else html.escape(s.text) for s in runs)
    return f'<div style="{BOX}">{body}</div>'


def _shared_block(label: str, text: str) -> None:
    words = len(text.split())
    with st.expander(f"{label}: {_words(words)}, {len(text)} characters, the same in every one"):
        st.html(f'<div style="{BOX}">{html.escape(text)}</div>')


def _near_identical_hints(state: RankingState, thumbs_mode: bool) -> list[differences.NearGroup]:
    groups = differences.near_identical_groups(state.texts)
    for group in groups:
        hint = differences.near_identical_hint(state.letters, group)
        if not thumbs_mode:
            hint += " · rank one of them, then press = to tie the others with it"
        st.info(hint, icon=":material/difference:")  # letters and numbers only: safe Markdown
    return groups


def _word_diff(state: RankingState, groups: list[differences.NearGroup]) -> None:
    names = state.letters
    first = groups[0].members[:2] if groups else [0, 1]
    gid = state.group_id
    pick = st.columns(2)
    a = pick[0].selectbox("Compare", names, index=first[0], key=f"diff_a_{gid}")
    b = pick[1].selectbox("with", names, index=first[1], key=f"diff_b_{gid}")
    if a == b:
        st.caption("Pick two different candidates to compare.")
        return
    segments = differences.word_diff(state.text_of(a), state.text_of(b))
    only_a = sum(len(s.text.split()) for s in segments if s.kind == "a")
    only_b = sum(len(s.text.split()) for s in segments if s.kind == "b")
    st.caption(f"{_words(only_a)} only in {a} (red), {_words(only_b)} only in {b} (green)")
    cols = st.columns(2)
    with cols[0], st.container(border=True):
        st.markdown(f"**{a}**")
        st.html(_side(segments, "a", ONLY_A))
    with cols[1], st.container(border=True):
        st.markdown(f"**{b}**")
        st.html(_side(segments, "b", ONLY_B))


def differences_view(state: RankingState, thumbs_mode: bool = False) -> None:
    """Near-identical hints, then (behind the Differences toggle) where the candidates differ."""
    if len(state.texts) < 2:
        return
    groups = _near_identical_hints(state, thumbs_mode)
    on = st.toggle(
        "Differences",
        key="diff_on",
        help="Collapse the text all candidates share and highlight where each one departs; "
        "compare any two word by word.",
    )
    if not on:
        return
    parts = differences.shared_parts(state.texts)
    with st.container(border=True, key="diff_view"):
        if parts.prefix:
            _shared_block("Shared opening", parts.prefix)
        if not parts.prefix and not parts.suffix:
            st.caption("The candidates share no opening or ending.")
        st.caption("Where each candidate departs from the shared text (highlighted):")
        for name, middle in zip(state.letters, parts.middles, strict=True):
            st.html(_departure(name, parts, middle))
        if parts.suffix:
            _shared_block("Shared ending", parts.suffix)
        _word_diff(state, groups)
