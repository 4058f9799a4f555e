"""The Team page: round settings, agreement per annotator, disputes, gold groups, judge."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from app import actions, candidate_view
from labeling.queue import parse_ranking
from labeling.safe_text import plain, plain_list
from store import db as storedb
from store.access import User
from store.errors import PrefloopError
from store.rounds import MODES


def _flash(prefix: str) -> None:
    for suffix, show in (("note", st.success), ("error", st.error)):
        msg = st.session_state.pop(f"{prefix}_{suffix}", None)
        if msg:
            show(plain(msg))


def _do(prefix: str, func, *args, note: str, **kwargs) -> None:
    """Run an action from a callback; leave its message for the next run."""
    try:
        func(*args, **kwargs)
    except PrefloopError as exc:
        st.session_state[f"{prefix}_error"] = str(exc)
        return
    st.session_state[f"{prefix}_note"] = note


def _settings(ws: storedb.Workspace, user: User, round_id: int) -> None:
    opts = actions.round_options(ws, user, round_id)
    with st.form(f"round_settings_{round_id}"):
        st.subheader(f"Round {round_id} settings")
        c1, c2, c3 = st.columns(3)
        c1.selectbox("Mode", MODES, index=MODES.index(opts.mode), key="set_mode")
        c2.number_input(
            "Overlap target (annotators per group)",
            min_value=1,
            max_value=50,
            value=opts.overlap,
            key="set_overlap",
        )
        c3.checkbox(
            "Show judge suggestions to annotators", value=opts.show_suggestions, key="set_show"
        )
        st.text_area(
            "Guidelines (Markdown, shown beside the annotator page)",
            value=opts.guidelines or "",
            height=160,
            key="set_guidelines",
        )
        if st.form_submit_button("Save settings", key="save_settings"):
            _do(
                "team",
                actions.set_round_options,
                ws,
                user,
                round_id,
                mode=st.session_state["set_mode"],
                overlap=int(st.session_state["set_overlap"]),
                show_suggestions=bool(st.session_state["set_show"]),
                guidelines=st.session_state["set_guidelines"],
                note=f"Saved round {round_id}'s settings.",
            )
            st.rerun()


def _agreement(report) -> None:
    st.subheader("Agreement")
    c1, c2, c3 = st.columns(3)
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    c1.metric("Krippendorff's α (ordinal)", fmt(report.alpha))
    c2.metric("Mean pairwise agreement", fmt(report.mean_agreement))
    c3.metric("Groups with 2+ annotators", report.groups_with_overlap)
    if report.annotators.empty:
        st.caption("No labels yet.")
        return
    table = report.annotators.rename(
        columns={
            "n_labels": "labels",
            "pairwise_agreement": "agreement with others",
            "kendall_tau": "Kendall τ",
            "gold_accuracy": "gold accuracy",
            "median_seconds": "median s/label",
        }
    )
    st.dataframe(table, hide_index=True, width="stretch", key="annotator_table")
    flagged = list(report.annotators.loc[report.annotators["flagged"], "annotator"])
    if flagged:
        st.warning(
            "Below the agreement threshold (on gold groups when they have 3+, else with "
            f"their peers): {plain_list(flagged)}. `prefloop dataset freeze "
            "--exclude-flagged` leaves their labels out."
        )
    if "judge" in set(report.annotators["annotator"]):
        row = report.annotators.set_index("annotator").loc["judge"]
        agree = row["pairwise_agreement"]
        st.caption(
            "Judge–human agreement: "
            + ("–" if agree is None or pd.isna(agree) else f"{agree:.3f}")
            + " (the judge's labels against every human's on the same groups)"
        )


def _bias_chart(bias) -> None:
    frame = bias.position_frame()
    if frame.empty:
        return
    base = alt.Chart(frame).encode(
        x=alt.X("annotator:N", title=None),
        xOffset=alt.XOffset("shown:N"),
        color=alt.Color("shown:N", title="candidate shown"),
    )
    points = base.mark_point(filled=True, size=70).encode(
        y=alt.Y("rate:Q", scale=alt.Scale(domain=[0, 1]), title="ranked best (95% Wilson)"),
        tooltip=["annotator:N", "shown:N", "rate:Q", "low:Q", "high:Q", "chance:Q"],
    )
    bars = base.mark_errorbar().encode(y="low:Q", y2="high:Q")
    chance = (
        alt.Chart(frame)
        .mark_tick(color="gray", thickness=2, size=30)
        .encode(x="annotator:N", y="chance:Q", tooltip=["chance:Q"])
    )
    st.altair_chart(points + bars + chance, width="stretch", key="bias_chart")


def _bias(bias) -> None:
    st.subheader("Annotator bias")
    if not bias.annotators:
        st.caption("No ranked labels yet.")
        return
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    st.caption(
        "How often the candidate each annotator saw first (or last) is ranked best, against "
        "the chance rate 1/K (gray tick); rank vs length and Markdown density as Kendall τ "
        "(> 0: longer / denser ranked better) against the other annotators' consensus on the "
        f"same groups. Consensus of all annotators: length τ {fmt(bias.consensus_length_tau)}, "
        f"Markdown τ {fmt(bias.consensus_markdown_tau)}."
    )
    st.dataframe(bias.summary(), hide_index=True, width="stretch", key="bias_table")
    _bias_chart(bias)
    flagged = bias.flagged()
    if flagged:
        st.warning(
            f"Possible bias (p < {bias.alpha:g} with at least {bias.min_groups} groups): "
            + "; ".join(f"{plain(name)} ({', '.join(kinds)})" for name, kinds in flagged.items())
            + ". Freezing with a down-weight for flagged annotators (the Researcher page's "
            "freeze form, or `prefloop dataset freeze --downweight-biased 0.5`) counts them less "
            "in the consensus."
        )
    with st.expander("How the bias tests work"):
        st.markdown(
            f"- Position: {bias.tests['position']}.\n- Length: {bias.tests['length']}.\n"
            "- Markdown density (share of characters that are Markdown syntax) is shown, "
            "not flagged."
        )


def _disputes(ws: storedb.Workspace, user: User, report) -> None:
    st.subheader("Disputes")
    if report.disputes.empty:
        st.caption("No group where the annotators disagree on half of the pairs or more.")
        return
    st.dataframe(report.disputes, hide_index=True, width="stretch", key="disputes_table")
    gid = st.selectbox("Adjudicate group", list(report.disputes["group_id"]), key="dispute_pick")
    group, labs = actions.group_detail(ws, user, int(gid))
    st.caption("Prompt")
    candidate_view.show_text(group.prompt)
    for cid, text in zip(group.candidate_ids, group.texts, strict=True):
        st.caption(f"Candidate {cid}")
        candidate_view.show_candidate(text, key=f"adj_{cid}")
    st.dataframe(
        labs[["annotator", "ranking", "flags", "comment"]].astype(str),
        hide_index=True,
        width="stretch",
    )
    with st.form(f"adjudicate_{gid}"):
        st.text_input(
            "Decided ranking (candidate ids best first, > between places, = ties)",
            placeholder=">".join(str(c) for c in group.candidate_ids),
            key="adj_ranking",
        )
        st.checkbox("Drop the group instead (all bad)", key="adj_drop")
        st.text_input("Note", key="adj_note")
        if st.form_submit_button("Save decision", key="adjudicate_submit"):
            drop = bool(st.session_state["adj_drop"])
            try:
                ranking = None if drop else parse_ranking(st.session_state["adj_ranking"])
            except PrefloopError as exc:
                st.session_state["team_error"] = str(exc)
            else:
                _do(
                    "team",
                    actions.adjudicate,
                    ws,
                    user,
                    int(gid),
                    ranking,
                    ["all_bad"] if drop else None,
                    st.session_state["adj_note"],
                    note=f"Saved the decision on group {gid}; training uses it.",
                )
            st.rerun()


def _gold(ws: storedb.Workspace, user: User, round_id: int) -> None:
    st.subheader("Gold groups")
    golden = actions.gold_groups(ws, user, [round_id])
    if golden:
        st.dataframe(
            pd.DataFrame({"group_id": list(golden), "ranking": [str(r) for r in golden.values()]}),
            hide_index=True,
            width="stretch",
        )
    else:
        st.caption("No gold groups in this round. Gold groups are mixed into every queue.")
    with st.form(f"gold_{round_id}"):
        c1, c2 = st.columns([1, 3])
        c1.number_input("Group id", min_value=1, step=1, key="gold_group")
        c2.text_input("Known ranking (candidate ids, e.g. 12>13=14>15)", key="gold_ranking")
        if st.form_submit_button("Mark as gold", key="gold_submit"):
            try:
                ranking = parse_ranking(st.session_state["gold_ranking"])
            except PrefloopError as exc:
                st.session_state["team_error"] = str(exc)
            else:
                gid = int(st.session_state["gold_group"])
                _do(
                    "team",
                    actions.set_gold,
                    ws,
                    user,
                    gid,
                    ranking,
                    note=f"Group {gid} is gold.",
                )
            st.rerun()


def _judge(ws: storedb.Workspace, user: User, round_id: int) -> None:
    registered = actions.registered_judges(ws, user)
    with st.form(f"judge_{round_id}"):
        st.subheader("Judge suggestions")
        st.selectbox(
            "Judge: llm, or a programmatic judge the operator registered",
            ["llm", *registered["name"]],
            key="judge_name",
        )
        if registered.empty:
            st.caption(
                "No programmatic judge is registered. The operator registers one on the "
                "command line: `prefloop judges add NAME module:function`."
            )
        st.checkbox("Also label as annotator 'judge' (judge–human agreement)", key="judge_as")
        st.checkbox("Show the suggestions to annotators", key="judge_show")
        if st.form_submit_button("Start judging", key="judge_start"):
            args = ["judge", str(round_id), "--judge", st.session_state["judge_name"]]
            if st.session_state["judge_as"]:
                args.append("--as-annotator")
            if st.session_state["judge_show"]:
                args += ["--show", "on"]
            _do(
                "team",
                actions.start_job,
                ws,
                user,
                args,
                note=f"Started judging round {round_id}; refresh to see the suggestions.",
            )
            st.rerun()


def team_page(ws: storedb.Workspace, user: User) -> None:
    """Round settings, agreement, disputes, gold, judge."""
    actions.research_access(user)
    st.title("Team")
    _flash("team")
    round_df = actions.labelling_rounds(ws, user)
    if round_df.empty:
        st.info("No rounds yet.")
        return
    titles = dict(zip(round_df["id"], round_df["title"], strict=True))
    round_id = st.selectbox("Round", list(titles), format_func=titles.get, key="team_round")
    report = actions.team_report(ws, user, [int(round_id)])
    _agreement(report)
    _bias(actions.bias_report(ws, user, [int(round_id)]))
    _disputes(ws, user, report)
    c1, c2 = st.columns(2)
    with c1:
        _settings(ws, user, int(round_id))
    with c2:
        _gold(ws, user, int(round_id))
        _judge(ws, user, int(round_id))
