"""One owner of the database: the serving process keeps it open, threads share it, other
processes go through its socket, and without a live owner everyone opens the file again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from labeling import queue
from store import db as storedb
from store import owner, prompts
from store.errors import PrefloopError
from tests.cli_helpers import ROOT, run_cli, write_jsonl
from tests.fixtures_app import add_prompts, make_workspace
from tests.test_queue import check_target_kept, make_round, ranked, run_annotators_in_threads

# a separate process that owns the workspace's database until its standard input closes
OWNER_CODE = (
    "import sys; from store import db, owner; owner.own(db.workspace(sys.argv[1])); "
    "print('ready', flush=True); sys.stdin.read()"
)


def start_owner(ws: storedb.Workspace) -> subprocess.Popen:
    """Start a process that owns ws's database; returns once its socket answers."""
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER_CODE, str(ws.root)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read()
    return proc


def stop_owner(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


def file_is_held(ws: storedb.Workspace) -> bool:
    """Whether another process holds the database file open (DuckDB's file lock)."""
    code = "import duckdb, sys; duckdb.connect(sys.argv[1], read_only=True).close()"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ws.db_path)], capture_output=True, text=True, timeout=60
    )
    return proc.returncode != 0 and "lock" in proc.stderr.lower()


def prompt_texts(ws: storedb.Workspace) -> list[str]:
    with storedb.connect(ws) as con:
        return sorted(prompts.list_prompts(con)["text"])


@pytest.fixture
def owned_here():
    """own(ws) in this process for the test, released after it."""
    taken: list[storedb.Workspace] = []

    def take(ws: storedb.Workspace, **kw) -> owner.Owner:
        taken.append(ws)
        return owner.own(ws, **kw)

    yield take
    for ws in taken:
        owner.release(ws)


def test_the_owner_serves_twenty_threads_without_reopening_the_file(
    tmp_path, monkeypatch, owned_here
):
    n_groups, overlap = 30, 3
    ws, rid, _ = make_round(tmp_path / "ws", n_groups, overlap=overlap)
    owned_here(ws, serve=False)

    def no_open(*_a, **_k):
        raise AssertionError("a unit of work opened the database file again")

    monkeypatch.setattr(storedb, "_open", no_open)
    monkeypatch.setattr(storedb, "migrate", no_open)
    names = [f"ann{i:02d}" + ("slow" if i % 7 == 3 else "") for i in range(20)]
    accepted = run_annotators_in_threads(
        str(ws.root), rid, names, {n for n in names if "slow" in n}
    )
    assert len({a for _, a, _ in accepted}) >= 10  # they really worked at once
    check_target_kept(ws, rid, accepted, overlap, n_groups)


def test_a_cli_command_goes_through_the_owner_and_its_writes_are_visible(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    add_prompts(ws, ["already here"])
    proc = start_owner(ws)
    try:
        assert file_is_held(ws)  # nobody else can open the file: the CLI must use the socket
        record = json.loads((ws.root / owner.OWNER_FILE).read_text())
        assert record["pid"] == proc.pid
        assert Path(record["socket"]).stat().st_mode & 0o777 == 0o600
        rows = [{"prompt": "written through the owner"}, {"prompt": "and a second one"}]
        src = write_jsonl(tmp_path / "p.jsonl", rows)
        run_cli("prompts", "import", str(src), "--workspace", str(ws.root), timeout=120)
        # the quick check and the counts run on the owner too
        assert "prompts: 3" in run_cli("status", "--workspace", str(ws.root)).stdout
        # this process reads through the owner too, and sees what the CLI wrote
        assert prompt_texts(ws) == ["already here", "and a second one", "written through the owner"]
        backup = run_cli("backup", str(tmp_path / "bk"), "--workspace", str(ws.root)).stdout
        assert "bk" in backup
    finally:
        stop_owner(proc)
    assert not (ws.root / owner.OWNER_FILE).exists()  # a clean stop leaves nothing behind
    copy = next(p for p in (tmp_path / "bk").iterdir() if not p.name.startswith("."))
    assert prompt_texts(storedb.workspace(copy)) == prompt_texts(ws)


def test_a_killed_owner_leaves_a_stale_socket_that_clients_ignore(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    proc = start_owner(ws)
    socket_path = Path(json.loads((ws.root / owner.OWNER_FILE).read_text())["socket"])
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert socket_path.exists()  # killed: nothing was cleaned up
    started = time.monotonic()
    add_prompts(ws, ["after the owner died"])  # falls back to opening the file
    assert time.monotonic() - started < 10
    assert not socket_path.exists() and not (ws.root / owner.OWNER_FILE).exists()
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "from the command line"}])
    run_cli("prompts", "import", str(src), "--workspace", str(ws.root), timeout=120)
    assert prompt_texts(ws) == ["after the owner died", "from the command line"]


def test_a_unit_of_work_that_raises_in_the_client_is_rolled_back_by_the_owner(tmp_path):
    ws, rid, _ = make_round(tmp_path / "ws", 3, overlap=1)
    proc = start_owner(ws)
    try:
        with pytest.raises(RuntimeError, match="client-side failure"), storedb.connect(ws) as con:
            assert isinstance(con, owner.RemoteConnection)
            con.execute("INSERT INTO meta VALUES ('half-done', 'x')")
            raise RuntimeError("client-side failure")
        # a client killed in the middle of a unit of work is rolled back too
        code = (
            "import os, sys; from store import db; ws = db.workspace(sys.argv[1])\n"
            "with db.connect(ws) as con:\n"
            "    con.execute(\"INSERT INTO meta VALUES ('killed', 'x')\")\n"
            "    print('inside', flush=True); sys.stdin.read()"
        )
        client = subprocess.Popen(
            [sys.executable, "-c", code, str(ws.root)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout.readline().strip() == "inside"
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=30)
        with storedb.connect(ws) as con:
            keys = {r[0] for r in con.execute("SELECT key FROM meta").fetchall()}
        assert "half-done" not in keys and "killed" not in keys
        # the queue still works through the owner (no row left locked by the dead client)
        ticket = queue.take(ws, "ann", rid)
        queue.submit(ws, ranked(ticket.group, "ann"))
        # a DuckDB error on the owner arrives as the same DuckDB error class
        with pytest.raises(duckdb.CatalogException), storedb.connect(ws) as con:
            con.execute("SELECT * FROM no_such_table")
    finally:
        stop_owner(proc)


def test_a_client_whose_owner_goes_away_mid_work_gets_one_line(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    proc = start_owner(ws)
    with pytest.raises(PrefloopError, match="lost the connection"), storedb.connect(ws) as con:
        con.execute("SELECT 1").fetchone()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        con.execute("SELECT 2").fetchone()


def test_the_web_app_started_by_serve_owns_the_database(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from store import users

    ws = make_workspace(tmp_path / "ws")
    with storedb.connect(ws) as con:
        users.add_user(con, "ada", "admin", "correct horse battery")
    monkeypatch.setenv("PREFLOOP_WORKSPACE", str(ws.root))
    monkeypatch.setenv(owner.SERVE_ENV, "1")  # what `prefloop serve` sets for the app
    app = ROOT / "app" / "streamlit_app.py"
    try:
        at = AppTest.from_file(str(app), default_timeout=60)
        at.run()
        assert not at.exception, at.exception
        assert owner.owned(ws) is not None and file_is_held(ws)
        # a command line user adds an account while the app runs; the app's page lists it
        proc = subprocess.run(
            [sys.executable, "-m", "app.cli", "users", "add", "zoe", "--role", "annotator"]
            + ["--password-stdin", "--workspace", str(ws.root)],
            input="long enough pw\n",
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        at.text_input(key="login_name").input("ada")
        at.text_input(key="login_password").input("correct horse battery")
        at.button(key="sign_in").click().run()
        at.sidebar.radio(key="page").set_value("Admin").run()
        assert not at.exception, at.exception
        assert "zoe" in " ".join(str(df.value) for df in at.dataframe)
    finally:
        owner.release(ws)
    assert not (ws.root / owner.OWNER_FILE).exists()


def test_a_job_leaves_a_core_only_while_the_web_app_serves_its_workspace(tmp_path, monkeypatch):
    """A CLI job with no web app running uses every core; while another process owns the
    workspace (`prefloop serve`), one core is left to it; accelerate's processes share the
    cores out; $PREFLOOP_THREADS overrides all of it."""
    import torch

    from tuning import modeling

    ws = make_workspace(tmp_path / "ws")
    cores = os.cpu_count() or 2
    before = torch.get_num_threads()
    monkeypatch.delenv("PREFLOOP_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(modeling, "_SERVED", None)
    try:
        modeling.limit_threads()  # no workspace known yet: leave the core
        assert torch.get_num_threads() == max(1, cores - 1)
        modeling.limit_threads(ws)
        assert torch.get_num_threads() == cores
        modeling.limit_threads()  # later calls in the job (the trainer's setup) keep the choice
        assert torch.get_num_threads() == cores
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        modeling.limit_threads(ws)
        assert torch.get_num_threads() == max(1, cores // 2)
        monkeypatch.delenv("LOCAL_WORLD_SIZE")

        proc = start_owner(ws)
        try:
            modeling.limit_threads(ws)
            assert torch.get_num_threads() == max(1, cores - 1)
            monkeypatch.setenv("PREFLOOP_THREADS", "3")
            modeling.limit_threads(ws)
            assert torch.get_num_threads() == 3
        finally:
            stop_owner(proc)
        monkeypatch.delenv("PREFLOOP_THREADS")
        modeling.limit_threads(ws)  # the app stopped: every core again
        assert torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)
