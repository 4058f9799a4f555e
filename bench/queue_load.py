"""Load benchmark: a team of annotators on the assignment queue while `prefloop sample` runs.

The benchmark process owns the workspace database, as the web app does. Annotators take and
submit groups through the app's API (app.actions.next_group / submit_label), as threads of that
process and, in a second phase, as separate processes that reach the database through the owner's
socket. Meanwhile a real `prefloop sample` job runs as a subprocess (through the socket too). It
prints hand-out and submit latency percentiles, lost / duplicated / over-target label counts
(all must be 0) and the job's wall time alone and under each load, side by side.

    python bench/queue_load.py                       # 20 annotators, threads then processes
    python bench/queue_load.py --phases threads --think 0.2 --limit 8

Not a test: it takes minutes and its figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app import actions  # noqa: E402
from store import db as storedb  # noqa: E402
from store import owner, rounds, users  # noqa: E402
from store.access import User  # noqa: E402
from store.errors import PrefloopError  # noqa: E402
from store.records import LabelRecord  # noqa: E402
from store.rounds import CandidateRecord  # noqa: E402

PASSWORD = "bench-password-1"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def make_round(ws: storedb.Workspace, n_groups: int, k: int, overlap: int, tag: str) -> int:
    """A round of n_groups groups with k candidates each, wanting overlap labels per group."""
    from store import prompts
    from store.records import PromptRecord

    texts = [PromptRecord(f"{tag} prompt {i}: say something kind.") for i in range(n_groups)]
    with storedb.connect(ws) as con:
        ids, _ = prompts.upsert_prompts(con, texts, "heldout", "bench")
        rid = rounds.create_round(con, "base", "heldout", k, {"k": k}, "bench")
        items = [
            (pid, [CandidateRecord(f"{tag} answer {pid}.{c}") for c in range(k)]) for pid in ids
        ]
        rounds.add_groups(con, rid, items)
        rounds.set_round_options(con, rid, overlap=overlap)
    return rid


def annotate(root: str, name: str, rid: int, stop: str, think: float, seed: int) -> dict:
    """One annotator: take, think, submit, until the file stop exists (the job ended) or the
    round has nothing left for them. Returns latencies (s) and the labels the API accepted."""
    ws = storedb.workspace(root)
    user = User(name, "annotator")
    rng = random.Random(seed)
    takes, submits, accepted, refused = [], [], [], 0
    while not os.path.exists(stop):
        t0 = time.perf_counter()
        job = actions.next_group(ws, user, rid)
        takes.append(time.perf_counter() - t0)
        if job.group is None:
            break
        time.sleep(rng.uniform(0, 2 * think))
        ids = [int(c) for c in job.group.candidate_ids]
        rng.shuffle(ids)
        record = LabelRecord(job.group.group_id, name, [[i] for i in ids])
        t0 = time.perf_counter()
        try:
            actions.submit_label(ws, user, record)
            accepted.append(job.group.group_id)
        except PrefloopError:
            refused += 1
        submits.append(time.perf_counter() - t0)
    return {
        "name": name,
        "take": takes,
        "submit": submits,
        "accepted": accepted,
        "refused": refused,
    }


def start_sample(ws: storedb.Workspace, args: argparse.Namespace) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "app.cli", "sample", "-w", str(ws.root), "--k", str(args.k)]
    cmd += ["--limit", str(args.limit), "--max-new-tokens", str(args.max_new_tokens)]
    cmd += ["--model", "base"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_job(proc: subprocess.Popen, started: float) -> float:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"prefloop sample failed:\n{err[-2000:]}")
    return time.perf_counter() - started


def job_alone(ws: storedb.Workspace, args: argparse.Namespace) -> float:
    started = time.perf_counter()
    return wait_job(start_sample(ws, args), started)


def check_labels(ws: storedb.Workspace, rid: int, overlap: int, accepted: list) -> dict:
    """Accepted labels missing from the table, (group, annotator) pairs stored twice, stored
    labels nobody was told were accepted, and groups over their target."""
    with storedb.connect(ws) as con:
        rows = con.execute(
            "SELECT l.group_id, l.annotator FROM labels l JOIN groups g ON g.id = l.group_id "
            "WHERE g.round_id = ?",
            [rid],
        ).fetchall()
    stored = [(int(g), a) for g, a in rows]
    seen: dict[tuple[int, str], int] = {}
    for key in stored:
        seen[key] = seen.get(key, 0) + 1
    per_group: dict[int, int] = {}
    for g, _ in set(stored):
        per_group[g] = per_group.get(g, 0) + 1
    want = {(int(g), a) for g, a in accepted}
    return {
        "lost": len(want - set(stored)),
        "duplicated": sum(n - 1 for n in seen.values()),
        "unexpected": len(set(stored) - want),
        "over_target": sum(1 for n in per_group.values() if n > overlap),
        "labels": len(stored),
    }


def run_phase(ws, args, kind: str, rid: int) -> dict:
    """Annotators (threads of this process or separate processes) while the job runs."""
    names = [f"{kind[0]}ann{i:02d}" for i in range(args.annotators)]
    with storedb.connect(ws) as con:
        for name in names:
            users.add_user(con, name, "annotator", PASSWORD)
    stop = ws.root / f".bench-stop-{kind}"
    job_started = time.perf_counter()
    job = start_sample(ws, args)
    results: list[dict] = []
    if kind == "threads":
        lock = threading.Lock()

        def one(i: int, name: str) -> None:
            r = annotate(str(ws.root), name, rid, str(stop), args.think, i)
            with lock:
                results.append(r)

        threads = [threading.Thread(target=one, args=(i, n)) for i, n in enumerate(names)]
        for t in threads:
            t.start()
        job_s = wait_job(job, job_started)
        stop.touch()
        for t in threads:
            t.join()
    else:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--worker",
                    json.dumps([str(ws.root), n, rid, str(stop), args.think, i]),
                ],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i, n in enumerate(names)
        ]
        job_s = wait_job(job, job_started)
        stop.touch()
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"an annotator process failed (exit {p.returncode})")
            results.append(json.loads(out.strip().splitlines()[-1]))
    takes = [x for r in results for x in r["take"]]
    submits = [x for r in results for x in r["submit"]]
    accepted = [(g, r["name"]) for r in results for g in r["accepted"]]
    checked = check_labels(ws, rid, args.overlap, accepted)
    return {
        "kind": kind,
        "job_s": job_s,
        "take": takes,
        "submit": submits,
        "refused": sum(r["refused"] for r in results),
        **checked,
    }


def worker_main(spec: str) -> None:
    root, name, rid, stop, think, seed = json.loads(spec)
    result = annotate(root, name, rid, stop, think, seed)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--annotators", type=int, default=20)
    parser.add_argument("--groups", type=int, default=2000, help="groups in each phase's round")
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument(
        "--think",
        type=float,
        default=0.5,
        help="mean seconds an annotator looks at a group before submitting",
    )
    parser.add_argument("--limit", type=int, default=16, help="prompts the sampling job samples")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--phases", default="threads,processes")
    parser.add_argument("--model", default=None, help="model folder (default: the default model)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker)
        return

    from tuning.models_cache import ensure_default_model

    model = args.model or str(ensure_default_model())
    root = Path(tempfile.mkdtemp(prefix="prefloop-bench-")) / "ws"
    ws = storedb.create(root, model)
    from store import prompts
    from store.records import PromptRecord

    with storedb.connect(ws) as con:
        poems = [
            PromptRecord(f"Write a short poem about the number {i}.") for i in range(args.limit)
        ]
        prompts.add_prompts(con, poems, "train", "bench")
    owner.own(ws)  # this process is the owner, as the web app is
    print(
        f"workspace {root}; {args.annotators} annotators, think {args.think} s on average; "
        f"job: prefloop sample --limit {args.limit} --max-new-tokens {args.max_new_tokens} "
        f"--k {args.k}",
        flush=True,
    )
    alone = job_alone(ws, args)
    print(f"job alone: {alone:.1f} s", flush=True)
    phases = []
    for kind in args.phases.split(","):
        rid = make_round(ws, args.groups, args.k, args.overlap, kind)
        phases.append(run_phase(ws, args, kind, rid))
        print(f"phase {kind} done", flush=True)

    def ms(values: list[float], q: float) -> str:
        return f"{percentile(values, q) * 1000:7.1f}"

    print()
    print(
        f"{'annotators as':<12} {'hand-outs':>9} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} "
        f"{'submits':>7} {'p50 ms':>7} {'p95 ms':>7} {'lost':>4} {'dup':>4} {'over':>4} "
        f"{'job s':>6} {'alone s':>7} {'slower':>6}"
    )
    for p in phases:
        slower = (p["job_s"] / alone - 1) * 100
        print(
            f"{p['kind']:<12} {len(p['take']):>9} {ms(p['take'], 0.5)} {ms(p['take'], 0.95)} "
            f"{ms(p['take'], 1.0)} {len(p['submit']):>7} {ms(p['submit'], 0.5)} "
            f"{ms(p['submit'], 0.95)} {p['lost']:>4} {p['duplicated']:>4} {p['over_target']:>4} "
            f"{p['job_s']:>6.1f} {alone:>7.1f} {slower:>5.0f}%"
        )
    for p in phases:
        if p["unexpected"] or p["refused"]:
            print(
                f"{p['kind']}: {p['unexpected']} stored labels not reported accepted, "
                f"{p['refused']} submissions refused"
            )
    owner.release(ws)


if __name__ == "__main__":
    main()
