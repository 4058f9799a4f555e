"""Evaluating a model version: win-rate against another version, drift, held-out preference
accuracy and calibration, and human A/B rounds."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch

from labeling.ranking import fractional_ranks, pair_preferences
from store import db as storedb
from store import evals, labels, models, rounds
from store.errors import PrefloopError
from store.rounds import CandidateRecord
from tuning.config import SamplingConfig
from tuning.eval_stats import (
    distinct_n,
    expected_calibration_error,
    reliability_curve,
    win_rate,
)

HUMAN = "human"
LLM = "llm"


@dataclass
class EvalConfig:
    """What `prefloop eval` measures and how it samples."""

    against: str = "base"
    judge: str = LLM  # "llm", "human" or "module:function"
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
        )


def _round_for(ws: storedb.Workspace, version: str, cfg: SamplingConfig) -> int:
    """A round of this version with exactly these settings: reused if sampled before."""
    from tuning.sampling import sample_round

    wanted = {**asdict(cfg), "model_version": version}
    with storedb.connect(ws) as con:
        df = rounds.list_rounds(con)
    for row in df.itertuples():
        if row.model_version == version and row.settings == wanted:
            return int(row.id)
    return sample_round(ws, cfg, version, show_progress=False)


def _by_prompt(con, round_id: int) -> dict[int, rounds.GroupRecord]:
    return {g.prompt_id: g for g in rounds.groups(con, round_id=round_id)}


def load_judge(ws: storedb.Workspace, cfg: EvalConfig):
    """The judge cfg names: a programmatic module:function or the LLM judge."""
    from labeling.judges import DEFAULT_RUBRIC, load_programmatic_judge
    from tuning.llm_judge import LLMJudge

    if cfg.judge == LLM:
        from tuning.modeling import load_base, load_tokenizer
        from tuning.models_cache import DEFAULT_MODEL

        name = cfg.judge_model or DEFAULT_MODEL
        return LLMJudge(load_base(name), load_tokenizer(name), cfg.rubric or DEFAULT_RUBRIC)
    return load_programmatic_judge(cfg.judge)


def judged_win_rate(
    ws: storedb.Workspace, version: str, against_round: int, version_round: int, judge
) -> tuple[dict, list[dict]]:
    """Win-rate of version_round's candidates against against_round's, candidate i vs i."""
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
    return result, details


@torch.no_grad()
def _policy_and_ref_logps(
    ws: storedb.Workspace, version: str, groups: list[rounds.GroupRecord]
) -> tuple[list[list[float]], list[list[float]], list[list[int]]]:
    """Summed log-probs of each candidate under the version and under the base model."""
    from tuning.batching import GroupTokens, collate, sequence_logps
    from tuning.modeling import candidate_ids, load_tokenizer, load_version, prompt_ids

    with storedb.connect(ws) as con:
        base = models.base_model(con)
        info = models.get_version(con, version)
    tok = load_tokenizer(base)
    model = load_version(base, ws.path(info["adapter_path"]) if info else None)
    policy, ref, lengths = [], [], []
    for start in range(0, len(groups), 4):
        chunk = groups[start : start + 4]
        tokens = [
            GroupTokens(
                prompt_ids(tok, g.prompt, g.messages),
                candidate_ids(tok, {"texts": g.texts, "finish_reasons": g.finish_reasons}),
            )
            for g in chunk
        ]
        batch = collate(tokens, tok.pad_token_id, 1024).to(model.device)
        p = sequence_logps(model, batch).cpu()
        if info is not None:
            with model.disable_adapter():
                r = sequence_logps(model, batch).cpu()
        else:
            r = p
        for g, t, off in zip(chunk, tokens, batch.group_offsets, strict=True):
            n = len(g.texts)
            policy.append(p[off : off + n].tolist())
            ref.append(r[off : off + n].tolist())
            lengths.append([len(c) for c in t.completions])
    return policy, ref, lengths


def drift(ws: storedb.Workspace, version: str, version_round: int, against_round: int) -> dict:
    """KL(π‖π_ref) per token, length and its change, distinct-2, share hitting the length limit."""
    with storedb.connect(ws) as con:
        mine = rounds.candidates(con, version_round)
        theirs = rounds.candidates(con, against_round)
        groups = rounds.groups(con, round_id=version_round)
    policy, ref, lengths = _policy_and_ref_logps(ws, version, groups)
    tokens = sum(sum(x) for x in lengths)
    kl = sum(p - r for gp, gr in zip(policy, ref, strict=True) for p, r in zip(gp, gr, strict=True))
    mean_len, ref_len = float(mine["n_tokens"].mean()), float(theirs["n_tokens"].mean())
    return {
        "kl_per_token": kl / max(tokens, 1),
        "mean_length": mean_len,
        "mean_length_against": ref_len,
        "length_change": mean_len - ref_len,
        "distinct2": distinct_n(list(mine["text"]), 2),
        "distinct2_against": distinct_n(list(theirs["text"]), 2),
        "length_limit_share": float((mine["finish_reason"] == "length").mean()),
        "length_limit_share_against": float((theirs["finish_reason"] == "length").mean()),
    }


def preference_accuracy(
    ws: storedb.Workspace, version: str, beta: float, split: str = "heldout"
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
    policy, ref, _ = _policy_and_ref_logps(ws, version, groups)
    predicted, observed, correct = [], [], []
    for g, gp, gr in zip(groups, policy, ref, strict=True):
        pos = {cid: i for i, cid in enumerate(g.candidate_ids)}
        rankings = [[[pos[c] for c in tier] for tier in r] for r in by_group[g.group_id]]
        for (a, b), p in pair_preferences(rankings).items():
            margin = beta * ((gp[a] - gr[a]) - (gp[b] - gr[b]))
            q = 1 / (1 + math.exp(-margin))
            correct.append(1.0 if margin > 0 else 0.0)
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


def human_ab_results(ws: storedb.Workspace, round_id: int) -> dict:
    """Win-rate of an A/B evaluation round from its labels (ties and all-bad count half)."""
    with storedb.connect(ws) as con:
        info = rounds.get_round(con, round_id)
        spec = info["settings"].get("eval")
        if not spec:
            raise PrefloopError(f"round {round_id} is not an A/B evaluation round")
        cands = rounds.candidates(con, round_id)
        labs = labels.labels(con, [round_id])
    origin = dict(zip(cands["id"], cands["origin"], strict=True))
    outcomes = []
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
    result = win_rate(outcomes).to_dict() if outcomes else {"wins": 0, "losses": 0, "ties": 0}
    return {
        **result,
        "n": len(outcomes),
        "version": spec["version"],
        "against": spec["against"],
        "round": round_id,
    }


def evaluate(ws: storedb.Workspace, version: str, cfg: EvalConfig) -> dict:
    """Run every evaluation of a version against cfg.against; store and return the results."""
    with storedb.connect(ws) as con:
        info = models.get_version(con, version)
        models.get_version(con, cfg.against)
    if version == cfg.against:
        raise PrefloopError("evaluate a version against a different one (--against)")
    sampling = cfg.sampling()
    mine = _round_for(ws, version, sampling)
    theirs = _round_for(ws, cfg.against, sampling)
    out: dict = {"version": version, "against": cfg.against, "rounds": [mine, theirs]}
    beta = cfg.beta or (info["config"].get("beta") if info else None) or 0.1
    if cfg.judge == HUMAN:
        out["human_ab_round"] = create_human_ab_round(
            ws, version, cfg.against, mine, theirs, cfg.seed
        )
    else:
        result, details = judged_win_rate(ws, version, theirs, mine, load_judge(ws, cfg))
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
    out["drift"] = drift(ws, version, mine, theirs)
    pref = preference_accuracy(ws, version, beta, cfg.split) if info else None
    with storedb.connect(ws) as con:
        evals.add_eval(
            con, "drift", version, out["drift"], against=cfg.against, round_ids=[mine, theirs]
        )
        if pref is not None:
            out["preference"] = pref[0]
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
