"""`prefloop rounds set`, `prefloop gold …` and `prefloop labels history`: the assignment queue's
settings, gold groups and label revisions."""

from __future__ import annotations

import argparse
import getpass
from pathlib import Path

from store.errors import PrefloopError


def cmd_rounds_set(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from store import db, rounds

    guidelines = None
    if args.guidelines is not None:
        path = Path(args.guidelines)
        if not path.is_file():
            raise PrefloopError(f"no guidelines file at {path}")
        guidelines = path.read_text(encoding="utf-8")
    options = {
        "overlap": args.overlap,
        "mode": args.mode,
        "show_suggestions": None if args.suggestions is None else args.suggestions == "on",
        "guidelines": guidelines,
    }
    if all(v is None for v in options.values()):
        raise PrefloopError(
            "nothing to change: give --overlap, --mode, --suggestions or --guidelines"
        )
    with db.connect(_ws(args)) as con:
        current = rounds.set_round_options(con, args.round, **options)
    words = "none" if current.guidelines is None else f"{len(current.guidelines)} characters"
    print(
        f"round {current.round_id}: mode {current.mode}, overlap {current.overlap}, "
        f"suggestions {'on' if current.show_suggestions else 'off'}, guidelines {words}"
    )


def cmd_gold_set(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from labeling.queue import format_ranking, parse_ranking
    from store import db, gold

    ranking = parse_ranking(args.ranking)
    with db.connect(_ws(args)) as con:
        gold.set_gold(con, args.group, ranking, args.author or _whoami())
    print(f"group {args.group} is gold: {format_ranking(ranking)}")


def cmd_gold_list(args: argparse.Namespace) -> None:
    from app.cli import _print_table, _ws
    from labeling.queue import format_ranking
    from store import db, gold

    with db.connect(_ws(args), read_only=True) as con:
        df = gold.list_gold(con, None if args.round is None else [args.round])
    if not args.json:
        df["ranking"] = df["ranking"].map(format_ranking)
    _print_table(df, args.json)


def cmd_gold_remove(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from store import db, gold

    with db.connect(_ws(args)) as con:
        gold.remove_gold(con, args.group)
    print(f"group {args.group} is no longer gold (its labels stay)")


def cmd_gold_accuracy(args: argparse.Namespace) -> None:
    from app.cli import _print_table, _ws
    from labeling.queue import gold_accuracy

    _print_table(gold_accuracy(_ws(args), None if args.round is None else [args.round]), args.json)


def cmd_labels_history(args: argparse.Namespace) -> None:
    from app.cli import _print_table, _ws
    from labeling.queue import format_ranking
    from store import db, labels

    with db.connect(_ws(args), read_only=True) as con:
        df = labels.label_history(con, args.group, args.annotator)
    if not args.json:
        df["ranking"] = df["ranking"].map(lambda r: "-" if r is None else format_ranking(r))
        df["flags"] = df["flags"].map(lambda f: ",".join(f) or "-")
    _print_table(df, args.json)


def _whoami() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in this environment
        return None


def _subcommands(sub, name: str):
    """The subcommand group of an existing `prefloop NAME …` command (e.g. rounds, labels)."""
    parser = sub.choices[name]
    for action in parser._actions:  # argparse keeps no public handle on a parser's subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise RuntimeError(f"`prefloop {name}` has no subcommands")  # a bug, not a user error


def register(sub, add) -> None:
    """Add `rounds set`, `gold set|list|remove|accuracy` and `labels history` to the parser."""
    p = add(
        "set",
        cmd_rounds_set,
        "change how a round is labelled: overlap target, mode, judge suggestions, guidelines",
        _subcommands(sub, "rounds"),
    )
    p.add_argument("round", type=int, metavar="ROUND", help="round id (`prefloop rounds list`)")
    p.add_argument(
        "--overlap",
        type=int,
        metavar="N",
        help="annotators wanted per group (default 1; e.g. 3 to measure agreement); the queue "
        "never hands a group to more",
    )
    p.add_argument(
        "--mode",
        choices=["rank", "thumbs"],
        help="rank: order the candidates; thumbs: up/down on each (only before the first label)",
    )
    p.add_argument(
        "--suggestions",
        choices=["on", "off"],
        help="show a judge's pre-ranking to annotators (`prefloop judge` makes them)",
    )
    p.add_argument(
        "--guidelines",
        metavar="FILE.md",
        help="Markdown shown to annotators above each group (an empty file removes them)",
    )

    grp = sub.add_parser(
        "gold",
        help="gold groups: known rankings mixed into the queue to measure annotators",
        description="Gold groups have a ranking a researcher knows to be right. The queue "
        "gives each annotator every gold group of a round once (they look like any other "
        "group), and `prefloop gold accuracy` compares their labels with the gold ranking.",
    ).add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    p = add("set", cmd_gold_set, "mark a group as gold with its known ranking", grp)
    p.add_argument("group", type=int, metavar="GROUP", help="group id (`prefloop groups export`)")
    p.add_argument(
        "--ranking",
        required=True,
        metavar="RANKING",
        help="the group's candidate ids best first, '>' between places and '=' for ties, "
        'e.g. "12>13=14>15"',
    )
    p.add_argument(
        "--author", help="who set it (default: your login name); letters, digits, _ . @ -"
    )
    p = add("list", cmd_gold_list, "list gold groups with their rankings", grp)
    p.add_argument("--round", type=int, metavar="N", help="only the gold groups of round N")
    p.add_argument("--json", action="store_true", help="print JSON records")
    p = add("remove", cmd_gold_remove, "unmark a gold group (its labels stay)", grp)
    p.add_argument("group", type=int, metavar="GROUP", help="group id")
    p = add(
        "accuracy",
        cmd_gold_accuracy,
        "each annotator's accuracy on gold groups (exact match, share of pairs ordered right)",
        grp,
    )
    p.add_argument("--round", type=int, metavar="N", help="only the gold groups of round N")
    p.add_argument("--json", action="store_true", help="print JSON records")

    p = add(
        "history",
        cmd_labels_history,
        "every revision of an annotator's label on a group, oldest first",
        _subcommands(sub, "labels"),
    )
    p.add_argument("group", type=int, metavar="GROUP", help="group id")
    p.add_argument("--annotator", required=True, metavar="NAME", help="whose label")
    p.add_argument("--json", action="store_true", help="print JSON records")
