"""The `prefloop` command line: a thin layer over store, labeling and tuning."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

from store.errors import PrefloopError

DEMO_DATA = Path(__file__).resolve().parent.parent / "labeling" / "data"


def _ws(args: argparse.Namespace):
    from store.db import workspace

    return workspace(args.workspace)


def _round_ids(text: str | None) -> list[int] | None:
    """Round ids from a --rounds value such as "1,3" (None when not given)."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrefloopError(f"--rounds takes round ids like 1,3; got {text!r}") from None


def _print_table(df, as_json: bool) -> None:
    if as_json:
        print(df.to_json(orient="records", date_format="iso", default_handler=str))
    elif df.empty:
        print("(none)")
    else:
        import pandas as pd

        with pd.option_context(
            "display.max_columns", None, "display.width", 200, "display.max_colwidth", 60
        ):
            print(df.to_string(index=False))


def cmd_init(args: argparse.Namespace) -> None:
    from store.db import create
    from tuning.models_cache import DEFAULT_MODEL

    root = args.workspace or os.environ.get("PREFLOOP_WORKSPACE") or "."
    ws = create(root, args.model or DEFAULT_MODEL)
    print(f"created workspace {ws.root} (base model: {args.model or DEFAULT_MODEL})")


def cmd_demo(args: argparse.Namespace) -> None:
    from labeling.ingest import import_prompts
    from store.db import DB_NAME, create
    from tuning.config import SamplingConfig
    from tuning.jobs import sample_job
    from tuning.models_cache import DEFAULT_MODEL, ensure_default_model

    root = Path(args.workspace or os.environ.get("PREFLOOP_WORKSPACE") or "demo-workspace")
    if (root / DB_NAME).exists():
        print(f"demo workspace {root} exists already; keeping it")
        return
    ensure_default_model()
    ws = create(root, DEFAULT_MODEL)
    import_prompts(ws, DEMO_DATA / "demo_prompts.jsonl", "train")
    import_prompts(ws, DEMO_DATA / "demo_prompts_heldout.jsonl", "heldout")
    cfg = SamplingConfig(k=args.k, max_new_tokens=args.max_new_tokens, seed=0)
    round_id = sample_job(ws, cfg, None)
    print(f"demo workspace {ws.root}: 40 train + 10 held-out prompts, round {round_id} sampled")


def cmd_status(args: argparse.Namespace) -> None:
    from store import db, models

    ws = _ws(args)
    with db.connect(ws) as con:
        counts = db.table_counts(con)
        base, newest = models.base_model(con), models.latest_version(con)
    print(f"workspace {ws.root}\nbase model: {base}\nnewest model version: {newest}")
    for table, n in counts.items():
        print(f"{table}: {n}")


def cmd_prompts_import(args: argparse.Namespace) -> None:
    from labeling.ingest import import_prompts

    report = import_prompts(_ws(args), Path(args.file), args.split)
    print(
        f"imported {report.stored} prompts into {args.split}; "
        f"skipped {report.duplicates} duplicates"
    )


def cmd_sample(args: argparse.Namespace) -> None:
    from tuning.config import SamplingConfig
    from tuning.jobs import sample_job

    cfg = SamplingConfig(
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        split=args.split,
        limit=args.limit,
        prompts_per_batch=args.prompts_per_batch,
    )
    ws = _ws(args)
    options = {"mode": args.mode, "overlap": args.overlap}
    if args.guidelines:
        options["guidelines"] = _read_text(args.guidelines)
    round_id = sample_job(ws, cfg, args.model, show_progress=not args.json, options=options)
    if args.json:
        from store import db, rounds

        with db.connect(ws, read_only=False) as con:
            info = rounds.get_round(con, round_id)
        print(
            json.dumps({k: (str(v) if k == "created" else v) for k, v in info.items()}, default=int)
        )
    else:
        print(round_id)


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PrefloopError(f"cannot read {path}: {exc}") from exc


def cmd_groups_export(args: argparse.Namespace) -> None:
    from labeling.exporting import group_rows
    from store import db, rounds
    from store.exports import write_rows

    with db.connect(_ws(args)) as con:
        round_id = args.round if args.round is not None else rounds.latest_round(con)
        if round_id is None:
            raise PrefloopError("the workspace has no rounds yet; run `prefloop sample` first")
        groups = rounds.groups(con, round_id=round_id, pending=args.pending)
    rows = group_rows(groups)
    write_rows(rows, Path(args.out))
    print(f"wrote {len(rows)} groups of round {round_id} to {args.out}")


def cmd_groups_import(args: argparse.Namespace) -> None:
    from labeling.ingest import import_ranked_groups

    round_id, report = import_ranked_groups(_ws(args), Path(args.file), args.split)
    print(f"imported {report.stored} ranked groups as round {round_id}")


def cmd_pairs_import(args: argparse.Namespace) -> None:
    from labeling.ingest import import_pairs

    round_id, report = import_pairs(_ws(args), Path(args.file), args.split)
    print(f"imported {report.stored} pairs as groups of two in round {round_id}")
    for reason, n in sorted(report.skipped.items()):
        print(f"  skipped {n} rows: {reason}")


def cmd_labels_import(args: argparse.Namespace) -> None:
    from labeling.ingest import import_labels

    n = import_labels(_ws(args), Path(args.file))
    print(f"imported {n} labels")


def cmd_tune(args: argparse.Namespace) -> None:
    from tuning.config import DPOConfig, GRPOConfig, LoraSettings
    from tuning.jobs import tune_job

    lora = LoraSettings(
        r=args.lora_r,
        alpha=args.lora_alpha,
        target_modules=[m.strip() for m in args.target_modules.split(",") if m.strip()],
    )
    common = dict(
        epochs=args.epochs,
        lr=args.lr,
        max_length=args.max_length,
        groups_per_step=args.groups_per_step,
        seed=args.seed,
        lora=lora,
    )
    if args.method == "grpo":
        cfg = GRPOConfig(
            beta=0.04 if args.beta is None else args.beta,
            gains=args.gains,
            scale_rewards=args.scale_rewards,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            target_kl=args.target_kl,
            loss_type=args.loss_type,
            ppo_epochs=args.ppo_epochs,
            entropy_coef=args.entropy_coef,
            gain_source=args.gain_source,
            **common,
        )
    else:
        cfg = DPOConfig(
            beta=0.1 if args.beta is None else args.beta,
            loss_type=args.loss,
            label_smoothing=args.label_smoothing,
            sft_weight=args.sft_weight,
            listwise=args.listwise,
            soft_labels=args.soft_labels,
            early_stop=args.early_stop,
            **common,
        )
    version = tune_job(
        _ws(args),
        cfg,
        method=args.method,
        from_version=getattr(args, "from"),
        dataset_id=args.dataset,
        show_progress=not args.quiet,
    )
    if version:  # only the main process of a multi-process run reports
        print(version)


def cmd_dataset_freeze(args: argparse.Namespace) -> None:
    from labeling.curation import Curation, freeze_versions

    def names(value: str | None) -> list[str] | None:
        return [x.strip() for x in value.split(",") if x.strip()] if value else None

    cur = Curation(
        split=args.split,
        rounds=_round_ids(args.rounds),
        annotators=names(args.annotators),
        exclude_annotators=names(args.exclude_annotators) or [],
        exclude_flagged=args.exclude_flagged,
        min_agreement=args.min_agreement,
        keep_all_bad=args.keep_all_bad,
        dedupe=args.dedupe,
        max_length_ratio=args.max_length_ratio,
        heldout_fraction=args.heldout_fraction,
        split_seed=args.split_seed,
    )
    result = freeze_versions(_ws(args), cur)
    if args.json:
        print(json.dumps({"train": result.train, "heldout": result.heldout, **result.stats}))
        return
    left = {k: n for k, n in result.stats["left_out"].items() if n}
    print(
        f"{result.stats['groups']} groups, {result.stats['pairs']} pairs; left out: "
        + (", ".join(f"{k} {n}" for k, n in left.items()) or "none"),
        file=sys.stderr,
    )
    if result.heldout:
        print(f"held-out part: {result.heldout}", file=sys.stderr)
    print(result.train)


def cmd_dataset_show(args: argparse.Namespace) -> None:
    from labeling.curation import dataset_card
    from store import datasets, db

    with db.connect(_ws(args)) as con:
        version = args.version or datasets.latest_dataset(con)
        if version is None:
            raise PrefloopError("no dataset version yet: run `prefloop dataset freeze` first")
        info = datasets.get_dataset(con, version)
    print(json.dumps(info, default=str) if args.json else dataset_card(info))


def cmd_list(what: str):
    def run(args: argparse.Namespace) -> None:
        from store import datasets, db, models, rounds, runs

        ws = _ws(args)
        with db.connect(ws) as con:
            if what == "models":
                df = models.list_versions(con)
                df.insert(3, "base_path", [_local_path(b) for b in df["base_model"]])
            elif what == "rounds":
                df = rounds.list_rounds(con)
            elif what == "datasets":
                df = datasets.list_datasets(con)
            else:
                df = runs.list_runs(con)
            if what == "models":
                base = models.base_model(con)
        if what == "models":
            import pandas as pd

            head = pd.DataFrame(
                [
                    {
                        "id": "base",
                        "parent": None,
                        "base_model": base,
                        "base_path": _local_path(base),
                        "method": "base",
                    }
                ]
            )
            df = pd.concat([head, df], ignore_index=True) if not df.empty else head
        _print_table(df, args.json)

    return run


def _local_path(base: str) -> str | None:
    from tuning.models_cache import DEFAULT_MODEL, cache_dir

    if base == DEFAULT_MODEL:
        return str(cache_dir() / "models" / DEFAULT_MODEL)
    return str(Path(base).resolve()) if Path(base).exists() else None


def cmd_export(args: argparse.Namespace) -> None:
    from labeling.exporting import export_dataset

    path, n = export_dataset(_ws(args), args.format, Path(args.out), args.dataset)
    print(f"wrote {n} rows to {path} (card: {path.parent / 'README.md'})")


def cmd_eval(args: argparse.Namespace) -> None:
    from tuning.evaluation import EvalConfig
    from tuning.jobs import eval_job

    cfg = EvalConfig(
        against=args.against,
        judge=args.judge,
        judge_model=args.judge_model,
        rubric=args.rubric,
        split=args.split,
        limit=args.limit,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        beta=args.beta,
    )
    ws = _ws(args)
    if args.model is None:
        from store import db, models

        with db.connect(ws) as con:
            args.model = models.latest_version(con)
    result = eval_job(ws, args.model, cfg)
    if args.json:
        print(json.dumps(result, default=float))
        return
    print(f"{result['version']} vs {result['against']} (rounds {result['rounds']})")
    if "winrate" in result:
        w = result["winrate"]
        print(
            f"win-rate {w['win_rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] "
            f"(wins {w['wins']}, losses {w['losses']}, ties {w['ties']}; judge {args.judge})"
        )
    if "human_ab_round" in result:
        print(
            f"A/B evaluation round {result['human_ab_round']} is in the annotator queue; "
            f"see `prefloop evals human --round {result['human_ab_round']}`"
        )
    d = result["drift"]
    print(
        f"KL/token {d['kl_per_token']:.4f}; length {d['mean_length']:.1f} "
        f"({d['length_change']:+.1f}); distinct-2 {d['distinct2']:.3f}; "
        f"hit limit {d['length_limit_share']:.0%}"
    )
    if "preference" in result:
        p = result["preference"]
        print(
            f"held-out preference accuracy {p['accuracy']:.3f} over {p['pairs']} pairs; "
            f"ECE {p['ece']:.3f}"
        )


def cmd_evals_list(args: argparse.Namespace) -> None:
    from store import db, evals

    with db.connect(_ws(args)) as con:
        df = evals.list_evals(con, args.kind)
    _print_table(df, args.json)


def cmd_evals_human(args: argparse.Namespace) -> None:
    from tuning.evaluation import human_ab_results

    result = human_ab_results(_ws(args), args.round)
    print(
        json.dumps(result)
        if args.json
        else f"{result['version']} vs {result['against']}: {result['n']} judged; "
        f"wins {result['wins']}, losses {result['losses']}, ties {result['ties']}"
        + (
            f"; win-rate {result['win_rate']:.3f} [{result['low']:.3f}, {result['high']:.3f}]"
            if result["n"]
            else ""
        )
    )


def cmd_serve(args: argparse.Namespace) -> None:
    ws = _ws(args)
    script = Path(__file__).resolve().parent / "streamlit_app.py"
    env = {**os.environ, "PREFLOOP_WORKSPACE": str(ws.root)}
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(script),
        "--server.port",
        str(args.port),
        "--server.address",
        args.address,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]
    print(f"serving {ws.root} at http://{args.address}:{args.port}", flush=True)
    raise SystemExit(subprocess.call(cmd, env=env))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--workspace",
        "-w",
        metavar="DIR",
        help="workspace folder (default: $PREFLOOP_WORKSPACE or the current folder)",
    )
    parser = argparse.ArgumentParser(
        prog="prefloop",
        description="Human-in-the-loop preference labeling and LoRA DPO tuning.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, func, help_, parent=sub):
        p = parent.add_parser(name, parents=[common], help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "create a workspace (database + artifacts folders)")
    p.add_argument(
        "--model", help="base model: Hugging Face id or local path (default: SmolLM2-135M-Instruct)"
    )

    p = add("demo", cmd_demo, "create a demo workspace with built-in prompts and sample round 1")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=96)

    add("status", cmd_status, "show the workspace's base model and row counts")

    prompts = sub.add_parser("prompts", help="manage prompts").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = add("import", cmd_prompts_import, "import prompts from JSONL, CSV or Parquet", prompts)
    p.add_argument("file")
    p.add_argument("--split", default="train", choices=["train", "heldout"])

    p = add("sample", cmd_sample, "sample a new round: K candidates per prompt")
    p.add_argument(
        "--model",
        metavar="VERSION",
        help="model version to sample from ('base' = the base model; default: newest)",
    )
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--k", type=int, default=4, help="candidates per prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="sample only the first N prompts of the split")
    p.add_argument("--prompts-per-batch", type=int, default=8)
    p.add_argument(
        "--mode",
        default="rank",
        choices=["rank", "thumbs"],
        help="what annotators do: rank the K candidates, or thumb each up/down",
    )
    p.add_argument(
        "--overlap", type=int, default=1, help="annotators wanted per group (e.g. 3 for agreement)"
    )
    p.add_argument("--guidelines", metavar="FILE.md", help="Markdown guidelines for annotators")
    p.add_argument("--json", action="store_true", help="print a JSON summary of the round")

    groups = sub.add_parser("groups", help="export or import groups").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = add("export", cmd_groups_export, "write a round's groups as JSONL for ranking", groups)
    p.add_argument("--round", type=int, help="round id (default: newest)")
    p.add_argument("--pending", action="store_true", help="only groups nobody has labelled")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    p = add("import", cmd_groups_import, "import ranked lists (prompt, completions, ranks)", groups)
    p.add_argument("file")
    p.add_argument("--split", default="train", choices=["train", "heldout"])

    labels = sub.add_parser("labels", help="import labels").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = add("import", cmd_labels_import, "import rankings from JSONL (all rows or none)", labels)
    p.add_argument("file")

    pairs = sub.add_parser("pairs", help="import preference pairs").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = add(
        "import",
        cmd_pairs_import,
        "import TRL-format pairs or Anthropic HH-RLHF files as groups of two",
        pairs,
    )
    p.add_argument("file")
    p.add_argument("--split", default="train", choices=["train", "heldout"])

    p = add("tune", cmd_tune, "train a LoRA adapter on the labelled groups (DPO or GRPO)")
    p.add_argument("--method", default="dpo", choices=["dpo", "grpo"])
    p.add_argument(
        "--beta",
        type=float,
        help="DPO: β of the implicit reward (default 0.1); GRPO: KL weight (0.04)",
    )
    dpo = p.add_argument_group("DPO family")
    dpo.add_argument("--loss", default="sigmoid", choices=["sigmoid", "ipo", "hinge", "robust"])
    dpo.add_argument(
        "--label-smoothing",
        type=float,
        default=0.0,
        help="ε of conservative (sigmoid) or robust DPO",
    )
    dpo.add_argument(
        "--sft-weight",
        type=float,
        default=0.0,
        help="α: add α × the top-ranked candidate's NLL per token",
    )
    dpo.add_argument(
        "--listwise",
        action="store_true",
        help="Plackett–Luce over the whole ranking instead of all pairs",
    )
    dpo.add_argument(
        "--soft-labels",
        default="empirical",
        choices=["empirical", "bt", "hard"],
        help="pair targets: empirical (share of annotators preferring; the default), bt "
        "(fitted Bradley–Terry probabilities) or hard (consensus pairs, target 1)",
    )
    dpo.add_argument(
        "--hard-labels",
        dest="soft_labels",
        action="store_const",
        const="hard",
        default="empirical",
        help="same as --soft-labels hard",
    )
    dpo.add_argument(
        "--early-stop",
        type=int,
        default=0,
        metavar="PATIENCE",
        help="stop after PATIENCE epochs without better held-out preference "
        "accuracy and keep the best epoch (needs labelled held-out groups)",
    )
    grpo = p.add_argument_group("GRPO")
    grpo.add_argument(
        "--gains", default="linear", help="rank → gain: linear, dcg, or values such as 1,0.6,0.3,0"
    )
    grpo.add_argument("--scale-rewards", default="group", choices=["group", "batch", "none"])
    grpo.add_argument("--epsilon", type=float, default=0.2)
    grpo.add_argument("--epsilon-high", type=float)
    grpo.add_argument(
        "--target-kl", type=float, help="adapt β to hold this KL per token (e.g. 0.05–0.2 nats)"
    )
    grpo.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo"])
    grpo.add_argument("--ppo-epochs", type=int, default=1, help="passes over each batch")
    grpo.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus weight")
    grpo.add_argument(
        "--gain-source",
        default="mean",
        choices=["mean", "bt"],
        help="per-candidate gains: mean of the annotators' --gains schedule, or bt "
        "(mean Bradley–Terry probability of beating the group's other candidates)",
    )
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--groups-per-step", type=int, default=4)
    p.add_argument("--from", metavar="VERSION", help="continue training this version's adapter")
    p.add_argument(
        "--dataset",
        metavar="VERSION",
        help="train on this dataset version (default: freeze the current labels)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    ds = sub.add_parser("dataset", help="dataset versions").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = add("freeze", cmd_dataset_freeze, "freeze labelled groups into a dataset version", ds)
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    p.add_argument("--rounds", help="comma-separated round ids (default: all)")
    p.add_argument(
        "--annotators",
        metavar="A,B",
        help="only these annotators' labels (default: all but the judge)",
    )
    p.add_argument("--exclude-annotators", metavar="A,B", help="leave these annotators out")
    p.add_argument(
        "--exclude-flagged",
        action="store_true",
        help="leave out annotators the agreement report flags (low agreement or gold accuracy)",
    )
    p.add_argument(
        "--min-agreement",
        type=float,
        metavar="X",
        help="leave out groups whose annotators agree on less than X of the candidate pairs "
        "(groups with one annotator pass)",
    )
    p.add_argument(
        "--keep-all-bad",
        action="store_true",
        help="keep groups an annotator flagged all_bad (default: leave them out)",
    )
    p.add_argument("--dedupe", action="store_true", help="one group per prompt (most labels)")
    p.add_argument(
        "--max-length-ratio",
        type=float,
        metavar="R",
        help="leave out groups teaching a pair whose chosen/rejected character-length ratio "
        "is outside [1/R, R]",
    )
    p.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="put this share of the prompts (by a hash of the prompt) into a separate "
        "held-out dataset version",
    )
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out split")
    p.add_argument("--json", action="store_true", help="print the versions and statistics")
    p = add("show", cmd_dataset_show, "show a dataset version's card (filters, statistics)", ds)
    p.add_argument("version", nargs="?", metavar="VERSION", help="default: the newest")
    p.add_argument("--json", action="store_true")
    p = add("list", cmd_list("datasets"), "list dataset versions", ds)
    p.add_argument("--json", action="store_true")

    for name, what in (("models", "models"), ("rounds", "rounds"), ("runs", "runs")):
        grp = sub.add_parser(name, help=f"list {what}").add_subparsers(
            dest="sub", required=True, metavar="SUBCOMMAND"
        )
        p = add("list", cmd_list(what), f"list {what}", grp)
        p.add_argument("--json", action="store_true")

    p = add("export", cmd_export, "export a dataset version for TRL / datasets")
    p.add_argument(
        "--format",
        required=True,
        choices=["pairs", "listwise", "kto"],
        help="pairs: TRL prompt/chosen/rejected; listwise: ranked lists; kto: TRL unpaired "
        "prompt/completion/label from thumbs",
    )
    p.add_argument("--dataset", metavar="VERSION", help="dataset version (default: newest)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl|FILE.parquet")

    p = add("eval", cmd_eval, "evaluate a model version: win-rate, drift, preference accuracy")
    p.add_argument("--model", metavar="VERSION", help="version to evaluate (default: newest)")
    p.add_argument(
        "--against",
        default="base",
        metavar="VERSION",
        help="version to compare with (default: base = π_ref)",
    )
    p.add_argument(
        "--judge",
        default="llm",
        help="llm (a local model with a rubric, both orders), human (an A/B round in "
        "the annotator queue) or module:function (a programmatic judge)",
    )
    p.add_argument("--judge-model", help="the LLM judge's model (default: the default model)")
    p.add_argument("--rubric", help="the LLM judge's rubric (system prompt)")
    p.add_argument("--split", default="heldout", choices=["train", "heldout"])
    p.add_argument("--limit", type=int, help="evaluate on the first N prompts of the split")
    p.add_argument("--k", type=int, default=2, help="samples per prompt and version")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1234, help="the same seed samples both versions")
    p.add_argument("--beta", type=float, help="implicit-reward β (default: the version's)")
    p.add_argument("--json", action="store_true")

    ev = sub.add_parser("evals", help="evaluation results").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = add("list", cmd_evals_list, "list stored evaluations", ev)
    p.add_argument("--kind", choices=["winrate", "drift", "preference"])
    p.add_argument("--json", action="store_true")
    p = add("human", cmd_evals_human, "win-rate of a human A/B evaluation round so far", ev)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--json", action="store_true")

    p = add("serve", cmd_serve, "serve the web app (annotator and researcher pages)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="localhost")

    from app import cli_judge, cli_queue, cli_team

    for module in (cli_team, cli_queue, cli_judge):
        module.register(sub, add)
    return parser


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one subcommand; user errors print without a traceback."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    if threading.current_thread() is threading.main_thread():
        # a terminated job unwinds like Ctrl-C, so it is marked failed and leaves nothing half-made
        signal.signal(signal.SIGTERM, _terminated)
    try:
        args.func(args)
    except PrefloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
