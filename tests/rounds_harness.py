"""Rounds of sample → scripted labels → tune → judged evaluation, driven through the prefloop CLI.

Shared by tests/test_real_model.py (a small seeded version that runs in CI) and
bench/winrate_rounds.py (the full benchmark). Everything runs `python -m app.cli ...` in a
subprocess with the repository root as the working directory, as a user would:

- prompts: the train prompts of labeling/data/demo_prompts.jsonl and the 10 held-out prompts of
  labeling/data/demo_prompts_heldout.jsonl (`--split heldout`);
- a scripted annotator with a learnable preference (`rank_shorter`): shorter completions, counted
  in tokens, rank higher (equal counts tie); every completion that hit the max-new-tokens limit
  (or is empty) ties in the last place, so the model cannot win by packing tokens;
- round 1 samples the first P train prompts from the base model and is the same for every
  method, so it is sampled and labelled once in a shared workspace, which is then copied, one copy
  per method (paths in a workspace are relative, so a copy is a complete workspace);
- per method and round r: `tune --method M` (freezes all labels so far; `--from` the previous
  version after round 1), then `eval --model vR --against base --judge JUDGE --split heldout`;
  before round r > 1, `sample --model v(r-1)` and the scripted labels for its groups;
- the judge `shorter_judge(prompt, completion)` scores fewer words higher and a truncated (token
  count at the limit) or empty completion lowest; its limit comes from
  $PREFLOOP_JUDGE_MAX_NEW_TOKENS, which the harness sets for the eval subprocesses.

Methods run concurrently (`jobs`); the caller gives each its share of the cores through
$PREFLOOP_THREADS in `LoopSettings.env` (a prefloop job alone takes every core), and round 1's two
samples, which run side by side, get half the cores each. Step wall times are per process and
include any contention.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "labeling" / "data"
TRAIN_PROMPTS = DATA / "demo_prompts.jsonl"
HELDOUT_PROMPTS = DATA / "demo_prompts_heldout.jsonl"
JUDGE = "tests.rounds_harness:shorter_judge"
LIMIT_ENV = "PREFLOOP_JUDGE_MAX_NEW_TOKENS"
ANNOTATOR = "shorter-bot"
# a second taste that is not about length: a formal register (see informality)
FORMAL_JUDGE = "tests.rounds_harness:formal_judge"
FORMAL_ANNOTATOR = "formal-bot"


# --------------------------------------------------------------------------- tokens and judge


@lru_cache(maxsize=1)
def _tokenizer():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from tuning.models_cache import ensure_default_model

    return AutoTokenizer.from_pretrained(str(ensure_default_model()))


def n_tokens(text: str) -> int:
    """Tokens of text under the default model's tokenizer."""
    return len(_tokenizer()(text, add_special_tokens=False)["input_ids"])


def is_truncated(text: str, max_new_tokens: int) -> bool:
    """Empty, or (re-tokenised) at the max-new-tokens limit (one token of slack for re-merging)."""
    return not text.strip() or n_tokens(text) >= max_new_tokens - 1


def shorter_judge(prompt: str, completion: str) -> float:
    """Higher is better: fewer words; a truncated or empty completion scores lowest."""
    if is_truncated(completion, int(os.environ.get(LIMIT_ENV, "48"))):
        return -1e9
    return -float(len(completion.split()))


_INFORMAL = re.compile(
    r"!|\b(?:\w+n't|i'm|you're|we're|they're|it's|that's|let's|there's|here's|i'll|you'll|"
    r"i've|you've|i'd|you'd|sure|absolutely|of course|great question|hey|hi|awesome|cool|"
    r"super|totally|gonna|wanna|yeah|yes|okay|ok|lol|:\)|;\))\b|[\U0001F300-\U0001FAFF]",
    re.IGNORECASE,
)


def informality(text: str) -> float | None:
    """Informal markers (exclamation marks, contractions, chatty words, emoji) per word, or
    None for an empty answer. Independent of length: a rate, not a count."""
    words = len(text.split())
    if not words:
        return None
    return len(_INFORMAL.findall(text.replace("’", "'"))) / max(words, 10)


def formal_judge(prompt: str, completion: str) -> float:
    """Higher is better: fewer informal markers per word; an empty answer scores lowest."""
    rate = informality(completion)
    return -1e9 if rate is None else -rate


# --------------------------------------------------------------------------- the annotator


def rank_formal(groups: list[dict], max_new_tokens: int) -> tuple[list[dict], int, int]:
    """Labels of an annotator who prefers a formal register: candidates ranked by informal
    markers per word (fewer first, equal rates tie), empty answers tied last. Length and
    cut-offs do not matter to this annotator."""
    rows, skipped, empty = [], 0, 0
    for g in groups:
        places: dict[float, list] = {}
        last = []
        for c in g["candidates"]:
            rate = informality(c["text"])
            if rate is None:
                last.append(c["id"])
            else:
                places.setdefault(round(rate, 6), []).append(c["id"])
        empty += len(last)
        ranking = [places[r] for r in sorted(places)] + ([last] if last else [])
        if len(ranking) < 2:
            skipped += 1
            continue
        rows.append({"group_id": g["group_id"], "annotator": FORMAL_ANNOTATOR, "ranking": ranking})
    return rows, skipped, empty


TASTES = {"shorter": JUDGE, "formal": FORMAL_JUDGE}


def rank_shorter(groups: list[dict], max_new_tokens: int) -> tuple[list[dict], int, int]:
    """Labels of an annotator who ranks each group shortest first, cut-off answers tied last.

    Returns (label rows, groups left out because they have no strict order, candidates cut off).
    Token counts and finish reasons come from the groups export (re-tokenised when absent).
    """
    rows, skipped, truncated = [], 0, 0
    for g in groups:
        places: dict[int, list] = {}
        last = []
        for c in g["candidates"]:
            n = c["n_tokens"] if "n_tokens" in c else n_tokens(c["text"])
            if "finish_reason" in c:
                cut = c["finish_reason"] == "length" or not c["text"].strip()
            else:
                cut = is_truncated(c["text"], max_new_tokens)
            if cut:
                last.append(c["id"])
            else:
                places.setdefault(n, []).append(c["id"])
        truncated += len(last)
        ranking = [places[n] for n in sorted(places)] + ([last] if last else [])
        if len(ranking) < 2:  # no strict order: nothing to learn from
            skipped += 1
            continue
        rows.append({"group_id": g["group_id"], "annotator": ANNOTATOR, "ranking": ranking})
    return rows, skipped, truncated


# --------------------------------------------------------------------------- CLI driving


class CliError(RuntimeError):
    """A prefloop command exited non-zero."""


class Cli:
    """Runs `python -m app.cli ... --workspace WS` in a subprocess and times each command."""

    def __init__(self, workspace: Path, env: dict[str, str] | None = None) -> None:
        self.workspace = Path(workspace)
        self.env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.timings: list[tuple[str, float]] = []

    def __call__(self, *args: str, timeout: float = 3600) -> str:
        """The command's stdout; a non-zero exit raises CliError with its output."""
        return self.run(*args, timeout=timeout).stdout

    def run(self, *args: str, timeout: float = 3600) -> subprocess.CompletedProcess:
        """The finished command with its stdout and stderr; a non-zero exit raises CliError."""
        cmd = [sys.executable, "-m", "app.cli", *args, "--workspace", str(self.workspace)]
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        self.timings.append((" ".join(args[:2]), time.perf_counter() - t0))
        if proc.returncode != 0:
            raise CliError(
                f"`{shlex.join(['prefloop', *args])}` exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout[-2000:]}\nstderr:\n{proc.stderr[-4000:]}"
            )
        return proc

    def json(self, *args: str) -> dict | list:
        """The command's stdout parsed as JSON (its last non-empty line)."""
        return json.loads(last_line(self(*args)))


def last_line(out: str) -> str:
    """The last non-empty line of a command's output."""
    return [x for x in out.splitlines() if x.strip()][-1].strip()


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file."""
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


# --------------------------------------------------------------------------- the loop


@dataclass
class LoopSettings:
    """How big the loop is and how each method tunes."""

    prompts: int = 32  # train prompts sampled per round
    k: int = 4  # candidates per prompt
    max_new_tokens: int = 48
    rounds: int = 2
    eval_k: int = 2  # samples per held-out prompt and version
    seed: int = 0  # round r samples with seed + r; tuning uses seed
    eval_seed: int = 1234  # the same seed samples π_ref and every version on the held-out split
    eval_temperature: float = 0.7
    eval_top_p: float = 0.95
    tune_args: dict[str, str] = field(default_factory=dict)  # method -> `prefloop tune` flags
    taste: str = "shorter"  # the scripted annotator and judge: shorter | formal
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every command


@dataclass
class RoundResult:
    """One method's round: its labels, the new version, and that version's held-out evaluation."""

    method: str
    round: int
    round_id: int
    version: str
    labelled: int
    skipped: int
    truncated: int
    eval: dict  # `prefloop eval --json`
    times: dict[str, float]  # wall seconds of sample, label, tune, eval

    @property
    def winrate(self) -> dict:
        """win_rate, low, high (Wilson 95%), wins, losses, ties, n."""
        return self.eval["winrate"]

    @property
    def drift(self) -> dict:
        """kl_per_token, mean_length(_against), length_change, length_limit_share(_against)."""
        return self.eval["drift"]


@dataclass
class MethodResult:
    """One method's rounds, in order."""

    method: str
    tune_args: str
    workspace: Path
    rounds: list[RoundResult] = field(default_factory=list)
    total_s: float = 0.0


def _print(msg: str) -> None:
    print(msg, flush=True)


def label_round(
    cli: Cli, round_id: int, max_new_tokens: int, taste: str = "shorter"
) -> tuple[int, int, int]:
    """Export the round's groups, rank them with the scripted annotator, import the labels."""
    exported = cli.workspace / f"round{round_id}_groups.jsonl"
    cli("groups", "export", "--round", str(round_id), "--out", str(exported))
    rank = rank_formal if taste == "formal" else rank_shorter
    rows, skipped, truncated = rank(read_jsonl(exported), max_new_tokens)
    labels = cli.workspace / f"round{round_id}_labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if rows:
        out = cli("labels", "import", str(labels))
        assert f"imported {len(rows)} labels" in out, out
    return len(rows), skipped, truncated


def sample_and_label(cli: Cli, s: LoopSettings, model: str, r: int) -> tuple[int, dict, dict]:
    """Sample round r from model and label it: (round id, label counts, wall times)."""
    t = time.perf_counter()
    info = cli.json(
        "sample",
        *("--model", model, "--limit", str(s.prompts), "--k", str(s.k)),
        *("--max-new-tokens", str(s.max_new_tokens), "--seed", str(s.seed + r), "--json"),
    )
    times = {"sample": time.perf_counter() - t}
    assert info["groups"] == s.prompts and info["model_version"] == model, info
    t = time.perf_counter()
    labelled, skipped, truncated = label_round(cli, info["id"], s.max_new_tokens, s.taste)
    times["label"] = time.perf_counter() - t
    counts = {"labelled": labelled, "skipped": skipped, "truncated": truncated}
    return int(info["id"]), counts, times


def eval_sampling(s: LoopSettings) -> list[str]:
    """The sampling flags of every evaluation, for `prefloop eval` and `prefloop sample` alike."""
    return [
        *("--split", "heldout", "--k", str(s.eval_k), "--max-new-tokens", str(s.max_new_tokens)),
        *("--temperature", str(s.eval_temperature), "--top-p", str(s.eval_top_p)),
        *("--seed", str(s.eval_seed)),
    ]


def prepare_shared(ws: Path, s: LoopSettings) -> tuple[int, dict, dict]:
    """A workspace with the prompts, round 1 sampled from the base model and labelled, and the
    base model's held-out evaluation round (`prefloop eval` reuses a round sampled with its
    settings), sampled concurrently."""
    cores = os.cpu_count() or 2
    threads = min(int(s.env.get("PREFLOOP_THREADS") or cores), max(1, cores // 2))
    cli = Cli(ws, {**s.env, "PREFLOOP_THREADS": str(threads)})  # two samples side by side
    cli("init")
    cli("prompts", "import", str(TRAIN_PROMPTS), "--split", "train")
    cli("prompts", "import", str(HELDOUT_PROMPTS), "--split", "heldout")
    with ThreadPoolExecutor(max_workers=1) as pool:
        heldout = pool.submit(cli, "sample", "--model", "base", *eval_sampling(s), "--json")
        round1 = sample_and_label(cli, s, "base", 1)
        heldout.result()
    return round1


def run_method(
    method: str,
    shared: Path,
    ws: Path,
    s: LoopSettings,
    round1: tuple[int, dict, dict],
    log: Callable[[str], None] = _print,
) -> MethodResult:
    """Copy the shared workspace and run every round of one method in the copy."""
    t0 = time.perf_counter()
    shutil.copytree(shared, ws)
    cli = Cli(ws, {**s.env, LIMIT_ENV: str(s.max_new_tokens)})
    tune_args = shlex.split(s.tune_args[method])
    result = MethodResult(method, shlex.join(tune_args), ws)
    version = None
    for r in range(1, s.rounds + 1):
        if r == 1:
            round_id, counts, times = round1
            times = dict(times)
        else:
            round_id, counts, times = sample_and_label(cli, s, version, r)

        t = time.perf_counter()
        # a method may carry a label after '#' (dpo#lr1e-3): several settings of one method
        tune = ["tune", "--method", method.split("#")[0], *tune_args, "--seed", str(s.seed)]
        tune.append("--quiet")
        version = last_line(cli(*tune, *(["--from", version] if version else [])))
        times["tune"] = time.perf_counter() - t

        t = time.perf_counter()
        ev = cli.json(
            "eval",
            *("--model", version, "--against", "base", "--judge", TASTES[s.taste]),
            *eval_sampling(s),
            "--json",
        )
        times["eval"] = time.perf_counter() - t
        row = RoundResult(method, r, round_id, version, **counts, eval=ev, times=times)
        result.rounds.append(row)
        log(describe(row))
    result.total_s = time.perf_counter() - t0
    return result


def run_loop(
    base_dir: Path,
    methods: list[str],
    s: LoopSettings,
    jobs: int = 2,
    log: Callable[[str], None] = _print,
) -> tuple[dict[str, MethodResult], dict[str, str]]:
    """Round 1 once from the base model, then every method's rounds (concurrently up to jobs).

    Returns the results by method and the error message of each method that failed.
    """
    base_dir = Path(base_dir)
    t0 = time.perf_counter()
    shared = base_dir / "round1"
    round1 = prepare_shared(shared, s)
    _, counts, times = round1
    log(
        f"[round 1] sampled {s.prompts} prompts x {s.k} from base ({times['sample']:.1f}s); "
        f"labelled {counts['labelled']} groups (skipped {counts['skipped']} without strict "
        f"order, {counts['truncated']} candidates at the limit); ready after "
        f"{time.perf_counter() - t0:.1f}s"
    )
    results, errors = {}, {}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {
            m: pool.submit(run_method, m, shared, base_dir / m, s, round1, log) for m in methods
        }
        for m, f in futures.items():
            try:
                results[m] = f.result()
            except Exception as exc:  # report what the other methods reached
                errors[m] = str(exc)
                log(f"[{m}] FAILED: {exc}")
    return results, errors


# --------------------------------------------------------------------------- reporting


def describe(row: RoundResult) -> str:
    """A few lines on one method's round."""
    m, w, d, t = row.method, row.winrate, row.drift, row.times
    return (
        f"[{m}] round {row.round} (round id {row.round_id}, {row.version}): labelled "
        f"{row.labelled} groups (skipped {row.skipped} without strict order; {row.truncated} "
        f"candidates at the limit)\n"
        f"[{m}]   win-rate {w['win_rate']:.3f} Wilson95 [{w['low']:.3f}, {w['high']:.3f}] "
        f"(wins {w['wins']}, losses {w['losses']}, ties {w['ties']}, n {w.get('n')})\n"
        f"[{m}]   KL/token {d['kl_per_token']:.4f}; mean length {d['mean_length']:.1f} tokens "
        f"({d['length_change']:+.1f} vs base); hit limit {d['length_limit_share']:.0%} "
        f"(base {d['length_limit_share_against']:.0%})\n"
        f"[{m}]   wall: sample {t['sample']:.1f}s, label {t['label']:.1f}s, tune {t['tune']:.1f}s, "
        f"eval {t['eval']:.1f}s"
    )


def table(results: dict[str, MethodResult], settings: bool = True) -> str:
    """One line per method and round: win-rate, Wilson interval, drift, wall time per step."""
    lines = [
        f"{'method':<6} {'rnd':>3} {'ver':>4} {'win':>6} {'low':>6} {'high':>6} "
        f"{'W/L/T':>9} {'KL/tok':>7} {'dlen':>6} {'limit':>6} {'sample':>7} {'label':>6} "
        f"{'tune':>7} {'eval':>6}" + ("  settings" if settings else "")
    ]
    for m, res in results.items():
        for row in res.rounds:
            w, d, t = row.winrate, row.drift, row.times
            lines.append(
                f"{m:<6} {row.round:>3} {row.version:>4} {w['win_rate']:>6.3f} "
                f"{w['low']:>6.3f} {w['high']:>6.3f} "
                f"{w['wins']:>3}/{w['losses']}/{w['ties']:<3} {d['kl_per_token']:>7.4f} "
                f"{d['length_change']:>+6.1f} {d['length_limit_share']:>6.0%} "
                f"{t['sample']:>6.0f}s {t['label']:>5.0f}s {t['tune']:>6.0f}s {t['eval']:>5.0f}s"
                + (f"  {res.tune_args}" if settings else "")
            )
    return "\n".join(lines)
