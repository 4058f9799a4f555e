"""Honest errors when the machine misbehaves: a full disk, a damaged database file, and the
`prefloop check` / `prefloop backup` commands that find damage and guard against it."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import duckdb
import pytest

from app import actions
from store import db as storedb
from store import users
from store.errors import PrefloopError, storage_error
from store.records import LabelRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import run_cli
from tests.fixtures_app import add_prompts, make_workspace, seed_round

CORRUPT_HINT = "prefloop check"


def _all_rows(ws: storedb.Workspace) -> dict[str, list]:
    """Every row of every table, sorted, to compare two workspaces."""
    con = duckdb.connect(str(ws.db_path), read_only=True)
    try:
        tables = [
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'"
            ).fetchall()
        ]
        return {
            t: sorted(map(repr, con.execute(f'SELECT * FROM "{t}"').fetchall())) for t in tables
        }
    finally:
        con.close()


@pytest.fixture(scope="module")
def big_ws(tmp_path_factory) -> storedb.Workspace:
    """A workspace whose candidates fill data blocks on both sides of the file's middle."""
    ws = make_workspace(tmp_path_factory.mktemp("big") / "ws")
    seed = seed_round(ws, n_groups=3)
    with storedb.connect(ws) as con:
        admin = users.add_user(con, "ada", "admin", "correct horse battery")
    c = seed.candidate_ids[0]
    actions.submit_label(
        ws, admin, LabelRecord(seed.group_ids[0], "ada", [[c[0]], [c[1], c[2], c[3]]])
    )
    rng = random.Random(0)
    prompt_ids = add_prompts(ws, [f"bulk prompt {i}" for i in range(2500)])
    from store import rounds

    with storedb.connect(ws) as con:
        round_id = rounds.create_round(con, "base", "train", 4, {"k": 4}, "sampled")
        # random hex does not compress, so the round's candidates take many blocks
        items = [
            (pid, [CandidateRecord(rng.randbytes(600).hex()) for _ in range(4)])
            for pid in prompt_ids
        ]
        rounds.add_groups(con, round_id, items)
    con = duckdb.connect(str(ws.db_path))
    con.execute("CHECKPOINT")
    con.close()
    return ws


def _copy(ws: storedb.Workspace, dest: Path) -> storedb.Workspace:
    shutil.copytree(ws.root, dest)
    return storedb.Workspace(dest)


def _truncated(ws: storedb.Workspace, dest: Path) -> storedb.Workspace:
    copy = _copy(ws, dest)
    os.truncate(copy.db_path, copy.db_path.stat().st_size // 2)
    return copy


def _zeroed(ws: storedb.Workspace, dest: Path) -> storedb.Workspace:
    copy = _copy(ws, dest)
    with copy.db_path.open("r+b") as fh:
        fh.seek(copy.db_path.stat().st_size // 2)
        fh.write(b"\0" * 256 * 1024)
    return copy


def test_check_passes_on_a_good_workspace(big_ws):
    proc = run_cli("check", "--workspace", big_ws.root)
    assert "table candidates: ok, 10012 rows" in proc.stdout
    assert "table labels: ok, 1 rows" in proc.stdout
    assert "verdict: the database and the files it names are intact" in proc.stdout


def test_check_finds_a_truncated_copy_and_status_does_not_say_all_is_well(big_ws, tmp_path):
    bad = _truncated(big_ws, tmp_path / "cut")
    proc = run_cli("check", "--workspace", bad.root, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "cut short" in proc.stdout
    assert "DAMAGED" in proc.stdout
    assert "restore the workspace from a backup made with `prefloop backup`" in proc.stdout
    assert "Traceback" not in proc.stderr

    status = run_cli("status", "--workspace", bad.root, check=False)
    assert status.returncode == 1
    assert "cut short" in status.stdout and "run `prefloop check`" in status.stdout
    assert "candidates:" not in status.stdout  # no row counts presented as if all were well


def test_check_finds_a_zeroed_block_and_a_command_hitting_it_says_so(big_ws, tmp_path):
    bad = _zeroed(big_ws, tmp_path / "zeroed")
    proc = run_cli("check", "--workspace", bad.root, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "table candidates: DAMAGED" in proc.stdout
    assert "checksum" in proc.stdout

    # the round of bulk candidates reads the damaged blocks
    out = tmp_path / "groups.jsonl"
    export = run_cli(
        "groups", "export", "--workspace", bad.root, "--round", "2", "--out", out, check=False
    )
    assert export.returncode == 2
    assert "Traceback" not in export.stderr
    lines = export.stderr.strip().splitlines()
    assert len(lines) == 1, export.stderr
    assert str(bad.db_path) in lines[0] and "damaged" in lines[0]
    assert CORRUPT_HINT in lines[0] and "prefloop backup" in lines[0]
    assert not out.exists()


def test_backup_restores_an_equal_workspace_even_while_another_process_holds_it(big_ws, tmp_path):
    ws = _copy(big_ws, tmp_path / "ws")
    snapshot = ws.artifacts / "snapshots" / "d1.parquet"
    snapshot.write_bytes(b"PAR1 stand-in")
    with storedb.connect(ws) as con:
        con.execute(
            "INSERT INTO datasets (id, content_hash, path, n_groups, n_pairs, rounds, filters) "
            "VALUES ('d1', 'h', 'artifacts/snapshots/d1.parquet', 1, 1, '[1]', '{}')"
        )
    # another process holds the file for a second: the backup waits for it, as commands do
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
            "print('held', flush=True); time.sleep(1.5); c.close()",
            str(ws.db_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    proc = run_cli("backup", "--workspace", ws.root, tmp_path / "backups")
    holder.wait(timeout=30)
    folders = [p for p in (tmp_path / "backups").iterdir()]
    assert len(folders) == 1 and not folders[0].name.startswith(".")
    backup = storedb.Workspace(folders[0])
    assert str(backup.root) in proc.stdout

    assert _all_rows(backup) == _all_rows(ws)
    assert (backup.artifacts / "snapshots" / "d1.parquet").read_bytes() == b"PAR1 stand-in"
    assert (
        "verdict: the database and the files it names are intact"
        in run_cli("check", "--workspace", backup.root).stdout
    )
    status = run_cli("status", "--workspace", backup.root).stdout
    assert "candidates: 10012" in status
    # the restored copy takes new rows with fresh ids (sequences came along)
    new = add_prompts(backup, ["a prompt after the restore"])
    assert new[0] > max(int(r) for r in _ids(ws, "prompts"))


def _ids(ws: storedb.Workspace, table: str) -> list[int]:
    con = duckdb.connect(str(ws.db_path), read_only=True)
    try:
        return [r[0] for r in con.execute(f"SELECT id FROM {table}").fetchall()]
    finally:
        con.close()


def test_check_names_a_missing_snapshot(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    with storedb.connect(ws) as con:
        con.execute(
            "INSERT INTO datasets (id, content_hash, path, n_groups, n_pairs, rounds, filters) "
            "VALUES ('d1', 'h', 'artifacts/snapshots/d1.parquet', 1, 1, '[1]', '{}')"
        )
    proc = run_cli("check", "--workspace", ws.root, check=False)
    assert proc.returncode == 1
    assert "the snapshot of dataset d1: artifacts/snapshots/d1.parquet is missing" in proc.stdout


# ---------------------------------------------------------------------------------------------
# A full disk


def test_classifier_on_real_exceptions(tmp_path):
    full = storage_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/ws/x.parquet"))
    assert isinstance(full, PrefloopError)
    assert "is full" in str(full) and "/data/ws/x.parquet" in str(full)
    assert "free space" in str(full) and "run the command again" in str(full)

    wal = duckdb.IOException(
        'Could not write file "/data/ws/prefloop.duckdb.wal": No space left on device'
    )
    assert "the disk holding /data/ws/prefloop.duckdb.wal is full" in str(storage_error(wal))

    cut = tmp_path / "cut.duckdb"
    con = duckdb.connect(str(cut))
    con.execute("CREATE TABLE t AS SELECT md5(i::VARCHAR) AS x FROM range(200000) r(i)")
    con.close()
    os.truncate(cut, cut.stat().st_size // 2)
    with pytest.raises(duckdb.Error) as info:
        con = duckdb.connect(str(cut), read_only=True)
        con.execute("SELECT max(hash(t)) FROM t").fetchall()
    damaged = storage_error(info.value, cut)
    assert damaged is not None and str(cut) in str(damaged) and "prefloop check" in str(damaged)

    assert storage_error(OSError(errno.EACCES, "Permission denied")) is None
    assert storage_error(duckdb.CatalogException("Table with name x does not exist")) is None


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (skipped where this machine does not allow mounting)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_an_import_is_one_line_and_changes_nothing(small_disk, tmp_path):
    ws = make_workspace(small_disk / "ws")
    seed_round(ws, n_groups=3)
    before = _all_rows(ws)
    rng = random.Random(1)
    big = tmp_path / "big.jsonl"  # on the roomy disk; the workspace's disk fills
    with big.open("w") as fh:
        for i in range(16000):
            fh.write(json.dumps({"prompt": f"p{i} {rng.randbytes(300).hex()}"}) + "\n")

    proc = run_cli("prompts", "import", big, "--workspace", ws.root, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-2000:]
    assert f"the disk holding {ws.root}" in lines[0] and "is full" in lines[0]
    assert "nothing of this command was written" in lines[0]
    assert "free space on that disk, then run the command again" in lines[0]

    assert _all_rows(ws) == before
    assert run_cli("check", "--workspace", ws.root).returncode == 0


def test_disk_full_in_the_web_apps_actions_is_a_prefloop_error(small_disk):
    ws = make_workspace(small_disk / "ws")
    seed = seed_round(ws, n_groups=2)
    with storedb.connect(ws) as con:
        admin = users.add_user(con, "ada", "admin", "correct horse battery")
    filler = _fill(small_disk)
    c = seed.candidate_ids[0]
    record = LabelRecord(seed.group_ids[0], "ada", [[c[0]], [c[1], c[2], c[3]]])
    with pytest.raises(PrefloopError, match="is full .* free space on that disk"):
        for _ in range(200):  # DuckDB may buffer the first small writes
            actions.submit_label(ws, admin, record)
            record = LabelRecord(
                seed.group_ids[0], "ada", record.ranking, comment=uuid.uuid4().hex * 500
            )
    filler.unlink()


def _fill(disk: Path) -> Path:
    """Leave no room on disk; returns the filler file (delete it to free the space)."""
    filler = disk / "filler"
    with filler.open("wb") as fh:
        try:
            while True:
                fh.write(os.urandom(64 * 1024))
                fh.flush()
        except OSError:
            pass
    return filler


def test_disk_full_during_freeze_leaves_no_half_written_snapshot(small_disk):
    ws = make_workspace(small_disk / "ws")
    seed = seed_round(ws, n_groups=3)
    with storedb.connect(ws) as con:
        admin = users.add_user(con, "ada", "admin", "correct horse battery")
    for gid, c in zip(seed.group_ids, seed.candidate_ids, strict=True):
        actions.submit_label(ws, admin, LabelRecord(gid, "ada", [[c[0]], [c[1]], [c[2], c[3]]]))
    before = _all_rows(ws)
    filler = _fill(small_disk)

    proc = run_cli("dataset", "freeze", "--workspace", ws.root, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "is full" in lines[0], proc.stderr[-2000:]
    assert list((ws.artifacts / "snapshots").iterdir()) == []  # no snapshot, no temp file
    assert _all_rows(ws) == before

    filler.unlink()  # with room again the same command works
    run_cli("dataset", "freeze", "--workspace", ws.root)
    assert [p.name for p in (ws.artifacts / "snapshots").iterdir()] == ["d1.parquet"]


def test_disk_full_when_the_web_app_writes_a_tune_config(small_disk):
    from app import launcher
    from tuning.config import DPOConfig

    ws = make_workspace(small_disk / "ws")
    launcher.log_dir(ws).mkdir(parents=True, exist_ok=True)
    filler = _fill(small_disk)
    with pytest.raises(PrefloopError, match="is full .* free space on that disk"):
        launcher.tune_config_args(ws, DPOConfig())
    assert list(launcher.log_dir(ws).iterdir()) == []  # no half-written config left behind
    filler.unlink()
    args = launcher.tune_config_args(ws, DPOConfig())
    assert json.loads(Path(args[-1]).read_text())["method"] == "dpo"
