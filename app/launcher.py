"""Starting `prefloop` CLI jobs in the background for the web app, and finding their logs."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from labeling.judges import REGISTERED_ONLY_ENV
from store import db as storedb
from store.errors import PrefloopError, storage_error
from tuning.config import DPOConfig, GRPOConfig, SamplingConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOG_DIR = "runs"
EXIT_MARK = "[prefloop] job exited with code "
_LOG_NAME = re.compile(r"^job-(?P<stamp>\d{8}-\d{6})-(?P<kind>[a-z0-9_]+)-pid(?P<pid>\d+)\.log$")


def log_dir(ws: storedb.Workspace) -> Path:
    """The folder that holds the logs of jobs started from the web app."""
    return ws.artifacts / LOG_DIR


def sample_args(
    cfg: SamplingConfig, version: str | None, mode: str = "rank", overlap: int = 1
) -> list[str]:
    """The `prefloop sample` arguments for a sampling config, model version and round options."""
    args = ["sample"]
    if version:
        args += ["--model", version]
    args += [
        "--split",
        cfg.split,
        "--k",
        str(cfg.k),
        "--max-new-tokens",
        str(cfg.max_new_tokens),
        "--temperature",
        repr(float(cfg.temperature)),
        "--top-p",
        repr(float(cfg.top_p)),
        "--seed",
        str(cfg.seed),
        "--prompts-per-batch",
        str(cfg.prompts_per_batch),
        "--dtype",
        cfg.dtype,
    ]
    if cfg.load_in_4bit:
        args.append("--load-in-4bit")
    if cfg.limit:
        args += ["--limit", str(cfg.limit)]
    return [*args, "--mode", mode, "--overlap", str(int(overlap))]


def tune_config_args(
    ws: storedb.Workspace,
    cfg: DPOConfig | GRPOConfig,
    *,
    method: str = "dpo",
    from_version: str | None = None,
    dataset_id: str | None = None,
) -> list[str]:
    """Write a run's config as a JSON file in the job log folder; the `prefloop tune` arguments."""
    config = {
        "method": method,
        "from": None if from_version in (None, "", "base") else from_version,
        "dataset": dataset_id or None,
        **cfg.to_dict(),
    }
    folder = log_dir(ws)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    tmp_name = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f"tune-{stamp}-{method}-", suffix=".json.tmp", dir=folder
        )
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        path = Path(tmp_name).with_suffix("")  # the unique name without ".tmp"
        os.replace(tmp_name, path)
    except OSError as exc:
        if tmp_name:
            Path(tmp_name).unlink(missing_ok=True)
        raise storage_error(exc, folder) or PrefloopError(
            f"could not write the run's config into {folder}: {exc}"
        ) from exc
    return ["tune", "--config", str(path)]


def _reap(proc: subprocess.Popen, log_path: Path) -> None:
    code = proc.wait()
    try:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n{EXIT_MARK}{code}\n")
    except OSError:
        pass


def start_job(ws: storedb.Workspace, args: list[str]) -> tuple[int, Path]:
    """Start `prefloop ARGS --workspace WS` detached in the background; returns (pid, log path)."""
    if not args:
        raise PrefloopError("no prefloop command to start")
    folder = log_dir(ws)
    folder.mkdir(parents=True, exist_ok=True)
    kind = re.sub(r"[^a-z0-9_]", "_", args[0].lower()) or "job"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    cmd = [sys.executable, "-m", "app.cli", *args, "--workspace", str(ws.root)]
    env = {
        **os.environ,
        "PREFLOOP_WORKSPACE": str(ws.root),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
        REGISTERED_ONLY_ENV: "1",  # the job itself refuses a judge the operator did not register
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    fd, tmp_name = tempfile.mkstemp(prefix=f"job-{stamp}-{kind}-", suffix=".starting", dir=folder)
    tmp = Path(tmp_name)
    with os.fdopen(fd, "ab") as log:
        log.write(f"$ prefloop {shlex.join(args)} --workspace {ws.root}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=PROJECT_ROOT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise PrefloopError(f"could not start `prefloop {args[0]}`: {exc}") from exc
    log_path = folder / f"job-{stamp}-{kind}-pid{proc.pid}.log"
    os.replace(tmp, log_path)
    threading.Thread(target=_reap, args=(proc, log_path), daemon=True).start()
    return proc.pid, log_path


@dataclass
class LaunchedJob:
    """A job started from the web app, as its log file tells."""

    pid: int
    kind: str
    started: str
    log_path: Path
    exit_code: int | None

    @property
    def running(self) -> bool:
        """Whether the process is still at work (no exit code yet and the process exists)."""
        if self.exit_code is not None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    @property
    def state(self) -> str:
        """'running', 'exit N', or 'ended' when the exit code was not recorded."""
        if self.exit_code is not None:
            return f"exit {self.exit_code}"
        return "running" if self.running else "ended"


def exit_code(log_path: Path) -> int | None:
    """The exit code recorded at the end of a job's log, or None while unknown (running)."""
    for line in reversed(read_tail(log_path, lines=5)):
        if line.startswith(EXIT_MARK):
            try:
                return int(line[len(EXIT_MARK) :].strip())
            except ValueError:
                return None
    return None


def launched_jobs(ws: storedb.Workspace, limit: int = 20) -> list[LaunchedJob]:
    """Jobs started from the web app, newest first."""
    folder = log_dir(ws)
    if not folder.is_dir():
        return []
    jobs = []
    for path in folder.iterdir():
        match = _LOG_NAME.match(path.name)
        if not match:
            continue
        stamp = match["stamp"]
        jobs.append(
            LaunchedJob(
                pid=int(match["pid"]),
                kind=match["kind"],
                started=f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]} "
                f"{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}",
                log_path=path,
                exit_code=None,
            )
        )
    jobs.sort(key=lambda j: (j.log_path.stat().st_mtime_ns, j.pid), reverse=True)
    jobs = jobs[:limit]
    for job in jobs:
        job.exit_code = exit_code(job.log_path)
    return jobs


def find_log(ws: storedb.Workspace, pid: int | None, log_path: str | None = None) -> Path | None:
    """The log of a run: its recorded log path, else the newest web-app log of its process id."""
    if log_path:
        path = ws.resolve_stored(log_path, f"the log of the run in process {pid}")
        return path if path.exists() else None
    if pid is None:
        return None
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        return None
    matches = [j for j in launched_jobs(ws, limit=10_000) if j.pid == pid]
    return matches[0].log_path if matches else None


def read_tail(path: Path | None, lines: int = 40, max_bytes: int = 65_536) -> list[str]:
    """The last lines of a log as a terminal shows them (a progress bar's last state only)."""
    if path is None or not Path(path).exists():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read()
    text = data.decode("utf-8", errors="replace")
    out = []
    for raw in text.replace("\r\n", "\n").split("\n"):
        shown = [part for part in raw.split("\r") if part.strip()]
        if shown:
            out.append(shown[-1].rstrip())
    return out[-lines:]


def eval_args(version: str, cfg) -> list[str]:
    """The `prefloop eval` arguments for an evaluation config (tuning.evaluation.EvalConfig)."""
    args = [
        "eval",
        "--model", version,
        "--against", cfg.against,
        "--judge", cfg.judge,
        "--split", cfg.split,
        "--k", str(cfg.k),
        "--max-new-tokens", str(cfg.max_new_tokens),
        "--temperature", repr(float(cfg.temperature)),
        "--top-p", repr(float(cfg.top_p)),
        "--seed", str(cfg.seed),
    ]  # fmt: skip
    if cfg.limit:
        args += ["--limit", str(cfg.limit)]
    if cfg.judge_model:
        args += ["--judge-model", cfg.judge_model]
    if cfg.rubric:
        args += ["--rubric", cfg.rubric]
    return args
