"""The researcher's dataset panel: freeze a curated dataset version, read its card."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import actions
from labeling.curation import Curation
from labeling.safe_text import plain
from store import db as storedb
from store.access import User
from store.errors import PrefloopError

DOWNWEIGHT_CHOICES = ("off", "0.5", "0.25", "0")


def _names(text: str) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def _freeze(ws: storedb.Workspace, user: User) -> None:
    get = st.session_state.get
    downweight = get("cur_downweight") or "off"
    cur = Curation(
        rounds=[int(r) for r in get("cur_rounds") or []] or None,
        annotators=_names(get("cur_annotators")) or None,
        exclude_annotators=_names(get("cur_exclude")),
        exclude_flagged=bool(get("cur_exclude_flagged")),
        min_agreement=float(get("cur_min_agreement")) or None,
        keep_all_bad=bool(get("cur_keep_all_bad")),
        dedupe=bool(get("cur_dedupe")),
        max_length_ratio=float(get("cur_max_ratio")) or None,
        heldout_fraction=float(get("cur_heldout")),
        split_seed=int(get("cur_seed") or 0),
        downweight_biased=None if downweight == "off" else float(downweight),
    )
    try:
        frozen = actions.freeze_dataset(ws, user, cur)
    except PrefloopError as exc:
        st.session_state["ds_error"] = str(exc)
        return
    held = f" and held-out version {frozen.heldout}" if frozen.heldout else ""
    st.session_state["ds_note"] = f"Froze dataset version {frozen.train}{held}."
    st.session_state["ds_pick"] = frozen.train


def datasets_panel(ws: storedb.Workspace, user: User, dataset_df: pd.DataFrame, round_ids) -> None:
    """Curated freezing and the dataset versions' cards."""
    st.subheader("Dataset versions")
    for suffix, show in (("note", st.success), ("error", st.error)):
        msg = st.session_state.pop(f"ds_{suffix}", None)
        if msg:
            show(plain(msg))
    with st.expander("Freeze a curated dataset version"), st.form("freeze_form"):
        st.multiselect("Rounds (empty: every train round)", list(round_ids), key="cur_rounds")
        c1, c2 = st.columns(2)
        c1.text_input("Only these annotators (comma-separated)", key="cur_annotators")
        c2.text_input("Leave out annotators", key="cur_exclude")
        c1.checkbox("Leave out flagged annotators", key="cur_exclude_flagged")
        c2.checkbox("Keep groups flagged all bad", key="cur_keep_all_bad")
        c1.checkbox("One group per prompt (dedupe)", key="cur_dedupe")
        c2.number_input(
            "Min agreement per group (0 = off)", 0.0, 1.0, 0.0, 0.05, key="cur_min_agreement"
        )
        c1.number_input(
            "Max chosen/rejected length ratio (0 = off)",
            0.0,
            100.0,
            0.0,
            0.5,
            key="cur_max_ratio",
        )
        c2.number_input("Held-out share of prompts", 0.0, 0.9, 0.0, 0.05, key="cur_heldout")
        c1.number_input("Split seed", 0, 2**31 - 1, 0, key="cur_seed")
        c2.selectbox(
            "Weight of bias-flagged annotators in the consensus (Team page audit)",
            DOWNWEIGHT_CHOICES,
            key="cur_downweight",
            help="off: count them like everyone; 0: leave their rankings out",
        )
        st.form_submit_button("Freeze", key="freeze_submit", on_click=_freeze, args=(ws, user))
    if dataset_df.empty:
        st.caption("No dataset versions yet.")
        return
    st.dataframe(
        dataset_df[["id", "n_groups", "n_pairs", "rounds", "created"]],
        hide_index=True,
        width="stretch",
    )
    ids = list(reversed([str(d) for d in dataset_df["id"]]))
    if st.session_state.get("ds_pick") not in ids:
        st.session_state.pop("ds_pick", None)
    pick = st.selectbox("Card of version", ids, key="ds_pick")
    with st.container(border=True):
        st.markdown(actions.dataset_card(ws, user, pick))  # names and filters escaped in the card
