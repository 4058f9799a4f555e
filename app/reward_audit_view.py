"""The run view's reward audit: reward–human agreement on an online run's own samples, per
training step (the numbers come from labeling.reward_audit)."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from labeling.reward_audit import agreement_curve, curve_summary
from labeling.safe_text import plain
from store import db as storedb
from store.errors import PrefloopError

CAPTION = (
    "Reward–human agreement on the policy's own samples: of the pairs the annotators ordered in "
    "this run's audit round, the share the run's reward orders the same way (a reward tie counts "
    "half), per training step, with 95% Wilson intervals; 0.5 is chance. The reward climbing "
    "while this falls is the alarm that the policy games the reward."
)


def is_online_run(row: dict) -> bool:
    """Whether a runs row is an online tuning run (one with step rounds and maybe an audit)."""
    config = row.get("config") if isinstance(row.get("config"), dict) else {}
    return row.get("kind") == "tune" and (
        config.get("method") in ("rloo", "ppo") or bool(config.get("online"))
    )


def _chart(curve: pd.DataFrame) -> alt.LayerChart:
    data = curve.dropna(subset=["agreement"])[
        ["step", "agreement", "low", "high", "pairs", "labelled_groups"]
    ]
    x = alt.X("step:Q", title="training step", axis=alt.Axis(tickMinStep=1))
    base = alt.Chart(data).encode(x=x)
    line = base.mark_line(point=True).encode(
        y=alt.Y("agreement:Q", scale=alt.Scale(domain=[0, 1]), title="reward–human agreement"),
        tooltip=["step", "agreement", "low", "high", "pairs", "labelled_groups"],
    )
    bars = base.mark_errorbar(ticks=True).encode(
        y=alt.Y("low:Q", title="reward–human agreement"), y2="high:Q"
    )
    chance = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
    return (bars + line + chance).properties(title="Reward audit", height=260)


def audit_panel(ws: storedb.Workspace, run_id: int) -> None:
    """The agreement curve of an online run's audit round, its table and what it means."""
    st.markdown("**Reward audit**")
    try:
        curve = agreement_curve(ws, run_id)
    except PrefloopError as exc:
        st.caption(plain(exc))
        return
    st.caption(CAPTION)
    if curve["pairs"].sum() > 0:
        st.altair_chart(_chart(curve), width="stretch", key=f"reward_audit_{run_id}")
    st.text(curve_summary(curve, run_id))
    st.dataframe(curve, hide_index=True, width="stretch", key=f"reward_audit_table_{run_id}")
