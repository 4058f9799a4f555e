"""The annotator page: rank (or thumb) the next group of a round, by mouse or keyboard.

Keys: 1..K rank the candidate in that slot next, t ties the next key with the last pick,
u undoes, s skips, b flags all bad and submits, Enter submits. Model output (candidates and
prompts) is drawn by app.candidate_view (Markdown without HTML, code highlighted, the rest
inert), the round's guidelines through the safe Markdown subset of labeling.safe_text.
"""

from __future__ import annotations

import time

import streamlit as st

from app import actions, candidate_view
from app.differences_view import differences_view
from labeling import annotation
from labeling.safe_text import plain, safe_markdown
from store import db as storedb
from store.access import User
from store.errors import PrefloopError

EM_SPACES = "\u2003\u2003"  # Markdown would collapse the plain double space between places
THUMBS = {"up": "👍 good", "down": "👎 bad"}
RATINGS = [1, 2, 3, 4, 5]


# Keys are caught in the page by a small component that sends every key typed so far (with a
# per-page-load nonce); the script applies the ones it has not applied yet, in order. Streamlit's
# own button shortcuts would lose keys typed faster than a rerun (disabled buttons do not fire,
# and triggers arriving together are merged and run in page order).
KEYS_JS = """
export default function ({ setStateValue }) {
  const box = (window.__prefloopKeys = window.__prefloopKeys || {
    nonce: Math.random().toString(36).slice(2),
    keys: [],
  });
  const onKey = (e) => {
    if (e.ctrlKey || e.metaKey || e.altKey || e.isComposing) return;
    const t = e.target;
    if (e.key === "Escape") {
      if (document.activeElement) document.activeElement.blur();
      return;
    }
    if (t && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName))) return;
    const key = e.key.length === 1 ? e.key.toLowerCase() : e.key;
    if (!/^[1-9tusb=]$/.test(key) && key !== "Enter") return;
    e.preventDefault();
    box.keys.push(key);
    setStateValue("typed", { nonce: box.nonce, keys: box.keys.slice() });
  };
  document.addEventListener("keydown", onKey);
  // a mark that keys are being caught (browser tests wait for it before typing)
  document.documentElement.dataset.prefloopKeys = "on";
  return () => {
    document.removeEventListener("keydown", onKey);
    delete document.documentElement.dataset.prefloopKeys;
  };
}
"""
_keys_component = st.components.v2.component("prefloop_keys", html="<span></span>", js=KEYS_JS)
KEYS_KEY = "annot_keys"


def _new_keys() -> list[str]:
    """Keys typed since the last run (the component's cumulative list minus those applied)."""
    result = _keys_component(key=KEYS_KEY, on_typed_change=lambda: None)
    typed = getattr(result, "typed", None) if result is not None else None
    if not typed:
        return []
    nonce, keys = typed.get("nonce"), list(typed.get("keys") or [])
    seen_nonce, seen = st.session_state.get("keys_seen", (None, 0))
    if nonce != seen_nonce:  # a new page load: its keys start from zero
        seen = 0
    st.session_state["keys_seen"] = (nonce, seen)
    return keys[seen:]


def _consume_keys(n: int) -> None:
    nonce, seen = st.session_state.get("keys_seen", (None, 0))
    st.session_state["keys_seen"] = (nonce, seen + n)


def show_messages(prefix: str) -> None:
    """Show (once) the message and error a button callback left for this page."""
    note = st.session_state.pop(f"{prefix}_note", None)
    if note:
        st.success(plain(note))
    error = st.session_state.pop(f"{prefix}_error", None)
    if error:
        st.error(plain(error))  # errors may quote what was typed or stored


def _state() -> annotation.RankingState | None:
    return st.session_state.get("ranking")


def _ranking_action(action: str, name: str | None = None) -> None:
    state = _state()
    if state is None:
        return
    try:
        if action == "press":
            state.press(name)
        elif action == "rank":
            state.tie_armed = False
            state.rank_next(name)
        elif action == "tie":
            state.tie_armed = False
            state.tie_with_last(name)
        elif action == "arm_tie":
            state.arm_tie()
        elif action == "undo":
            state.undo()
        elif action == "clear":
            state.reset()
            state.tie_armed = False
    except PrefloopError as exc:
        st.session_state["annot_error"] = str(exc)


def _choices(state: annotation.RankingState, prefix: str) -> dict[int, object]:
    """Per candidate id, the value of its widget with this key prefix (unset ones left out)."""
    out = {}
    for name, cid in zip(state.letters, state.candidate_ids, strict=True):
        value = st.session_state.get(f"{prefix}_{state.group_id}_{name}")
        if value is not None:
            out[cid] = value
    return out


def _store_label(ws: storedb.Workspace, user: User, how: str) -> None:
    """Submit the group: how is 'submit', 'skip' or 'all_bad'."""
    state = _state()
    if state is None:
        return
    gid = state.group_id
    comment = st.session_state.get(f"comment_{gid}")
    try:
        if how == "skip":
            record = state.skip_label(comment)
        elif st.session_state.get("annot_mode") == "thumbs":
            thumbs = {cid: v == "up" for cid, v in _choices(state, "thumb").items()}
            if len(thumbs) < len(state.candidate_ids):
                raise PrefloopError("give every candidate a thumb (up or down) before submitting")
            record = state.thumbs_label(thumbs, all_bad=how == "all_bad", comment=comment)
        else:
            record = state.to_label(all_bad=how == "all_bad", comment=comment)
        ratings = {cid: int(v) for cid, v in _choices(state, "rate").items()}
        record.ratings = ratings or None
        shown = st.session_state.get(f"shown_{gid}")
        record.seconds = round(time.time() - shown, 3) if shown else None
        candidate_view.stamp(record, state)
        actions.submit_label(ws, user, record)
    except PrefloopError as exc:
        st.session_state["annot_error"] = str(exc)
        return
    st.session_state.pop("ranking", None)
    st.session_state.pop("revise_group", None)
    st.session_state["annot_note"] = {
        "skip": "Skipped that group.",
        "all_bad": "Flagged all bad and saved.",
        "submit": "Saved your ranking.",
    }[how]


def _show_prompt(group) -> None:
    with st.container(border=True):
        st.caption("Prompt")
        if group.messages:
            for turn in group.messages:  # imported data: the role as plain text
                st.text(f"[{turn.get('role', '')}]")
                candidate_view.show_text(str(turn.get("content", "")))
        else:
            candidate_view.show_text(group.prompt)


def _candidate_box(state: annotation.RankingState, slot: int, thumbs_mode: bool) -> None:
    name = state.letters[slot]
    gid = state.group_id
    place = state.place_of(name)
    key_hint = f" · key {slot + 1}" if slot < 9 and not thumbs_mode else ""
    with st.container(border=True, key=f"cand_{name}"):
        head = f"**Candidate {name}**{key_hint}"
        if place is not None:
            head += f" · ranked #{place}"
        st.markdown(head)
        candidate_view.show_candidate(state.text_of(name), key=f"{gid}_{name}")
        if thumbs_mode:
            st.segmented_control(
                "Verdict",
                list(THUMBS),
                format_func=THUMBS.get,
                key=f"thumb_{gid}_{name}",
                label_visibility="collapsed",
            )
        else:
            b1, b2 = st.columns(2)
            b1.button(
                "Rank next",
                key=f"rank_{name}",
                on_click=_ranking_action,
                args=("press", name),
                disabled=place is not None,
                width="stretch",
            )
            if state.tiers:
                b2.button(
                    "Tie with last",
                    key=f"tie_{name}",
                    on_click=_ranking_action,
                    args=("tie", name),
                    disabled=place is not None,
                    width="stretch",
                )
        st.segmented_control(
            "Rating 1–5 (optional)",
            RATINGS,
            key=f"rate_{gid}_{name}",
            help="How good is this answer on its own (1 = unusable, 5 = excellent)?",
        )


def _suggestion_text(state: annotation.RankingState, ranking: list[list[int]]) -> str:
    letters = dict(zip(state.candidate_ids, state.letters, strict=True))
    tiers = [" = ".join(letters[c] for c in tier if c in letters) for tier in ranking]
    return "  >  ".join(t for t in tiers if t)


def _guidelines(text: str | None) -> None:
    with st.sidebar.expander("Guidelines", expanded=True):
        if text:
            st.markdown(safe_markdown(text))
        else:
            st.caption("No guidelines for this round yet.")
        st.caption(
            "Keys: 1..K rank next · t tie next with last · u undo · "
            "= tie last pick with its near-identical candidates · s skip · b all bad · "
            "Enter submit · Esc leaves the comment box"
        )


def _my_labels(ws: storedb.Workspace, user: User, round_id: int) -> None:
    mine = actions.my_labels(ws, user, round_id)
    with st.expander(f"Your labels in this round ({len(mine)})"):
        if mine.empty:
            st.caption("None yet.")
            return
        cols = [c for c in ("group_id", "flags", "revision", "created", "updated") if c in mine]
        st.dataframe(mine[cols], hide_index=True, width="stretch")
        pick = st.selectbox(
            "Revise the label of group", list(mine["group_id"]), key="revise_pick", index=None
        )
        if st.button("Revise it", key="revise_start", disabled=pick is None):
            st.session_state["revise_group"] = int(pick)
            st.session_state.pop("ranking", None)
            st.rerun()


def annotator_page(ws: storedb.Workspace, user: User) -> None:
    """Label the next group of a round."""
    st.title("Label candidates")
    round_df = actions.labelling_rounds(ws, user)
    if round_df.empty:
        st.info(
            "This workspace has no rounds yet. A researcher starts one on the Researcher page "
            "(or with `prefloop sample`)."
        )
        return
    titles = dict(zip(round_df["id"], round_df["title"], strict=True))
    round_ids = list(titles)
    if st.session_state.get("round") not in round_ids:
        st.session_state.pop("round", None)
    round_id = st.selectbox("Round", round_ids, format_func=titles.get, key="round")
    options = actions.round_options(ws, user, round_id)
    thumbs_mode = options.mode == "thumbs"
    st.session_state["annot_mode"] = options.mode
    _guidelines(options.guidelines)

    revise = st.session_state.get("revise_group")
    job = actions.next_group(ws, user, round_id, revise=revise)
    total = job.done + job.left
    st.progress(job.done / total if total else 1.0)
    st.caption(f"Done {job.done} / left {job.left} in this round")
    show_messages("annot")
    if job.group is None:
        st.success(
            f"No groups left for you in round {round_id}: you have labelled all you can. "
            "Pick another round above, or wait for the next one."
        )
        st.session_state.pop("ranking", None)
        _my_labels(ws, user, round_id)
        return
    if revise is not None:
        st.warning(
            f"Revising your label of group {revise}; submitting replaces it (kept in its history)."
        )

    state = _state()
    if state is None or state.group_id != job.group.group_id or state.annotator != user.name:
        state = annotation.start_ranking(job.group, user.name)
        st.session_state["ranking"] = state
        st.session_state[f"shown_{state.group_id}"] = time.time()

    typed = _new_keys()
    if typed:
        done = annotation.apply_keys(state, typed, thumbs_mode)
        _consume_keys(done.consumed)
        if done.errors:
            st.session_state["annot_error"] = "; ".join(done.errors)
        if done.action:
            _store_label(ws, user, done.action)
            st.rerun()  # keys typed after it apply to the next group
        show_messages("annot")

    _show_prompt(job.group)
    if thumbs_mode:
        st.caption("Give each candidate a thumb up (acceptable) or down, then **Submit**.")
    else:
        st.caption(
            "Order the candidates best to worst: **Rank next** (or its number key) puts a "
            "candidate in the next place, **Tie with last** (or t, then its key) gives it the "
            "same place as your last pick."
        )
    if options.show_suggestions and job.suggestion is not None:
        st.info(f"Judge suggestion: {_suggestion_text(state, job.suggestion)}")

    differences_view(state, thumbs_mode)
    names = state.letters
    per_row = 2 if len(names) > 2 else len(names)
    for start in range(0, len(names), per_row):
        cols = st.columns(per_row)
        for slot, col in zip(range(start, min(start + per_row, len(names))), cols, strict=False):
            with col:
                _candidate_box(state, slot, thumbs_mode)

    gid = state.group_id
    with st.container(border=True):
        if not thumbs_mode:
            summary = state.summary().replace("  ", EM_SPACES)  # letters only: safe Markdown
            st.markdown(f"**Your ranking:** {summary}" if summary else "**Your ranking:** (empty)")
            if state.tie_armed:
                st.caption("Tie armed: the next key ties with your last pick.")
            elif state.unranked and state.tiers:
                st.caption("Still to place: " + ", ".join(state.unranked))
            u = st.columns(3)
            u[0].button(
                "Tie next",
                key="arm_tie",
                on_click=_ranking_action,
                args=("arm_tie",),
                disabled=not state.tiers or state.complete,
                width="stretch",
            )
            u[1].button(
                "Undo",
                key="undo",
                on_click=_ranking_action,
                args=("undo",),
                disabled=not state.tiers,
                width="stretch",
            )
            u[2].button(
                "Clear",
                key="clear",
                on_click=_ranking_action,
                args=("clear",),
                disabled=not state.tiers,
                width="stretch",
            )
        st.text_area("Comment (optional)", key=f"comment_{gid}", height=80)
        ready = (
            len(_choices(state, "thumb")) == len(state.candidate_ids)
            if thumbs_mode
            else state.can_submit()
        )
        s = st.columns(3)
        s[0].button(
            "Submit",
            key="submit",
            type="primary",
            on_click=_store_label,
            args=(ws, user, "submit"),
            disabled=not ready,
            width="stretch",
        )
        s[1].button(
            "All bad",
            key="all_bad",
            on_click=_store_label,
            args=(ws, user, "all_bad"),
            help="None of these is acceptable: flags the group, which training leaves out.",
            width="stretch",
        )
        s[2].button(
            "Skip",
            key="skip",
            on_click=_store_label,
            args=(ws, user, "skip"),
            width="stretch",
        )
    _my_labels(ws, user, round_id)
