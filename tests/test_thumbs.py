"""Thumbs rounds: snapshots carry the thumbs, KTO (unpaired) export, bootstrapped pairs, judge."""

from __future__ import annotations

from pathlib import Path

import pytest

from labeling.suggest import load_suggestion_judge, suggest_round, suggested_thumbs
from store import datasets, labels, prompts, rounds, suggestions
from store import db as storedb
from store.records import LabelRecord, PromptRecord
from store.rounds import CandidateRecord
from tests.cli_helpers import cli, cli_error, read_jsonl
from tests.fixtures_app import SeededRound, make_workspace, seed_round

SHORTER = "tests.judges.length:shorter"


def _thumbs_round(ws: storedb.Workspace, texts: list[list[str]]) -> SeededRound:
    r = seed_round(ws, n_groups=len(texts), k=len(texts[0]))
    with storedb.connect(ws) as con:
        rounds.set_round_options(con, r.round_id, mode="thumbs")
        # give the candidates the texts the test wants (seed_round writes 'answer g.c')
        for cids, group_texts in zip(r.candidate_ids, texts, strict=True):
            for cid, text in zip(cids, group_texts, strict=True):
                con.execute("UPDATE candidates SET text = ? WHERE id = ?", [text, cid])
    r.texts = texts
    return r


def _thumbs(cids: list[int], ups: str) -> dict[int, bool]:
    """Thumbs from a pattern like '+--' (one sign per candidate)."""
    return {c: s == "+" for c, s in zip(cids, ups, strict=True)}


TEXTS = [
    ["good one", "bad one", "worse one"],
    ["fine", "also fine", "fine too"],
    ["yes", "maybe", "no"],
]


@pytest.fixture
def thumbs_ws(tmp_path: Path) -> tuple[storedb.Workspace, SeededRound]:
    ws = make_workspace(tmp_path / "ws")
    r = _thumbs_round(ws, TEXTS)
    c = r.candidate_ids
    records = [
        LabelRecord(r.group_ids[0], "ann", None, thumbs=_thumbs(c[0], "+--")),
        LabelRecord(r.group_ids[1], "ann", None, thumbs=_thumbs(c[1], "+++")),
        LabelRecord(r.group_ids[2], "ann", None, thumbs=_thumbs(c[2], "++-")),
        LabelRecord(r.group_ids[2], "bob", None, thumbs=_thumbs(c[2], "+--")),
    ]
    with storedb.connect(ws) as con:
        labels.add_labels(con, records)
    return ws, r


def test_snapshot_carries_thumbs_and_pairs_are_ups_times_downs(thumbs_ws, tmp_path, capsys):
    ws, r = thumbs_ws
    version = cli(capsys, "dataset", "freeze", "-w", ws.root).strip()
    with storedb.connect(ws) as con:
        info = datasets.get_dataset(con, version)
    rows = datasets.read_snapshot(ws, info).set_index("group_id")
    assert rows.loc[r.group_ids[0], "thumbs"] == [[1, 0], [0, 1], [0, 1]]
    assert rows.loc[r.group_ids[1], "thumbs"] == [[1, 0], [1, 0], [1, 0]]
    assert rows.loc[r.group_ids[2], "thumbs"] == [[2, 0], [1, 1], [0, 2]]
    assert rows.loc[r.group_ids[1], "ranking"] == [[0, 1, 2]]  # all up: one tier, no pair
    assert info["stats"]["thumbs"] == {"up": 5, "down": 3, "tied": 1}

    # one annotator per group: the pairs are exactly that annotator's ups x downs
    single = cli(capsys, "dataset", "freeze", "-w", ws.root, "--annotators", "ann").strip()
    out = tmp_path / "pairs" / "pairs.jsonl"
    cli(capsys, "export", "-w", ws.root, "--format", "pairs", "--dataset", single, "--out", out)
    got = {(p["prompt"], p["chosen"], p["rejected"]) for p in read_jsonl(out)}
    want = set()
    for prompt, texts, pattern in zip(r.prompts, TEXTS, ("+--", "+++", "++-"), strict=True):
        ups = [t for t, s in zip(texts, pattern, strict=True) if s == "+"]
        downs = [t for t, s in zip(texts, pattern, strict=True) if s == "-"]
        want |= {(prompt, u, d) for u in ups for d in downs}
    assert got == want and len(read_jsonl(out)) == 4

    # two annotators: their derived rankings [[ups], [downs]] meet in the consensus
    out = tmp_path / "pairs2" / "pairs.jsonl"
    cli(capsys, "export", "-w", ws.root, "--format", "pairs", "--dataset", version, "--out", out)
    pairs = {(p["chosen"], p["rejected"]) for p in read_jsonl(out) if p["prompt"] == r.prompts[2]}
    assert pairs == {("yes", "maybe"), ("yes", "no"), ("maybe", "no")}


def test_kto_export_majority_per_candidate_ties_dropped(thumbs_ws, tmp_path, capsys):
    ws, r = thumbs_ws
    cli(capsys, "dataset", "freeze", "-w", ws.root)
    out = tmp_path / "kto" / "kto.jsonl"
    assert "wrote 8 rows" in cli(capsys, "export", "-w", ws.root, "--format", "kto", "--out", out)
    rows = read_jsonl(out)
    got = {(x["prompt"], x["completion"], x["label"]) for x in rows}
    assert (r.prompts[2], "maybe", True) not in got and (r.prompts[2], "maybe", False) not in got
    assert (r.prompts[2], "yes", True) in got and (r.prompts[2], "no", False) in got
    assert {(x["completion"], x["label"]) for x in rows if x["prompt"] == r.prompts[0]} == {
        ("good one", True),
        ("bad one", False),
        ("worse one", False),
    }
    card = (out.parent / "README.md").read_text()
    assert "TRL unpaired preference" in card and "dataset version: `d1`" in card
    assert "5 up, 3 down, 1 tied" in card

    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(out), split="train")
    assert set(ds.column_names) == {"prompt", "completion", "label"}
    assert ds.features["label"].dtype == "bool" and ds.num_rows == 8
    parquet = tmp_path / "kto2" / "kto.parquet"
    cli(capsys, "export", "-w", ws.root, "--format", "kto", "--out", parquet)
    pq = load_dataset("parquet", data_files=str(parquet), split="train")
    assert pq.features["label"].dtype == "bool" and pq.num_rows == 8


def test_kto_export_needs_thumbs(tmp_path, capsys):
    ws = make_workspace(tmp_path / "ws")
    r = seed_round(ws, n_groups=1, k=2)
    with storedb.connect(ws) as con:
        labels.add_labels(
            con, [LabelRecord(r.group_ids[0], "ann", [[c] for c in r.candidate_ids[0]])]
        )
    cli(capsys, "dataset", "freeze", "-w", ws.root)
    err = cli_error(
        capsys, "export", "-w", ws.root, "--format", "kto", "--out", tmp_path / "k.jsonl"
    )
    assert "no thumbs" in err and "--format pairs" in err


def test_conversational_kto_export(tmp_path, capsys):
    ws = make_workspace(tmp_path / "ws")
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Greet me."},
    ]
    with storedb.connect(ws) as con:
        prompts.add_prompts(con, [PromptRecord("Greet me.", messages)], "train", "test")
        pid = int(prompts.list_prompts(con)["id"].iloc[0])
        rid = rounds.create_round(con, "base", "train", 2, {}, "sampled")
        rounds.set_round_options(con, rid, mode="thumbs")
        gid, cids = rounds.add_group(
            con, rid, pid, [CandidateRecord("Hi!"), CandidateRecord("No.")]
        )
        labels.add_labels(con, [LabelRecord(gid, "ann", None, thumbs=_thumbs(cids, "+-"))])
    cli(capsys, "dataset", "freeze", "-w", ws.root)
    out = tmp_path / "kto" / "kto.jsonl"
    cli(capsys, "export", "-w", ws.root, "--format", "kto", "--out", out)
    rows = read_jsonl(out)
    assert rows == [
        {
            "prompt": messages,
            "completion": [{"role": "assistant", "content": "Hi!"}],
            "label": True,
        },
        {
            "prompt": messages,
            "completion": [{"role": "assistant", "content": "No."}],
            "label": False,
        },
    ]


def test_judge_thumbs_a_thumbs_round(tmp_path, capsys):
    ws = make_workspace(tmp_path / "ws")
    r = _thumbs_round(ws, [["a", "bbb", "cc", "dddd"], ["x", "y", "z", "w"]])
    c = r.candidate_ids
    report = suggest_round(
        ws, r.round_id, load_suggestion_judge(SHORTER), SHORTER, as_annotator=True
    )
    assert (report.mode, report.thumbs_up, report.thumbs_down, report.labelled) == (
        "thumbs",
        2,
        6,
        2,
    )
    with storedb.connect(ws) as con:
        _, ranking = suggestions.suggestion(con, r.group_ids[0])
        assert ranking == [[c[0][0], c[0][2]], [c[0][1], c[0][3]]]  # above the median length
        _, ranking = suggestions.suggestion(con, r.group_ids[1])
        assert ranking == [[], c[1]]  # all the same score: nothing above the median
        assert suggested_thumbs(ranking) == {x: False for x in c[1]}
        judged = labels.labels(con, annotator="judge").set_index("group_id")
    assert judged.loc[r.group_ids[0], "thumbs"] == _thumbs(c[0], "+-+-")
    assert judged.loc[r.group_ids[0], "ranking"] == [[c[0][0], c[0][2]], [c[0][1], c[0][3]]]

    # a threshold on the scorer's score (-length): up when at most 3 characters long
    out = cli(
        capsys, "judge", r.round_id, "--judge", SHORTER, "--thumbs-threshold", "-3", "-w", ws.root
    )
    assert "7 thumbs up, 1 down" in out
    with storedb.connect(ws) as con:
        _, ranking = suggestions.suggestion(con, r.group_ids[0])
    assert ranking == [[c[0][0], c[0][1], c[0][2]], [c[0][3]]]


def test_kto_export_trains_in_trl(thumbs_ws, tmp_path, tiny_model_dir, capsys):
    ws, _ = thumbs_ws
    cli(capsys, "dataset", "freeze", "-w", ws.root)
    out = tmp_path / "kto" / "kto.jsonl"
    cli(capsys, "export", "-w", ws.root, "--format", "kto", "--out", out)

    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=4,
        max_steps=2,
        max_length=128,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
    )
    trainer = KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=load_dataset("json", data_files=str(out), split="train"),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    assert trainer.train().global_step == 2
