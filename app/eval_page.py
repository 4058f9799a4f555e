"""The Evaluation page: start evaluations, win-rate and drift per model version, human A/B
rounds, per-run metrics, and two versions' completions side by side."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from app import actions, launcher
from store import db as storedb
from store import evals, models, rounds, runs
from store.access import User
from store.errors import PrefloopError
from store.prompts import SPLITS
from tuning.evaluation import EvalConfig, human_ab_results


def _eval_form(ws: storedb.Workspace, version_ids: list[str]) -> None:
    with st.form("eval_form"):
        st.markdown("**Evaluate a model version**")
        choices = ["base", *version_ids]
        c1, c2 = st.columns(2)
        version = c1.selectbox("Version", list(reversed(choices)), key="eval_version")
        against = c2.selectbox("Against", choices, key="eval_against")
        judge_kind = st.radio(
            "Judge", ["LLM judge", "Human A/B round", "Programmatic"], horizontal=True
        )
        spec = st.text_input("Programmatic judge (module:function)", key="eval_spec")
        c3, c4, c5 = st.columns(3)
        split = c3.selectbox("Prompts", SPLITS, index=SPLITS.index("heldout"))
        limit = c4.number_input("Limit (0 = all)", min_value=0, value=0)
        k = c5.number_input("Samples per prompt", min_value=1, value=2)
        c6, c7 = st.columns(2)
        max_new = c6.number_input("Max new tokens", min_value=1, value=96)
        seed = c7.number_input("Seed", min_value=0, value=1234)
        if not st.form_submit_button("Start evaluation"):
            return
    judge = {"LLM judge": "llm", "Human A/B round": "human"}.get(judge_kind, spec.strip())
    if not judge:
        st.error("Enter the programmatic judge as module:function.")
        return
    if version == against:
        st.error("Pick two different versions.")
        return
    cfg = EvalConfig(
        against=against,
        judge=judge,
        split=split,
        limit=int(limit) or None,
        k=int(k),
        max_new_tokens=int(max_new),
        seed=int(seed),
    )
    try:
        pid, log_path = actions.start_job(
            ws, st.session_state["user"], launcher.eval_args(version, cfg)
        )
    except PrefloopError as exc:
        st.error(str(exc))
        return
    st.success(f"Started the evaluation (process {pid}); results appear below when it ends.")
    st.caption(f"Log: {log_path}")


def _winrate_chart(wr: pd.DataFrame) -> None:
    base = alt.Chart(wr).encode(x=alt.X("label:N", title="version vs against", sort=None))
    points = base.mark_point(filled=True, size=80).encode(
        y=alt.Y("win_rate:Q", scale=alt.Scale(domain=[0, 1]), title="win-rate (95% Wilson)")
    )
    bars = base.mark_errorbar().encode(y="low:Q", y2="high:Q")
    rule = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
    st.altair_chart(points + bars + rule, width="stretch")


def _results(ws: storedb.Workspace, ev: pd.DataFrame) -> None:
    st.subheader("Results per model version")
    if ev.empty:
        st.caption("No evaluations yet: start one above or run `prefloop eval`.")
        return
    flat = pd.concat([ev.drop(columns=["metrics"]), pd.json_normalize(ev["metrics"])], axis=1)
    wr = flat[flat["kind"] == "winrate"].copy()
    if not wr.empty:
        wr["label"] = wr["version"] + " vs " + wr["against"] + " #" + wr["id"].astype(str)
        _winrate_chart(wr)
        st.dataframe(
            wr[["id", "version", "against", "judge", "wins", "losses", "ties", "win_rate", "low",
                "high", "round_ids", "created"]],
            hide_index=True, width="stretch",
        )  # fmt: skip
    drift = flat[flat["kind"] == "drift"]
    if not drift.empty:
        st.markdown("**Drift** (KL to π_ref per token, length, diversity, length-limit hits)")
        st.dataframe(
            drift[["id", "version", "against", "kl_per_token", "mean_length", "length_change",
                   "distinct2", "distinct2_against", "length_limit_share", "created"]],
            hide_index=True, width="stretch",
        )  # fmt: skip
    pref = flat[flat["kind"] == "preference"]
    if not pref.empty:
        st.markdown("**Held-out preference accuracy and calibration**")
        st.dataframe(
            pref[["id", "version", "accuracy", "ece", "pairs", "judge", "created"]],
            hide_index=True,
            width="stretch",
        )
        pick = st.selectbox("Reliability curve of", list(pref["id"])[::-1], key="curve_pick")
        with storedb.connect(ws) as con:
            curve = pd.DataFrame(evals.eval_details(con, pick) or [])
        if not curve.empty:
            dots = (
                alt.Chart(curve)
                .mark_line(point=True)
                .encode(
                    x=alt.X("predicted:Q", scale=alt.Scale(domain=[0, 1]), title="σ(β·margin)"),
                    y=alt.Y(
                        "observed:Q", scale=alt.Scale(domain=[0, 1]), title="observed agreement"
                    ),
                )
            )
            diag = (
                alt.Chart(pd.DataFrame({"x": [0, 1], "y": [0, 1]}))
                .mark_line(strokeDash=[4, 4], color="gray")
                .encode(x="x:Q", y="y:Q")
            )
            st.altair_chart(dots + diag, width="stretch")


def _human_rounds(ws: storedb.Workspace, round_df: pd.DataFrame) -> None:
    ab = round_df[round_df["source"].str.startswith("eval:")]
    if ab.empty:
        return
    st.subheader("Human A/B rounds")
    rows = []
    for rid in ab["id"]:
        r = human_ab_results(ws, int(rid))
        rows.append(
            {
                "round": r["round"],
                "version": r["version"],
                "against": r["against"],
                "judged": r["n"],
                "wins": r["wins"],
                "losses": r["losses"],
                "ties": r["ties"],
                "win_rate": r.get("win_rate"),
                "low": r.get("low"),
                "high": r.get("high"),
            }
        )
    st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    st.caption("Annotators rank these rounds on the Annotator page (blind, sides shuffled).")


def _run_metrics(ws: storedb.Workspace, run_df: pd.DataFrame) -> None:
    tunes = run_df[run_df["kind"] == "tune"]
    if tunes.empty:
        return
    st.subheader("Training metrics per run")
    run_id = st.selectbox(
        "Run",
        list(tunes["id"]),
        key="eval_run_pick",
        format_func=lambda i: f"#{i} ({tunes.set_index('id').at[i, 'result']})",
    )
    with storedb.connect(ws) as con:
        metrics = runs.run_metrics(con, int(run_id))
    if metrics.empty:
        st.caption("No metrics logged.")
        return
    names = [c for c in metrics.columns if c != "epoch"]
    chosen = st.multiselect("Metrics", names, default=names[:4], key="eval_metric_pick")
    cols = st.columns(2)
    for i, name in enumerate(chosen):
        with cols[i % 2]:
            st.markdown(f"**{name}**")
            st.line_chart(metrics[[name]].dropna(), height=220)


def _side_by_side(ws: storedb.Workspace, round_df: pd.DataFrame) -> None:
    sampled = round_df[round_df["source"] == "sampled"]
    if len(sampled) < 2:
        return
    st.subheader("Completions side by side")
    label = {
        int(r.id): f"round {r.id}: {r.model_version}, {r.split}, seed {r.settings.get('seed')}"
        for r in sampled.itertuples()
    }
    ids = list(label)
    c1, c2 = st.columns(2)
    left = c1.selectbox("Left", ids, index=len(ids) - 1, format_func=label.get, key="sbs_left")
    partner = rounds.comparable_round(sampled, left)
    right = c2.selectbox(
        "Right",
        ids,
        index=ids.index(partner) if partner in ids else 0,
        format_func=label.get,
        key=f"sbs_right_{left}",
    )
    with storedb.connect(ws) as con:
        a = {g.prompt_id: g for g in rounds.groups(con, round_id=left)}
        b = {g.prompt_id: g for g in rounds.groups(con, round_id=right)}
    shared = sorted(set(a) & set(b))
    if not shared:
        st.caption("These rounds share no prompts.")
        return
    for pid in shared[:20]:
        with st.container(border=True):
            st.caption("Prompt")
            st.text(a[pid].prompt)
            la, rb = st.columns(2)
            with la:
                for t in a[pid].texts:
                    st.text(t)
            with rb:
                for t in b[pid].texts:
                    st.text(t)


def evaluation_page(ws: storedb.Workspace, user: User) -> None:
    """Start evaluations and read their results."""
    actions.research_access(user)
    st.title("Evaluation")
    with storedb.connect(ws) as con:
        version_ids = [str(v) for v in models.list_versions(con)["id"]]
        ev = evals.list_evals(con)
        round_df = rounds.list_rounds(con)
        run_df = runs.list_runs(con)
    _eval_form(ws, version_ids)
    _results(ws, ev)
    _human_rounds(ws, round_df)
    _run_metrics(ws, run_df)
    _side_by_side(ws, round_df)
