"""Judge suggestions: a programmatic or LLM judge pre-ranks (or thumbs) a round's groups.

How a judge turns a group of K candidates into a suggestion:

- a scorer f(prompt, completion) -> float (or a reward model, rm:VERSION) scores each candidate
  once; higher is better, equal scores tie;
- a pairwise judge f(prompt, a, b) (or the LLM judge, which reads both orders) judges all
  C(K, 2) pairs; a candidate's score is its wins, a tie counting half; equal scores tie.

Rank rounds store the tiers, best first. Thumbs rounds store exactly two tiers, [ups, downs]
(either may be empty): a candidate is up when its score is above the group's median score, or,
with a threshold (scorers only), when its score is at least the threshold. So a group whose
candidates all score the same gets all thumbs down under the median rule.

With as_annotator the judge's verdicts are also stored as labels of annotator "judge" (its
rankings, or thumbs in thumbs rounds), so agreement reports compare it with the humans. Groups
the judge has labelled already keep their label. Dataset versions leave the judge's labels out
unless `--annotators` names it.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations

from labeling.curation import JUDGE_ANNOTATOR
from labeling.judges import judge_function, load_programmatic_judge
from store import db as storedb
from store import labels, rounds, runs, suggestions
from store.errors import PrefloopError
from store.records import LabelRecord


@dataclass
class Scorer:
    """A judge that scores one completion at a time: f(prompt, completion) -> float."""

    func: Callable[[str, str], float]

    def __call__(self, prompt: str, completion: str) -> float:
        return float(self.func(prompt, completion))


def load_suggestion_judge(spec: str) -> Scorer | Callable[[str, str, str], float]:
    """The judge "module:function" names: a Scorer for f(prompt, completion), else pairwise."""
    func, kind = judge_function(spec)
    return Scorer(func) if kind == "scorer" else load_programmatic_judge(spec)


def judge_scores(judge, items: list[tuple[str, list[str]]]) -> list[list[float]]:
    """Scores of each (prompt, candidate texts): a scorer's scores (a batched scorer such as a
    reward model scores them all at once), or pairwise wins (ties ½)."""
    if hasattr(judge, "score_many"):
        return [[float(s) for s in group] for group in judge.score_many(items)]
    if isinstance(judge, Scorer):
        return [[judge(prompt, t) for t in texts] for prompt, texts in items]
    pairs = [
        (g, i, j, (prompt, texts[i], texts[j]))
        for g, (prompt, texts) in enumerate(items)
        for i, j in combinations(range(len(texts)), 2)
    ]
    questions = [q for *_, q in pairs]
    if hasattr(judge, "judge_many"):  # the LLM judge batches every pair of the round
        outcomes = judge.judge_many(questions) if questions else []
    else:
        outcomes = [judge(*q) for q in questions]
    scores = [[0.0] * len(texts) for _, texts in items]
    for (g, i, j, _), outcome in zip(pairs, outcomes, strict=True):
        scores[g][i] += float(outcome)
        scores[g][j] += 1.0 - float(outcome)
    return scores


def scores_to_ranking(candidate_ids: list[int], scores: list[float]) -> list[list[int]]:
    """Tiers of candidate ids by descending score; equal scores share a tier."""
    tiers: list[list[int]] = []
    last = None
    for score, cid in sorted(zip(scores, candidate_ids, strict=True), key=lambda x: (-x[0], x[1])):
        if last is not None and abs(score - last) < 1e-9:
            tiers[-1].append(cid)
        else:
            tiers.append([cid])
        last = score
    return tiers


def scores_to_thumbs(
    candidate_ids: list[int], scores: list[float], threshold: float | None = None
) -> dict[int, bool]:
    """Thumbs up for scores above the group's median (or at least threshold), down otherwise."""
    if threshold is not None:
        return {c: s >= threshold for c, s in zip(candidate_ids, scores, strict=True)}
    median = statistics.median(scores)
    return {c: s > median + 1e-9 for c, s in zip(candidate_ids, scores, strict=True)}


def thumbs_ranking(thumbs: dict[int, bool]) -> list[list[int]]:
    """The two tiers [ups, downs] a thumbs suggestion is stored as (either may be empty)."""
    return [
        sorted(c for c, up in thumbs.items() if up),
        sorted(c for c, up in thumbs.items() if not up),
    ]


def suggested_thumbs(ranking: list[list[int]]) -> dict[int, bool]:
    """A thumbs round's stored suggestion [ups, downs] as candidate id -> up."""
    ups = ranking[0] if ranking else []
    downs = [c for tier in ranking[1:] for c in tier]
    return {**{c: True for c in ups}, **{c: False for c in downs}}


@dataclass
class SuggestReport:
    """What judging a round stored."""

    round_id: int
    judge: str
    mode: str
    groups: int = 0
    suggested: int = 0
    labelled: int = 0  # labels stored for annotator "judge"
    already_labelled: int = 0  # groups the judge had labelled before: left as they were
    show_suggestions: bool | None = None
    thumbs_up: int = 0
    thumbs_down: int = 0
    scores: dict[int, dict[int, float]] | None = None  # group id -> candidate id -> score


def _scores_each(judge) -> bool:
    """Whether the judge scores each candidate on its own (a scorer or a reward model)."""
    return isinstance(judge, Scorer) or hasattr(judge, "score_many")


def suggest_round(
    ws: storedb.Workspace,
    round_id: int,
    judge,
    judge_name: str,
    *,
    as_annotator: bool = False,
    thumbs_threshold: float | None = None,
    show: bool | None = None,
) -> SuggestReport:
    """Judge every group of a round; store suggestions (and optionally the judge's labels)."""
    if thumbs_threshold is not None and not _scores_each(judge):
        raise PrefloopError(
            "a thumbs threshold applies to a scorer's scores only; pairwise and LLM judges "
            "give thumbs up above the group's median number of wins"
        )
    with storedb.connect(ws) as con:
        mode = rounds.round_options(con, round_id).mode
        groups = rounds.groups(con, round_id=round_id)
        if not groups:
            raise PrefloopError(f"round {round_id} has no groups to judge")
        config = {
            "round": int(round_id),
            "judge": judge_name,
            "as_annotator": as_annotator,
            "thumbs_threshold": thumbs_threshold,
        }
        run_id = runs.start_run(con, "judge", config)
    try:
        report = _judge_and_store(
            ws, round_id, groups, mode, judge, judge_name, as_annotator, thumbs_threshold, show
        )
    except BaseException as exc:
        with storedb.connect(ws) as con:
            runs.fail_run(con, run_id, str(exc) or type(exc).__name__)
        raise
    with storedb.connect(ws) as con:
        runs.finish_run(con, run_id, f"{report.suggested} suggestions for round {round_id}")
    return report


def _judge_and_store(
    ws: storedb.Workspace,
    round_id: int,
    groups: list[rounds.GroupRecord],
    mode: str,
    judge,
    judge_name: str,
    as_annotator: bool,
    thumbs_threshold: float | None,
    show: bool | None,
) -> SuggestReport:
    # the judge runs with the database closed: annotators keep labelling meanwhile
    scores = judge_scores(judge, [(g.prompt, g.texts) for g in groups])
    report = SuggestReport(round_id, judge_name, mode, groups=len(groups))
    report.scores = {
        g.group_id: dict(zip(g.candidate_ids, s, strict=True))
        for g, s in zip(groups, scores, strict=True)
    }
    verdicts: dict[int, list[list[int]]] = {}
    thumbs: dict[int, dict[int, bool]] = {}
    for g, s in zip(groups, scores, strict=True):
        if mode == "thumbs":
            thumbs[g.group_id] = scores_to_thumbs(g.candidate_ids, s, thumbs_threshold)
            verdicts[g.group_id] = thumbs_ranking(thumbs[g.group_id])
            report.thumbs_up += sum(thumbs[g.group_id].values())
            report.thumbs_down += len(g.candidate_ids) - sum(thumbs[g.group_id].values())
        else:
            verdicts[g.group_id] = scores_to_ranking(g.candidate_ids, s)
    with storedb.connect(ws) as con:
        report.suggested = suggestions.set_suggestions(con, judge_name, verdicts)
        if as_annotator:
            report.labelled, report.already_labelled = _label_as_judge(con, verdicts, thumbs)
        if show is not None:
            rounds.set_round_options(con, round_id, show_suggestions=show)
        report.show_suggestions = rounds.round_options(con, round_id).show_suggestions
    return report


def _label_as_judge(
    con, verdicts: dict[int, list[list[int]]], thumbs: dict[int, dict[int, bool]]
) -> tuple[int, int]:
    """Store the judge's verdicts as labels of annotator "judge"; returns (stored, kept)."""
    done = set(labels.labels(con, annotator=JUDGE_ANNOTATOR)["group_id"].astype(int))
    records = []
    for gid, ranking in verdicts.items():
        if gid in done:
            continue
        if gid in thumbs:
            records.append(LabelRecord(gid, JUDGE_ANNOTATOR, None, thumbs=thumbs[gid]))
        else:
            records.append(LabelRecord(gid, JUDGE_ANNOTATOR, ranking))
    stored = labels.add_labels(con, records, source="judge")
    return stored, len(verdicts) - len(records)
