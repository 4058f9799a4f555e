"""Roles are enforced on every research action: through the underlying API and in the app."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from app import actions
from store import db as storedb
from store import labels, users
from store.access import AccessDenied, User
from store.records import LabelRecord
from tests.fixtures_app import make_workspace, seed_round

APP = Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py"
PASSWORD = "correct horse battery"
ANNOTATOR = User("ann", "annotator")
RESEARCHER = User("rey", "researcher")
ADMIN = User("ada", "admin")


@pytest.fixture
def ws(tmp_path, monkeypatch):
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    with storedb.connect(workspace) as con:
        for u in (ANNOTATOR, RESEARCHER, ADMIN):
            users.add_user(con, u.name, u.role, PASSWORD)
    return workspace


def research_actions(ws, seeded, tmp_path):
    """Every guarded action of the web app that an annotator must not do, by name."""
    gid, cids = seeded.group_ids[0], seeded.candidate_ids[0]
    ranking = [[c] for c in cids]
    return {
        "open a research page": lambda u: actions.research_access(u),
        "read all labels": lambda u: actions.all_labels(ws, u),
        "start a sampling job": lambda u: actions.start_job(ws, u, ["sample", "--k", "2"]),
        "start a tuning job": lambda u: actions.start_job(ws, u, ["tune", "--method", "dpo"]),
        "start an evaluation": lambda u: actions.start_job(ws, u, ["eval", "--judge", "llm"]),
        "start a judge": lambda u: actions.start_job(ws, u, ["judge", str(seeded.round_id)]),
        "change round settings": lambda u: actions.set_round_options(
            ws, u, seeded.round_id, overlap=3
        ),
        "freeze a dataset": lambda u: actions.freeze_dataset(ws, u),
        "export a dataset": lambda u: actions.export_dataset(ws, u, "pairs", tmp_path / "x.jsonl"),
        "see the agreement report": lambda u: actions.team_report(ws, u),
        "read a group's labels": lambda u: actions.group_detail(ws, u, gid),
        "adjudicate a dispute": lambda u: actions.adjudicate(ws, u, gid, ranking),
        "mark gold": lambda u: actions.set_gold(ws, u, gid, ranking),
        "list gold": lambda u: actions.gold_groups(ws, u),
        "list accounts": lambda u: actions.list_accounts(ws, u),
        "add an account": lambda u: actions.add_account(ws, u, "eve", "admin", PASSWORD),
        "promote an account": lambda u: actions.change_account(ws, u, "ann", role="admin"),
    }


ACTION_NAMES = [
    "open a research page",
    "read all labels",
    "start a sampling job",
    "start a tuning job",
    "start an evaluation",
    "start a judge",
    "change round settings",
    "freeze a dataset",
    "export a dataset",
    "see the agreement report",
    "read a group's labels",
    "adjudicate a dispute",
    "mark gold",
    "list gold",
    "list accounts",
    "add an account",
    "promote an account",
]
ADMIN_ONLY = {"list accounts", "add an account", "promote an account"}


@pytest.mark.parametrize("name", ACTION_NAMES)
def test_an_annotator_is_refused_every_research_action(ws, tmp_path, name):
    seeded = seed_round(ws, n_groups=2, k=3)
    action = research_actions(ws, seeded, tmp_path)[name]
    with storedb.connect(ws) as con:
        before = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    with pytest.raises(AccessDenied, match="ann \\(annotator\\) may not"):
        action(ANNOTATOR)
    with storedb.connect(ws) as con:
        after = {t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
        assert con.execute("SELECT overlap FROM rounds").fetchone()[0] == 1
        assert con.execute("SELECT role FROM users WHERE name = 'ann'").fetchone()[0] == (
            "annotator"
        )
    assert after == before  # nothing was written
    assert not list((ws.artifacts / "runs").glob("job-*.log"))  # no job started
    assert not (tmp_path / "x.jsonl").exists()
    if name in ADMIN_ONLY:
        with pytest.raises(AccessDenied, match="rey \\(researcher\\) may not manage accounts"):
            action(RESEARCHER)


TABLES = ("labels", "datasets", "gold", "adjudications", "users", "runs", "suggestions")


def test_annotators_label_only_under_their_own_name(ws):
    seeded = seed_round(ws, n_groups=1, k=2)
    record = LabelRecord(seeded.group_ids[0], "rey", [[c] for c in seeded.candidate_ids[0]])
    with pytest.raises(Exception, match="only store labels under their own name"):
        actions.submit_label(ws, ANNOTATOR, record)
    record.annotator = "ann"
    actions.submit_label(ws, ANNOTATOR, record)
    mine = actions.my_labels(ws, ANNOTATOR)
    assert list(mine["annotator"]) == ["ann"]
    with storedb.connect(ws) as con:
        assert len(labels.labels(con)) == 1


def test_nobody_signed_in_is_refused():
    with pytest.raises(AccessDenied, match="sign in first"):
        actions.research_access(None)


# ---------------------------------------------------------------------------------------------
# through the app


def signed_in(name: str, page: str | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=60)
    if page:
        at.query_params["page"] = page
    at.run()
    at.text_input(key="login_name").input(name)
    at.text_input(key="login_password").input(PASSWORD)
    at.button(key="sign_in").click().run()
    assert not at.exception, at.exception
    return at


def test_an_annotator_sees_only_the_annotator_page(ws):
    seed_round(ws, n_groups=1, k=2)
    at = signed_in("ann")
    assert at.sidebar.radio(key="page").options == ["Annotator"]
    assert "Signed in as **ann** (annotator)" in [c.value for c in at.sidebar.caption]


@pytest.mark.parametrize("page", ["researcher", "evaluation", "team", "admin"])
def test_an_annotator_asking_for_a_research_page_by_url_is_refused(ws, page):
    seed_round(ws, n_groups=1, k=2)
    at = signed_in("ann", page=page)
    assert any(
        f"ann (annotator) may not open the {page.capitalize()} page" in e.value for e in at.error
    )
    # the annotator page is shown instead: none of the research forms or tables
    keys = {getattr(w, "key", None) for w in [*at.button, *at.selectbox, *at.number_input]}
    research_keys = {
        "start_sampling",
        "sample_version",
        "tune_method",
        "save_settings",
        "add_account_submit",
        "judge_start",
        "eval_version",
    }
    assert not keys & research_keys
    assert at.button(key="submit")  # the ranking page


def test_a_researcher_sees_research_pages_but_not_admin(ws):
    at = signed_in("rey")
    assert at.sidebar.radio(key="page").options == [
        "Annotator",
        "Researcher",
        "Loop",
        "Evaluation",
        "Team",
    ]
    at = signed_in("rey", page="admin")
    assert any("may not open the Admin page" in e.value for e in at.error)


def test_an_admin_adds_an_account_on_the_admin_page(ws):
    at = signed_in("ada", page="admin")
    assert at.sidebar.radio(key="page").value == "Admin"
    at.text_input(key="new_name").input("zoe")
    at.selectbox(key="new_role").set_value("researcher")
    at.text_input(key="new_password").input("long enough pw")
    at.button(key="add_account_submit").click().run()
    assert "Added zoe (researcher)." in [s.value for s in at.success]
    with storedb.connect(ws) as con:
        df = users.list_users(con).set_index("name")
    assert df.loc["zoe", "role"] == "researcher"
