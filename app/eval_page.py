"""The Evaluation page: start evaluations, win-rate and drift per model version, human A/B
rounds, per-run metrics, and two versions' completions side by side."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from app import actions, candidate_view, launcher
from labeling.safe_text import plain
from store import db as storedb
from store import evals, models, rounds, runs
from store.access import User
from store.errors import PrefloopError
from store.prompts import SPLITS
from tuning.evaluation import EvalConfig, breaking_reason, human_ab_results

FLUENCY = ["nll_per_token", "nll_per_token_against", "fluency_drift", "broken_share",
           "broken_share_against"]  # fmt: skip
GUARDED = ["guarded_win_rate", "guarded_low", "guarded_high", "guarded_wins", "guarded_losses",
           "guarded_ties"]  # fmt: skip


def _eval_form(
    ws: storedb.Workspace, version_ids: list[str], reward_ids: list[str] | None = None
) -> None:
    registered = list(actions.registered_judges(ws, st.session_state["user"])["name"])
    with st.form("eval_form"):
        st.markdown("**Evaluate a model version**")
        choices = ["base", *version_ids]
        c1, c2 = st.columns(2)
        version = c1.selectbox("Version", list(reversed(choices)), key="eval_version")
        against = c2.selectbox("Against", choices, key="eval_against")
        judge_kind = st.radio(
            "Judge",
            ["LLM judge", "Human A/B round", "Registered judge", "Reward model"],
            horizontal=True,
        )
        picked = st.selectbox(
            "Registered judge (programmatic, registered by the operator)",
            registered,
            index=0 if registered else None,
            key="eval_registered",
        )
        if not registered:
            st.caption(
                "No programmatic judge is registered. The operator registers one on the "
                "command line: `prefloop judges add NAME module:function`."
            )
        reward = st.selectbox(
            "Reward model (trained with `prefloop tune --method rm`)",
            list(reversed(reward_ids or [])),
            index=0 if reward_ids else None,
            key="eval_reward",
        )
        c3, c4, c5 = st.columns(3)
        split = c3.selectbox("Prompts", SPLITS, index=SPLITS.index("heldout"))
        limit = c4.number_input("Limit (0 = all)", min_value=0, value=0)
        k = c5.number_input("Samples per prompt", min_value=1, value=2)
        c6, c7 = st.columns(2)
        max_new = c6.number_input("Max new tokens", min_value=1, value=96)
        seed = c7.number_input("Seed", min_value=0, value=1234)
        if not st.form_submit_button("Start evaluation"):
            return
    judge = {"LLM judge": "llm", "Human A/B round": "human"}.get(judge_kind, picked)
    if judge_kind == "Reward model":
        judge = f"rm:{reward}" if reward else None
        if not judge:
            st.error("No reward model yet; train one with `prefloop tune --method rm`.")
            return
    if not judge:
        st.error(
            "No registered judge to pick; register one with "
            "`prefloop judges add NAME module:function`."
        )
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
        st.error(plain(exc))
        return
    st.success(f"Started the evaluation (process {pid}); results appear below when it ends.")
    st.caption(f"Log: {plain(log_path)}")


def _winrate_chart(wr: pd.DataFrame) -> None:
    base = alt.Chart(wr).encode(x=alt.X("label:N", title="version vs against", sort=None))
    points = base.mark_point(filled=True, size=80).encode(
        y=alt.Y("win_rate:Q", scale=alt.Scale(domain=[0, 1]), title="win-rate (95% Wilson)")
    )
    bars = base.mark_errorbar().encode(y="low:Q", y2="high:Q")
    rule = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
    st.altair_chart(points + bars + rule, width="stretch")


def _rounds_key(round_ids: list | None) -> tuple[int, ...]:
    """Round ids as a comparable tuple."""
    return tuple(int(r) for r in round_ids or [])


def _latest_drift(drift: pd.DataFrame, version: str, round_ids: list | None) -> dict | None:
    """The newest drift row of this version on these rounds (any rounds when none match)."""
    mine = drift[drift["version"] == version]
    same = mine[mine["round_ids"].map(_rounds_key) == _rounds_key(round_ids)]
    pick = same if not same.empty else mine
    return None if pick.empty else pick.iloc[-1].to_dict()


def _with_fluency(wr: pd.DataFrame, drift: pd.DataFrame) -> pd.DataFrame:
    """Win-rate rows with the fluency measures of the drift eval of the same rounds."""
    wr["won_by_breaking"] = None
    for idx, row in wr.iterrows():
        d = _latest_drift(drift, row["version"], row["round_ids"])
        if d is not None and _rounds_key(d["round_ids"]) == _rounds_key(row["round_ids"]):
            for col in FLUENCY:
                wr.at[idx, col] = d.get(col)
            wr.at[idx, "won_by_breaking"] = breaking_reason(_present(d)) is not None
    return wr


def _present(row: dict) -> dict:
    """A flattened row without its missing (NaN) values."""
    return {k: v for k, v in row.items() if not (isinstance(v, float) and pd.isna(v))}


def _pct(x: float | None) -> str:
    """A share as a percentage; a dash when missing."""
    return "–" if x is None or pd.isna(x) else f"{x:.0%}"


def _num(x: float | None, fmt: str = ".3f") -> str:
    """A number formatted; a dash when missing."""
    return "–" if x is None or pd.isna(x) else format(x, fmt)


def _latest_per_version(flat: pd.DataFrame, drift: pd.DataFrame) -> None:
    """Per version, its latest evaluation: the red mark when it won by breaking the model, then
    raw and guarded win-rate beside the fluency measures."""
    latest = flat[flat["kind"].isin(["winrate", "drift"])]
    if latest.empty:
        return
    st.markdown("**Latest evaluation per version**")
    for version in dict.fromkeys(latest["version"]):
        rows = latest[latest["version"] == version]
        last = rows.iloc[-1]
        d = _latest_drift(drift, version, last["round_ids"])
        w = rows[
            (rows["kind"] == "winrate")
            & (rows["round_ids"].map(_rounds_key) == _rounds_key(last["round_ids"]))
        ]
        w = None if w.empty else w.iloc[-1]
        with st.container(border=True):
            st.text(f"{version} vs {last['against']} (rounds {list(last['round_ids'])})")
            reason = breaking_reason(_present(d)) if d is not None else None
            if reason:
                st.error(f"{plain(version)}: won by breaking the model ({plain(reason)})")
            c = st.columns(6)
            c[0].metric("win-rate", _num(None if w is None else w["win_rate"]))
            c[1].metric("guarded win-rate", _num(None if w is None else w["guarded_win_rate"]))
            c[2].metric("NLL/token (π_ref)", _num(None if d is None else d.get("nll_per_token")))
            c[3].metric(
                "NLL/token, against", _num(None if d is None else d.get("nll_per_token_against"))
            )
            c[4].metric("broken share", _pct(None if d is None else d.get("broken_share")))
            c[5].metric(
                "broken, against", _pct(None if d is None else d.get("broken_share_against"))
            )
            if d is not None:
                st.caption(
                    f"fluency drift {_num(d.get('fluency_drift'), '+.3f')} nats/token; "
                    f"KL per token {_num(d.get('kl_per_token'))} (budget "
                    f"{_num(d.get('kl_budget'), 'g')})"
                )


def _results(ws: storedb.Workspace, ev: pd.DataFrame) -> None:
    st.subheader("Results per model version")
    if ev.empty:
        st.caption("No evaluations yet: start one above or run `prefloop eval`.")
        return
    flat = pd.concat([ev.drop(columns=["metrics"]), pd.json_normalize(ev["metrics"])], axis=1)
    flat = flat.reindex(columns=list(dict.fromkeys([*flat.columns, *FLUENCY, *GUARDED])))
    drift = flat[flat["kind"] == "drift"]
    wr = _with_fluency(flat[flat["kind"] == "winrate"].copy(), drift)
    _latest_per_version(flat, drift)
    if not wr.empty:
        wr["label"] = wr["version"] + " vs " + wr["against"] + " #" + wr["id"].astype(str)
        _winrate_chart(wr)
        st.caption(
            "guarded: broken answers (empty, degenerate, or > 1 nat/token less likely under π_ref "
            "than π_ref's median answer) never win; fluency columns from the same rounds' drift"
        )
        st.dataframe(
            wr[["id", "version", "against", "judge", "wins", "losses", "ties", "win_rate", "low",
                "high", *GUARDED, *FLUENCY, "won_by_breaking", "round_ids", "created"]],
            hide_index=True, width="stretch",
        )  # fmt: skip
    if not drift.empty:
        st.markdown(
            "**Drift** (KL to π_ref per token, length, diversity, length-limit hits, NLL per "
            "token under π_ref, broken answers)"
        )
        st.dataframe(
            drift[["id", "version", "against", "kl_per_token", "mean_length", "length_change",
                   "distinct2", "distinct2_against", "length_limit_share", *FLUENCY,
                   "kl_budget", "won_by_breaking", "created"]],
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
                "guarded_win_rate": r.get("guarded_win_rate"),
                "guarded_low": r.get("guarded_low"),
                "guarded_high": r.get("guarded_high"),
                "broken": r.get("broken"),
                "broken_against": r.get("broken_against"),
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
            st.markdown(f"**{plain(name)}**")
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
            candidate_view.show_text(a[pid].prompt)
            for side, group in zip(st.columns(2), (a[pid], b[pid]), strict=True):
                with side:
                    for cid, t in zip(group.candidate_ids, group.texts, strict=True):
                        candidate_view.show_candidate(t, key=f"side_{cid}")


def evaluation_page(ws: storedb.Workspace, user: User) -> None:
    """Start evaluations and read their results."""
    actions.research_access(user)
    st.title("Evaluation")
    with storedb.connect(ws) as con:
        versions = models.list_versions(con)
        version_ids = [str(v) for v in versions[versions["kind"] == models.POLICY]["id"]]
        reward_ids = [str(v) for v in versions[versions["kind"] == models.REWARD]["id"]]
        ev = evals.list_evals(con)
        round_df = rounds.list_rounds(con)
        run_df = runs.list_runs(con)
    _eval_form(ws, version_ids, reward_ids)
    _results(ws, ev)
    _human_rounds(ws, round_df)
    _run_metrics(ws, run_df)
    _side_by_side(ws, round_df)
