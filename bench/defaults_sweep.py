"""Which defaults improve the model without breaking it? A sweep of DPO and GRPO settings.

For each scripted taste (`shorter`: fewer tokens, cut-off answers last; `formal`: fewer
informal markers per word, which has nothing to do with length) and each seed, round 1 is
sampled from the base model and labelled once; then every setting runs two rounds of
sample → label → tune (`--from` the previous version) → `prefloop eval` against π_ref on the
held-out prompts with a judge of the same taste (tests/rounds_harness.py drives the real CLI).

Per setting, over tastes and seeds: the guarded win-rate after the last round (a broken answer
never wins) with its Wilson 95% interval, the broken share, the fluency drift (NLL per token
under π_ref of the version's answers minus π_ref's own), KL per token, distinct-2, wall time
and the epoch each round kept (0: the guard kept the starting adapter; the round learned nothing).
The best setting is the one with the highest mean guarded win-rate among those whose broken
share stays ≤ 5% for every taste and seed.

Run (one at a time: it uses both cores):
  .venv/bin/python bench/defaults_sweep.py --prompts 32 --seeds 0,1,2 --tastes shorter,formal
  .venv/bin/python bench/defaults_sweep.py --setting "dpo#sft0=--sft-weight 0" --setting "dpo"
A setting is LABEL=FLAGS, where LABEL is dpo or grpo, optionally with #name; "dpo" alone runs
the defaults.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.rounds_harness import LoopSettings, run_loop  # noqa: E402
from tuning.eval_stats import wilson_interval  # noqa: E402

DEFAULT_SETTINGS = [
    "dpo",  # the defaults
    "dpo#sft0=--sft-weight 0",
    "dpo#lr1e-3=--lr 1e-3",
    "dpo#beta0.3=--beta 0.3",
    "dpo#ipo=--loss ipo",
    "grpo",
    "grpo#lr1e-3=--lr 1e-3",
    "grpo#beta0.04=--beta 0.04",
    "grpo#dcg=--gains dcg",
]


def parse_setting(text: str) -> tuple[str, str]:
    """LABEL=FLAGS (or LABEL alone: the defaults) -> (label, flags)."""
    label, _, flags = text.partition("=")
    if label.split("#")[0] not in ("dpo", "grpo"):
        raise SystemExit(f"setting {text!r}: the label must start with dpo or grpo")
    return label, flags


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=32, help="train prompts per round")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--eval-k", type=int, default=2, help="held-out samples per prompt in eval")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tastes", default="shorter,formal")
    ap.add_argument("--setting", action="append", help="LABEL=FLAGS; repeat (default: a grid)")
    ap.add_argument("--jobs", type=int, default=2, help="settings run concurrently")
    ap.add_argument("--keep", metavar="DIR", help="keep the workspaces in DIR")
    ap.add_argument(
        "--show", type=int, default=3, help="held-out answers to print per setting, beside π_ref's"
    )
    args = ap.parse_args()
    settings = dict(parse_setting(x) for x in (args.setting or DEFAULT_SETTINGS))
    base = Path(args.keep or tempfile.mkdtemp(prefix="prefloop-sweep-"))
    rows: dict[str, list[dict]] = {label: [] for label in settings}
    t_all = time.perf_counter()
    for taste in args.tastes.split(","):
        for seed in [int(x) for x in args.seeds.split(",")]:
            s = LoopSettings(
                prompts=args.prompts,
                k=args.k,
                max_new_tokens=args.max_new_tokens,
                rounds=args.rounds,
                eval_k=args.eval_k,
                seed=seed,
                tune_args=settings,
                taste=taste,
                # settings side by side share the cores (a job alone takes them all)
                env={"PREFLOOP_THREADS": str(max(1, (os.cpu_count() or 2) // args.jobs))},
            )
            out = base / f"{taste}-seed{seed}"
            results, errors = run_loop(out, list(settings), s, jobs=args.jobs, log=lambda _m: None)
            for label, err in errors.items():
                print(f"{taste} seed {seed} {label}: FAILED {err.splitlines()[0]}", flush=True)
            for label, res in results.items():
                last = res.rounds[-1]
                w, d = last.winrate, last.drift
                row = {
                    "taste": taste,
                    "seed": seed,
                    "win": w.get("guarded_win_rate", w["win_rate"]),
                    "raw": w["win_rate"],
                    "n": w["n"],
                    "broken": d.get("broken_share", float("nan")),
                    "drift": d.get("fluency_drift", float("nan")),
                    "kl": d["kl_per_token"],
                    "distinct2": d["distinct2"],
                    "wall": res.total_s,
                }
                rows[label].append(row)
                if args.show:
                    print(side_by_side(res.workspace, last.eval["rounds"], args.show), flush=True)
                print(
                    f"{taste:<7} seed {seed} {label:<14} guarded win {row['win']:.3f} "
                    f"(raw {row['raw']:.3f}) broken {row['broken']:.0%} drift "
                    f"{row['drift']:+.2f} KL {row['kl']:.3f} d2 {row['distinct2']:.2f} "
                    f"{row['wall']:.0f}s kept epochs "
                    f"{kept_epochs(res.workspace, [r.version for r in res.rounds])}",
                    flush=True,
                )
            if not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    print(f"\nall done in {time.perf_counter() - t_all:.0f}s\n")
    print(summary(rows, settings))
    return 0


def kept_epochs(workspace: Path, versions: list[str]) -> str:
    """The epoch each round's run kept, e.g. "3/0" (0: the guard kept the starting adapter, so
    the round learned nothing and its win-rate is the parent's)."""
    from tests.rounds_harness import Cli

    models = {m["id"]: m for m in Cli(workspace).json("models", "list", "--json")}
    return "/".join(
        str(models[v]["config"].get("training", {}).get("kept_epoch", "?")) for v in versions
    )


def side_by_side(workspace: Path, round_ids: list[int], n: int) -> str:
    """The first n held-out answers of the version's evaluation round beside π_ref's."""
    from tests.rounds_harness import Cli, read_jsonl

    cli = Cli(workspace)
    groups = []
    for rid in round_ids:
        out = workspace / f"show-{rid}.jsonl"
        cli("groups", "export", "--round", str(rid), "--out", str(out))
        groups.append({g["prompt"]: g["candidates"][0]["text"] for g in read_jsonl(out)})
    mine, ref = groups
    lines = []
    for prompt in list(mine)[:n]:
        lines.append(f"    Q: {prompt[:90]}")
        lines.append(f"      version: {mine[prompt][:160]!r}")
        lines.append(f"      pi_ref:  {ref.get(prompt, '')[:160]!r}")
    return "\n".join(lines)


def summary(rows: dict[str, list[dict]], settings: dict[str, str]) -> str:
    """The sweep table: one line per setting, pooled over tastes and seeds, and the pick."""
    lines = [
        f"{'setting':<14} {'tastes x seeds':>14} {'guarded win':>11} {'Wilson95':>15} "
        f"{'worst':>6} {'broken max':>10} {'drift':>6} {'KL/tok':>7} {'d2':>5} {'wall':>6}  flags"
    ]
    best, best_win = None, -1.0
    for label, rs in rows.items():
        if not rs:
            lines.append(f"{label:<14} (failed)")
            continue
        n = sum(r["n"] for r in rs)
        score = sum(r["win"] * r["n"] for r in rs)
        low, high = wilson_interval(score, n)
        win = score / n
        broken = max(r["broken"] for r in rs)
        lines.append(
            f"{label:<14} {len(rs):>14} {win:>11.3f} [{low:.3f}, {high:.3f}] "
            f"{min(r['win'] for r in rs):>6.3f} {broken:>10.0%} "
            f"{statistics.fmean(r['drift'] for r in rs):>+6.2f} "
            f"{statistics.fmean(r['kl'] for r in rs):>7.3f} "
            f"{statistics.fmean(r['distinct2'] for r in rs):>5.2f} "
            f"{statistics.fmean(r['wall'] for r in rs):>5.0f}s  {settings[label] or '(defaults)'}"
        )
        if broken <= 0.05 and win > best_win:
            best, best_win = label, win
    lines.append(f"\nbest with broken share <= 5% everywhere: {best or 'none'}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
