"""`prefloop judge ROUND`: a judge pre-ranks a round's groups as suggestions for annotators."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from store.errors import PrefloopError

SHOW = {"on": True, "off": False}


def _load(args: argparse.Namespace, ws):
    """The judge and the name its suggestions are stored under."""
    from labeling.suggest import load_suggestion_judge

    if args.judge == "llm":
        from tuning.evaluation import EvalConfig, load_judge
        from tuning.modeling import limit_threads
        from tuning.models_cache import DEFAULT_MODEL

        limit_threads()  # leave a core for the web server while the judge reads every pair
        cfg = EvalConfig(judge="llm", judge_model=args.judge_model, rubric=args.rubric)
        return load_judge(ws, cfg), f"llm:{args.judge_model or DEFAULT_MODEL}"
    if args.judge_model or args.rubric:
        raise PrefloopError("--judge-model and --rubric apply to --judge llm only")
    return load_suggestion_judge(args.judge), args.judge


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
        print(json.dumps(asdict(report)))
        return
    what = (
        f"{report.thumbs_up} thumbs up, {report.thumbs_down} down"
        if report.mode == "thumbs"
        else "rankings"
    )
    print(f"judge {name}: {report.suggested} suggestions ({what}) for round {args.round}")
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


def register(sub, add) -> None:
    """Add `prefloop judge` and `prefloop suggestions list` to the parser."""
    p = add(
        "judge",
        cmd_judge,
        "pre-rank a round with a judge: suggestions for annotators, optionally its own labels",
    )
    p.add_argument("round", type=int, metavar="ROUND", help="round id")
    p.add_argument(
        "--judge",
        required=True,
        metavar="module:function|llm",
        help="a scorer f(prompt, completion) -> float, a pairwise judge f(prompt, a, b) -> "
        "'a'|'b'|'tie', or llm (a local model comparing every pair in both orders)",
    )
    p.add_argument("--judge-model", help="the LLM judge's model (default: the default model)")
    p.add_argument("--rubric", help="the LLM judge's rubric (system prompt)")
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
