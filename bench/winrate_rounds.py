"""Win-rate over rounds: do two rounds of sample -> label -> tune beat π_ref on held-out prompts?

Drives the real CLI (`python -m app.cli ...`, cwd = the repository root) on fresh temporary
workspaces with the real default model (SmolLM2-135M-Instruct), one workspace per method so that
each starts from the base model:

- prompts: the 40 train prompts of labeling/data/demo_prompts.jsonl and the 10 held-out prompts of
  labeling/data/demo_prompts_heldout.jsonl (`--split heldout`);
- a scripted annotator with a learnable preference: shorter completions, counted in tokens of the
  model's tokenizer, rank higher (equal counts tie); every completion that hit the
  max-new-tokens limit (or is empty) is tied in the last place, so the model cannot win by packing
  tokens;
- per method and round r: `sample --limit P --k K --max-new-tokens N --seed r` (round 1 from base,
  later rounds from the newest version), `groups export --round R`, the scripted labels,
  `labels import`, `tune --method M` (freezes all labels so far; `--from` the previous version
  after round 1), then `eval --model vR --against base --judge bench.winrate_rounds:shorter_judge
  --split heldout --k 2 --max-new-tokens N --json`.

The judge `shorter_judge(prompt, completion)` scores fewer words higher and a truncated (token
count at the limit) or empty completion lowest. Its limit comes from $PREFLOOP_BENCH_MAX_NEW_TOKENS
(the bench sets it for the eval subprocess; default 48).

Goal: after the last round, the Wilson 95% lower bound of the win-rate against π_ref is above 0.5
for every method.

The methods run concurrently by default (`--jobs 2`): prefloop's jobs use one core less than the
machine has, so on a 2-core machine each job uses one thread either way; step wall times are
per process and include any contention.

Run:  .venv/bin/python bench/winrate_rounds.py --prompts 32 --k 4 --max-new-tokens 48 --rounds 2 \
          --methods dpo,grpo [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PROMPTS = ROOT / "labeling" / "data" / "demo_prompts.jsonl"
HELDOUT_PROMPTS = ROOT / "labeling" / "data" / "demo_prompts_heldout.jsonl"
JUDGE = "bench.winrate_rounds:shorter_judge"
ANNOTATOR = "bench-shorter"

TUNE_ARGS = {
    "dpo": "--lr 5e-4 --epochs 3 --beta 0.1 --groups-per-step 4",
    "grpo": "--lr 2e-3 --epochs 6 --groups-per-step 4 --beta 0.0",
}

_print_lock = threading.Lock()


def log(msg: str) -> None:
    with _print_lock:
        print(msg, flush=True)


# --------------------------------------------------------------------------- tokens and judge


@lru_cache(maxsize=1)
def _tokenizer():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from tuning.models_cache import ensure_default_model

    return AutoTokenizer.from_pretrained(str(ensure_default_model()))


def n_tokens(text: str) -> int:
    return len(_tokenizer()(text, add_special_tokens=False)["input_ids"])


def _limit() -> int:
    return int(os.environ.get("PREFLOOP_BENCH_MAX_NEW_TOKENS", "48"))


def is_truncated(text: str, max_new_tokens: int) -> bool:
    """Empty, or (re-tokenised) at the max-new-tokens limit (one token of slack for re-merging)."""
    return not text.strip() or n_tokens(text) >= max_new_tokens - 1


def shorter_judge(prompt: str, completion: str) -> float:
    """Higher is better: fewer words; a truncated or empty completion scores lowest."""
    if is_truncated(completion, _limit()):
        return -1e9
    return -float(len(completion.split()))


# --------------------------------------------------------------------------- CLI driving


class Step:
    def __init__(self, ws: Path, env: dict):
        self.ws, self.env = ws, env

    def cli(self, *args: str, timeout: float = 3600) -> str:
        cmd = [sys.executable, "-m", "app.cli", *args, "--workspace", str(self.ws)]
        if args[0] in ("prompts", "groups", "labels"):  # subcommand groups: flag after action
            cmd = [
                sys.executable,
                "-m",
                "app.cli",
                *args[:2],
                "--workspace",
                str(self.ws),
                *args[2:],
            ]
        proc = subprocess.run(
            cmd, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n"
                f"{proc.stderr[-4000:]}"
            )
        return proc.stdout


def last_line(out: str) -> str:
    return [x for x in out.splitlines() if x.strip()][-1].strip()


def label_round(step: Step, round_id: int, max_new_tokens: int) -> tuple[int, int, int]:
    """Export the round's groups, rank them shortest-first (truncated tied last), import."""
    exported = step.ws / f"round{round_id}_groups.jsonl"
    step.cli("groups", "export", "--round", str(round_id), "--out", str(exported))
    rows, skipped, truncated = [], 0, 0
    for line in exported.read_text().splitlines():
        if not line.strip():
            continue
        g = json.loads(line)
        places: dict[int, list] = {}
        last = []
        for c in g["candidates"]:
            # the export's token count and finish reason when it has them, else re-tokenise
            n = c["n_tokens"] if "n_tokens" in c else n_tokens(c["text"])
            if "finish_reason" in c:
                truncated_c = c["finish_reason"] == "length" or not c["text"].strip()
            else:
                truncated_c = is_truncated(c["text"], max_new_tokens)
            if truncated_c:
                last.append(c["id"])
            else:
                places.setdefault(n, []).append(c["id"])
        truncated += len(last)
        ranking = [places[n] for n in sorted(places)] + ([last] if last else [])
        if len(ranking) < 2:  # no strict order: nothing to learn from
            skipped += 1
            continue
        rows.append({"group_id": g["group_id"], "annotator": ANNOTATOR, "ranking": ranking})
    labels = step.ws / f"round{round_id}_labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if rows:
        step.cli("labels", "import", str(labels))
    return len(rows), skipped, truncated


def run_method(method: str, args: argparse.Namespace, base_dir: Path) -> dict:
    ws = base_dir / method
    env = dict(os.environ, PREFLOOP_BENCH_MAX_NEW_TOKENS=str(args.max_new_tokens))
    step = Step(ws, env)
    tune_args = shlex.split(
        TUNE_ARGS[method] if args.tune_args.get(method) is None else args.tune_args[method]
    )
    t0 = time.perf_counter()
    step.cli("init")
    step.cli("prompts", "import", str(TRAIN_PROMPTS))
    step.cli("prompts", "import", str(HELDOUT_PROMPTS), "--split", "heldout")
    log(
        f"[{method}] workspace {ws} ready ({time.perf_counter() - t0:.1f}s); "
        f"tune settings: {shlex.join(tune_args)}"
    )
    result = {"method": method, "tune_args": shlex.join(tune_args), "rounds": []}
    version = None
    for r in range(1, args.rounds + 1):
        times = {}
        t = time.perf_counter()
        out = step.cli(
            "sample",
            "--model",
            version or "base",
            "--limit",
            str(args.prompts),
            "--k",
            str(args.k),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--seed",
            str(r),
        )
        round_id = int(last_line(out))
        times["sample"] = time.perf_counter() - t

        t = time.perf_counter()
        n_labelled, n_skipped, n_trunc = label_round(step, round_id, args.max_new_tokens)
        times["label"] = time.perf_counter() - t

        t = time.perf_counter()
        tune = ["tune", "--method", method, *tune_args, "--quiet"]
        if version:
            tune += ["--from", version]
        version = last_line(step.cli(*tune))
        times["tune"] = time.perf_counter() - t

        t = time.perf_counter()
        ev = json.loads(
            last_line(
                step.cli(
                    "eval",
                    "--model",
                    version,
                    "--against",
                    "base",
                    "--judge",
                    JUDGE,
                    "--split",
                    "heldout",
                    "--k",
                    str(args.eval_k),
                    "--max-new-tokens",
                    str(args.max_new_tokens),
                    "--json",
                )
            )
        )
        times["eval"] = time.perf_counter() - t
        w, d = ev["winrate"], ev["drift"]
        row = {
            "round": r,
            "round_id": round_id,
            "version": version,
            "labelled": n_labelled,
            "skipped": n_skipped,
            "truncated_candidates": n_trunc,
            "win_rate": w["win_rate"],
            "low": w["low"],
            "high": w["high"],
            "wins": w["wins"],
            "losses": w["losses"],
            "ties": w["ties"],
            "n": w.get("n"),
            "kl_per_token": d["kl_per_token"],
            "mean_length": d["mean_length"],
            "length_change": d["length_change"],
            "limit_share": d["length_limit_share"],
            "limit_share_base": d["length_limit_share_against"],
            "times": times,
        }
        result["rounds"].append(row)
        log(
            f"[{method}] round {r} (round id {round_id}, {version}): labelled {n_labelled} groups "
            f"(skipped {n_skipped} without strict order; {n_trunc} candidates at the limit)\n"
            f"[{method}]   win-rate {row['win_rate']:.3f} Wilson95 [{row['low']:.3f}, "
            f"{row['high']:.3f}] (wins {row['wins']}, losses {row['losses']}, ties {row['ties']}, "
            f"n {row['n']})\n"
            f"[{method}]   KL/token {row['kl_per_token']:.4f}; mean length "
            f"{row['mean_length']:.1f} tokens ({row['length_change']:+.1f} vs base); hit limit "
            f"{row['limit_share']:.0%} (base {row['limit_share_base']:.0%})\n"
            f"[{method}]   wall: sample {times['sample']:.1f}s, label {times['label']:.1f}s, "
            f"tune {times['tune']:.1f}s, eval {times['eval']:.1f}s"
        )
    result["total_s"] = time.perf_counter() - t0
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32, help="train prompts sampled per round")
    ap.add_argument("--k", type=int, default=4, help="candidates per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", default="dpo,grpo")
    ap.add_argument("--eval-k", type=int, default=2, help="eval samples per held-out prompt")
    ap.add_argument("--keep", metavar="DIR", help="create the workspaces in DIR and keep them")
    ap.add_argument("--jobs", type=int, default=2, help="methods run concurrently")
    ap.add_argument("--dpo-args", help=f"tune settings for DPO (default: {TUNE_ARGS['dpo']})")
    ap.add_argument("--grpo-args", help=f"tune settings for GRPO (default: {TUNE_ARGS['grpo']})")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in TUNE_ARGS:
            ap.error(f"unknown method {m!r}")
    args.tune_args = {"dpo": args.dpo_args, "grpo": args.grpo_args}

    if args.keep:
        base_dir = Path(args.keep).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        for m in methods:
            if (base_dir / m).exists():
                ap.error(f"{base_dir / m} exists; pick an empty --keep DIR")
    else:
        base_dir = Path(tempfile.mkdtemp(prefix="prefloop-winrate-"))

    # The judge must import the way the CLI will import it (cwd on sys.path, bench/ namespace).
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, '.');"
            "from labeling.judges import load_programmatic_judge as L;"
            f"print(L({JUDGE!r})('p', 'Short answer.', 'A much longer answer than that.'))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if check.returncode != 0 or check.stdout.strip() != "1.0":
        print(f"judge {JUDGE} does not load as expected:\n{check.stdout}{check.stderr}")
        return 1
    _tokenizer()  # prepare the default model once before the jobs start

    log(
        f"prompts {args.prompts}, k {args.k}, max-new-tokens {args.max_new_tokens}, rounds "
        f"{args.rounds}, methods {','.join(methods)}, eval k {args.eval_k} on the held-out split, "
        f"judge {JUDGE}, jobs {args.jobs}, workspaces {base_dir}"
    )
    t0 = time.perf_counter()
    results, errors = {}, {}
    try:
        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = {m: pool.submit(run_method, m, args, base_dir) for m in methods}
            for m, f in futures.items():
                try:
                    results[m] = f.result()
                except Exception as exc:  # report what the other methods reached
                    errors[m] = str(exc)
                    log(f"[{m}] FAILED: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(base_dir, ignore_errors=True)

    print(f"\nsummary (total wall {time.perf_counter() - t0:.0f}s)")
    header = (
        f"{'method':<6} {'rnd':>3} {'ver':>4} {'win':>6} {'low':>6} {'high':>6} "
        f"{'W/L/T':>9} {'KL/tok':>7} {'dlen':>6} {'limit':>6} {'sample':>7} {'label':>6} "
        f"{'tune':>7} {'eval':>6}  settings"
    )
    print(header)
    for m in methods:
        res = results.get(m)
        if res is None:
            print(f"{m:<6} failed: {errors.get(m, '?').splitlines()[0]}")
            continue
        for row in res["rounds"]:
            t = row["times"]
            print(
                f"{m:<6} {row['round']:>3} {row['version']:>4} {row['win_rate']:>6.3f} "
                f"{row['low']:>6.3f} {row['high']:>6.3f} "
                f"{row['wins']:>3}/{row['losses']}/{row['ties']:<3} {row['kl_per_token']:>7.4f} "
                f"{row['length_change']:>+6.1f} {row['limit_share']:>6.0%} {t['sample']:>6.0f}s "
                f"{t['label']:>5.0f}s {t['tune']:>6.0f}s {t['eval']:>5.0f}s  {res['tune_args']}"
            )
    verdicts = []
    for m in methods:
        res = results.get(m)
        ok = bool(res and res["rounds"] and res["rounds"][-1]["low"] > 0.5)
        low = res["rounds"][-1]["low"] if res and res["rounds"] else float("nan")
        verdicts.append(ok)
        print(
            f"goal {m}: Wilson lower bound after round {args.rounds} = {low:.3f} "
            f"{'> 0.5: holds' if ok else '<= 0.5: does not hold'}"
        )
    goal = all(verdicts) and not errors
    print(
        f"GOAL {'HOLDS' if goal else 'DOES NOT HOLD'} (Wilson 95% lower bound > 0.5 after round "
        f"{args.rounds} for {', '.join(methods)})"
    )
    if args.keep:
        print(f"workspaces kept in {base_dir}")
    return 0 if goal else 1


if __name__ == "__main__":
    sys.exit(main())
