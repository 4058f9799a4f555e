"""Sampling rounds: batching, reproducibility, finish reasons and stored log-probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from store import db, rounds
from tests.cli_helpers import ROOT, cli, run_cli
from tuning.batching import GroupTokens, collate, sequence_logps
from tuning.generation import HFGenerator
from tuning.modeling import load_base, load_tokenizer, prompt_ids

PROMPTS = ROOT / "labeling" / "data" / "demo_prompts.jsonl"


def _texts(ws: Path, round_id: int) -> list[list[str]]:
    with db.connect(db.workspace(ws)) as con:
        return [g.texts for g in rounds.groups(con, round_id=round_id)]


def test_same_seed_same_round_and_json_summary(tmp_path: Path, tiny_model_dir: Path, capsys):
    ws = tmp_path / "ws"
    cli(capsys, "init", "-w", ws, "--model", tiny_model_dir)
    cli(capsys, "prompts", "import", PROMPTS, "-w", ws)
    args = [
        "sample",
        "-w",
        ws,
        "--k",
        3,
        "--limit",
        5,
        "--max-new-tokens",
        10,
        "--prompts-per-batch",
        2,
    ]
    r1 = int(cli(capsys, *args, "--seed", 7).splitlines()[-1])
    r2 = int(cli(capsys, *args, "--seed", 7).splitlines()[-1])
    r3 = int(cli(capsys, *args, "--seed", 8).splitlines()[-1])
    assert _texts(ws, r1) == _texts(ws, r2)
    assert _texts(ws, r1) != _texts(ws, r3)
    assert all(len(set(g)) > 1 for g in _texts(ws, r1))  # K different candidates

    summary = json.loads(cli(capsys, *args, "--seed", 7, "--json"))
    assert summary["k"] == 3 and summary["groups"] == 5 and summary["model_version"] == "base"
    assert summary["settings"]["max_new_tokens"] == 10 and summary["settings"]["seed"] == 7
    assert (summary["mode"], summary["overlap"]) == ("rank", 1)

    guide = tmp_path / "guide.md"
    guide.write_text("Prefer **short** answers.")
    extra = ("--mode", "thumbs", "--overlap", 3, "--guidelines", guide, "--json")
    summary = json.loads(cli(capsys, *args, "--seed", 7, *extra))
    assert (summary["mode"], summary["overlap"]) == ("thumbs", 3)
    with db.connect(db.workspace(ws)) as con:
        assert rounds.round_options(con, summary["id"]).guidelines == "Prefer **short** answers."


def test_round_stores_token_counts_finish_reasons_and_logprobs(
    tmp_path: Path, tiny_model_dir: Path, capsys
):
    ws = tmp_path / "ws"
    cli(capsys, "init", "-w", ws, "--model", tiny_model_dir)
    cli(capsys, "prompts", "import", PROMPTS, "-w", ws)
    proc = run_cli("sample", "-w", ws, "--k", 2, "--limit", 3, "--max-new-tokens", 6)
    round_id = int(proc.stdout.split()[-1])
    assert "sampling (base)" in proc.stderr  # the progress bar
    with db.connect(db.workspace(ws)) as con:
        cands = rounds.candidates(con, round_id)
    assert len(cands) == 6
    assert set(cands["finish_reason"]) <= {"eos", "length"}
    assert (cands["n_tokens"] <= 6).all() and (cands["n_tokens"] >= 1).all()
    assert (cands["logprob"] < 0).all()


def test_generator_logprobs_are_temperature_one_and_stop_tokens_end_samples(
    tiny_model_dir: Path,
):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_base(str(tiny_model_dir))
    gen = HFGenerator(model, tok)
    prompts = [prompt_ids(tok, "Say hi.", None), prompt_ids(tok, "Name two colours.", None)]
    samples = gen.generate(prompts, 3, max_new_tokens=8, temperature=1.7, top_p=0.9, seed=3)
    assert [len(s) for s in samples] == [3, 3]
    for p, group in zip(prompts, samples, strict=True):
        for s in group:
            assert s.finish_reason == "length" and s.n_tokens == 8 == len(s.token_ids)
            batch = collate([GroupTokens(p, [s.token_ids])], tok.pad_token_id, 512)
            with torch.no_grad():
                expected = float(sequence_logps(model, batch)[0])
            assert abs(expected - s.logprob) < 1e-3  # raw logits, not the sampling temperature

    # make the first greedy token a stop token: every sample then ends right there with "eos"
    first = gen.generate(prompts[:1], 1, max_new_tokens=1, temperature=0, top_p=1, seed=0)
    gen.stop_ids = [first[0][0].token_ids[0]]
    stopped = gen.generate(prompts[:1], 2, max_new_tokens=8, temperature=0, top_p=1, seed=0)
    assert all(s.finish_reason == "eos" and s.n_tokens == 1 for s in stopped[0])


def test_generator_matches_transformers_generate_greedily_and_its_nucleus_narrows(
    default_model_dir: Path,
):
    """The hand-written decoding loop (shared prefill, rows leaving as they stop) writes what
    `transformers.generate` writes for the same prompts, and its top-p keeps the top token."""
    tok = load_tokenizer(str(default_model_dir))
    model = load_base(str(default_model_dir))
    gen = HFGenerator(model, tok)
    texts = ["Say hi.", "Name two colours that go well together, please.", "Why?"]
    prompts = [prompt_ids(tok, t, None) for t in texts]
    # a stop token that greedy decoding reaches early on one prompt: rows then leave at
    # different steps, and the rows still running must not notice
    first = gen.generate(prompts, 1, max_new_tokens=12, temperature=0, top_p=1, seed=0)
    others = set(first[0][0].token_ids) | set(first[2][0].token_ids)
    gen.stop_ids = [next(t for t in first[1][0].token_ids[1:] if t not in others)]
    ours = gen.generate(prompts, 2, max_new_tokens=12, temperature=0, top_p=1, seed=0)
    assert any(s.finish_reason == "eos" for g in ours for s in g)
    assert any(s.finish_reason == "length" for g in ours for s in g)

    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
            eos_token_id=gen.stop_ids, pad_token_id=tok.pad_token_id, temperature=None,
            top_p=None, top_k=None,
        )[:, width:].tolist()  # fmt: skip
    for group, expected in zip(ours, ref, strict=True):
        for s in group:
            assert s.token_ids == expected[: s.n_tokens], (s.token_ids, expected)
            assert s.n_tokens == len(expected) or expected[s.n_tokens] == tok.pad_token_id

    # a nucleus this narrow holds only the most likely token: sampling is then greedy
    narrow = gen.generate(prompts, 2, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=5)
    assert [[s.token_ids for s in g] for g in narrow] == [[s.token_ids for s in g] for g in ours]


def test_nucleus_matches_a_full_sort_for_narrow_wide_and_flat_rows():
    """Rows whose nucleus fits in the top 64, needs the top 1024, or needs the whole vocabulary
    each get exactly the set a full sort gives, with the same probabilities, in one batch."""
    from tuning.generation import _nucleus

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5000, generator=gen)
    logits[0, :3] += 20  # peaked: a handful of tokens
    logits[1, :200] += 6  # a nucleus of about 200 tokens
    logits[2] *= 0.01  # nearly flat: most of the vocabulary
    logits[3, 7] += 50  # one token holds all the mass
    probs = torch.softmax(logits, -1)
    for top_p in (0.5, 0.9, 0.99):
        vals, ids = _nucleus(probs, top_p)
        sorted_p, order = probs.sort(-1, descending=True)
        for row in range(len(probs)):
            before = sorted_p[row].cumsum(0) - sorted_p[row]
            n = int((before < top_p).sum())  # the smallest prefix holding top_p
            kept = vals[row] > 0
            assert int(kept.sum()) == n, (row, top_p)
            assert set(ids[row][kept].tolist()) == set(order[row, :n].tolist())
            assert torch.allclose(vals[row][kept].sort().values, sorted_p[row, :n].sort().values)
    assert int((_nucleus(probs, 0.99)[0][2] > 0).sum()) > 1024  # the flat row left the top 1024
