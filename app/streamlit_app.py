"""The prefloop web app: an annotator page (ranking) and a researcher page (rounds, jobs, models).

Run it with `prefloop serve --workspace DIR`. The page is a thin layer: ranking state lives in
labeling.annotation, every query in store, background jobs in app.launcher. Model output
(prompts, candidates, logs) is shown only as plain text (st.text / st.code without a language).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import actions, launcher
from app.annotator_page import annotator_page
from app.auth_pages import admin_page, keep_signed_in, login_page, sign_out, signed_in_user
from app.datasets_panel import datasets_panel
from app.reward_audit_view import audit_panel, is_online_run
from labeling.safe_text import plain
from store import datasets, models, rounds, runs
from store import db as storedb
from store import owner as db_owner
from store.access import User
from store.errors import PrefloopError
from store.prompts import SPLITS
from tuning.config import (
    DEMOTE_BROKEN_HELP,
    DTYPES,
    DPOConfig,
    GRPOConfig,
    LoraSettings,
    PPOConfig,
    RLOOConfig,
    RMConfig,
    SamplingConfig,
)
from tuning.jobs import gate_text

PAGES = ("Annotator", "Researcher", "Loop", "Evaluation", "Team", "Admin")
PAGE_ACTION = {  # the permission each page needs (store.access.PERMISSIONS)
    "Annotator": "label",
    "Researcher": "view_research",
    "Loop": "view_research",
    "Evaluation": "view_research",
    "Team": "view_research",
    "Admin": "manage_users",
}
METHODS = {  # label -> (method, DPO or reward-model loss; None = DPO listwise Plackett–Luce)
    "DPO (sigmoid)": ("dpo", "sigmoid"),
    "DPO (IPO)": ("dpo", "ipo"),
    "DPO (hinge)": ("dpo", "hinge"),
    "DPO (robust)": ("dpo", "robust"),
    "DPO listwise (Plackett–Luce)": ("dpo", None),
    "GRPO": ("grpo", None),
    "GRPO online (fresh samples, a reward)": ("grpo", "online"),
    "RLOO online (fresh samples, a reward)": ("rloo", "online"),
    "PPO online (reward, adaptive KL)": ("ppo", "online"),
    "Reward model (pairwise Bradley–Terry)": ("rm", "pairwise"),
    "Reward model (listwise Plackett–Luce)": ("rm", "listwise"),
}
# the tuning form's fields, reset to the chosen method's defaults when the method changes
TUNE_FIELDS = (
    "tune_beta", "tune_margin", "tune_epochs", "tune_lr", "tune_groups_per_step", "tune_lora_r",
    "tune_lora_alpha", "tune_kl_budget", "tune_center", "tune_sft", "tune_gains",
    "tune_target_kl", "tune_reward", "tune_online_k", "tune_audit", "tune_demote",
)  # fmt: skip
REFRESH_S = 3.0
DTYPE_LABEL = "Precision of the base weights (dtype)"
DTYPE_TIP = "auto: bfloat16 on a GPU that supports it, else float32; LoRA weights stay float32"
NO_PARENT = "(base model)"
NEW_DATASET = "(freeze the current labels)"

# Widget values that must survive a visit to the other page (Streamlit drops the state of
# widgets that were not drawn in a run unless it is written back).
for _key in ("round",):
    if _key in st.session_state:
        st.session_state[_key] = st.session_state[_key]


def load_workspace() -> storedb.Workspace:
    """The workspace from $PREFLOOP_WORKSPACE, or stop the page with what to do."""
    try:
        ws = storedb.workspace()
        db_owner.own_if_serving(ws)
        return ws
    except PrefloopError as exc:
        st.error(
            f"{plain(exc)}\n\nStart the web app with `prefloop serve --workspace DIR` "
            "(or set PREFLOOP_WORKSPACE to a workspace folder before `streamlit run`)."
        )
        st.stop()


# ----------------------------------------------------------------------------------------------
# Researcher page


def _launch(ws: storedb.Workspace, args: list[str], what: str) -> None:
    try:
        pid, log_path = actions.start_job(ws, st.session_state["user"], args)
    except PrefloopError as exc:
        st.error(plain(exc))
        return
    st.success(f"Started {what} (process {pid}); it shows under Jobs once it has loaded the model.")
    st.caption(f"Log: {plain(log_path)}")


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
        mode = c1.selectbox(
            "Annotators",
            ["rank", "thumbs"],
            key="sample_mode",
            format_func={"rank": "rank the K candidates", "thumbs": "thumb each up/down"}.get,
        )
        overlap = c2.number_input(
            "Overlap (annotators per group)",
            min_value=1,
            max_value=50,
            value=1,
            key="sample_overlap",
        )
        dtype = c1.selectbox(DTYPE_LABEL, DTYPES, key="sample_dtype", help=DTYPE_TIP)
        if st.form_submit_button("Start sampling", key="start_sampling"):
            cfg = SamplingConfig(
                k=int(k),
                max_new_tokens=int(max_new),
                temperature=float(temperature),
                top_p=float(top_p),
                seed=int(seed),
                split=split,
                limit=int(limit) or None,
                dtype=dtype,
            )
            _launch(
                ws,
                launcher.sample_args(cfg, version, mode, int(overlap)),
                f"sampling from {version}",
            )


def _tuning_form(
    ws: storedb.Workspace,
    version_ids: list[str],
    dataset_ids: list[str],
    reward_ids: list[str] | None = None,
) -> None:
    st.subheader("Start a tuning run")
    # outside the form, so the fields below show the chosen method's own defaults
    method = st.selectbox("Method", list(METHODS), key="tune_method")
    if st.session_state.get("tune_form_for") != method:
        # the fields' keys are shared by every method: show the newly chosen one's defaults
        for key in TUNE_FIELDS:
            st.session_state.pop(key, None)
        st.session_state["tune_form_for"] = method
    kind = METHODS[method][0]
    online = METHODS[method][1] == "online"
    classes = {"grpo": GRPOConfig, "rloo": RLOOConfig, "ppo": PPOConfig, "rm": RMConfig}
    default = classes.get(kind, DPOConfig)()
    if kind == "rm":  # a reward model continues a reward model, never a policy
        version_ids = reward_ids or []
    with st.form(f"tune_form_{kind}{'_online' if online else ''}"):
        c1, c2 = st.columns(2)
        if isinstance(default, RMConfig):
            beta = c1.number_input(
                "Margin (pairwise)", min_value=0.0, value=float(default.margin), key="tune_margin"
            )
        else:
            beta = c1.number_input(
                "Beta", min_value=0.0, max_value=10.0, value=float(default.beta), key="tune_beta"
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
        dtype = c1.selectbox(DTYPE_LABEL, DTYPES, key="tune_dtype", help=DTYPE_TIP)
        kl_budget = default.kl_budget
        if not isinstance(default, RMConfig):  # a reward model samples nothing to guard
            kl_budget = c1.number_input(
                "KL budget (nats/token; the per-epoch guard and the promotion gate)",
                min_value=0.001,
                value=float(default.kl_budget),
                format="%.3f",
                key="tune_kl_budget",
            )
        if isinstance(default, RMConfig):
            center = c2.number_input(
                "Centre rewards C (0 = off)",
                min_value=0.0,
                value=float(default.center_rewards),
                key="tune_center",
            )
        elif isinstance(default, DPOConfig):
            sft = c2.number_input(
                "SFT weight α", min_value=0.0, value=float(default.sft_weight), key="tune_sft"
            )
        else:
            gains = ""
            if isinstance(default, GRPOConfig):
                sft = c2.number_input(
                    "SFT weight α", min_value=0.0, value=float(default.sft_weight), key="tune_sft"
                )
            if isinstance(default, GRPOConfig) and not online:
                gains = c2.text_input(
                    "Gains (linear, dcg or 1,0.6,0.3,0)", default.gains, key="tune_gains"
                )
            target_kl = c1.number_input(
                "Target KL per token within the run (0 = fixed β)",
                min_value=0.0,
                value=float(default.target_kl or 0.0),
                format="%.3f",
                key="tune_target_kl",
            )
        demote = False
        if isinstance(default, DPOConfig) or (isinstance(default, GRPOConfig) and not online):
            demote = c2.checkbox(
                "Train broken favourites as the worst (--demote-broken)",
                value=default.demote_broken,
                key="tune_demote",
                help=DEMOTE_BROKEN_HELP,
            )
        if online:
            rewards = st.multiselect(
                "Reward (llm, registered judges, reward models; summed)",
                actions.reward_choices(ws, st.session_state["user"]),
                key="tune_reward",
            )
            k = c1.number_input("Samples per prompt (K)", min_value=1 if kind == "ppo" else 2,
                                value=default.k, key="tune_online_k")  # fmt: skip
            audit = c2.number_input(
                "Audit: prompts per step sent to the annotators", min_value=0,
                value=default.audit, key="tune_audit",
            )  # fmt: skip
        if st.form_submit_button("Start tuning run", key="start_tuning"):
            name, loss = METHODS[method]
            common = dict(
                epochs=int(epochs),
                lr=float(lr),
                groups_per_step=int(groups_per_step),
                lora=LoraSettings(r=int(lora_r), alpha=int(lora_alpha)),
                kl_budget=float(kl_budget),
                dtype=dtype,
            )
            if online:
                common.update(reward=list(rewards), k=int(k), audit=int(audit), online=True)
            if name == "rm":
                cfg = RMConfig(
                    loss_type=loss, margin=float(beta), center_rewards=float(center), **common
                )
            elif name in ("grpo", "rloo", "ppo"):
                extra = (
                    {
                        "gains": gains.strip() or "linear",
                        "sft_weight": float(sft),
                        "demote_broken": bool(demote),
                    }
                    if name == "grpo"
                    else {}
                )
                cfg = default.__class__(
                    beta=float(beta), target_kl=float(target_kl) or None, **extra, **common
                )
            else:
                cfg = DPOConfig(
                    beta=float(beta),
                    loss_type=loss or "sigmoid",
                    listwise=loss is None,
                    sft_weight=float(sft),
                    demote_broken=bool(demote),
                    **common,
                )
            args = launcher.tune_config_args(
                ws,
                cfg,
                method=name,
                from_version=None if parent == NO_PARENT else parent,
                dataset_id=None if dataset == NEW_DATASET or online else dataset,
            )
            _launch(ws, args, f"a {method} run")


def _metric_charts(metrics: pd.DataFrame) -> None:
    if metrics.empty:
        st.caption("No metrics yet.")
        return
    shown = ("loss", "rewards/accuracies", "kl", "accuracy")
    if "objective/scores" in metrics.columns:  # an online run: one point per rollout step
        shown = ("objective/scores", "objective/kl", "beta", "frac_reward_zero_std")
    names = [n for n in shown if n in metrics.columns]
    guard = [n for n in ("guard/kl_per_token", "guard/broken_share") if n in metrics.columns]
    if guard:  # the per-epoch fluency guard: one point per epoch
        names += guard
    if names:
        for col, name in zip(st.columns(len(names)), names, strict=True):
            with col:
                st.markdown(f"**{plain(name)}**")
                series = metrics[[name]].dropna()
                st.line_chart(series, x_label="step", y_label=name, height=260)
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
        st.error(plain(exc))
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
        if is_online_run(row.to_dict()):
            audit_panel(ws, int(run_id))
        with st.expander("Run config"):
            st.json(row["config"])
        try:
            log_path = launcher.find_log(ws, row["pid"], row["log_path"])
        except PrefloopError as exc:
            st.error(plain(exc))
            log_path = None
        if log_path is not None:
            st.caption(f"Log: {plain(log_path)}")
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


def researcher_page(ws: storedb.Workspace, user: User) -> None:
    """Rounds, sampling and tuning forms, jobs with live metrics, and model versions."""
    actions.research_access(user)
    st.title("Researcher")
    with storedb.connect(ws) as con:
        round_df = rounds.list_rounds(con)
        version_df = models.list_versions(con)
        newest = models.default_version(con)  # the newest promoted version
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

    version_ids = [str(v) for v in version_df[version_df["kind"] == models.POLICY]["id"]]
    reward_ids = [str(v) for v in version_df[version_df["kind"] == models.REWARD]["id"]]
    f1, f2 = st.columns(2)
    with f1:
        _sampling_form(ws, version_ids, newest)
    with f2:
        _tuning_form(ws, version_ids, [str(d) for d in dataset_df["id"]], reward_ids)

    every = REFRESH_S if _any_running(ws, run_df) else None
    st.fragment(run_every=every)(jobs_view)(ws)

    st.subheader("Model versions")
    st.caption("Base model:")
    st.text(base)
    if version_df.empty:
        st.caption("No tuned versions yet.")
    else:
        columns = ["id", "kind", "parent", "dataset_id", "method", "promoted", "run_id"]
        table = version_df[columns].rename(columns={"dataset_id": "dataset"})
        table.insert(6, "promotion gate", version_df["gate"].map(gate_text))
        st.dataframe(table, hide_index=True, width="stretch")
        st.caption(f"New rounds sample from {newest} unless another version is chosen.")
        every_id = [str(v) for v in version_df["id"]]
        pick = st.selectbox("Version", list(reversed(every_id)), key="version_pick")
        row = version_df[version_df["id"] == pick].iloc[0]
        if not row["promoted"] and row["kind"] == models.POLICY:
            force = st.checkbox("Promote although its gate failed", key="promote_force")
            if st.button(f"Promote {pick}", key="promote_version"):
                try:
                    actions.promote_version(ws, user, pick, force=force)
                    st.rerun()
                except PrefloopError as exc:
                    st.error(plain(exc))
        st.json(row["config"], expanded=False)

    datasets_panel(ws, user, dataset_df, [int(r) for r in round_df["id"]])


# ----------------------------------------------------------------------------------------------


def _page_from_url(pages: list[str], user: User) -> str:
    """The page the URL asks for, if this user may see it; refusals are shown once."""
    wanted = str(st.query_params.get("page", pages[0])).capitalize()
    if wanted in pages:
        return wanted
    if wanted in PAGES:
        st.session_state["page_refused"] = (
            f"{user.name} ({user.role}) may not open the {wanted} page; showing {pages[0]}."
        )
    return pages[0]


def main() -> None:
    """Sign in, pick a page the user's role allows, and draw it."""
    st.set_page_config(page_title="prefloop", layout="wide")
    ws = load_workspace()
    user = signed_in_user(ws)
    if user is None:
        login_page(ws)
        return
    st.session_state["user"] = user
    pages = [p for p in PAGES if user.can(PAGE_ACTION[p])]
    if st.session_state.get("page") not in pages:
        st.session_state["page"] = _page_from_url(pages, user)
    with st.sidebar:
        st.markdown("## prefloop")
        st.caption(f"Signed in as **{plain(user.name)}** ({user.role})")
        st.button("Sign out", key="sign_out", on_click=sign_out, args=(ws,))
        page = st.radio("Page", pages, key="page")
        st.caption("Workspace:")
        st.text(str(ws.root))
        keep_signed_in(ws)
    st.query_params["page"] = page.lower()
    refused = st.session_state.pop("page_refused", None)
    if refused:
        st.error(plain(refused))
    try:
        if page == "Annotator":
            annotator_page(ws, user)
        elif page == "Researcher":
            researcher_page(ws, user)
        elif page == "Loop":
            from app.loop_page import loop_page

            loop_page(ws, user)
        elif page == "Evaluation":
            from app.eval_page import evaluation_page

            evaluation_page(ws, user)
        elif page == "Team":
            from app.team_page import team_page

            team_page(ws, user)
        else:
            admin_page(ws, user)
    except PrefloopError as exc:
        st.error(plain(exc))


main()
