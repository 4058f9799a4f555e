"""Drawing model output wherever people read it (the annotator page, adjudication, side by side
on the Evaluation page): candidates and prompts through the safe renderer of
labeling.candidate_render, a raw toggle per candidate, long answers collapsed."""

from __future__ import annotations

import streamlit as st

from labeling import candidate_render
from labeling.annotation import RankingState
from labeling.safe_text import plain
from store.records import LabelRecord


def draw(rendered: candidate_render.Rendered) -> None:
    """The segments of a rendered text: Markdown, and code highlighted in its language."""
    if not rendered.segments:
        st.caption("(empty)")
    for segment in rendered.segments:
        if segment.kind == "code":
            st.code(segment.text, language=segment.language, wrap_lines=True)
        else:
            st.markdown(segment.text)


def show_text(text: str) -> None:
    """A prompt (or a turn of one) as rendered Markdown, invisible characters flagged."""
    rendered = candidate_render.render(text)
    note = rendered.invisible_note()
    if note:
        st.warning(plain(note), icon="⚠️")
    draw(rendered)


def show_candidate(text: str, key: str) -> None:
    """One candidate: a raw toggle, a warning about invisible characters, and the text (in a
    collapsed expander when long, so the ranking controls below stay in view)."""
    rendered = candidate_render.render(text)
    raw = st.toggle(
        "raw",
        key=f"raw_{key}",
        help="Show the exact characters the model wrote (invisible ones as ⟨U+…⟩).",
    )
    note = rendered.invisible_note()
    if note:
        st.warning(plain(note), icon="⚠️")
    if rendered.long:
        lines = text.count("\n") + 1
        box = st.expander(f"Long answer ({lines} lines, {len(text)} characters): open to read")
    else:
        box = st.container()
    with box:
        if raw:
            st.code(rendered.raw, language=None, wrap_lines=True)
        else:
            draw(rendered)


def stamp(record: LabelRecord, state: RankingState) -> None:
    """Record on a label the renderer and the view hash of the candidates it was given on."""
    texts = [state.text_of(name) for name in state.letters]
    record.render_version, record.render_hash = candidate_render.label_view(
        state.candidate_ids, texts
    )
