"""`prefloop judge ROUND`: a judge pre-ranks a round's groups as suggestions for annotators;
`prefloop judges`: the registry of programmatic judges the web app may run."""

from __future__ import annotations

import argparse

from app import json_out
from app.config_options import add_dtype_option
from store.errors import PrefloopError

SHOW = {"on": True, "off": False}


def _load(args: argparse.Namespace, ws):
    """The judge and the name its suggestions are stored under."""
    from labeling.judges import resolve_judge
    from labeling.suggest import load_suggestion_judge

    if args.judge == "llm":
        from tuning.evaluation import EvalConfig, load_judge
        from tuning.modeling import limit_threads
        from tuning.models_cache import DEFAULT_MODEL

        limit_threads(ws)  # a core is left for the web server while it serves ws
        cfg = EvalConfig(
            judge="llm", judge_model=args.judge_model, rubric=args.rubric, dtype=args.dtype
        )
        return load_judge(ws, cfg), f"llm:{args.judge_model or DEFAULT_MODEL}"
    if args.judge_model or args.rubric:
        raise PrefloopError("--judge-model and --rubric apply to --judge llm only")
    if args.judge.startswith("rm:"):
        from tuning.modeling import limit_threads
        from tuning.reward_model import reward_judge

        limit_threads(ws)
        return reward_judge(ws, args.judge, args.dtype), args.judge
    return load_suggestion_judge(resolve_judge(ws, args.judge)), args.judge


def cmd_judge(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from labeling.suggest import suggest_round
    from store import db, rounds

    ws = _ws(args)
    with db.connect(ws) as con:
        rounds.get_round(con, args.round)  # an unknown round fails before a model loads
    judge, name = _load(args, ws)
    report = suggest_round(
        ws,
        args.round,
        judge,
        name,
        as_annotator=args.as_annotator,
        thumbs_threshold=args.thumbs_threshold,
        show=SHOW[args.show] if args.show else None,
    )
    if args.json:
        print(json_out.dumps(report))
        return
    what = (
        f"{report.thumbs_up} thumbs up, {report.thumbs_down} down"
        if report.mode == "thumbs"
        else "rankings"
    )
    print(f"judge {name}: {report.suggested} suggestions ({what}) for round {args.round}")
    if report.scores and getattr(judge, "score_many", None):
        values = [v for group in report.scores.values() for v in group.values()]
        print(
            f"scored {len(values)} candidates: mean {sum(values) / len(values):.3f}, "
            f"min {min(values):.3f}, max {max(values):.3f} (--json lists each)"
        )
    if args.as_annotator:
        print(
            f"stored {report.labelled} labels as annotator 'judge' "
            f"({report.already_labelled} groups were labelled by the judge before)"
        )
    print(f"annotators {'see' if report.show_suggestions else 'do not see'} the suggestions")


def cmd_judge_show(args: argparse.Namespace) -> None:
    from app.cli import _print_table, _ws
    from store import db, suggestions

    with db.connect(_ws(args)) as con:
        df = suggestions.suggestions(con, args.round)
    _print_table(df, args.json)


def cmd_judges_add(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from app.cli_queue import _whoami
    from labeling.judges import register_judge

    kind = register_judge(_ws(args), args.name, args.spec, args.author or _whoami())
    print(f"registered judge {args.name} = {args.spec} ({kind}); the web app may run it now")


def cmd_judges_list(args: argparse.Namespace) -> None:
    from app.cli import _print_table, _ws
    from store import db, judges

    with db.connect(_ws(args)) as con:
        _print_table(judges.list_judges(con), args.json)


def cmd_judges_remove(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from store import db, judges

    with db.connect(_ws(args)) as con:
        judges.remove_judge(con, args.name)
    print(f"removed judge {args.name}; what it stored stays")


JUDGE_HELP = (
    "a registered judge's NAME (`prefloop judges list`), llm (a local model comparing every "
    "pair in both orders), rm:VERSION (a reward model scoring every candidate), or "
    "module:function: a scorer f(prompt, completion) -> float or a "
    "pairwise judge f(prompt, a, b) -> 'a'|'b'|'tie', imported as installed or from "
    "PYTHONPATH (never from the current directory)"
)


def _register_judges(sub, add) -> None:
    grp = sub.add_parser(
        "judges",
        help="the programmatic judges the web app may run (registered by the operator)",
    ).add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = add(
        "add",
        cmd_judges_add,
        "register module:function under NAME, after checking that it imports and takes "
        "(prompt, completion) or (prompt, a, b); the module must be installed or on PYTHONPATH",
        grp,
    )
    p.add_argument(
        "name",
        metavar="NAME",
        help="lower-case letters, digits, _ or - (at most 32); not llm, human or rm:…",
    )
    p.add_argument("spec", metavar="module:function", help="the judge function")
    p.add_argument("--author", help="who registered it (default: your login name)")
    p = add("list", cmd_judges_list, "list registered judges", grp)
    p.add_argument("--json", action="store_true")
    p = add("remove", cmd_judges_remove, "unregister a judge (its stored results stay)", grp)
    p.add_argument("name", metavar="NAME")


def register(sub, add) -> None:
    """Add `prefloop judge`, `prefloop judges` and `prefloop suggestions list` to the parser."""
    p = add(
        "judge",
        cmd_judge,
        "pre-rank a round with a judge: suggestions for annotators, optionally its own labels",
    )
    p.add_argument("round", type=int, metavar="ROUND", help="round id")
    p.add_argument(
        "--judge",
        required=True,
        metavar="NAME|llm|rm:VERSION|module:function",
        help=JUDGE_HELP,
    )
    p.add_argument("--judge-model", help="the LLM judge's model (default: the default model)")
    p.add_argument("--rubric", help="the LLM judge's rubric (system prompt)")
    add_dtype_option(p)
    p.add_argument(
        "--as-annotator",
        action="store_true",
        help="also store the verdicts as labels of annotator 'judge' (for judge-human "
        "agreement; datasets leave them out unless --annotators names 'judge')",
    )
    p.add_argument(
        "--show",
        choices=sorted(SHOW),
        help="show the suggestions to the round's annotators (on) or hide them (off)",
    )
    p.add_argument(
        "--thumbs-threshold",
        type=float,
        metavar="SCORE",
        help="thumbs rounds, scorers only: up when the score is at least SCORE "
        "(default: up when above the group's median)",
    )
    p.add_argument("--json", action="store_true", help="print a JSON summary")

    grp = sub.add_parser("suggestions", help="judge suggestions").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    p = add("list", cmd_judge_show, "list a round's judge suggestions", grp)
    p.add_argument("--round", type=int, required=True)
    p.add_argument("--json", action="store_true")
    _register_judges(sub, add)
