"""The judge registry: only judges the operator registered run from the web app; the CLI never
imports a judge from the current directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app import actions
from labeling.judges import REGISTERED_ONLY_ENV
from store import db as storedb
from store import judges, suggestions
from store.access import User
from store.errors import PrefloopError
from tests.cli_helpers import ROOT, cli, cli_error
from tests.fixtures_app import make_workspace, seed_round
from tests.test_app import open_app, wait_for

SHORTER = "tests.judges.length:shorter"  # scorer: -len(completion)
ALWAYS_A = "tests.judges.length:always_a"  # pairwise
RESEARCHER = User("rey", "researcher")
FIRST = ["a rather long first answer", "tiny", "a medium answer", "mid one"]


@pytest.fixture
def ws(tmp_path, monkeypatch) -> storedb.Workspace:
    workspace = make_workspace(tmp_path / "ws")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(workspace.root))
    return workspace


def registry(ws: storedb.Workspace) -> dict[str, str]:
    with storedb.connect(ws) as con:
        df = judges.list_judges(con)
    return dict(zip(df["name"], df["spec"], strict=True))


def stored_suggestions(ws: storedb.Workspace, round_id: int):
    with storedb.connect(ws) as con:
        return suggestions.suggestions(con, round_id)


def job_logs(ws: storedb.Workspace) -> list[Path]:
    return sorted((ws.artifacts / "runs").glob("job-*"))


def prefloop(*args, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """The installed `prefloop` console script, as an operator runs it from a folder."""
    script = Path(sys.executable).parent / "prefloop"
    if not script.exists():
        pytest.skip("the prefloop console script is not installed in this environment")
    return subprocess.run(
        [str(script), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )


def test_judges_add_list_remove(ws, capsys):
    out = cli(capsys, "judges", "add", "short", SHORTER, "--author", "op", "-w", ws.root)
    assert "registered judge short" in out and "scorer" in out
    cli(capsys, "judges", "add", "first", ALWAYS_A, "-w", ws.root)
    listed = json.loads(cli(capsys, "judges", "list", "--json", "-w", ws.root))
    assert [(j["name"], j["spec"]) for j in listed] == [("first", ALWAYS_A), ("short", SHORTER)]
    assert listed[1]["author"] == "op"
    assert "short" in cli(capsys, "judges", "list", "-w", ws.root)

    refused = {
        ("short", ALWAYS_A): "registered already",
        ("llm", SHORTER): "reserved",
        ("rm:v1", SHORTER): "reserved",
        ("Bad Name", SHORTER): "invalid judge name",
        ("x" * 33, SHORTER): "invalid judge name",
        ("nope", "tests.judges.length:missing"): "has no function missing",
        ("nomod", "no_such_module_xyz:f"): "PYTHONPATH",
        ("one-arg", "os.path:basename"): "does not take 2 or 3 arguments",
        ("notspec", "just_a_name"): "module:function",
    }
    for (name, spec), reason in refused.items():
        assert reason in cli_error(capsys, "judges", "add", name, spec, "-w", ws.root)
    assert registry(ws) == {"first": ALWAYS_A, "short": SHORTER}  # nothing half-registered

    assert "removed judge first" in cli(capsys, "judges", "remove", "first", "-w", ws.root)
    assert registry(ws) == {"short": SHORTER}
    assert "no judge named 'first'" in cli_error(capsys, "judges", "remove", "first", "-w", ws.root)


def test_the_app_refuses_a_judge_that_is_not_registered(ws):
    seeded = seed_round(ws, n_groups=2, k=3)
    rid = str(seeded.round_id)
    attempts = [
        ["judge", rid, "--judge", SHORTER],
        ["judge", rid, "--judge=shutil:move"],
        ["judge", rid, "--jud", "shutil:move"],
        ["judge", rid, "--judge", "unknown-name"],
        ["eval", "--model", "base", "--judge", "shutil:move"],
    ]
    for args in attempts:
        with pytest.raises(PrefloopError, match="prefloop judges add NAME module:function"):
            actions.start_job(ws, RESEARCHER, args)
    assert not job_logs(ws)  # nothing started
    assert stored_suggestions(ws, seeded.round_id).empty


def test_team_page_offers_llm_and_registered_judges_and_starts_one(ws, capsys):
    seeded = seed_round(ws, n_groups=2, k=4, first_texts=FIRST)
    at = open_app("Team")
    assert at.selectbox(key="judge_name").options == ["llm"]
    assert any("prefloop judges add NAME module:function" in c.value for c in at.caption)
    assert not [t for t in at.text_input if t.key == "judge_spec"]  # nothing to type code into

    cli(capsys, "judges", "add", "short", SHORTER, "-w", ws.root)
    at = open_app("Team")
    assert at.selectbox(key="judge_name").options == ["llm", "short"]
    at.selectbox(key="judge_name").set_value("short")
    at.button(key="judge_start").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    [log] = job_logs(ws)
    assert "--judge short" in log.read_text().splitlines()[0]
    done = wait_for(
        lambda: not stored_suggestions(ws, seeded.round_id).empty, what="the judge's suggestions"
    )
    assert done
    df = stored_suggestions(ws, seeded.round_id).set_index("group_id")
    assert set(df["judge"]) == {"short"}
    cids = seeded.candidate_ids[0]
    assert df.loc[seeded.group_ids[0], "ranking"] == [[cids[1]], [cids[3]], [cids[2]], [cids[0]]]


def test_a_registered_judge_runs_through_prefloop_judge_and_a_web_job_runs_nothing_else(ws, capsys):
    seeded = seed_round(ws, n_groups=2, k=4, first_texts=FIRST)
    cli(capsys, "judges", "add", "short", SHORTER, "-w", ws.root)
    # a job as the web app starts it: the job itself runs registered judges only
    env = {**os.environ, "PYTHONPATH": str(ROOT), REGISTERED_ONLY_ENV: "1"}
    cmd = [sys.executable, "-m", "app.cli", "judge", str(seeded.round_id), "-w", str(ws.root)]
    refused = subprocess.run(
        [*cmd, "--judge", SHORTER], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert refused.returncode == 2 and "is not registered" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert stored_suggestions(ws, seeded.round_id).empty

    done = subprocess.run(
        [*cmd, "--judge", "short", "--json"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["suggested"] == 2
    df = stored_suggestions(ws, seeded.round_id).set_index("group_id")
    cids = seeded.candidate_ids[0]
    assert df.loc[seeded.group_ids[0], "ranking"] == [[cids[1]], [cids[3]], [cids[2]], [cids[0]]]
    assert set(df["judge"]) == {"short"}


def test_the_cli_never_imports_a_judge_from_the_current_directory(ws, tmp_path):
    seeded = seed_round(ws, n_groups=1, k=2)
    here = tmp_path / "downloads"
    here.mkdir()
    marker = tmp_path / "evil-ran"
    (here / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n\n"
        "def judge(prompt, completion):\n    return 0.0\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", REGISTERED_ONLY_ENV)}
    ran = prefloop(
        "judge", seeded.round_id, "--judge", "evil:judge", "-w", ws.root, cwd=here, env=env
    )
    assert ran.returncode == 2, ran.stderr
    assert "PYTHONPATH" in ran.stderr and "current directory" in ran.stderr
    assert "Traceback" not in ran.stderr
    added = prefloop("judges", "add", "evil", "evil:judge", "-w", ws.root, cwd=here, env=env)
    assert added.returncode == 2 and "PYTHONPATH" in added.stderr
    assert not marker.exists()  # the module never ran
    assert stored_suggestions(ws, seeded.round_id).empty and registry(ws) == {}

    # named on PYTHONPATH, as the message says, the operator's module is used
    ok = prefloop(
        "judges", "add", "mine", "evil:judge", "-w", ws.root, cwd=here,
        env={**env, "PYTHONPATH": str(here)},
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert registry(ws) == {"mine": "evil:judge"}
