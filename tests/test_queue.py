"""The assignment queue: overlap targets under concurrency, leases, gold groups and skips."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import duckdb
import pytest

from app.cli import build_parser
from labeling import annotation, queue
from store import db as storedb
from store import gold, labels, prompts, rounds
from store.errors import PrefloopError
from store.records import LabelRecord, PromptRecord
from store.rounds import CandidateRecord, GroupRecord
from tests.cli_helpers import cli, cli_error

# ----------------------------------------------------------------------------------------------
# helpers


def make_round(
    root: Path, n_groups: int, k: int = 3, overlap: int = 1, ws: storedb.Workspace | None = None
) -> tuple[storedb.Workspace, int, list[list[int]]]:
    """A workspace (new unless given) with a round of n_groups groups of k candidates; returns
    (workspace, round id, candidate ids per group in group order)."""
    ws = ws or storedb.create(root, base_model="unused")
    with storedb.connect(ws) as con:
        rid = rounds.create_round(con, None, "train", k, {"k": k}, "test")
        texts = [f"round {rid} prompt {g}" for g in range(n_groups)]
        prompts.add_prompts(con, [PromptRecord(t) for t in texts], "train", "test")
        listed = prompts.list_prompts(con)
        by_text = dict(zip(listed["text"], listed["id"], strict=True))
        items = [
            (int(by_text[t]), [CandidateRecord(f"{t} answer {c}") for c in range(k)]) for t in texts
        ]
        stored = rounds.add_groups(con, rid, items)
        rounds.set_round_options(con, rid, overlap=overlap)
    return ws, rid, [cids for _, cids in stored]


def group_ids(ws: storedb.Workspace, rid: int) -> list[int]:
    """The group ids of a round, in order."""
    with storedb.connect(ws) as con:
        return [g.group_id for g in rounds.groups(con, round_id=rid)]


def ranked(group: GroupRecord | int, annotator: str, cids: list[int] | None = None) -> LabelRecord:
    """A label ranking the candidates in stored order."""
    if isinstance(group, GroupRecord):
        return LabelRecord(group.group_id, annotator, [[c] for c in group.candidate_ids])
    return LabelRecord(group, annotator, [[c] for c in cids])


def skip(group_id: int, annotator: str) -> LabelRecord:
    return LabelRecord(group_id, annotator, None, ["skipped"])


def stored(ws: storedb.Workspace, rid: int) -> list[tuple[int, str, bool]]:
    with storedb.connect(ws) as con:
        df = labels.labels(con, [rid])
    return [
        (int(r.group_id), r.annotator, "skipped" in r.flags) for r in df.itertuples(index=False)
    ]


def filled(rows: list[tuple[int, str, bool]]) -> dict[int, int]:
    """Non-skipped labels per group."""
    out: dict[int, int] = {}
    for gid, _, skipped in rows:
        if not skipped:
            out[gid] = out.get(gid, 0) + 1
    return out


class Annotator:
    """A simulated annotator: each step takes its next group and submits a label (one in ten a
    skip). A slow one holds a 20 ms lease and takes 60 ms, so its lease has always run out when
    it submits: accepted only while the group still has a free slot."""

    def __init__(self, root: str, rid: int, name: str, slow: bool = False):
        self.ws, self.rid, self.name, self.slow = storedb.Workspace(Path(root)), rid, name, slow
        self.rng = random.Random(name)
        self.accepted: list[tuple[int, str, bool]] = []
        self.refused = 0
        self.finished = False

    def step(self) -> None:
        """Take a group and label it (or finish when the queue has nothing left for them)."""
        ticket = queue.take(self.ws, self.name, self.rid, lease_s=0.02 if self.slow else 60)
        if ticket.group is None:
            self.finished = True
            return
        if self.slow:
            time.sleep(0.06)
        skipped = self.rng.random() < 0.1
        gid = ticket.group.group_id
        record = skip(gid, self.name) if skipped else ranked(ticket.group, self.name)
        try:
            queue.submit(self.ws, record)
        except PrefloopError as exc:
            assert "not stored" in str(exc), exc
            self.refused += 1
            return
        self.accepted.append((gid, self.name, skipped))

    def run(self) -> list[tuple[int, str, bool]]:
        """Step until finished; returns what was accepted."""
        for _ in range(500):
            self.step()
            if self.finished:
                return self.accepted
        raise AssertionError(f"{self.name} never ran out of groups")


def simulate(root: str, rid: int, name: str, slow: bool = False) -> list[tuple[int, str, bool]]:
    """One annotator working through the queue on their own; returns the accepted labels."""
    return Annotator(root, rid, name, slow).run()


def run_annotators_in_threads(root: str, rid: int, names: list[str], slow: set[str]):
    """Run the annotators at once, one thread each; returns the accepted labels."""
    results: dict[str, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(len(names))

    def one(name: str) -> None:
        start.wait()
        try:
            results[name] = simulate(root, rid, name, name in slow)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [a for r in results.values() for a in r]


def process_worker(args: tuple[str, int, list[str]]) -> list[tuple[int, str, bool]]:
    """A separate OS process: its annotators take turns, one step (take + submit) each."""
    root, rid, names = args
    team = [Annotator(root, rid, n, slow=n.endswith("slow")) for n in names]
    for _ in range(500):
        active = [a for a in team if not a.finished]
        if not active:
            return [x for a in team for x in a.accepted]
        for annotator in active:
            annotator.step()
    raise AssertionError("the annotators never ran out of groups")


def check_target_kept(ws, rid, accepted, overlap, n_groups) -> None:
    """Every accepted label is stored once, nothing else is, and no group exceeds its target."""
    rows = stored(ws, rid)
    assert sorted(rows) == sorted(accepted)  # none lost, none extra
    assert len({(g, a) for g, a, _ in rows}) == len(rows)  # nobody labelled a group twice
    per_group = filled(rows)
    assert max(per_group.values()) <= overlap, per_group
    # everyone once more, one after the other: every group reaches its target exactly
    names = sorted({a for _, a, _ in rows})
    for name in names:
        accepted += simulate(str(ws.root), rid, name)
    final = filled(stored(ws, rid))
    assert final == {g: overlap for g in final} and len(final) == n_groups


# ----------------------------------------------------------------------------------------------
# concurrency


N_GROUPS, OVERLAP, N_ANNOTATORS = 30, 3, 20
PROCESS_TIMEOUT_S = 300
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("process_lock", [True, False], ids=["process-lock", "row-lock-only"])
def test_twenty_threads_never_exceed_the_target_or_lose_a_label(
    tmp_path, monkeypatch, process_lock
):
    ws, rid, _ = make_round(tmp_path / "ws", N_GROUPS, overlap=OVERLAP)
    if not process_lock:  # the round-row write lock alone must hold under DuckDB's MVCC
        monkeypatch.setattr(queue, "_process_lock", lambda ws: contextlib.nullcontext())
    names = [f"ann{i:02d}" + ("slow" if i % 7 == 3 else "") for i in range(N_ANNOTATORS)]
    slow = {n for n in names if n.endswith("slow")}
    # one idle connection keeps the database instance open, so every thread's transaction runs
    # against the same instance (optimistic MVCC between threads)
    keep = duckdb.connect(str(ws.db_path))
    try:
        accepted = run_annotators_in_threads(str(ws.root), rid, names, slow)
    finally:
        keep.close()
    assert len({a for _, a, _ in accepted}) >= N_ANNOTATORS // 2  # they really worked at once
    check_target_kept(ws, rid, accepted, OVERLAP, N_GROUPS)


def test_separate_processes_never_exceed_the_target_or_lose_a_label(tmp_path):
    # fewer groups than with threads: every unit of work opens the file, and processes wait
    # their turn on DuckDB's file lock
    n_groups = N_GROUPS // 2
    ws, rid, _ = make_round(tmp_path / "ws", n_groups, overlap=OVERLAP)
    n_proc = 5
    names = [f"p{p}a{i}" + ("slow" if i == 3 else "") for p in range(n_proc) for i in range(4)]
    chunks = [(str(ws.root), rid, names[p * 4 : (p + 1) * 4]) for p in range(n_proc)]
    # plain interpreters, not multiprocessing: its spawn start method re-runs the parent's
    # __main__, which is the Streamlit script after an AppTest ran in this process
    code = "import json, sys; from tests.test_queue import process_worker as w; "
    code += "print(json.dumps(w(json.loads(sys.argv[1]))))"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, json.dumps(chunk)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for chunk in chunks
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=PROCESS_TIMEOUT_S)
        assert proc.returncode == 0, err[-3000:]
        results.append([tuple(x) for x in json.loads(out.strip().splitlines()[-1])])
    accepted = [a for r in results for a in r]
    assert len({a for _, a, _ in accepted}) >= len(names) // 2
    check_target_kept(ws, rid, accepted, OVERLAP, n_groups)


# ----------------------------------------------------------------------------------------------
# the policy


def test_fullest_group_first_then_round_order(tmp_path):
    ws, rid, cids = make_round(tmp_path / "ws", 4, overlap=3)
    g1, g2, g3, g4 = group_ids(ws, rid)
    for who in ("x", "y"):
        queue.submit(ws, ranked(g3, who, cids[2]))
    queue.submit(ws, ranked(g2, "z", cids[1]))
    got = [queue.take(ws, name, rid).group.group_id for name in ("a", "b", "c", "d", "e")]
    # g3 has 2 of 3 → a fills it; g2 (1 of 3) gets b and c; then the empty ones in order
    assert got == [g3, g2, g2, g1, g1]


def test_a_reload_gets_the_held_group_again_and_renews_the_lease(tmp_path):
    ws, rid, _ = make_round(tmp_path / "ws", 3)
    first = queue.take(ws, "ann", rid, lease_s=60)
    again = queue.take(ws, "ann", rid, lease_s=60)
    assert again.group.group_id == first.group.group_id and again.expires >= first.expires
    job = annotation.next_assignment(ws, "ann", rid)
    assert job.group.group_id == first.group.group_id and (job.done, job.left) == (0, 3)
    # overlap 1: the held group is full for everyone else
    other = annotation.next_assignment(ws, "bob", rid)
    assert other.group.group_id != first.group.group_id and other.left == 2


def test_an_expired_lease_returns_the_slot(tmp_path):
    ws, rid, _ = make_round(tmp_path / "ws", 1)
    held = queue.take(ws, "ann", rid, lease_s=0.5)
    assert queue.take(ws, "bob", rid).group is None  # ann holds the only slot
    time.sleep(0.6)
    bob = queue.take(ws, "bob", rid)
    assert bob.group.group_id == held.group.group_id
    queue.submit(ws, ranked(bob.group, "bob"))
    with pytest.raises(PrefloopError, match="hold on group .* ran out .* not stored"):
        queue.submit(ws, ranked(held.group, "ann"))
    assert [(a, s) for _, a, s in stored(ws, rid)] == [("bob", False)]


def test_a_late_submission_is_accepted_while_the_slot_is_free(tmp_path):
    ws, rid, _ = make_round(tmp_path / "ws", 2)
    t0 = queue.utcnow()
    ticket = queue.take(ws, "ann", rid, lease_s=60, now=t0)
    later = t0 + timedelta(minutes=5)
    queue.submit(ws, ranked(ticket.group, "ann"), now=later)
    assert stored(ws, rid) == [(ticket.group.group_id, "ann", False)]


def test_coming_back_after_the_lease_ran_out_resumes_the_same_group(tmp_path):
    ws, rid, cids = make_round(tmp_path / "ws", 3, overlap=2)
    g1, g2, _ = group_ids(ws, rid)
    t0 = queue.utcnow()
    assert queue.take(ws, "ann", rid, lease_s=60, now=t0).group.group_id == g1
    later = t0 + timedelta(hours=1)
    queue.submit(ws, ranked(g2, "bob", cids[1]), now=later)  # g2 is now the fullest
    assert queue.take(ws, "cat", rid, now=later).group.group_id == g2
    assert queue.take(ws, "ann", rid, now=later).group.group_id == g1  # where ann left off


def test_a_submission_without_a_lease_on_a_full_group_is_refused(tmp_path):
    ws, rid, cids = make_round(tmp_path / "ws", 2)
    g1 = group_ids(ws, rid)[0]
    ticket = queue.take(ws, "ann", rid)
    assert ticket.group.group_id == g1
    with pytest.raises(PrefloopError, match="do not hold group .* slots are taken .* not stored"):
        queue.submit(ws, ranked(g1, "bob", cids[0]))
    queue.submit(ws, ranked(ticket.group, "ann"))
    with pytest.raises(PrefloopError, match="asks for 1 annotator"):
        queue.submit(ws, ranked(g1, "bob", cids[0]))
    # a skip never fills a slot, so it is taken even then
    queue.submit(ws, skip(g1, "bob"))
    assert filled(stored(ws, rid)) == {g1: 1}
    # the page's save_label stores a label of a group the annotator never took from the queue
    # (a researcher labelling directly), like an import
    annotation.save_label(ws, ranked(g1, "rita", cids[0]))
    assert filled(stored(ws, rid)) == {g1: 2}


def test_a_skip_is_done_for_the_annotator_and_leaves_the_slot(tmp_path):
    ws, rid, _ = make_round(tmp_path / "ws", 1)
    ticket = queue.take(ws, "ann", rid)
    queue.submit(ws, skip(ticket.group.group_id, "ann"))
    mine = queue.take(ws, "ann", rid)
    assert mine.group is None and (mine.done, mine.left) == (1, 0)
    bob = queue.take(ws, "bob", rid)
    assert bob.group.group_id == ticket.group.group_id


def test_release_gives_the_group_back(tmp_path):
    ws, rid, _ = make_round(tmp_path / "ws", 1)
    ticket = queue.take(ws, "ann", rid)
    assert queue.take(ws, "bob", rid).group is None
    assert queue.release(ws, ticket.group.group_id, "ann")
    assert not queue.release(ws, ticket.group.group_id, "ann")  # nothing held any more
    assert queue.take(ws, "bob", rid).group.group_id == ticket.group.group_id


def test_lease_length_comes_from_the_environment(tmp_path, monkeypatch):
    ws, rid, _ = make_round(tmp_path / "ws", 1)
    monkeypatch.setenv(queue.LEASE_ENV, "120")
    t0 = queue.utcnow()
    assert queue.take(ws, "ann", rid, now=t0).expires == t0 + timedelta(seconds=120)
    monkeypatch.delenv(queue.LEASE_ENV)
    assert queue.lease_seconds() == 15 * 60
    monkeypatch.setenv(queue.LEASE_ENV, "soon")
    with pytest.raises(PrefloopError, match="PREFLOOP_LEASE_S"):
        queue.take(ws, "ann", rid)


def test_save_label_revises_a_second_submission(tmp_path):
    ws, rid, _ = make_round(tmp_path / "ws", 2)
    job = annotation.next_assignment(ws, "ann", rid)
    annotation.save_label(ws, ranked(job.group, "ann"))
    reversed_ = LabelRecord(job.group.group_id, "ann", [[c] for c in job.group.candidate_ids[::-1]])
    annotation.save_label(ws, reversed_)
    with pytest.raises(PrefloopError, match="already has a label from 'ann'.*Revise"):
        annotation.save_label(ws, reversed_)
    with storedb.connect(ws) as con:
        row = labels.labels(con, [rid]).iloc[0]
        assert (row["revision"], row["ranking"]) == (2, reversed_.ranking)
        assert len(labels.label_history(con, job.group.group_id, "ann")) == 2
    job = annotation.next_assignment(ws, "ann", rid)
    assert (job.done, job.left) == (1, 1)


def test_unknown_round_and_group_say_so(tmp_path):
    ws, _, _ = make_round(tmp_path / "ws", 1)
    with pytest.raises(PrefloopError, match="unknown round 99"):
        queue.take(ws, "ann", 99)
    with pytest.raises(PrefloopError, match="unknown group_id 999"):
        queue.submit(ws, ranked(999, "ann", [1, 2, 3]))
    with pytest.raises(PrefloopError, match="annotator name"):
        queue.take(ws, "  ", 1)


# ----------------------------------------------------------------------------------------------
# gold


def test_gold_groups_are_mixed_in_for_everyone_and_ignore_the_target(tmp_path):
    ws, rid, cids = make_round(tmp_path / "ws", 12, overlap=1)
    gids = group_ids(ws, rid)
    gold_ids = gids[2::4]  # 3 gold groups
    with storedb.connect(ws) as con:
        for gid, c in zip(gids, cids, strict=True):
            if gid in gold_ids:
                gold.set_gold(con, gid, [[c[0]], [c[1], c[2]]], "rita")
    order: dict[str, list[int]] = {}
    for name in ("ann", "bob", "cat"):
        while True:
            ticket = queue.take(ws, name, rid)
            if ticket.group is None:
                break
            assert type(ticket.group) is GroupRecord  # nothing marks a gold group
            order.setdefault(name, []).append(ticket.group.group_id)
            group = ticket.group
            ranking = [[c] for c in group.candidate_ids]
            if name == "bob":
                ranking = ranking[::-1]
            queue.submit(ws, LabelRecord(group.group_id, name, ranking))
    for name, got in order.items():
        assert set(gold_ids) <= set(got), name  # every annotator gets every gold group
    # each regular group went to exactly one annotator (overlap 1), gold to all three
    rows = stored(ws, rid)
    per_group = filled(rows)
    assert all(per_group[g] == (3 if g in gold_ids else 1) for g in gids)
    # gold is spread through the queue, not left for the end
    first = order["ann"]
    assert min(first.index(g) for g in gold_ids) < len(first) - len(gold_ids)
    # accuracy: ann and cat rank exactly like gold on the ties-free part, bob reverses it
    acc = queue.gold_accuracy(ws).set_index("annotator")
    assert acc.loc["ann", "gold_labelled"] == 3 and acc.loc["bob", "pair_accuracy"] == 0.0
    assert acc.loc["ann", "pair_accuracy"] == 1.0 and acc.loc["ann", "exact"] == 0.0


def test_the_gold_draw_is_reproducible(tmp_path):
    orders = []
    for attempt in range(2):
        ws, rid, cids = make_round(tmp_path / f"ws{attempt}", 6)
        gids = group_ids(ws, rid)
        with storedb.connect(ws) as con:
            for gid, c in list(zip(gids, cids, strict=True))[::3]:
                gold.set_gold(con, gid, [[c[0]], [c[1]], [c[2]]], None)
        seen = []
        while (ticket := queue.take(ws, "ann", rid)).group is not None:
            seen.append(ticket.group.group_id)
            queue.submit(ws, ranked(ticket.group, "ann"))
        orders.append(seen)
    assert orders[0] == orders[1] and len(orders[0]) == 6


def test_gold_rankings_are_validated(tmp_path):
    ws, rid, cids = make_round(tmp_path / "ws", 1)
    gid = group_ids(ws, rid)[0]
    a, b, c = cids[0]
    with storedb.connect(ws) as con:
        with pytest.raises(PrefloopError, match="misses candidate"):
            gold.set_gold(con, gid, [[a], [b]], None)
        with pytest.raises(PrefloopError, match="all-tied"):
            gold.set_gold(con, gid, [[a, b, c]], None)
        with pytest.raises(PrefloopError, match="unknown group"):
            gold.set_gold(con, 999, [[a], [b, c]], None)
        gold.set_gold(con, gid, [[a], [b, c]], "rita")
        assert gold.gold(con) == {gid: [[a], [b, c]]} and gold.gold(con, [rid + 1]) == {}
        gold.remove_gold(con, gid)
        with pytest.raises(PrefloopError, match="not a gold group"):
            gold.remove_gold(con, gid)
    assert queue.parse_ranking(" 12 > 13=14>15 ") == [[12], [13, 14], [15]]
    with pytest.raises(PrefloopError, match="e.g. 12>13=14>15"):
        queue.parse_ranking("12,13")


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_rounds_set_gold_and_label_history(tmp_path, capsys):
    ws, rid, cids = make_round(tmp_path / "ws", 2)
    gid = group_ids(ws, rid)[0]
    a, b, c = cids[0]
    w = ("-w", str(ws.root))
    guide = tmp_path / "guide.md"
    guide.write_text("# Prefer short answers\n")
    out = cli(capsys, "rounds", "set", rid, "--overlap", 3, "--guidelines", guide, *w)
    assert "overlap 3" in out and "mode rank" in out
    out = cli(capsys, "rounds", "set", rid, "--mode", "thumbs", "--suggestions", "on", *w)
    assert "mode thumbs" in out and "suggestions on" in out
    with storedb.connect(ws) as con:
        opts = rounds.round_options(con, rid)
    assert (opts.overlap, opts.mode, opts.show_suggestions) == (3, "thumbs", True)
    assert opts.guidelines.startswith("# Prefer short")
    assert "nothing to change" in cli_error(capsys, "rounds", "set", rid, *w)
    assert "unknown round 9" in cli_error(capsys, "rounds", "set", 9, "--overlap", 2, *w)

    out = cli(capsys, "gold", "set", gid, "--ranking", f"{a}>{b}={c}", "--author", "rita", *w)
    assert f"group {gid} is gold: {a}>{b}={c}" in out
    assert f"{a}>{b}={c}" in cli(capsys, "gold", "list", "--round", rid, *w)
    assert "cannot read the ranking" in cli_error(capsys, "gold", "set", gid, "--ranking", "x", *w)
    assert "misses candidate" in cli_error(capsys, "gold", "set", gid, "--ranking", f"{a}>{b}", *w)

    queue.submit(ws, LabelRecord(gid, "ann", None, thumbs={a: True, b: False, c: False}))
    queue.submit(ws, LabelRecord(gid, "bob", None, thumbs={a: True, b: True, c: False}))
    out = cli(capsys, "gold", "accuracy", "--json", *w)
    assert '"annotator":"ann","gold_labelled":1,"gold_skipped":0,"exact":1.0' in out
    assert '"annotator":"bob","gold_labelled":1,"gold_skipped":0,"exact":0.0' in out
    assert "no longer gold" in cli(capsys, "gold", "remove", gid, *w)
    assert "(none)" in cli(capsys, "gold", "list", *w)
    assert "not a gold group" in cli_error(capsys, "gold", "remove", gid, *w)


def test_cli_label_history(tmp_path, capsys):
    ws, rid, cids = make_round(tmp_path / "ws", 1)
    gid = group_ids(ws, rid)[0]
    a, b, c = cids[0]
    queue.submit(ws, LabelRecord(gid, "ann", [[a], [b], [c]]))
    queue.revise(ws, LabelRecord(gid, "ann", [[c], [b, a]], comment="changed my mind"))
    out = cli(capsys, "labels", "history", gid, "--annotator", "ann", "-w", str(ws.root))
    assert f"{a}>{b}>{c}" in out and f"{c}>{b}={a}" in out and "changed my mind" in out
    err = cli_error(capsys, "labels", "history", gid, "--annotator", "bob", "-w", str(ws.root))
    assert "'bob' has no label on group" in err


def test_cli_help_texts():
    parser = build_parser()
    for argv in (["rounds", "set"], ["gold", "set"], ["gold", "list"], ["labels", "history"]):
        sub = parser
        for word in argv:
            sub = next(
                a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"
            ).choices[word]
        assert sub.description and all(a.help for a in sub._actions if a.dest not in ("help",))
