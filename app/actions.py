"""What a signed-in user can do in the web app, each action checked against their role first.

The Streamlit pages call these functions, never the guarded store functions directly, so a
role is enforced on the action itself and not only by hiding a page. The `prefloop` CLI runs as
the workspace's operator (whoever can open the folder) and calls the plain API.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from labeling import annotation, judges
from store import db as storedb
from store import labels, rounds, suggestions, users
from store.access import User, require
from store.errors import PrefloopError
from store.records import LabelRecord
from store.rounds import GroupRecord

# ---------------------------------------------------------------------------------------------
# Signing in


def needs_first_admin(ws: storedb.Workspace) -> bool:
    """Whether the workspace has no account yet (the app then asks for a first admin)."""
    with storedb.connect(ws) as con:
        return users.count_users(con) == 0


def create_first_admin(ws: storedb.Workspace, name: str, password: str) -> str:
    """Create the first account (admin) of an empty workspace and sign it in; returns a token."""
    with storedb.connect(ws) as con:
        if users.count_users(con):
            raise PrefloopError("this workspace has accounts already; sign in instead")
        user = users.add_user(con, name, "admin", password)
        return users.start_session(con, user)


def sign_in(
    ws: storedb.Workspace, name: str, password: str, client: str | None = None
) -> tuple[User, str]:
    """Check name and password typed on a client (an address or a browser session id);
    returns the user and a new session token."""
    name = users.check_sign_in_input(name, password)  # before opening the database
    with storedb.connect(ws) as con:
        user = users.authenticate(con, name, password, client)
        token = users.start_session(con, user) if user else None
    if user is None:  # raised after the commit so the failed attempt stays recorded
        raise PrefloopError("wrong name or password (or the account is disabled)")
    return user, token


def current_user(ws: storedb.Workspace, token: str | None) -> User | None:
    """The user a session token belongs to; None when it is unknown or expired."""
    if not token:
        return None
    with storedb.connect(ws) as con:
        return users.session_user(con, token)


def sign_out(ws: storedb.Workspace, token: str | None) -> None:
    """End a session."""
    with storedb.connect(ws) as con:
        users.end_session(con, token)


# ---------------------------------------------------------------------------------------------
# Labelling (every role)


def labelling_rounds(ws: storedb.Workspace, user: User) -> pd.DataFrame:
    """Rounds an annotator can pick (id, title, mode), newest first; no label counts."""
    require(user, "label")
    with storedb.connect(ws) as con:
        df = rounds.list_rounds(con)
    df = df[~df["source"].map(annotation.is_rollout_source)]  # online runs' step rounds
    if df.empty:
        return pd.DataFrame(columns=["id", "title", "mode"])
    df = df.sort_values("id", ascending=False)
    titles = [
        annotation.round_title(int(r.id), r.model_version, r.source, r.mode)
        for r in df.itertuples()
    ]
    return pd.DataFrame({"id": df["id"].astype(int), "title": titles, "mode": df["mode"]})


def round_options(ws: storedb.Workspace, user: User, round_id: int) -> rounds.RoundOptions:
    """A round's labelling options (mode, guidelines, whether suggestions show)."""
    require(user, "label")
    with storedb.connect(ws) as con:
        return rounds.round_options(con, round_id)


@dataclass
class Job:
    """What the annotator page shows: a group (or None), progress, and a judge's suggestion."""

    group: GroupRecord | None
    done: int
    left: int
    suggestion: list[list[int]] | None = None


def next_group(ws: storedb.Workspace, user: User, round_id: int, revise: int | None = None) -> Job:
    """The next group of the round for this user (or their own labelled group to revise)."""
    require(user, "label")
    job = annotation.next_assignment(ws, user.name, round_id)
    if revise is None:
        return Job(job.group, job.done, job.left, job.hint)
    with storedb.connect(ws) as con:
        mine = labels.labels(con, annotator=user.name)
        if int(revise) not in set(mine["group_id"].astype(int)):
            raise PrefloopError(f"you have no label of group {revise} to revise")
        group = rounds.groups(con, group_ids=[int(revise)])[0]
        hint = None
        if rounds.round_options(con, round_id).show_suggestions:
            found = suggestions.suggestion(con, group.group_id)
            hint = found[1] if found else None
    return Job(group, job.done, job.left, hint)


def submit_label(ws: storedb.Workspace, user: User, record: LabelRecord) -> None:
    """Store the user's own label (a second submission for a group revises it)."""
    require(user, "label")
    if record.annotator != user.name:
        raise PrefloopError(f"{user.name} may only store labels under their own name")
    annotation.save_label(ws, record)


def my_labels(ws: storedb.Workspace, user: User, round_id: int | None = None) -> pd.DataFrame:
    """The user's own labels (what they may revise)."""
    require(user, "label")
    with storedb.connect(ws) as con:
        return labels.labels(
            con, round_ids=None if round_id is None else [round_id], annotator=user.name
        )


# ---------------------------------------------------------------------------------------------
# Research (researcher, admin)


def research_access(user: User | None) -> User:
    """The user, if they may see the research pages."""
    return require(user, "view_research")


def all_labels(
    ws: storedb.Workspace, user: User, round_ids: list[int] | None = None
) -> pd.DataFrame:
    """Every annotator's labels."""
    require(user, "read_labels")
    with storedb.connect(ws) as con:
        return labels.labels(con, round_ids=round_ids)


def start_job(ws: storedb.Workspace, user: User, args: list[str]) -> tuple[int, Path]:
    """Start a `prefloop` sampling, tuning or evaluation job in the background."""
    from app import launcher

    require(user, "start_jobs")
    if not args or args[0] not in ("sample", "tune", "eval", "judge"):
        raise PrefloopError(f"not a job the web app starts: {args[:1]}")
    for judge in _judge_values(args):
        judges.require_web_judge(ws, judge)
    return launcher.start_job(ws, args)


def _judge_values(args: list[str]) -> list[str]:
    """Every value given to --judge in args, abbreviated (--jud) or joined (--judge=x) too."""
    values = []
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        if len(flag) < 4 or not "--judge".startswith(flag):
            continue
        if eq:
            values.append(value)
        elif i + 1 < len(args):
            values.append(args[i + 1])
    return values


def registered_judges(ws: storedb.Workspace, user: User) -> pd.DataFrame:
    """The judges the operator registered (name, spec, author, created): the web app runs these."""
    from store import judges as registry

    require(user, "view_research")
    with storedb.connect(ws) as con:
        return registry.list_judges(con)


def reward_choices(ws: storedb.Workspace, user: User) -> list[str]:
    """The rewards the web app's online runs may use: llm, registered judges, reward models."""
    from store import judges as registry
    from store import models

    require(user, "start_jobs")
    with storedb.connect(ws) as con:
        names = registry.list_judges(con)["name"].tolist()
        versions = models.list_versions(con)
    reward_models = versions[versions["kind"] == models.REWARD]["id"].tolist()
    return ["llm", *names, *(f"rm:{v}" for v in reward_models)]


def promote_version(ws: storedb.Workspace, user: User, version: str, force: bool = False) -> dict:
    """Make a model version the default that new rounds sample from (force: past a failed gate)."""
    from store import models

    require(user, "start_jobs")
    with storedb.connect(ws) as con:
        return models.promote(con, version, force=force)


def set_round_options(
    ws: storedb.Workspace, user: User, round_id: int, **options
) -> rounds.RoundOptions:
    """Change a round's mode, overlap target, suggestion toggle or guidelines."""
    require(user, "curate")
    with storedb.connect(ws) as con:
        return rounds.set_round_options(con, round_id, **options)


def export_dataset(
    ws: storedb.Workspace, user: User, fmt: str, out: Path, dataset_id: str | None = None
) -> tuple[Path, int]:
    """Write a dataset version for other tools."""
    from labeling.exporting import export_dataset as export

    require(user, "export")
    return export(ws, fmt, out, dataset_id)


# ---------------------------------------------------------------------------------------------
# Accounts (admin)


def list_accounts(ws: storedb.Workspace, user: User) -> pd.DataFrame:
    """Every account with its role."""
    require(user, "manage_users")
    with storedb.connect(ws) as con:
        return users.list_users(con)


def failed_sign_ins(ws: storedb.Workspace, user: User) -> pd.DataFrame:
    """Recent failed sign-ins per name and client (name, client, failures, last)."""
    require(user, "manage_users")
    with storedb.connect(ws) as con:
        return users.failed_sign_ins(con)


def add_account(ws: storedb.Workspace, user: User, name: str, role: str, password: str) -> User:
    """Create an account."""
    require(user, "manage_users")
    with storedb.connect(ws) as con:
        return users.add_user(con, name, role, password)


def change_account(
    ws: storedb.Workspace,
    user: User,
    name: str,
    *,
    role: str | None = None,
    password: str | None = None,
    active: bool | None = None,
) -> None:
    """Change an account's role, password or active state (its sessions end)."""
    require(user, "manage_users")
    if name == user.name and (active is False or (role and role != user.role)):
        raise PrefloopError("you cannot disable or demote your own account; ask another admin")
    with storedb.connect(ws) as con:
        if role is not None:
            users.set_role(con, name, role)
        if password:
            users.set_password(con, name, password)
        if active is not None:
            users.set_active(con, name, active)


# ---------------------------------------------------------------------------------------------
# Team: agreement, disputes, gold (researcher, admin)


def team_report(ws: storedb.Workspace, user: User, round_ids: list[int] | None = None):
    """Agreement per annotator, Krippendorff's α and disputed groups of some rounds."""
    from labeling import team

    require(user, "read_labels")
    return team.team_report(ws, round_ids)


def bias_report(ws: storedb.Workspace, user: User, round_ids: list[int] | None = None):
    """The annotators' position, length and Markdown-density audit of some rounds."""
    from labeling import team

    require(user, "read_labels")
    return team.bias_report(ws, round_ids)


def group_detail(
    ws: storedb.Workspace, user: User, group_id: int
) -> tuple[GroupRecord, pd.DataFrame]:
    """A group with every annotator's label (for adjudication)."""
    require(user, "read_labels")
    with storedb.connect(ws) as con:
        found = rounds.groups(con, group_ids=[int(group_id)])
        if not found:
            raise PrefloopError(f"unknown group {group_id}")
        df = labels.labels(con)
    return found[0], df[df["group_id"] == int(group_id)]


def adjudicate(
    ws: storedb.Workspace,
    user: User,
    group_id: int,
    ranking: list[list[int]] | None,
    flags: list[str] | None = None,
    note: str | None = None,
) -> None:
    """Decide a disputed group; training uses the decision instead of the consensus."""
    from labeling import team

    require(user, "curate")
    team.adjudicate(ws, group_id, ranking, user.name, flags, note)


def set_gold(ws: storedb.Workspace, user: User, group_id: int, ranking: list[list[int]]) -> None:
    """Mark a group as gold with its known ranking."""
    from store import gold

    require(user, "curate")
    with storedb.connect(ws) as con:
        gold.set_gold(con, group_id, ranking, user.name)


def gold_groups(ws: storedb.Workspace, user: User, round_ids: list[int] | None = None) -> dict:
    """Gold groups and their rankings."""
    from store import gold

    require(user, "read_labels")
    with storedb.connect(ws) as con:
        return gold.gold(con, round_ids=round_ids)


def freeze_dataset(ws: storedb.Workspace, user: User, curation=None):
    """Freeze curated labelled groups into dataset versions (labeling.curation.Curation)."""
    from labeling.curation import freeze_versions

    require(user, "export")
    return freeze_versions(ws, curation)


def dataset_card(ws: storedb.Workspace, user: User, dataset_id: str) -> str:
    """A dataset version's card (filters and statistics) in Markdown."""
    from labeling.curation import dataset_card as card
    from store import datasets

    require(user, "view_research")
    with storedb.connect(ws) as con:
        return card(datasets.get_dataset(con, dataset_id))
