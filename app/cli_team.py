"""`prefloop users …`: accounts and roles for the web app."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from store.errors import PrefloopError


def _not_utf8(where: str) -> PrefloopError:
    return PrefloopError(
        f"the password {where} is not UTF-8 text; give it as UTF-8 (nothing was changed)"
    )


def _utf8(password: str, where: str) -> str:
    """The password, unless it holds bytes that were not UTF-8 (decoded as lone surrogates)."""
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:
        raise _not_utf8(where) from None
    return password


def _password(args: argparse.Namespace) -> str:
    """The password from --password-stdin, $PREFLOOP_PASSWORD, or an interactive prompt."""
    if args.password_stdin:
        try:
            line = sys.stdin.readline()
        except UnicodeDecodeError:
            raise _not_utf8("on standard input") from None
        return _utf8(line.rstrip("\n"), "on standard input")
    if os.environ.get("PREFLOOP_PASSWORD"):
        return _utf8(os.environ["PREFLOOP_PASSWORD"], "in $PREFLOOP_PASSWORD")
    if not sys.stdin.isatty():
        raise PrefloopError(
            "no password given: pipe it with --password-stdin or set PREFLOOP_PASSWORD "
            "(there is no terminal to ask on)"
        )
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise PrefloopError("the two passwords differ; nothing was changed")
    return _utf8(first, "typed")


def cmd_users_add(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from store import db, users

    password = _password(args)
    with db.connect(_ws(args)) as con:
        user = users.add_user(con, args.name, args.role, password)
    print(f"added {user.name} ({user.role})")


def cmd_users_list(args: argparse.Namespace) -> None:
    from app.cli import _print_table, _ws
    from store import db, users

    with db.connect(_ws(args), read_only=True) as con:
        _print_table(users.list_users(con), args.json)


def cmd_users_failed_sign_ins(args: argparse.Namespace) -> None:
    from app.cli import _print_table, _ws
    from store import db, users

    with db.connect(_ws(args), read_only=True) as con:
        _print_table(users.failed_sign_ins(con), args.json)


def cmd_users_set_role(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from store import db, users

    with db.connect(_ws(args)) as con:
        users.set_role(con, args.name, args.role)
    print(f"{args.name} is now {args.role}; their open sessions ended")


def cmd_users_set_password(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from store import db, users

    password = _password(args)
    with db.connect(_ws(args)) as con:
        users.set_password(con, args.name, password)
    print(f"password of {args.name} changed; their open sessions ended")


def cmd_users_disable(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from store import db, users

    with db.connect(_ws(args)) as con:
        users.set_active(con, args.name, args.enable)
    print(f"{args.name} {'enabled' if args.enable else 'disabled'}")


def cmd_agreement(args: argparse.Namespace) -> None:
    from app import json_out
    from app.cli import _print_table, _round_ids, _ws
    from labeling.team import bias_report, team_report

    ws, round_ids = _ws(args), _round_ids(args.rounds)
    if not 0.0 < args.bias_alpha < 1.0:
        raise PrefloopError("--bias-alpha is a p-value threshold: between 0 and 1, e.g. 0.01")
    if args.bias_min_groups < 1:
        raise PrefloopError("--bias-min-groups must be at least 1")
    report = team_report(
        ws,
        round_ids,
        min_agreement=args.min_agreement,
        dispute_threshold=args.dispute_threshold,
    )
    bias = bias_report(ws, round_ids, alpha=args.bias_alpha, min_groups=args.bias_min_groups)
    if args.json:
        print(
            json_out.dumps(
                {
                    "alpha": report.alpha,
                    "mean_agreement": report.mean_agreement,
                    "groups_with_overlap": report.groups_with_overlap,
                    "annotators": report.annotators,
                    "disputes": report.disputes,
                    "bias": bias.to_dict(),
                }
            )
        )
        return
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print(
        f"Krippendorff's alpha (ordinal): {fmt(report.alpha)}; mean pairwise agreement: "
        f"{fmt(report.mean_agreement)} over {report.groups_with_overlap} groups with 2+ "
        "annotators"
    )
    _print_table(report.annotators, False)
    print(f"\ndisputed groups ({len(report.disputes)}):")
    _print_table(report.disputes, False)
    print(
        f"\nbias audit over {bias.n_groups} groups (consensus of all annotators: length τ "
        f"{fmt(bias.consensus_length_tau)}, markdown τ {fmt(bias.consensus_markdown_tau)}; "
        "τ > 0: longer / denser ranked better):"
    )
    _print_table(bias.summary(), False)
    flagged = bias.flagged()
    print(
        "flagged: "
        + (
            "; ".join(f"{name} ({', '.join(kinds)})" for name, kinds in flagged.items())
            if flagged
            else "none"
        )
        + f" (p < {args.bias_alpha:g} with at least {args.bias_min_groups} groups)"
    )
    print(f"position test: {bias.tests['position']}\nlength test: {bias.tests['length']}")


def cmd_adjudicate(args: argparse.Namespace) -> None:
    from app.cli import _ws
    from labeling.queue import parse_ranking
    from labeling.team import adjudicate

    if bool(args.ranking) == bool(args.drop):
        raise PrefloopError("give either --ranking or --drop")
    ranking = parse_ranking(args.ranking) if args.ranking else None
    author = args.author or os.environ.get("USER") or "cli"
    adjudicate(
        _ws(args), args.group, ranking, author, ["all_bad"] if args.drop else None, args.note
    )
    print(f"group {args.group} decided; dataset versions frozen from now on use the decision")


def register(sub, add) -> None:
    """Add `prefloop users …`, `agreement` and `adjudicate` to the parser."""
    from labeling.bias_audit import ALPHA as BIAS_ALPHA
    from labeling.bias_audit import MIN_GROUPS as BIAS_MIN_GROUPS
    from labeling.team import DISPUTE_THRESHOLD, MIN_AGREEMENT
    from store.access import NAME_RULE, ROLES
    from store.users import FAILURE_WINDOW

    p = add(
        "agreement",
        cmd_agreement,
        "inter-annotator agreement: per annotator (peers, gold, Kendall tau, median time, "
        "flagged), Krippendorff's alpha, disputed groups; and the bias audit: how often the "
        "candidate shown first / last is ranked best against chance, rank vs length and "
        "Markdown density against the others' consensus, position/length bias flags",
    )
    p.add_argument("--rounds", help="comma-separated round ids (default: all)")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=MIN_AGREEMENT,
        help="flag annotators below this agreement (gold accuracy when they have gold)",
    )
    p.add_argument(
        "--dispute-threshold",
        type=float,
        default=DISPUTE_THRESHOLD,
        help="list groups whose annotators disagree on at least this share of pairs",
    )
    p.add_argument(
        "--bias-alpha",
        type=float,
        default=BIAS_ALPHA,
        help="flag position or length bias when its test's p-value is below this",
    )
    p.add_argument(
        "--bias-min-groups",
        type=int,
        default=BIAS_MIN_GROUPS,
        help="flag only when the test rests on at least this many groups",
    )
    p.add_argument("--json", action="store_true", help="print JSON (missing numbers as null)")
    p = add(
        "adjudicate",
        cmd_adjudicate,
        "decide a disputed group: the ranking training uses instead of the annotators' consensus",
    )
    p.add_argument("group", type=int)
    p.add_argument("--ranking", help="candidate ids best first: 12>13=14>15 ('=' ties)")
    p.add_argument("--drop", action="store_true", help="drop the group from training (all bad)")
    p.add_argument("--note")
    p.add_argument("--author", help="who decided (default: $USER)")

    grp = sub.add_parser(
        "users",
        help="accounts for the web app (annotator, researcher, admin)",
        description="Accounts for the web app. Anyone who can run prefloop on the workspace "
        "folder manages them; the web app enforces the roles.",
    ).add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    pw_help = "read the password from the first line of standard input"
    p = add("add", cmd_users_add, "create an account (asks for its password)", grp)
    p.add_argument("name", help=f"the account's name: {NAME_RULE}")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--password-stdin", action="store_true", help=pw_help)
    p = add("list", cmd_users_list, "list accounts and roles", grp)
    p.add_argument("--json", action="store_true")
    p = add(
        "failed-sign-ins",
        cmd_users_failed_sign_ins,
        f"failed sign-ins of the last {FAILURE_WINDOW.seconds // 60} minutes per name and "
        "client (address or browser session), most recent first; names without an account "
        "show as '(no such account)'",
        grp,
    )
    p.add_argument("--json", action="store_true")
    p = add("set-role", cmd_users_set_role, "change an account's role", grp)
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p = add("set-password", cmd_users_set_password, "change an account's password", grp)
    p.add_argument("name")
    p.add_argument("--password-stdin", action="store_true", help=pw_help)
    p = add("disable", cmd_users_disable, "disable (or --enable) an account; labels stay", grp)
    p.add_argument("name")
    p.add_argument("--enable", action="store_true", help="re-enable instead")
