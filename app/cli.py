"""The `prefloop` command line: a thin layer over store, labeling and tuning."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from app import json_out
from store import owner as db_owner
from store.access import NAME_RULE
from store.errors import PrefloopError, storage_error

if TYPE_CHECKING:
    from tuning.config import TrainSettings

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
        print(json_out.dumps(df, separators=(",", ":")))  # compact, as before
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
    from store import db, integrity, models

    ws = _ws(args)
    problems = integrity.quick_check(ws)  # before opening it read-write
    if problems:
        print(f"workspace {ws.root}")
        for problem in problems:
            print(f"PROBLEM with {ws.db_path}: {problem}")
        print(
            "run `prefloop check` for a full scan of every table, and "
            f"{integrity.RESTORE} if it finds damage"
        )
        raise SystemExit(1)
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
    from app.config_options import config_from_args
    from tuning.config import SamplingConfig
    from tuning.jobs import sample_job

    cfg = config_from_args(SamplingConfig, args)
    ws = _ws(args)
    options = {"mode": args.mode, "overlap": args.overlap}
    if args.guidelines:
        options["guidelines"] = _read_text(args.guidelines)
    round_id = sample_job(ws, cfg, args.model, show_progress=not args.json, options=options)
    if args.json:
        from store import db, rounds

        with db.connect(ws, read_only=False) as con:
            info = rounds.get_round(con, round_id)
        print(json_out.dumps(info))
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
    print(
        f"imported {report.stored} ranked groups as round {round_id}; "
        f"skipped {report.duplicates} duplicate rows"
    )


def cmd_pairs_import(args: argparse.Namespace) -> None:
    from labeling.ingest import import_pairs

    round_id, report = import_pairs(_ws(args), Path(args.file), args.split)
    print(f"imported {report.stored} pairs as groups of two in round {round_id}")
    if report.duplicates:
        print(f"  skipped {report.duplicates} duplicate rows")
    for reason, n in sorted(report.skipped.items()):
        print(f"  skipped {n} rows: {reason}")


def cmd_labels_import(args: argparse.Namespace) -> None:
    from labeling.ingest import import_labels_noting

    n, notes = import_labels_noting(_ws(args), Path(args.file))
    print(f"imported {n} labels")
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)


# keys of a `tune --config` file that are not settings: what to train from and on, and what a
# model version stores next to its settings (ignored, so a stored config re-runs as it is)
RUN_KEYS = ("method", "from", "dataset")
RECORD_KEYS = ("final_metrics", "gate", "training")  # stored with a version, not settings


def tune_config(
    args: argparse.Namespace,
) -> tuple[str, TrainSettings, str | None, str | None]:
    """The (method, config, --from version, dataset version) a `tune` command line asks for."""
    from app.config_options import config_from_args, flags, options_given, read_config_file
    from tuning.config import METHOD_CONFIGS

    path = args.config
    stored = read_config_file(path) if path else {}
    where = f"config file {path}: " if path else ""
    for key in RUN_KEYS:
        if not isinstance(stored.get(key), (str, type(None))):
            raise PrefloopError(f"{where}{key!r} must be a string or null; got {stored[key]!r}")
    method = args.method or stored.get("method") or "dpo"
    if method not in METHOD_CONFIGS:
        raise PrefloopError(
            f"{where}unknown tuning method {method!r}; use one of {', '.join(METHOD_CONFIGS)}"
        )
    cls = METHOD_CONFIGS[method]
    own = {opt.flag for opt in options_given(args, cls)}
    foreign = {  # by flag: methods other than this one may share an option
        opt.flag: opt
        for other in METHOD_CONFIGS.values()
        if other is not cls
        for opt in options_given(args, other)
        if opt.flag not in own
    }.values()
    if foreign:
        raise PrefloopError(
            f"{flags(foreign)} {'is not a setting' if len(foreign) == 1 else 'are not settings'} "
            f"of --method {method}; see `prefloop tune --help` for each method's settings"
        )
    base = {k: v for k, v in stored.items() if k not in RUN_KEYS + RECORD_KEYS}
    try:
        cfg = config_from_args(cls, args, base)
    except PrefloopError as exc:
        where = f"config file {path} (--method {method})" if path else f"--method {method}"
        raise PrefloopError(
            f"{where}: {exc}; fix it, or see `prefloop tune --help` for the settings"
        ) from None
    from_version = getattr(args, "from") or stored.get("from")
    dataset = args.dataset or stored.get("dataset")
    return method, cfg, (None if from_version == "base" else from_version), dataset


def cmd_tune(args: argparse.Namespace) -> None:
    from tuning.jobs import resume_job, tune_job

    if args.resume is not None:
        _check_resume_alone(args)
        print(resume_job(_ws(args), args.resume, show_progress=not args.quiet))
        return
    method, cfg, from_version, dataset_id = tune_config(args)
    version = tune_job(
        _ws(args),
        cfg,
        method=method,
        from_version=from_version,
        dataset_id=dataset_id,
        show_progress=not args.quiet,
    )
    if version:  # only the main process of a multi-process run reports
        print(version)


def _check_resume_alone(args: argparse.Namespace) -> None:
    """--resume takes everything from the run: refuse other settings, saying so."""
    from app.config_options import flags, options_given
    from tuning.config import METHOD_CONFIGS

    given = {opt.flag: opt for cls in METHOD_CONFIGS.values() for opt in options_given(args, cls)}
    named = [f"--{n}" for n in ("method", "config", "from", "dataset") if getattr(args, n)]
    if given or named:
        shown = ", ".join(named + ([flags(given.values())] if given else []))
        raise PrefloopError(
            f"--resume continues run {args.resume} with its stored settings; drop {shown} (to "
            "train with other settings, start a new run)"
        )


def cmd_runs_audit(args: argparse.Namespace) -> None:
    from labeling.reward_audit import agreement_curve, curve_summary

    curve = agreement_curve(_ws(args), args.run)
    if args.json:
        print(json_out.dumps({"run": args.run, "steps": curve}))
        return
    _print_table(curve, False)
    print(curve_summary(curve, args.run), file=sys.stderr)


def cmd_models_config(args: argparse.Namespace) -> None:
    from store import db, models
    from tuning.config import METHOD_CONFIGS

    with db.connect(_ws(args)) as con:
        row = models.get_version(con, args.version)
    if row is None:
        raise PrefloopError(
            "the base model was not tuned, so it has no config; give a version such as v1 "
            "(see `prefloop models list`)"
        )
    stored = dict(row["config"])
    method = stored.get("method") or row["method"]
    if method not in METHOD_CONFIGS:
        raise PrefloopError(f"version {args.version} was trained by {method!r}, not tune")
    requested = (stored.get("training") or {}).get("beta_requested")
    if requested is not None:  # the β asked for; the run adapts it from the parent again
        stored["beta"] = requested
    cfg = METHOD_CONFIGS[method].from_dict(stored)
    out = {
        "method": method,
        "from": stored.get("from", row["parent"]),
        "dataset": stored.get("dataset", row["dataset_id"]),
        **cfg.to_dict(),
    }
    print(json_out.dumps(out, indent=2))


def cmd_models_promote(args: argparse.Namespace) -> None:
    from store import db, models

    with db.connect(_ws(args)) as con:
        gate = models.promote(con, args.version, force=args.force)
    forced = " despite its failed gate (forced)" if gate.get("forced") else ""
    print(f"{args.version} is promoted{forced}: `prefloop sample` draws new rounds from it")


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
        downweight_biased=args.downweight_biased,
    )
    result = freeze_versions(_ws(args), cur)
    if args.json:
        print(json_out.dumps({"train": result.train, "heldout": result.heldout, **result.stats}))
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
    print(json_out.dumps(info) if args.json else dataset_card(info))


def cmd_list(what: str):
    def run(args: argparse.Namespace) -> None:
        from store import datasets, db, models, rounds, runs
        from tuning.jobs import gate_text

        ws = _ws(args)
        with db.connect(ws) as con:
            if what == "models":
                df = models.list_versions(con)
                df.insert(3, "base_path", [_local_path(b) for b in df["base_model"]])
                if not args.json:  # the table: the gate's verdict in words, not its record
                    df["gate"] = df["gate"].map(gate_text)
                    df = df.drop(columns=["config"])
            elif what == "rounds":
                df = rounds.list_rounds(con)
            elif what == "datasets":
                df = datasets.list_datasets(con)
            else:
                runs.record_dead(con)
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
                        "promoted": True,
                        "kind": "policy",
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
    from labeling.exporting import export_dataset, freeze_current

    ws, dataset = _ws(args), args.dataset
    if dataset is None:
        dataset, new = freeze_current(ws)
        print(
            f"froze the current labels as dataset version {dataset}"
            if new
            else f"the current labels are dataset version {dataset} (unchanged, reused)"
        )
    path, n = export_dataset(ws, args.format, Path(args.out), dataset)
    print(f"wrote {n} rows to {path} (card: {path.parent / 'README.md'})")


def cmd_eval(args: argparse.Namespace) -> None:
    from tuning.evaluation import EvalConfig, breaking_reason
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
        dtype=args.dtype,
    )
    ws = _ws(args)
    if args.model is None:
        from store import db, models

        with db.connect(ws) as con:
            args.model = models.latest_version(con)
    result = eval_job(ws, args.model, cfg)
    if args.json:
        print(json_out.dumps(result))
        return
    print(f"{result['version']} vs {result['against']} (rounds {result['rounds']})")
    if "winrate" in result:
        w = result["winrate"]
        print(
            f"win-rate {w['win_rate']:.3f} [{w['low']:.3f}, {w['high']:.3f}] "
            f"(wins {w['wins']}, losses {w['losses']}, ties {w['ties']}; judge {args.judge})"
        )
        if "guarded_win_rate" in w:
            print(
                f"guarded win-rate {w['guarded_win_rate']:.3f} "
                f"[{w['guarded_low']:.3f}, {w['guarded_high']:.3f}] (wins "
                f"{w['guarded_wins']}, losses {w['guarded_losses']}, ties {w['guarded_ties']}; "
                "broken answers never win)"
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
    print(
        f"NLL/token under π_ref {d['nll_per_token']:.3f} vs {d['nll_per_token_against']:.3f} "
        f"({result['against']}); fluency drift {d['fluency_drift']:+.3f}; broken share "
        f"{d['broken_share']:.0%} vs {d['broken_share_against']:.0%}"
    )
    reason = breaking_reason(d)
    if reason:
        print(f"WON BY BREAKING THE MODEL: {reason}")
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
        json_out.dumps(result)
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
    # the web app's process owns the database while it runs; other processes go through it
    env = {**os.environ, "PREFLOOP_WORKSPACE": str(ws.root), db_owner.SERVE_ENV: "1"}
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
    from app.config_options import add_config_options, add_dtype_option, add_method_options
    from tuning.config import METHOD_CONFIGS, SamplingConfig

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

    add(
        "status",
        cmd_status,
        "show the workspace's base model and row counts after a quick integrity check "
        "(exits 1 and says to run `prefloop check` when the file looks damaged)",
    )

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
    add_config_options(p.add_argument_group("sampling settings"), SamplingConfig)
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
    p = add(
        "import",
        cmd_groups_import,
        "import ranked lists (prompt, completions, ranks); repeated rows are skipped",
        groups,
    )
    p.add_argument("file")
    p.add_argument("--split", default="train", choices=["train", "heldout"])

    labels = sub.add_parser("labels", help="import labels").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = add("import", cmd_labels_import, "import rankings from JSONL (all rows or none)", labels)
    p.add_argument(
        "file", help=f"rows of group_id, annotator, ranking, ...; annotator names: {NAME_RULE}"
    )

    pairs = sub.add_parser("pairs", help="import preference pairs").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = add(
        "import",
        cmd_pairs_import,
        "import TRL-format pairs or Anthropic HH-RLHF files as groups of two; repeated rows "
        "and rows without a prompt and two answers are skipped and counted",
        pairs,
    )
    p.add_argument("file")
    p.add_argument("--split", default="train", choices=["train", "heldout"])

    p = add(
        "tune",
        cmd_tune,
        "train a LoRA adapter on the labelled groups (DPO or GRPO), a reward model (rm: an "
        "adapter plus a scalar head, a judge as rm:VERSION), or a policy online on fresh samples "
        "of the prompts scored by --reward (--method grpo --online, --method rloo, --method "
        "ppo: a critic adapter, GAE and a per-token KL penalty, adaptive with --target-kl); every "
        "setting's default comes from the method's config dataclass (tuning/config.py)",
    )
    p.add_argument(
        "--method",
        choices=list(METHOD_CONFIGS),
        help="tuning method (default: the --config file's, else dpo)",
    )
    p.add_argument(
        "--config",
        metavar="FILE.json",
        help="a JSON object of settings, flat or as `prefloop models config VERSION` prints it; "
        "its method, from and dataset are used unless given as options; options override it",
    )
    p.add_argument(
        "--from",
        metavar="VERSION",
        help="continue training this version's adapter (a policy; with --method rm a reward model)",
    )
    p.add_argument(
        "--dataset",
        metavar="VERSION",
        help="train on this dataset version (default: freeze the current labels)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume",
        type=int,
        metavar="RUN",
        help="continue an online run that crashed or was killed from its last checkpoint, "
        "with the run's stored settings (give no other settings)",
    )
    method_groups = add_method_options(p, METHOD_CONFIGS)
    method_groups["dpo"].add_argument(
        "--hard-labels",
        dest="soft_labels",
        action="store_const",
        const="hard",
        default=argparse.SUPPRESS,
        help="same as --soft-labels hard",
    )

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
        "--downweight-biased",
        type=float,
        metavar="W",
        help="count annotators that the bias audit (`prefloop agreement`) flags for position "
        "or length bias with weight W in each group's consensus (0 = leave them out, e.g. "
        "0.5); recorded in the version's card",
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
        what_help = f"list {what}"
        if name == "runs":
            what_help += " (jobs); a running job whose process is gone is recorded as failed"
        p = add("list", cmd_list(what), what_help, grp)
        p.add_argument("--json", action="store_true")
        if name == "runs":
            p = add(
                "audit",
                cmd_runs_audit,
                "an online run's reward–human agreement per training step: of the pairs the "
                "annotators ordered in its audit round (--audit N), the share its reward "
                "orders the same way (ties half), with Wilson confidence intervals",
                grp,
            )
            p.add_argument("run", type=int, metavar="RUN")
            p.add_argument("--json", action="store_true")
        if name == "models":
            p = add(
                "config",
                cmd_models_config,
                "print a model version's tuning settings as JSON, the form `prefloop tune "
                "--config FILE` takes (re-runs the version as it was)",
                grp,
            )
            p.add_argument("version", metavar="VERSION")
            p = add(
                "promote",
                cmd_models_promote,
                "make a version the one `prefloop sample` draws new rounds from (a version "
                "that failed its promotion gate needs --force)",
                grp,
            )
            p.add_argument("version", metavar="VERSION")
            p.add_argument(
                "--force", action="store_true", help="promote even though its gate failed"
            )

    p = add("export", cmd_export, "export a dataset version for TRL / datasets")
    p.add_argument(
        "--format",
        required=True,
        choices=["pairs", "listwise", "kto"],
        help="pairs: TRL prompt/chosen/rejected; listwise: ranked lists; kto: TRL unpaired "
        "prompt/completion/label from thumbs",
    )
    p.add_argument(
        "--dataset",
        metavar="VERSION",
        help="export this dataset version, e.g. a curated one (default: freeze the current "
        "labels first, as `tune` does: all annotators but the judge, no filters; an unchanged "
        "version is reused)",
    )
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
        "the annotator queue), rm:VERSION (a reward model: the higher reward wins), a "
        "registered judge's NAME (`prefloop judges list`) or module:function (a "
        "programmatic judge, installed or on PYTHONPATH)",
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
    add_dtype_option(
        p,
        "; auto samples the answers as `sample` does (bfloat16 on a CPU with native bf16 units) "
        "and scores them in float32 on a CPU",
    )
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

    p = add(
        "serve",
        cmd_serve,
        "serve the web app (annotator and researcher pages); while it runs it owns the "
        "workspace database and other prefloop commands go through it",
    )
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="localhost")

    from app import cli_judge, cli_maintenance, cli_queue, cli_team

    for module in (cli_team, cli_queue, cli_judge, cli_maintenance):
        module.register(sub, add)
    return parser


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run one subcommand; user errors print without a traceback."""
    try:
        return _run(argv)
    except BrokenPipeError:
        # the reader left (`prefloop … | head`): stop quietly, as a process killed by SIGPIPE
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the flush at exit fails no more
        except (OSError, ValueError):
            pass  # stdout is not a file (in-process tests)
        return 141


def _run(argv: list[str] | None) -> int:
    """Parse the command line and run its subcommand; return the exit status."""
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    if threading.current_thread() is threading.main_thread():
        # a terminated job unwinds like Ctrl-C, so it is marked failed and leaves nothing half-made
        signal.signal(signal.SIGTERM, _terminated)
    try:
        args.func(args)
        sys.stdout.flush()
    except PrefloopError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        error = storage_error(exc, _db_path(args))  # a full disk or a damaged database file
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def _db_path(args: argparse.Namespace) -> Path | None:
    """The workspace database a command names, for messages; None when there is none."""
    from store.db import workspace

    try:
        return workspace(getattr(args, "workspace", None), must_exist=False).db_path
    except Exception:  # only for a message: never hide the error being reported
        return None


if __name__ == "__main__":
    raise SystemExit(main())
