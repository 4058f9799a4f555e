"""Win-rate over rounds: do two rounds of sample -> label -> tune beat π_ref on held-out prompts?

Drives the real CLI (`python -m app.cli ...`, cwd = the repository root) on fresh temporary
workspaces with the real default model (SmolLM2-135M-Instruct); the loop itself lives in
tests/rounds_harness.py, which tests/test_real_model.py runs at a smaller scale:

- prompts: the 40 train prompts of labeling/data/demo_prompts.jsonl and the 10 held-out prompts of
  labeling/data/demo_prompts_heldout.jsonl (`--split heldout`);
- a scripted annotator with a learnable preference: shorter completions, counted in tokens of the
  model's tokenizer, rank higher (equal counts tie); every completion that hit the
  max-new-tokens limit (or is empty) is tied in the last place, so the model cannot win by packing
  tokens;
- round 1: `sample --model base --limit P --k K --max-new-tokens N --seed S+1`, `groups export`,
  the scripted labels, `labels import`, once in a shared workspace (it is the same for every
  method), which is then copied, one copy per method, so that each method starts from the base
  model on the same labels;
- per method and round r: `tune --method M` (freezes all labels so far; `--from` the previous
  version after round 1), then `eval --model vR --against base --judge
  tests.rounds_harness:shorter_judge --split heldout --k 2 --max-new-tokens N --json`; rounds
  r > 1 first sample (`--seed S+r`) from the newest version and label its groups.

The judge `shorter_judge(prompt, completion)` scores fewer words higher and a truncated (token
count at the limit) or empty completion lowest. Its limit comes from
$PREFLOOP_JUDGE_MAX_NEW_TOKENS (set for the eval subprocesses).

Goal: after the last round, the Wilson 95% lower bound of the win-rate against π_ref is above 0.5
for every method.

The methods run concurrently by default (`--jobs 2`), each with cores ÷ jobs torch threads
($PREFLOOP_THREADS); step wall times are per process and include any contention.

Run:  .venv/bin/python bench/winrate_rounds.py --prompts 32 --k 4 --max-new-tokens 48 --rounds 2 \
          --methods dpo,grpo [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.rounds_harness import JUDGE, LoopSettings, n_tokens, run_loop, table  # noqa: E402

TUNE_ARGS = {
    "dpo": "--lr 5e-4 --epochs 3 --beta 0.1 --groups-per-step 4",
    "grpo": "--lr 2e-3 --epochs 6 --groups-per-step 4 --beta 0.0",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32, help="train prompts sampled per round")
    ap.add_argument("--k", type=int, default=4, help="candidates per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--methods", default="dpo,grpo")
    ap.add_argument("--eval-k", type=int, default=2, help="eval samples per held-out prompt")
    ap.add_argument("--seed", type=int, default=0, help="round r samples with seed + r")
    ap.add_argument("--keep", metavar="DIR", help="create the workspaces in DIR and keep them")
    ap.add_argument("--jobs", type=int, default=2, help="methods run concurrently")
    ap.add_argument("--dpo-args", help=f"tune settings for DPO (default: {TUNE_ARGS['dpo']})")
    ap.add_argument("--grpo-args", help=f"tune settings for GRPO (default: {TUNE_ARGS['grpo']})")
    args = ap.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in TUNE_ARGS:
            ap.error(f"unknown method {m!r}")
    given = {"dpo": args.dpo_args, "grpo": args.grpo_args}
    settings = LoopSettings(
        prompts=args.prompts,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        rounds=args.rounds,
        eval_k=args.eval_k,
        seed=args.seed,
        tune_args={m: given[m] if given[m] is not None else TUNE_ARGS[m] for m in TUNE_ARGS},
        # jobs side by side share the cores (a job alone with no web app takes them all)
        env={"PREFLOOP_THREADS": str(max(1, (os.cpu_count() or 2) // args.jobs))},
    )

    if args.keep:
        base_dir = Path(args.keep).resolve()
        base_dir.mkdir(parents=True, exist_ok=True)
        for name in ["round1", *methods]:
            if (base_dir / name).exists():
                ap.error(f"{base_dir / name} exists; pick an empty --keep DIR")
    else:
        base_dir = Path(tempfile.mkdtemp(prefix="prefloop-winrate-"))

    # The judge must import the way the CLI will (`python -m app.cli` from the repo root).
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
    n_tokens("warm-up")  # prepare the default model once before the jobs start

    print(
        f"prompts {args.prompts}, k {args.k}, max-new-tokens {args.max_new_tokens}, rounds "
        f"{args.rounds}, methods {','.join(methods)}, eval k {args.eval_k} on the held-out split, "
        f"judge {JUDGE}, jobs {args.jobs}, workspaces {base_dir}",
        flush=True,
    )
    for m in methods:
        print(f"[{m}] tune settings: {settings.tune_args[m]}", flush=True)
    t0 = time.perf_counter()
    try:
        results, errors = run_loop(base_dir, methods, settings, jobs=args.jobs)
    except Exception as exc:  # round 1, shared by every method, failed
        results, errors = {}, {m: f"round 1 failed: {exc}" for m in methods}
        print(f"round 1 FAILED: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(base_dir, ignore_errors=True)

    print(f"\nsummary (total wall {time.perf_counter() - t0:.0f}s)")
    print(table(results))
    for m in methods:
        if m not in results:
            print(f"{m:<6} failed: {errors.get(m, '?').splitlines()[0]}")
    verdicts = []
    for m in methods:
        res = results.get(m)
        low = res.rounds[-1].winrate["low"] if res and res.rounds else float("nan")
        ok = low > 0.5
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
