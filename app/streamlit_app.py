"""The prefloop web app: an annotator page (ranking) and a researcher page (rounds, jobs, models).

Run it with `prefloop serve --workspace DIR`. The page is a thin layer: ranking state lives in
labeling.annotation, every query in store, background jobs in tuning.launcher. Model output
(prompts, candidates, logs) is shown only as plain text (st.text / st.code without a language).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from labeling import annotation
from store import datasets, models, rounds, runs
from store import db as storedb
from store.errors import PrefloopError
from store.prompts import SPLITS
from tuning import launcher
from tuning.config import DPOConfig, GRPOConfig, LoraSettings, SamplingConfig

PAGES = ("Annotator", "Researcher", "Evaluation")
METHODS = {  # label -> (method, DPO loss; None = listwise Plackett–Luce)
    "DPO (sigmoid)": ("dpo", "sigmoid"),
    "DPO (IPO)": ("dpo", "ipo"),
    "DPO (hinge)": ("dpo", "hinge"),
    "DPO (robust)": ("dpo", "robust"),
    "DPO listwise (Plackett–Luce)": ("dpo", None),
    "GRPO": ("grpo", None),
}
REFRESH_S = 3.0
NO_PARENT = "(base model)"
NEW_DATASET = "(freeze the current labels)"
EM_SPACES = "\u2003\u2003"  # Markdown would collapse the plain double space between places

# Widget values that must survive a visit to the other page (Streamlit drops the state of
# widgets that were not drawn in a run unless it is written back).
for _key in ("annotator", "round"):
    if _key in st.session_state:
        st.session_state[_key] = st.session_state[_key]


def load_workspace() -> storedb.Workspace:
    """The workspace from $PREFLOOP_WORKSPACE, or stop the page with what to do."""
    try:
        return storedb.workspace()
    except PrefloopError as exc:
        st.error(
            f"{exc}\n\nStart the web app with `prefloop serve --workspace DIR` "
            "(or set PREFLOOP_WORKSPACE to a workspace folder before `streamlit run`)."
        )
        st.stop()


def show_messages(prefix: str) -> None:
    """Show (once) the message and error a button callback left for this page."""
    note = st.session_state.pop(f"{prefix}_note", None)
    if note:
        st.success(note)
    error = st.session_state.pop(f"{prefix}_error", None)
    if error:
        st.error(error)


# ----------------------------------------------------------------------------------------------
# Annotator page


def _ranking_action(action: str, name: str | None = None) -> None:
    state: annotation.RankingState | None = st.session_state.get("ranking")
    if state is None:
        return
    try:
        if action == "rank":
            state.rank_next(name)
        elif action == "tie":
            state.tie_with_last(name)
        elif action == "undo":
            state.undo()
        elif action == "clear":
            state.reset()
    except PrefloopError as exc:
        st.session_state["annot_error"] = str(exc)


def _store_label(ws: storedb.Workspace, skip: bool) -> None:
    state: annotation.RankingState | None = st.session_state.get("ranking")
    if state is None:
        return
    gid = state.group_id
    comment = st.session_state.get(f"comment_{gid}")
    try:
        if skip:
            record = state.skip_label(comment)
        else:
            record = state.to_label(
                all_bad=bool(st.session_state.get(f"all_bad_{gid}")), comment=comment
            )
        annotation.save_label(ws, record)
    except PrefloopError as exc:
        st.session_state["annot_error"] = str(exc)
        return
    st.session_state.pop("ranking", None)
    st.session_state["annot_note"] = "Skipped that group." if skip else "Saved your ranking."


def _show_prompt(group) -> None:
    with st.container(border=True):
        st.caption("Prompt")
        if group.messages:
            for turn in group.messages:  # imported data: plain text only, roles included
                st.text(f"[{turn.get('role', '')}]")
                st.text(str(turn.get("content", "")))
        else:
            st.text(group.prompt)


def _show_candidates(state: annotation.RankingState) -> None:
    names = state.letters
    per_row = 2 if len(names) > 2 else len(names)
    something_ranked = bool(state.tiers)
    for start in range(0, len(names), per_row):
        cols = st.columns(per_row)
        for col, name in zip(cols, names[start : start + per_row], strict=False):
            place = state.place_of(name)
            with col, st.container(border=True, key=f"cand_{name}"):
                head = f"**Candidate {name}**"
                if place is not None:
                    head += f" · ranked #{place}"
                st.markdown(head)
                st.text(state.text_of(name))
                b1, b2 = st.columns(2)
                b1.button(
                    "Rank next",
                    key=f"rank_{name}",
                    on_click=_ranking_action,
                    args=("rank", name),
                    disabled=place is not None,
                    width="stretch",
                )
                if something_ranked:
                    b2.button(
                        "Tie with last",
                        key=f"tie_{name}",
                        on_click=_ranking_action,
                        args=("tie", name),
                        disabled=place is not None,
                        width="stretch",
                    )


def annotator_page(ws: storedb.Workspace) -> None:
    """Rank the next group of a round: order the candidates best to worst."""
    st.title("Rank candidates")
    with storedb.connect(ws) as con:
        round_df = rounds.list_rounds(con)
    top = st.columns([1, 2])
    name = top[0].text_input("Annotator name", key="annotator", placeholder="your name")
    if round_df.empty:
        st.info(
            "This workspace has no rounds yet. A researcher starts one on the Researcher page "
            "(or with `prefloop sample`)."
        )
        return
    titles = {
        int(r.id): annotation.round_title(int(r.id), r.model_version, r.source)
        for r in round_df.itertuples()
    }
    round_ids = sorted(titles, reverse=True)
    if st.session_state.get("round") not in round_ids:
        st.session_state.pop("round", None)
    round_id = top[1].selectbox("Round", round_ids, format_func=titles.get, key="round")
    if not (name or "").strip():
        st.info("Enter your annotator name to start ranking.")
        return
    try:
        job = annotation.next_assignment(ws, name, round_id)
    except PrefloopError as exc:
        st.error(str(exc))
        return
    total = job.done + job.left
    st.progress(job.done / total if total else 1.0)
    st.caption(f"Done {job.done} / left {job.left} in this round")
    show_messages("annot")
    if job.group is None:
        st.success(
            f"No groups left for you in round {round_id}: you have labelled all {total}. "
            "Pick another round above, or wait for the next one."
        )
        st.session_state.pop("ranking", None)
        return

    state: annotation.RankingState | None = st.session_state.get("ranking")
    if (
        state is None
        or state.group_id != job.group.group_id
        or state.annotator != annotation.clean_annotator(name)
    ):
        state = annotation.start_ranking(job.group, name)
        st.session_state["ranking"] = state

    _show_prompt(job.group)
    st.caption(
        "Order the candidates best to worst: **Rank next** puts a candidate in the next place, "
        "**Tie with last** gives it the same place as your last pick."
    )
    _show_candidates(state)

    gid = state.group_id
    with st.container(border=True):
        summary = state.summary().replace("  ", EM_SPACES)  # letters only: safe as Markdown
        st.markdown(f"**Your ranking:** {summary}" if summary else "**Your ranking:** (empty)")
        if state.unranked and state.tiers:
            st.caption("Still to place: " + ", ".join(state.unranked))
        u1, u2, _ = st.columns([1, 1, 4])
        u1.button(
            "Undo",
            key="undo",
            on_click=_ranking_action,
            args=("undo",),
            disabled=not state.tiers,
            width="stretch",
        )
        u2.button(
            "Clear",
            key="clear",
            on_click=_ranking_action,
            args=("clear",),
            disabled=not state.tiers,
            width="stretch",
        )
        all_bad = st.checkbox(
            "All bad (none of these is acceptable)",
            key=f"all_bad_{gid}",
            help="Flags the group; it is left out of training. An unfinished ranking is "
            "stored as all tied.",
        )
        st.text_area("Comment (optional)", key=f"comment_{gid}", height=80)
        s1, s2, _ = st.columns([1, 1, 4])
        s1.button(
            "Submit",
            key="submit",
            type="primary",
            on_click=_store_label,
            args=(ws, False),
            disabled=not state.can_submit(all_bad),
            width="stretch",
        )
        s2.button(
            "Skip",
            key="skip",
            on_click=_store_label,
            args=(ws, True),
            width="stretch",
        )


# ----------------------------------------------------------------------------------------------
# Researcher page


def _launch(ws: storedb.Workspace, args: list[str], what: str) -> None:
    try:
        pid, log_path = launcher.start_job(ws, args)
    except PrefloopError as exc:
        st.error(str(exc))
        return
    st.success(f"Started {what} (process {pid}); it shows under Jobs once it has loaded the model.")
    st.caption(f"Log: {log_path}")


def _sampling_form(ws: storedb.Workspace, version_ids: list[str], newest: str) -> None:
    options = [models.BASE, *version_ids]
    if st.session_state.get("sample_newest") != newest or (
        st.session_state.get("sample_version") not in options
    ):
        # default to the newest version, also when one appears while the page is open
        st.session_state["sample_newest"] = newest
        st.session_state["sample_version"] = newest
    with st.form("sample_form"):
        st.subheader("Start a sampling round")
        version = st.selectbox("Model version", options, key="sample_version")
        split = st.selectbox("Split", SPLITS, key="sample_split")
        c1, c2 = st.columns(2)
        k = c1.number_input(
            "Candidates per prompt (K)", min_value=2, max_value=16, value=4, key="sample_k"
        )
        max_new = c2.number_input(
            "Max new tokens", min_value=1, max_value=4096, value=128, key="sample_max_new_tokens"
        )
        temperature = c1.number_input(
            "Temperature",
            min_value=0.0,
            max_value=2.0,
            value=0.8,
            step=0.05,
            key="sample_temperature",
        )
        top_p = c2.number_input(
            "Top-p", min_value=0.05, max_value=1.0, value=0.95, step=0.05, key="sample_top_p"
        )
        seed = c1.number_input("Seed", min_value=0, value=0, key="sample_seed")
        limit = c2.number_input(
            "Limit (first N prompts; 0 = all)", min_value=0, value=0, key="sample_limit"
        )
        if st.form_submit_button("Start sampling", key="start_sampling"):
            cfg = SamplingConfig(
                k=int(k),
                max_new_tokens=int(max_new),
                temperature=float(temperature),
                top_p=float(top_p),
                seed=int(seed),
                split=split,
                limit=int(limit) or None,
            )
            _launch(ws, launcher.sample_args(cfg, version), f"sampling from {version}")


def _tuning_form(ws: storedb.Workspace, version_ids: list[str], dataset_ids: list[str]) -> None:
    default = DPOConfig()
    with st.form("tune_form"):
        st.subheader("Start a tuning run")
        method = st.selectbox("Method", list(METHODS), key="tune_method")
        c1, c2 = st.columns(2)
        beta = c1.number_input(
            "Beta", min_value=0.001, max_value=10.0, value=default.beta, key="tune_beta"
        )
        epochs = c2.number_input(
            "Epochs", min_value=1, max_value=100, value=default.epochs, key="tune_epochs"
        )
        lr = c1.number_input(
            "Learning rate",
            min_value=1e-7,
            max_value=1e-2,
            value=default.lr,
            step=1e-5,
            format="%.1e",
            key="tune_lr",
        )
        groups_per_step = c2.number_input(
            "Groups per step",
            min_value=1,
            max_value=256,
            value=default.groups_per_step,
            key="tune_groups_per_step",
        )
        lora_r = c1.number_input(
            "LoRA r", min_value=1, max_value=256, value=default.lora.r, key="tune_lora_r"
        )
        lora_alpha = c2.number_input(
            "LoRA alpha",
            min_value=1,
            max_value=512,
            value=default.lora.alpha,
            key="tune_lora_alpha",
        )
        parent = c1.selectbox("Continue from (--from)", [NO_PARENT, *version_ids], key="tune_from")
        dataset = c2.selectbox(
            "Dataset version", [NEW_DATASET, *reversed(dataset_ids)], key="tune_dataset"
        )
        sft = c1.number_input("DPO: SFT weight α", min_value=0.0, value=0.0, key="tune_sft")
        gains = c2.text_input(
            "GRPO: gains (linear, dcg or 1,0.6,0.3,0)", "linear", key="tune_gains"
        )
        target_kl = c1.number_input(
            "GRPO: target KL per token (0 = fixed β)",
            min_value=0.0,
            value=0.0,
            format="%.3f",
            key="tune_target_kl",
        )
        if st.form_submit_button("Start tuning run", key="start_tuning"):
            name, loss = METHODS[method]
            common = dict(
                epochs=int(epochs),
                lr=float(lr),
                groups_per_step=int(groups_per_step),
                lora=LoraSettings(r=int(lora_r), alpha=int(lora_alpha)),
            )
            if name == "grpo":
                cfg = GRPOConfig(
                    beta=float(beta),
                    gains=gains.strip() or "linear",
                    target_kl=float(target_kl) or None,
                    **common,
                )
            else:
                cfg = DPOConfig(
                    beta=float(beta),
                    loss_type=loss or "sigmoid",
                    listwise=loss is None,
                    sft_weight=float(sft),
                    **common,
                )
            args = launcher.tune_args(
                cfg,
                method=name,
                from_version=None if parent == NO_PARENT else parent,
                dataset_id=None if dataset == NEW_DATASET else dataset,
            )
            _launch(ws, args, f"a {method} run")


def _metric_charts(metrics: pd.DataFrame) -> None:
    if metrics.empty:
        st.caption("No metrics yet.")
        return
    names = [n for n in ("loss", "rewards/accuracies") if n in metrics.columns]
    if names:
        for col, name in zip(st.columns(len(names)), names, strict=True):
            with col:
                st.markdown(f"**{name}**")
                st.line_chart(metrics[[name]], x_label="step", y_label=name, height=260)
    elif len(metrics) > 1:
        st.line_chart(metrics, x_label="step", height=260)
    last = metrics.ffill().iloc[-1]
    st.caption(
        f"step {int(metrics.index[-1])}: "
        + ", ".join(f"{k} = {v:.4g}" for k, v in last.items() if pd.notna(v))
    )


def _run_label(row) -> str:
    # only what never changes: a selectbox keeps showing an option's old label
    return f"#{int(row.id)} {row.kind}, started {pd.Timestamp(row.started):%Y-%m-%d %H:%M:%S}"


def _text(value) -> str | None:
    return value if isinstance(value, str) and value else None


def jobs_view(ws: storedb.Workspace) -> None:
    """Jobs table, the selected run's metrics and log, and processes started from this page."""
    head = st.columns([4, 1])
    head[0].subheader("Jobs")
    head[1].button("Refresh", key="refresh_jobs", width="stretch")
    try:
        with storedb.connect(ws) as con:
            run_df = runs.list_runs(con)
            ids = [int(i) for i in run_df["id"]]
            newest = ids[0] if ids else None
            if newest != st.session_state.get("newest_run") or (
                st.session_state.get("run_select") not in ids
            ):
                st.session_state["newest_run"] = newest  # follow a job that just started
                st.session_state["run_select"] = newest
            run_id = st.session_state.get("run_select")
            metrics = runs.run_metrics(con, run_id) if run_id is not None else pd.DataFrame()
    except PrefloopError as exc:
        st.error(str(exc))
        return
    launched = launcher.launched_jobs(ws)
    running_now = {f"run {i}" for i in run_df.loc[run_df["status"] == "running", "id"]} | {
        f"pid {j.pid}" for j in launched if j.running
    }
    was_running = st.session_state.get("running_runs", set())
    st.session_state["running_runs"] = running_now
    if was_running - running_now:
        st.rerun(scope="app")  # a job finished: refresh the rounds and model tables too
    if run_df.empty:
        st.caption("No jobs yet.")
    else:
        st.dataframe(
            run_df[["id", "kind", "status", "started", "finished", "result", "error"]],
            hide_index=True,
            width="stretch",
        )
        labels = {int(r.id): _run_label(r) for r in run_df.itertuples()}
        run_id = st.selectbox("Run", ids, format_func=labels.get, key="run_select")
        row = run_df[run_df["id"] == run_id].iloc[0]
        status = f"Status: {row['status']}"
        if _text(row["result"]):
            status += f", result: {row['result']}"
        st.text(status)
        if _text(row["error"]):
            st.text(f"Error: {row['error']}")
        _metric_charts(metrics)
        with st.expander("Run config"):
            st.json(row["config"])
        log_path = launcher.find_log(ws, row["pid"], row["log_path"])
        if log_path is not None:
            st.caption(f"Log: {log_path}")
            st.code(
                "\n".join(launcher.read_tail(log_path)) or "(empty)", language=None, wrap_lines=True
            )

    if launched:
        failed = launched[0].exit_code not in (None, 0)
        with st.expander("Jobs started from the web app", expanded=failed):
            st.dataframe(
                pd.DataFrame(
                    [
                        {
                            "pid": j.pid,
                            "command": j.kind,
                            "started": j.started,
                            "state": j.state,
                            "log": j.log_path.name,
                        }
                        for j in launched
                    ]
                ),
                hide_index=True,
                width="stretch",
            )
            pick = st.selectbox(
                "Log", [j.log_path.name for j in launched], key="launched_log_select"
            )
            path = launcher.log_dir(ws) / pick
            st.code(
                "\n".join(launcher.read_tail(path)) or "(empty)", language=None, wrap_lines=True
            )


def _any_running(ws: storedb.Workspace, run_df: pd.DataFrame) -> bool:
    if not run_df.empty and (run_df["status"] == "running").any():
        return True
    return any(j.running for j in launcher.launched_jobs(ws, limit=5))


def researcher_page(ws: storedb.Workspace) -> None:
    """Rounds, sampling and tuning forms, jobs with live metrics, and model versions."""
    st.title("Researcher")
    with storedb.connect(ws) as con:
        round_df = rounds.list_rounds(con)
        version_df = models.list_versions(con)
        newest = models.latest_version(con)
        dataset_df = datasets.list_datasets(con)
        run_df = runs.list_runs(con)
        base = models.base_model(con)

    st.subheader("Rounds")
    if round_df.empty:
        st.caption("No rounds yet: start one below.")
    else:
        table = round_df[
            ["id", "model_version", "split", "k", "groups", "labelled_groups", "labels", "created"]
        ].rename(columns={"model_version": "model version", "labelled_groups": "labelled groups"})
        st.dataframe(table, hide_index=True, width="stretch")

    version_ids = [str(v) for v in version_df["id"]]
    f1, f2 = st.columns(2)
    with f1:
        _sampling_form(ws, version_ids, newest)
    with f2:
        _tuning_form(ws, version_ids, [str(d) for d in dataset_df["id"]])

    every = REFRESH_S if _any_running(ws, run_df) else None
    st.fragment(run_every=every)(jobs_view)(ws)

    st.subheader("Model versions")
    st.caption("Base model:")
    st.text(base)
    if version_df.empty:
        st.caption("No tuned versions yet.")
    else:
        st.dataframe(
            version_df[["id", "parent", "dataset_id", "method", "run_id", "created"]].rename(
                columns={"dataset_id": "dataset"}
            ),
            hide_index=True,
            width="stretch",
        )
        pick = st.selectbox("Config of version", list(reversed(version_ids)), key="version_pick")
        st.json(version_df[version_df["id"] == pick].iloc[0]["config"], expanded=False)

    if not dataset_df.empty:
        st.subheader("Dataset versions")
        st.dataframe(
            dataset_df[["id", "n_groups", "n_pairs", "rounds", "created"]],
            hide_index=True,
            width="stretch",
        )


# ----------------------------------------------------------------------------------------------


def main() -> None:
    """Pick the page in the sidebar and draw it."""
    st.set_page_config(page_title="prefloop", layout="wide")
    ws = load_workspace()
    wanted = str(st.query_params.get("page", PAGES[0])).capitalize()
    if "page" not in st.session_state:
        st.session_state["page"] = wanted if wanted in PAGES else PAGES[0]
    with st.sidebar:
        st.markdown("## prefloop")
        page = st.radio("Page", PAGES, key="page")
        st.caption("Workspace:")
        st.text(str(ws.root))
    st.query_params["page"] = page.lower()
    try:
        if page == "Annotator":
            annotator_page(ws)
        elif page == "Researcher":
            researcher_page(ws)
        else:
            from app.eval_page import evaluation_page

            evaluation_page(ws)
    except PrefloopError as exc:
        st.error(str(exc))


main()
