"""Evaluating a model version: win-rate against another version, drift, held-out preference
accuracy and calibration, and human A/B rounds."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import torch

from labeling.ranking import fractional_ranks, pair_preferences
from store import db as storedb
from store import evals, labels, models, rounds
from store.errors import PrefloopError
from store.rounds import CandidateRecord
from tuning.config import SamplingConfig, TrainSettings
from tuning.eval_stats import (
    distinct_n,
    expected_calibration_error,
    guarded_summary,
    reliability_curve,
    win_rate,
)
from tuning.fluency import (
    MAX_BROKEN_SHARE,
    broken_flags,
    fluency,
    guarded_outcomes,
    won_by_breaking,
)

HUMAN = "human"
LLM = "llm"
BASE = "base"

# (prompt id, candidate index in its group) -> whether that answer is broken
Flags = dict[tuple[int, int], bool]


@dataclass
class EvalConfig:
    """What `prefloop eval` measures and how it samples."""

    against: str = "base"
    judge: str = LLM  # "llm", "human", "rm:VERSION", a registered judge's name or "module:function"
    judge_model: str | None = None  # the LLM judge's model (default: the default model)
    rubric: str | None = None
    split: str = "heldout"
    limit: int | None = None
    k: int = 2
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.95
    seed: int = 1234
    beta: float | None = None  # implicit-reward β (default: the version's training β)
    # the models' weights (sampled versions, π_ref and a model judge); auto samples the answers
    # as `sample` does (bfloat16 on a CPU with native bf16) and scores them in float32 on a CPU
    dtype: str = "auto"

    def sampling(self) -> SamplingConfig:
        """The sampling settings both versions share."""
        return SamplingConfig(
            k=self.k,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            split=self.split,
            limit=self.limit,
            dtype=self.dtype,
        )


def _round_for(ws: storedb.Workspace, version: str, cfg: SamplingConfig) -> int:
    """A round of this version with exactly these settings: reused if sampled before."""
    from tuning.sampling import round_settings, sample_round

    wanted = round_settings(cfg, version)
    with storedb.connect(ws) as con:
        df = rounds.list_rounds(con)
    for row in df.itertuples():
        if row.model_version == version and row.settings == wanted:
            return int(row.id)
    return sample_round(ws, cfg, version, show_progress=False)


def _by_prompt(con, round_id: int) -> dict[int, rounds.GroupRecord]:
    return {g.prompt_id: g for g in rounds.groups(con, round_id=round_id)}


def load_judge(ws: storedb.Workspace, cfg: EvalConfig):
    """The judge cfg names: the LLM judge, a reward model (rm:VERSION), a registered judge or a
    programmatic module:function."""
    from labeling.judges import DEFAULT_RUBRIC, load_programmatic_judge, resolve_judge
    from tuning.llm_judge import LLMJudge
    from tuning.reward_model import reward_judge, reward_version_of

    if reward_version_of(cfg.judge) is not None:
        return reward_judge(ws, cfg.judge, cfg.dtype)

    if cfg.judge == LLM:
        from tuning.modeling import load_base, load_tokenizer
        from tuning.models_cache import DEFAULT_MODEL

        name = cfg.judge_model or DEFAULT_MODEL
        return LLMJudge(
            load_base(name, cfg.dtype), load_tokenizer(name), cfg.rubric or DEFAULT_RUBRIC
        )
    return load_programmatic_judge(resolve_judge(ws, cfg.judge))


def judged_win_rate(
    ws: storedb.Workspace,
    version: str,
    against_round: int,
    version_round: int,
    judge,
    broken: Flags | None = None,
    broken_against: Flags | None = None,
) -> tuple[dict, list[dict]]:
    """Win-rate of version_round's candidates against against_round's, candidate i vs i; with
    the broken flags of both rounds also the guarded win-rate (broken answers never win)."""
    with storedb.connect(ws) as con:
        mine, theirs = _by_prompt(con, version_round), _by_prompt(con, against_round)
    items, details = [], []
    for prompt_id in sorted(set(mine) & set(theirs)):
        a, b = mine[prompt_id], theirs[prompt_id]
        for i in range(min(len(a.texts), len(b.texts))):
            items.append((a.prompt, a.texts[i], b.texts[i]))
            details.append({"prompt_id": prompt_id, "index": i})
    if not items:
        raise PrefloopError("the two rounds share no prompts to compare")
    if hasattr(judge, "judge_many"):
        outcomes = judge.judge_many(items)
    else:
        outcomes = [judge(*item) for item in items]
    for d, o in zip(details, outcomes, strict=True):
        d["outcome"] = o
    result = win_rate(outcomes).to_dict()
    result["n"] = len(outcomes)
    if broken is not None and broken_against is not None:
        for d in details:
            key = (d["prompt_id"], d["index"])
            d["broken"], d["broken_against"] = broken[key], broken_against[key]
        guarded = guarded_outcomes(
            outcomes, [d["broken"] for d in details], [d["broken_against"] for d in details]
        )
        for d, g in zip(details, guarded, strict=True):
            d["guarded_outcome"] = g
        result.update(guarded_summary(guarded))
    return result, details


def _load_policy(ws: storedb.Workspace, version: str, dtype: str = "auto"):
    """The base model with the version's adapter (none for base), its tokenizer, and whether it
    has an adapter to disable for π_ref."""
    from tuning.modeling import load_tokenizer, load_version

    with storedb.connect(ws) as con:
        base = models.base_model(con)
        info = models.get_version(con, version, models.POLICY)
    tok = load_tokenizer(base)
    adapter = models.adapter_dir(ws, info) if info else None
    model = load_version(base, adapter, dtype=dtype)
    return model, tok, info is not None


@torch.no_grad()
def _logps(
    model, tok, adapted: bool, groups: list[rounds.GroupRecord], policy: bool = True
) -> tuple[list[list[float]], list[list[float]], list[list[int]]]:
    """Summed log-probs of each candidate under the policy (empty lists when policy=False) and
    under π_ref (the adapter disabled), and each candidate's token count (end token included)."""
    from tuning.batching import GroupTokens, collate, sequence_logps
    from tuning.modeling import candidate_ids, prompt_ids

    pol, ref, lengths = [], [], []
    for start in range(0, len(groups), 4):
        chunk = groups[start : start + 4]
        tokens = [
            GroupTokens(
                prompt_ids(tok, g.prompt, g.messages),
                candidate_ids(tok, g.texts, g.finish_reasons),
            )
            for g in chunk
        ]
        batch = collate(tokens, tok.pad_token_id, 1024).to(model.device)
        p = sequence_logps(model, batch).cpu() if policy or not adapted else None
        if adapted:
            with model.disable_adapter():
                r = sequence_logps(model, batch).cpu()
        else:
            r = p
        for g, t, off in zip(chunk, tokens, batch.group_offsets, strict=True):
            n = len(g.texts)
            pol.append(p[off : off + n].tolist() if policy else [])
            ref.append(r[off : off + n].tolist())
            lengths.append([len(c) for c in t.completions])
    return pol, ref, lengths


def _policy_and_ref_logps(
    ws: storedb.Workspace, version: str, groups: list[rounds.GroupRecord], dtype: str = "auto"
) -> tuple[list[list[float]], list[list[float]], list[list[int]]]:
    """Summed log-probs of each candidate under the version and under the base model."""
    model, tok, adapted = _load_policy(ws, version, dtype)
    return _logps(model, tok, adapted, groups)


def nll_per_token(ref: list[list[float]], lengths: list[list[int]]) -> list[float]:
    """NLL per token under π_ref of each candidate, flat in group order: −log-prob / tokens."""
    return [
        -lp / max(n, 1)
        for gr, gl in zip(ref, lengths, strict=True)
        for lp, n in zip(gr, gl, strict=True)
    ]


def _answers(groups: list[rounds.GroupRecord]) -> tuple[list[tuple[int, int]], list[str]]:
    """(prompt id, index) keys and texts of every candidate, flat in group order."""
    keys = [(g.prompt_id, i) for g in groups for i in range(len(g.texts))]
    return keys, [t for g in groups for t in g.texts]


def kl_budget_of(info: dict | None) -> float:
    """The KL budget a version was trained with (its stored config), else the default."""
    stored = (info or {}).get("config") or {}
    budget = stored.get("kl_budget") if isinstance(stored, dict) else None
    return float(budget) if budget is not None else TrainSettings().kl_budget


@dataclass
class DriftResult:
    """Drift and fluency metrics, the broken flags of both rounds, and per-answer details."""

    metrics: dict
    broken: Flags = field(default_factory=dict)
    broken_against: Flags = field(default_factory=dict)
    details: list[dict] = field(default_factory=list)


def measure_drift(
    ws: storedb.Workspace,
    version: str,
    version_round: int,
    against_round: int,
    reference_round: int | None = None,
    dtype: str = "auto",
) -> DriftResult:
    """KL(π‖π_ref) per token, length, distinct-2, length-limit share, and fluency under π_ref.

    Fluency: each answer's NLL per token under π_ref (the base, adapter disabled) for both rounds.
    An answer is broken when degenerate or more than BROKEN_MARGIN nats per token above the median
    of π_ref's own answers: those of reference_round, a base round sampled with the same settings
    (None: the against round, which is π_ref's own when against is base).
    """
    with storedb.connect(ws) as con:
        mine = rounds.candidates(con, version_round)
        theirs = rounds.candidates(con, against_round)
        info = models.get_version(con, version)
        by_round = {r: rounds.groups(con, round_id=r) for r in {version_round, against_round}}
        if reference_round is not None and reference_round not in by_round:
            by_round[reference_round] = rounds.groups(con, round_id=reference_round)
    model, tok, adapted = _load_policy(ws, version, dtype)
    policy, ref, lengths = _logps(model, tok, adapted, by_round[version_round])
    nll = {version_round: nll_per_token(ref, lengths)}
    for r, groups in by_round.items():
        if r not in nll:
            _, r_ref, r_len = _logps(model, tok, adapted, groups, policy=False)
            nll[r] = nll_per_token(r_ref, r_len)
    del model
    tokens = sum(sum(x) for x in lengths)
    kl = sum(p - r for gp, gr in zip(policy, ref, strict=True) for p, r in zip(gp, gr, strict=True))
    kl_per_token = kl / max(tokens, 1)
    keys, texts = _answers(by_round[version_round])
    keys_t, texts_t = _answers(by_round[against_round])
    summary, b_mine, b_theirs = fluency(
        nll[version_round], texts, nll[against_round], texts_t, kl_per_token=kl_per_token
    )
    if reference_round is not None and reference_round != against_round:
        b_mine = broken_flags(nll[version_round], texts, nll[reference_round])
        b_theirs = broken_flags(nll[against_round], texts_t, nll[reference_round])
        summary = replace(
            summary,
            broken_share=sum(b_mine) / len(b_mine) if b_mine else 0.0,
            broken_share_against=sum(b_theirs) / len(b_theirs) if b_theirs else 0.0,
        )
    budget = kl_budget_of(info)
    # n_tokens is missing (NA) for imported candidates: those count as unknown, not as an error
    mean_len = float(mine["n_tokens"].astype("float64").mean())
    ref_len = float(theirs["n_tokens"].astype("float64").mean())
    metrics = {
        "kl_per_token": kl_per_token,
        "mean_length": mean_len,
        "mean_length_against": ref_len,
        "length_change": mean_len - ref_len,
        "distinct2": distinct_n(list(mine["text"]), 2),
        "distinct2_against": distinct_n(list(theirs["text"]), 2),
        "length_limit_share": float((mine["finish_reason"] == "length").mean()),
        "length_limit_share_against": float((theirs["finish_reason"] == "length").mean()),
        **{k: v for k, v in summary.to_dict().items() if k != "kl_per_token"},
        "fluency_reference_round": against_round if reference_round is None else reference_round,
        "kl_budget": budget,
        "won_by_breaking": won_by_breaking(summary.broken_share, kl_per_token, budget),
    }
    details = [
        {"round": r, "prompt_id": k[0], "index": k[1], "nll_per_token": x, "broken": b}
        for r, ks, xs, bs in (
            (version_round, keys, nll[version_round], b_mine),
            (against_round, keys_t, nll[against_round], b_theirs),
        )
        for k, x, b in zip(ks, xs, bs, strict=True)
    ]
    return DriftResult(
        metrics,
        dict(zip(keys, b_mine, strict=True)),
        dict(zip(keys_t, b_theirs, strict=True)),
        details,
    )


def drift(
    ws: storedb.Workspace,
    version: str,
    version_round: int,
    against_round: int,
    reference_round: int | None = None,
) -> dict:
    """The drift and fluency metrics of measure_drift."""
    return measure_drift(ws, version, version_round, against_round, reference_round).metrics


def breaking_reason(metrics: dict) -> str | None:
    """Why a drift measurement says the version won by breaking the model; None when it did not."""
    share, kl = metrics.get("broken_share"), metrics.get("kl_per_token")
    if share is None:
        return None
    budget = metrics.get("kl_budget", TrainSettings().kl_budget)
    flagged = metrics.get("won_by_breaking")
    if flagged is None:
        flagged = won_by_breaking(share, kl, budget)
    if not flagged:
        return None
    reasons = []
    if share > MAX_BROKEN_SHARE:
        reasons.append(f"broken share {share:.0%} (> {MAX_BROKEN_SHARE:.0%})")
    if kl is not None and kl > budget:
        reasons.append(f"KL per token {kl:.3f} > budget {budget:g}")
    return " / ".join(reasons) or "flagged by the drift measurement"


def preference_accuracy(
    ws: storedb.Workspace, version: str, beta: float, split: str = "heldout", dtype: str = "auto"
) -> tuple[dict, list[dict]] | None:
    """How often the version's implicit reward orders labelled held-out pairs as annotators did,
    with a reliability curve of σ(β·margin) against observed agreement and its ECE."""
    with storedb.connect(ws) as con:
        round_df = rounds.list_rounds(con)
        wanted = [int(r.id) for r in round_df.itertuples() if r.split == split]
        labs = labels.labels(con, wanted)
        by_group: dict[int, list] = {}
        for row in labs.itertuples():
            if row.ranking is not None and "all_bad" not in row.flags:
                by_group.setdefault(int(row.group_id), []).append(row.ranking)
        groups = rounds.groups(con, group_ids=sorted(by_group))
    if not groups:
        return None
    policy, ref, _ = _policy_and_ref_logps(ws, version, groups, dtype)
    predicted, observed, correct = [], [], []
    for g, gp, gr in zip(groups, policy, ref, strict=True):
        pos = {cid: i for i, cid in enumerate(g.candidate_ids)}
        rankings = [[[pos[c] for c in tier] for tier in r] for r in by_group[g.group_id]]
        for (a, b), p in pair_preferences(rankings).items():
            margin = beta * ((gp[a] - gr[a]) - (gp[b] - gr[b]))
            q = 1 / (1 + math.exp(-margin))
            correct.append(1.0 if margin > 0 else 0.5 if margin == 0 else 0.0)  # ties: half
            predicted += [q, 1 - q]  # both orientations, so the curve spans [0, 1]
            observed += [p, 1 - p]
    if not correct:
        return None
    metrics = {
        "accuracy": sum(correct) / len(correct),
        "ece": expected_calibration_error(predicted, observed),
        "pairs": len(correct),
    }
    return metrics, reliability_curve(predicted, observed)


def create_human_ab_round(
    ws: storedb.Workspace,
    version: str,
    against: str,
    version_round: int,
    against_round: int,
    seed: int = 0,
) -> int:
    """An evaluation round of blind A/B pairs (one per prompt, sides shuffled) for annotators."""
    rng = random.Random(seed)
    with storedb.connect(ws) as con:
        mine, theirs = _by_prompt(con, version_round), _by_prompt(con, against_round)
        items = []
        for prompt_id in sorted(set(mine) & set(theirs)):
            pair = [
                CandidateRecord(mine[prompt_id].texts[0], origin=version),
                CandidateRecord(theirs[prompt_id].texts[0], origin=against),
            ]
            rng.shuffle(pair)
            items.append((prompt_id, pair))
        if not items:
            raise PrefloopError("the two rounds share no prompts to compare")
        settings = {
            "eval": {
                "version": version,
                "against": against,
                "rounds": [version_round, against_round],
            }
        }
        split = rounds.get_round(con, version_round)["split"]
        round_id = rounds.create_round(
            con, None, split, 2, settings, f"eval:{version}-vs-{against}"
        )
        rounds.add_groups(con, round_id, items)
    return round_id


def _stored_broken(con, version: str, round_ids: list[int]) -> dict[tuple, bool] | None:
    """Broken flags by (round, prompt id, index) from the latest drift eval of these rounds."""
    stored = evals.list_evals(con, "drift")
    match = stored[
        (stored["version"] == version) & stored["round_ids"].map(lambda r: r == list(round_ids))
    ]
    if match.empty:
        return None
    details = evals.eval_details(con, int(match.iloc[-1]["id"]))
    if not isinstance(details, list) or not details:
        return None
    return {(d["round"], d["prompt_id"], d["index"]): bool(d["broken"]) for d in details}


def human_ab_results(ws: storedb.Workspace, round_id: int) -> dict:
    """Win-rate of an A/B evaluation round from its labels (ties and all-bad count half); with
    the stored drift measurements of the two sampled rounds also the guarded win-rate."""
    with storedb.connect(ws) as con:
        info = rounds.get_round(con, round_id)
        spec = info["settings"].get("eval")
        if not spec:
            raise PrefloopError(f"round {round_id} is not an A/B evaluation round")
        cands = rounds.candidates(con, round_id)
        labs = labels.labels(con, [round_id])
        prompt_of = {g.group_id: g.prompt_id for g in rounds.groups(con, round_id=round_id)}
        flags = _stored_broken(con, spec["version"], spec.get("rounds") or [])
    origin = dict(zip(cands["id"], cands["origin"], strict=True))
    outcomes, broken, broken_against = [], [], []
    for row in labs.itertuples():
        if "skipped" in row.flags or row.ranking is None:
            continue
        ranks = fractional_ranks(row.ranking)
        by_origin = {origin[c]: r for c, r in ranks.items()}
        mine, theirs = by_origin.get(spec["version"]), by_origin.get(spec["against"])
        if "all_bad" in row.flags or mine == theirs:
            outcomes.append(0.5)
        else:
            outcomes.append(1.0 if mine < theirs else 0.0)
        if flags is not None:  # the A/B pair is candidate 0 of each sampled round
            pid = prompt_of[int(row.group_id)]
            version_round, against_round = spec["rounds"]
            broken.append(flags.get((version_round, pid, 0)))
            broken_against.append(flags.get((against_round, pid, 0)))
    result = win_rate(outcomes).to_dict() if outcomes else {"wins": 0, "losses": 0, "ties": 0}
    if outcomes and None not in broken and None not in broken_against and flags is not None:
        result.update(guarded_summary(guarded_outcomes(outcomes, broken, broken_against)))
        result["broken"], result["broken_against"] = sum(broken), sum(broken_against)
    return {
        **result,
        "n": len(outcomes),
        "version": spec["version"],
        "against": spec["against"],
        "round": round_id,
    }


def evaluate(ws: storedb.Workspace, version: str, cfg: EvalConfig) -> dict:
    """Run every evaluation of a version against cfg.against; store and return the results.

    Fluency's reference (π_ref's own answers, whose median NLL per token sets the broken limit)
    is the against round when against is base; otherwise a base round sampled with the same
    settings (the version's own round when the version is base).
    """
    with storedb.connect(ws) as con:
        info = models.get_version(con, version, models.POLICY)
        models.get_version(con, cfg.against, models.POLICY)
    if version == cfg.against:
        raise PrefloopError("evaluate a version against a different one (--against)")
    # a programmatic judge loads (or fails) before anything is sampled
    judge = load_judge(ws, cfg) if cfg.judge not in (LLM, HUMAN) else None
    sampling = cfg.sampling()
    mine = _round_for(ws, version, sampling)
    theirs = _round_for(ws, cfg.against, sampling)
    out: dict = {"version": version, "against": cfg.against, "rounds": [mine, theirs]}
    reference = None
    if cfg.against != BASE:
        reference = mine if version == BASE else _round_for(ws, BASE, sampling)
        out["reference_round"] = reference
    beta = cfg.beta or (info["config"].get("beta") if info else None) or 0.1
    measured = measure_drift(ws, version, mine, theirs, reference, cfg.dtype)
    out["drift"] = measured.metrics
    with storedb.connect(ws) as con:
        evals.add_eval(
            con,
            "drift",
            version,
            measured.metrics,
            against=cfg.against,
            round_ids=[mine, theirs],
            details=measured.details,
        )
    if cfg.judge == HUMAN:
        out["human_ab_round"] = create_human_ab_round(
            ws, version, cfg.against, mine, theirs, cfg.seed
        )
    else:
        result, details = judged_win_rate(
            ws,
            version,
            theirs,
            mine,
            judge if judge is not None else load_judge(ws, cfg),
            measured.broken,
            measured.broken_against,
        )
        out["winrate"] = result
        with storedb.connect(ws) as con:
            evals.add_eval(
                con,
                "winrate",
                version,
                result,
                against=cfg.against,
                judge=cfg.judge,
                round_ids=[mine, theirs],
                details=details,
            )
    pref = preference_accuracy(ws, version, beta, cfg.split, cfg.dtype) if info else None
    if pref is not None:
        out["preference"] = pref[0]
        with storedb.connect(ws) as con:
            evals.add_eval(
                con,
                "preference",
                version,
                pref[0],
                round_ids=[],
                details=pref[1],
                judge=f"beta={beta}",
            )
    return out
