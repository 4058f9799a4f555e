"""The Loop page (researchers): the project's history as one picture, the measures of each
model version as charts, and the running jobs with the time they probably need still."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from app import actions
from labeling import loop_history, reward_audit
from labeling.safe_text import plain
from store import db as storedb
from store.access import User

REFRESH_S = 3.0
CHARTS = (  # measure, title, axis title
    ("accuracy", "Preference accuracy", "held-out preference accuracy"),
    ("kl_per_token", "KL to π_ref", "KL per token (nats)"),
    ("mean_length", "Mean length", "mean answer length (tokens)"),
)


def _duration(seconds: float) -> str:
    """Seconds as '1 h 5 min', '3 min 20 s' or '12 s'."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60} min"
    if s >= 60:
        return f"{s // 60} min {s % 60} s"
    return f"{s} s"


def _winrate_chart(measures: pd.DataFrame, order: list[str]) -> None:
    data = measures.dropna(subset=["win_rate"])
    if data.empty:
        st.caption(
            "Win-rate against π_ref: no version evaluated against the base model yet "
            "(Evaluation page, or `prefloop eval --against base`)."
        )
        return
    data = data[["version", "win_rate", "low", "high", "judge"]]
    x = alt.X("version:N", sort=order, title="model version")
    base = alt.Chart(data).encode(x=x)
    points = base.mark_line(point=True).encode(
        y=alt.Y("win_rate:Q", scale=alt.Scale(domain=[0, 1]), title="win-rate vs π_ref"),
        tooltip=["version", "win_rate", "low", "high", "judge"],
    )
    band = base.mark_errorbar(ticks=True).encode(
        y=alt.Y("low:Q", title="win-rate vs π_ref"), y2="high:Q"
    )
    even = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
    chart = (band + points + even).properties(
        title="Win-rate against π_ref (95% Wilson interval)", height=280
    )
    st.altair_chart(chart, width="stretch")


def _measure_chart(measures: pd.DataFrame, order: list[str], name: str, title: str, axis: str):
    data = measures.dropna(subset=[name])[["version", name]]
    if data.empty:
        st.caption(f"{title}: not measured yet.")
        return
    chart = (
        alt.Chart(data)
        .mark_line(point=True)
        .encode(
            x=alt.X("version:N", sort=order, title="model version"),
            y=alt.Y(f"{name}:Q", title=axis),
            tooltip=["version", name],
        )
        .properties(title=title, height=240)
    )
    st.altair_chart(chart, width="stretch")


def _versions(history: loop_history.LoopHistory) -> None:
    st.subheader("Model versions")
    measures = loop_history.version_measures(history)
    order = list(measures["version"])
    _winrate_chart(measures, order)
    for col, (name, title, axis) in zip(st.columns(len(CHARTS)), CHARTS, strict=True):
        with col:
            _measure_chart(measures, order, name, title, axis)
    st.caption(
        "Each point is a version's latest evaluation (`prefloop eval`); where a version was "
        "not evaluated, preference accuracy and KL come from its promotion gate (column *_from)."
    )
    st.dataframe(measures, hide_index=True, width="stretch")


def jobs_progress(ws: storedb.Workspace) -> None:
    """The running jobs with a progress bar and the time left."""
    st.subheader("Running jobs")
    jobs = loop_history.running_jobs(ws)
    if not jobs:
        st.caption("No job is running. Start one on the Researcher page.")
        return
    for job in jobs:
        head = f"#{job.run_id} {job.what}: running for {_duration(job.elapsed_s)}"
        fraction = job.fraction
        if fraction is None:
            st.text(f"{head}; this kind of job reports no progress")
        else:
            left = (
                f"about {_duration(job.eta_s)} left"
                if job.eta_s is not None
                else "time left not known yet"
            )
            done = f"{job.done:g} of {job.total:g} {job.unit} ({fraction:.0%})"
            st.progress(fraction, text=plain(f"{head}; {done}, {left}"))
        audit = reward_audit.audit_line(ws, job.run_id) if job.kind == "tune" else None
        if audit:  # an online run whose samples people ranked: is the reward still right?
            st.text(audit)


def loop_page(ws: storedb.Workspace, user: User) -> None:
    """Lineage graph, per-version charts and running jobs."""
    actions.research_access(user)
    st.title("Loop")
    history = loop_history.load_history(ws)
    every = REFRESH_S if loop_history.running_jobs(ws) else None
    if history.empty:
        st.info(
            "Nothing yet: no rounds, datasets, model versions or evaluations. Start a round on "
            "the Researcher page (or `prefloop sample`), rank it, then tune a version."
        )
        st.fragment(run_every=every)(jobs_progress)(ws)
        return
    st.subheader("Lineage")
    st.caption(
        "Rounds sampled from a model version → dataset versions frozen from rounds → model "
        "versions tuned on a dataset from a parent (dashed) → their evaluations."
    )
    st.graphviz_chart(loop_history.lineage_dot(loop_history.lineage(history)), width="stretch")
    st.fragment(run_every=every)(jobs_progress)(ws)
    _versions(history)
