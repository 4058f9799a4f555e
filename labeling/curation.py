"""Turning stored labels into training groups and freezing them as curated dataset versions.

A dataset version is built with filters (a `Curation`), applied in this order:

1. labels: the rounds of one split (or the rounds named); only the annotators named, or all but
   the excluded ones; the judge's own labels (annotator "judge", see labeling/suggest.py) only
   when named; optionally without annotators that the agreement report flags;
2. groups: a group flagged all_bad by any annotator is left out (unless keep_all_bad: then its
   rankings count like any other); skipped labels are ignored, so a group with only skipped
   labels is left out; a group whose annotators agree on less than min_agreement of the
   candidate pairs is left out (mean pairwise agreement over annotator pairs; a group with one
   annotator passes);
   with downweight_biased W the annotators that the bias audit (labeling/bias_audit.py) flags
   for position or length bias on the selected labels count with weight W in each group's
   consensus ranking (a weighted Borda count); with W = 0 their rankings are left out of the
   group altogether (consensus, agreement and the per-annotator rankings that soft labels and
   GRPO gains use), and a group only they ranked is left out. With 0 < W < 1 the per-annotator
   rankings stay as they are: only the consensus (pairs, hard-label DPO, exports) is weighted;
3. length normalisation: with max_length_ratio R a group is left out when any pair it
   teaches (an ordered pair of the consensus ranking or of an annotator's ranking) has a
   chosen/rejected character-length ratio outside [1/R, R]. The group stays the unit: cutting
   candidates out would change what the annotators compared and GRPO's groups, and dropping
   pairs only in exports would let training see pairs the exports do not. So no export and no
   training mode of the version contains such a pair;
4. dedupe: one group per prompt, the one with most labels, then the newest;
5. split: with heldout_fraction F the prompts are split by a hash of (split_seed, prompt text),
   so all of a prompt's groups land on the same side, and a prompt keeps its side in every
   later version built with the same seed. The held-out part is frozen as its own dataset
   version, named in the train version's filters (heldout_version).

Each version stores its filters and statistics (groups, pairs, annotators, labels per group,
mean agreement, groups left out per reason, chosen/rejected length ratio, thumbs); its card
(`dataset_card`) shows both and is part of every export.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import asdict, dataclass, field

import duckdb
import pandas as pd

from labeling import bias_audit
from labeling.agreement import annotator_report, group_disagreement
from labeling.ranking import consensus, ordered_pairs, usable_rankings
from labeling.safe_text import plain, plain_list
from store import adjudications, datasets, labels, rounds
from store import db as storedb
from store import gold as store_gold
from store.errors import PrefloopError

JUDGE_ANNOTATOR = "judge"  # the annotator a judge labels as (labeling/suggest.py)


@dataclass
class Curation:
    """The filters a dataset version is built with; the defaults keep every usable group."""

    split: str = "train"  # the prompts' split whose rounds are used
    rounds: list[int] | None = None  # only these rounds (default: all of the split)
    annotators: list[str] | None = None  # only these annotators (default: all but the judge)
    exclude_annotators: list[str] = field(default_factory=list)
    exclude_flagged: bool = False  # leave out annotators the agreement report flags
    min_agreement: float | None = None  # per-group pairwise agreement among its annotators
    keep_all_bad: bool = False  # keep groups flagged all_bad (their rankings still count)
    dedupe: bool = False  # one group per prompt
    max_length_ratio: float | None = None  # cap on chosen/rejected character-length ratio
    heldout_fraction: float = 0.0  # share of prompts frozen as a separate held-out version
    split_seed: int = 0
    downweight_biased: float | None = None  # consensus weight of bias-flagged annotators

    def check(self) -> None:
        """Raise a user error for settings that make no sense."""
        if self.split not in ("train", "heldout"):
            raise PrefloopError(f"unknown split {self.split!r}; use train or heldout")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise PrefloopError("--min-agreement is a share of pairs: between 0 and 1")
        if self.max_length_ratio is not None and self.max_length_ratio < 1.0:
            raise PrefloopError("--max-length-ratio must be at least 1 (e.g. 2 = up to twice)")
        if self.downweight_biased is not None and not 0.0 <= self.downweight_biased <= 1.0:
            raise PrefloopError(
                "--downweight-biased is the weight of flagged annotators in the consensus: "
                "between 0 (leave them out) and 1 (count them fully), e.g. 0.5"
            )
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise PrefloopError("--heldout-fraction must be at least 0 and below 1")

    def to_dict(self) -> dict:
        """The filters as stored with a dataset version."""
        return asdict(self)


@dataclass
class FrozenVersions:
    """The dataset versions one freeze produced: the training part and the held-out part."""

    train: str
    heldout: str | None = None
    stats: dict = field(default_factory=dict)


def _thumbs(value) -> dict[int, bool] | None:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict) or not value:
        return None
    return {int(k): bool(v) for k, v in value.items()}


def _select_annotators(
    labs: pd.DataFrame, cur: Curation, gold: dict | None
) -> tuple[pd.DataFrame, dict]:
    """The labels of the annotators the curation keeps, and what it dropped."""
    present = sorted(set(labs["annotator"]))
    if cur.annotators is not None:
        unknown = sorted(set(cur.annotators) - set(present))
        if unknown:
            raise PrefloopError(
                f"no labels from annotator(s) {', '.join(unknown)} in the chosen rounds; "
                f"annotators there: {', '.join(present) or 'none'}"
            )
        keep = set(cur.annotators)
    else:
        keep = set(present) - {JUDGE_ANNOTATOR}
    keep -= set(cur.exclude_annotators)
    flagged: list[str] = []
    if cur.exclude_flagged:
        kept = labs[labs["annotator"].isin(keep)]
        by_group: dict[int, dict[str, list]] = {}
        for row in kept.itertuples():
            if row.ranking is not None and "skipped" not in row.flags:
                by_group.setdefault(int(row.group_id), {})[row.annotator] = row.ranking
        flagged = [s.annotator for s in annotator_report(by_group, gold) if s.flagged]
        keep -= set(flagged)
    selected = labs[labs["annotator"].isin(keep)]
    info = {
        "flagged_annotators": flagged,
        "labels_excluded": {
            "annotator_filter": int((~labs["annotator"].isin(keep | set(flagged))).sum()),
            "flagged_annotator": int(labs["annotator"].isin(flagged).sum()),
        },
    }
    return selected, info


def _length_ratio_ok(texts: list[str], rankings: list[list[list[int]]], cap: float) -> bool:
    """Whether every pair the rankings order has a chosen/rejected length ratio within the cap."""
    for ranking in rankings:
        for a, b in ordered_pairs(ranking):
            ratio = max(len(texts[a]), 1) / max(len(texts[b]), 1)
            if ratio > cap or ratio < 1.0 / cap:
                return False
    return True


def _heldout_side(prompt: str, messages: str | None, seed: int, fraction: float) -> bool:
    """Whether a prompt falls into the held-out part: a hash of (seed, prompt), not its order."""
    digest = hashlib.sha256(f"{seed}\x00{prompt}\x00{messages or ''}".encode()).hexdigest()
    return int(digest[:16], 16) / 16**16 < fraction


def curated_rows(con: duckdb.DuckDBPyConnection, cur: Curation) -> tuple[pd.DataFrame, dict]:
    """Training groups that pass the curation (with columns agreement, prompt_id, label_ids,
    annotators, part), plus what was filtered out and why."""
    cur.check()
    round_info = rounds.list_rounds(con).set_index("id")
    wanted = [int(r) for r in round_info.index if round_info.at[r, "split"] == cur.split]
    if cur.rounds is not None:
        for r in cur.rounds:
            rounds.get_round(con, r)
        wanted = [r for r in wanted if r in set(cur.rounds)]
    labs = labels.labels(con, wanted)
    all_groups = set(labs["group_id"].astype(int))
    gold = store_gold.gold(con, wanted) if cur.exclude_flagged else None
    labs, info = _select_annotators(labs, cur, gold)
    by_group: dict[int, list] = {}
    for row in labs.to_dict("records"):
        by_group.setdefault(int(row["group_id"]), []).append(row)
    left_out = {
        "no_selected_annotator": len(all_groups - set(by_group)),
        "all_bad": 0,
        "skipped": 0,
        "low_agreement": 0,
        "length_ratio": 0,
        "duplicate_prompt": 0,
    }
    decided = adjudications.adjudications(con, sorted(by_group))
    left_out["adjudicated_out"] = 0
    group_records = rounds.groups(con, group_ids=sorted(by_group))
    biased: set[str] = set()
    weight = cur.downweight_biased
    if weight is not None:
        report = bias_audit.audit(bias_audit.audit_groups(labs, group_records))
        biased = set(report.flagged())
        left_out["biased_annotators_only"] = 0
        info["bias_audit"] = {
            "weight": weight,
            "flagged": report.flagged(),
            "alpha": report.alpha,
            "min_groups": report.min_groups,
            "tests": report.tests,
        }
    out = []
    for g in group_records:
        group_labels = by_group[g.group_id]
        pairs = [(r["ranking"], list(r["flags"])) for r in group_labels]
        decision = decided.get(g.group_id)
        if decision is not None and decision["ranking"] is None:
            left_out["adjudicated_out"] += 1
            continue
        if decision is None and not cur.keep_all_bad and any("all_bad" in f for _, f in pairs):
            left_out["all_bad"] += 1
            continue
        usable = usable_rankings(g.candidate_ids, pairs)
        if not usable and decision is None:
            left_out["skipped"] += 1
            continue
        # who made each usable ranking (usable_rankings keeps labels in this order)
        names = [
            r["annotator"]
            for r in group_labels
            if r["ranking"] is not None and "skipped" not in r["flags"]
        ]
        if weight == 0.0 and biased:
            kept = [(u, n) for u, n in zip(usable, names, strict=True) if n not in biased]
            if not kept and decision is None:
                left_out["biased_annotators_only"] += 1
                continue
            usable, names = [u for u, _ in kept], [n for _, n in kept]
        agreement = 1.0 - group_disagreement(usable) if len(usable) >= 2 else None
        if decision is not None:  # a researcher's decision replaces the annotators' consensus
            at = {cid: i for i, cid in enumerate(g.candidate_ids)}  # snapshots hold positions
            ranking = [[at[c] for c in tier] for tier in decision["ranking"]]
            usable = [ranking]
        else:
            weights = bias_audit.consensus_weights(names, biased, weight or 0.0) if biased else None
            ranking = consensus(usable, weights)
            low = agreement is not None and agreement < (cur.min_agreement or 0.0) - 1e-12
            if cur.min_agreement is not None and low:
                left_out["low_agreement"] += 1
                continue
        if cur.max_length_ratio is not None and not _length_ratio_ok(
            g.texts, [ranking, *usable], cur.max_length_ratio
        ):
            left_out["length_ratio"] += 1
            continue
        position = {cid: i for i, cid in enumerate(g.candidate_ids)}
        thumbs = None
        for r in group_labels:
            given = _thumbs(r.get("thumbs"))
            if given is None or "skipped" in r["flags"]:
                continue
            thumbs = thumbs or [[0, 0] for _ in g.candidate_ids]
            for cid, up in given.items():
                if cid in position:
                    thumbs[position[cid]][0 if up else 1] += 1
        messages = json.dumps(g.messages) if g.messages else None
        out.append(
            {
                "group_id": g.group_id,
                "round_id": g.round_id,
                "model_version": round_info.at[g.round_id, "model_version"],
                "prompt": g.prompt,
                "messages": messages,
                "candidate_ids": g.candidate_ids,
                "texts": g.texts,
                "sample_logprobs": [float("nan") if x is None else x for x in g.logprobs],
                "ranking": ranking,
                "n_labels": len(group_labels),
                "rankings": usable,
                "finish_reasons": g.finish_reasons,
                "thumbs": thumbs,
                "agreement": agreement,
                "prompt_id": g.prompt_id,
                "annotators": sorted({r["annotator"] for r in group_labels}),
                "label_ids": [int(r["label_id"]) for r in group_labels if "label_id" in r],
                "part": "heldout"
                if cur.heldout_fraction
                and _heldout_side(g.prompt, messages, cur.split_seed, cur.heldout_fraction)
                else "train",
            }
        )
    if cur.dedupe:
        best: dict[int, dict] = {}
        for row in out:
            other = best.get(row["prompt_id"])
            if other is None or (row["n_labels"], row["group_id"]) > (
                other["n_labels"],
                other["group_id"],
            ):
                best[row["prompt_id"]] = row
        left_out["duplicate_prompt"] = len(out) - len(best)
        out = sorted(best.values(), key=lambda r: r["group_id"])
    columns = [*datasets.SNAPSHOT_COLUMNS, "agreement", "prompt_id", "annotators", "label_ids"]
    return pd.DataFrame(out, columns=[*columns, "part"]), {"left_out": left_out, **info}


def training_rows(
    con: duckdb.DuckDBPyConnection,
    split: str = "train",
    round_ids: list[int] | None = None,
    curation: Curation | None = None,
) -> tuple[pd.DataFrame, dict]:
    """One row per labelled group with its consensus ranking, plus counts of what was left out."""
    cur = curation or Curation(split=split, rounds=round_ids)
    rows, info = curated_rows(con, cur)
    return rows[datasets.SNAPSHOT_COLUMNS].reset_index(drop=True), info["left_out"]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def version_stats(rows: pd.DataFrame, info: dict) -> dict:
    """Statistics of one part of a curated freeze: what the dataset card shows."""
    ratios, n_pairs = [], 0
    for texts, ranking in zip(rows["texts"], rows["ranking"], strict=True):
        for a, b in ordered_pairs(ranking):
            n_pairs += 1
            ratios.append(max(len(texts[a]), 1) / max(len(texts[b]), 1))
    agreements = [a for a in rows["agreement"] if a is not None and not pd.isna(a)]
    annotators = sorted({a for names in rows["annotators"] for a in names})
    up = down = tied = 0
    for thumbs in rows["thumbs"]:
        for ups, downs in thumbs or []:
            if ups == downs == 0:
                continue
            up, down, tied = up + (ups > downs), down + (ups < downs), tied + (ups == downs)
    return {
        "groups": len(rows),
        "pairs": n_pairs,
        "prompts": int(rows["prompt_id"].nunique()),
        "annotators": annotators,
        "labels": int(rows["n_labels"].sum()),
        "labels_per_group": _mean([float(n) for n in rows["n_labels"]]),
        "groups_with_several_annotators": len(agreements),
        "mean_agreement": _mean(agreements),
        "length_ratio": {
            "mean": _mean(ratios),
            "median": statistics.median(ratios) if ratios else None,
            "max": max((max(r, 1 / r) for r in ratios), default=None),
            "chosen_longer": _mean([float(r > 1) for r in ratios]),
        },
        "thumbs": {"up": up, "down": down, "tied": tied},
        **info,
    }


def freeze_versions(ws: storedb.Workspace, curation: Curation | None = None) -> FrozenVersions:
    """Freeze the curated groups as a dataset version (and its held-out part as another)."""
    cur = curation or Curation()
    cur.check()
    with storedb.connect(ws) as con:
        rows, info = curated_rows(con, cur)
        filters = cur.to_dict()
        heldout_id = None
        if cur.heldout_fraction and not rows.empty:
            held = rows[rows["part"] == "heldout"]
            if held.empty or len(held) == len(rows):
                raise PrefloopError(
                    f"the held-out split put {len(held)} of {len(rows)} groups aside; with so "
                    "few prompts pick another --split-seed or --heldout-fraction"
                )
            held_stats = version_stats(held, {**info, "part": "heldout"})
            heldout_id = datasets.freeze(
                ws,
                con,
                held,
                n_pairs=held_stats["pairs"],
                filters={**filters, "part": "heldout"},
                stats=held_stats,
            )
            rows = rows[rows["part"] == "train"]
            info = {**info, "heldout_groups": len(held)}
            filters["heldout_version"] = heldout_id
        stats = version_stats(rows, {**info, "part": "train"})
        train_id = datasets.freeze(
            ws, con, rows, n_pairs=stats["pairs"], filters=filters, stats=stats
        )
    return FrozenVersions(train_id, heldout_id, stats)


def freeze_dataset(
    ws: storedb.Workspace,
    split: str = "train",
    round_ids: list[int] | None = None,
    curation: Curation | None = None,
) -> str:
    """Freeze the labelled groups into a dataset version (reused if the content is unchanged)."""
    return freeze_versions(ws, curation or Curation(split=split, rounds=round_ids)).train


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _filter_lines(f: dict) -> list[str]:
    if "annotators" not in f:  # a version frozen before curation filters were recorded
        return [f"- split: {f.get('split', 'train')}; rounds: {f.get('rounds') or 'all'}"]
    lines = [
        f"- split: {f['split']} prompts; rounds: "
        + (", ".join(map(str, f["rounds"])) if f["rounds"] else "all of the split"),
        "- annotators: "
        + (plain_list(f["annotators"]) if f["annotators"] else "all (the judge left out)")
        + (f"; excluded: {plain_list(f['exclude_annotators'])}" if f["exclude_annotators"] else ""),
        f"- annotators flagged by the agreement report: "
        f"{'excluded' if f['exclude_flagged'] else 'kept'}",
        f"- minimum agreement per group: {_fmt(f['min_agreement'])}",
        f"- groups flagged all_bad: {'kept' if f['keep_all_bad'] else 'left out'}; "
        "skipped labels ignored",
        f"- one group per prompt: {'yes' if f['dedupe'] else 'no'}",
        f"- chosen/rejected length ratio cap: {_fmt(f['max_length_ratio'])}",
    ]
    if f.get("downweight_biased") is not None:
        lines.append(
            "- annotators flagged for position or length bias: weight "
            f"{_fmt(float(f['downweight_biased']))} in the consensus"
        )
    if f.get("heldout_fraction"):
        other = f.get("heldout_version")
        lines.append(
            f"- held-out split by prompt: fraction {f['heldout_fraction']}, seed "
            f"{f['split_seed']}; this is the {f.get('part', 'train')} part"
            + (f" (held-out part: `{other}`)" if other else "")
        )
    return lines


def _stats_lines(s: dict | None) -> list[str]:
    if not s:
        return ["- (no statistics recorded: frozen before prefloop recorded them)"]
    lr = s.get("length_ratio", {})
    lines = [
        f"- groups: {s['groups']}; ordered pairs: {s['pairs']}; prompts: {s['prompts']}",
        f"- annotators ({len(s['annotators'])}): {plain_list(s['annotators']) or 'none'}",
        f"- labels: {s['labels']}; labels per group: {_fmt(s['labels_per_group'])}",
        f"- mean agreement: {_fmt(s['mean_agreement'])} "
        f"(over {s['groups_with_several_annotators']} groups with several annotators)",
        f"- chosen/rejected length ratio: mean {_fmt(lr.get('mean'))}, median "
        f"{_fmt(lr.get('median'))}, max {_fmt(lr.get('max'))}; chosen longer in "
        f"{_fmt(lr.get('chosen_longer'))} of pairs",
    ]
    t = s.get("thumbs", {})
    if any(t.values()):
        lines.append(
            f"- thumbs (majority per candidate): {t['up']} up, {t['down']} down, "
            f"{t['tied']} tied (left out of KTO exports)"
        )
    audit = s.get("bias_audit")
    if audit:
        flagged = audit.get("flagged") or {}
        lines.append(
            "- bias audit (p < "
            f"{audit.get('alpha')} with at least {audit.get('min_groups')} groups): "
            + (
                "; ".join(f"{plain(n)} ({', '.join(k)})" for n, k in flagged.items())
                if flagged
                else "no annotator flagged"
            )
            + f"; their weight in the consensus: {_fmt(float(audit.get('weight', 1.0)))}"
        )
    if s.get("flagged_annotators"):
        lines.append(f"- flagged annotators left out: {plain_list(s['flagged_annotators'])}")
    excluded = s.get("labels_excluded", {})
    if any(excluded.values()):
        lines.append(
            "- labels left out: "
            + ", ".join(f"{reason} {n}" for reason, n in excluded.items() if n)
        )
    left = s.get("left_out", {})
    lines.append(
        "- groups left out: "
        + (", ".join(f"{reason} {n}" for reason, n in left.items() if n) or "none")
    )
    if s.get("heldout_groups"):
        lines.append(f"- groups put in the held-out part: {s['heldout_groups']}")
    return lines


def dataset_card(info: dict) -> str:
    """A dataset version's card in Markdown: identity, filters, statistics."""
    created = info.get("created")
    return "\n".join(
        [
            f"## Dataset version `{info['id']}`",
            "",
            f"- sha256: `{info['content_hash']}`",
            f"- created: {created}",
            f"- groups: {info['n_groups']}; ordered pairs: {info['n_pairs']}",
            f"- rounds: {', '.join(str(r) for r in info['rounds'])}",
            "",
            "### Filters",
            "",
            *_filter_lines(info["filters"]),
            "",
            "### Statistics",
            "",
            *_stats_lines(info.get("stats")),
            "",
        ]
    )
