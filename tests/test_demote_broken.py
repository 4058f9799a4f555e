"""With --demote-broken, broken candidates that annotators ranked first are ranked below the
fluent ones before training, so a round does not teach the next version to break (DPO, GRPO)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.cli import main
from labeling.ranking import consensus, mean_gains
from store import db, models
from store.records import TrainingGroup
from tests.labelled_ws import labelled_workspace
from tuning.config import GRPOConfig
from tuning.dpo import build_groups
from tuning.dpo import demote_broken as dpo_demote
from tuning.fluency import demote, demotions
from tuning.grpo import build_grpo_groups
from tuning.grpo import demote_broken as grpo_demote
from tuning.modeling import load_tokenizer

# candidate 0 is word salad of the kind a tuned small model emits; the annotators still liked it
TEXTS = ("lava lava lava lava lava lava lava", "Sure, here it is.", "No.", "I will not do it.")
RANKINGS = [[[0], [1], [2], [3]], [[0], [2], [1], [3]]]


def test_demote_keeps_each_sides_order_and_drops_emptied_tiers() -> None:
    assert demote([[2], [0, 1], [3]], {2}) == [[0, 1], [3], [2]]
    assert demote([[0, 2], [1], [3]], {2, 3}) == [[0], [1], [2], [3]]
    assert demote([[0], [1]], set()) == [[0], [1]]


def test_demotions_judge_against_pi_refs_own_answers() -> None:
    reference = [1.0, 1.2, 1.4]  # median 1.2: an answer over 2.2 nats/token is broken
    nll = [[2.5, 1.1, 1.3], [1.1, 1.3, 2.5], [2.4, 2.6, 2.3], [1.0, 1.0, 1.0]]
    texts = [["a b", "c d", "e f"]] * 3 + [["a b", "", "e f"]]
    rankings = [[[[0], [1], [2]]], [[[0], [1], [2]]], [[[0], [1], [2]]], [[[1], [0, 2]]]]
    bads, counts = demotions(nll, texts, rankings, reference)
    # ranked first: demoted; ranked last already: nothing moves; all broken: nothing to prefer;
    # the empty answer is broken whatever its likelihood
    assert bads == [{0}, set(), set(), {1}]
    assert counts == {"data/broken_candidates": 6.0, "data/demoted_groups": 2.0}
    # without π_ref's answers, the median of every candidate is the reference
    assert demotions([[1.0, 1.0, 3.5]], [["a", "b", "c"]], [[[[2], [0], [1]]]], None)[0] == [{2}]


def _ref(groups, nll: list[float], attr: str) -> None:
    """Set every group's π_ref log-probs so each candidate has the given NLL per token."""
    for g in groups:
        lens = [len(c) for c in g.tokens.completions]
        if attr == "ref_logps":
            g.ref_logps = torch.tensor([-n * k for n, k in zip(nll, lens, strict=True)])
        else:
            g.ref = [torch.full((k,), -n) for n, k in zip(nll, lens, strict=True)]


def test_dpo_and_grpo_learn_the_broken_favourite_as_the_worst(tiny_model_dir: Path) -> None:
    tok = load_tokenizer(str(tiny_model_dir))
    row = TrainingGroup("Say yes.", list(TEXTS), consensus(RANKINGS), RANKINGS)
    nll = [1.5, 1.2, 1.3, 1.4]  # the salad is degenerate, not unlikely

    group = build_groups([row], tok, 64, "empirical")[0]
    assert group.ranking[0] == [0] and (0, 1) in group.pairs
    _ref([group], nll, "ref_logps")
    assert dpo_demote([group], [1.2, 1.3], "empirical")["data/demoted_groups"] == 1
    # every pair now prefers the fluent side, and the SFT term's target is a fluent answer
    assert {(1, 0), (2, 0), (3, 0)} <= set(group.pairs)
    assert not [p for p in group.pairs if p[0] == 0]
    assert group.ranking[0] != [0] and group.ranking[-1] == [0]
    # (the two annotators split on 1 against 2, so that pair stays out)
    assert dict(zip(group.pairs, group.targets, strict=True)) == {
        (1, 0): 1.0, (1, 3): 1.0, (2, 0): 1.0, (2, 3): 1.0, (3, 0): 1.0
    }  # fmt: skip

    grpo = build_grpo_groups([row], tok, GRPOConfig())[0]
    assert int(grpo.gains.argmax()) == 0
    _ref([grpo], nll, "ref")
    grpo_demote([grpo], [1.2, 1.3], GRPOConfig())
    assert int(grpo.gains.argmin()) == 0
    demoted = [[[1], [2], [3], [0]], [[2], [1], [3], [0]]]
    assert grpo.gains.tolist() == pytest.approx(mean_gains(demoted, 4))


# one short epoch, no guard or gate: what is checked is the demotion, not the training
QUICK = ("--epochs", "1", "--guard-prompts", "0", "--gate-prompts", "0", "--quiet")


@pytest.fixture
def ws(tmp_path: Path, tiny_model_dir: Path) -> db.Workspace:
    """Five train groups whose annotator ranked the word salad first."""
    return labelled_workspace(tmp_path / "ws", tiny_model_dir, TEXTS)


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_tune_demotes_when_asked_and_says_so(ws: db.Workspace, capsys, method: str) -> None:
    assert main(["tune", "-w", str(ws.root), "--method", method, "--demote-broken", *QUICK]) == 0
    err = capsys.readouterr().err
    assert "5 group(s) ranked an answer π_ref finds broken above a fluent one" in err, err
    assert main(["tune", "-w", str(ws.root), "--method", method, "--no-demote-broken", *QUICK]) == 0
    assert "finds broken" not in capsys.readouterr().err
    with db.connect(ws) as con:
        on, off = (models.get_version(con, v)["config"] for v in ("v1", "v2"))
    assert on["demote_broken"] is True and off["demote_broken"] is False
    assert on["final_metrics"]["data/demoted_groups"] == 5
    assert on["final_metrics"]["data/broken_candidates"] >= 5
    assert "data/demoted_groups" not in off["final_metrics"]


def test_dpo_demotes_broken_favourites_by_default(ws: db.Workspace, capsys) -> None:
    # the shorter taste's round 2 ranked version 1's garbage first; the defaults must not learn it
    assert main(["tune", "-w", str(ws.root), "--method", "dpo", *QUICK]) == 0
    assert "5 group(s) ranked an answer π_ref finds broken" in capsys.readouterr().err
    with db.connect(ws) as con:
        config = models.get_version(con, "v1")["config"]
    assert config["demote_broken"] is True
    assert config["final_metrics"]["data/demoted_groups"] == 5
