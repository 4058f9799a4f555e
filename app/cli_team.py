"""`prefloop users …`: accounts and roles for the web app."""

from __future__ import annotations

import argparse
import getpass
import os
import sys

from store.errors import PrefloopError


def _password(args: argparse.Namespace) -> str:
    """The password from --password-stdin, $PREFLOOP_PASSWORD, or an interactive prompt."""
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if os.environ.get("PREFLOOP_PASSWORD"):
        return os.environ["PREFLOOP_PASSWORD"]
    if not sys.stdin.isatty():
        raise PrefloopError(
            "no password given: pipe it with --password-stdin or set PREFLOOP_PASSWORD "
            "(there is no terminal to ask on)"
        )
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise PrefloopError("the two passwords differ; nothing was changed")
    return first


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
        users.set_active(con, args.name, not args.enable)
    print(f"{args.name} {'enabled' if args.enable else 'disabled'}")


def register(sub, add) -> None:
    """Add `prefloop users …` to the parser."""
    from store.access import ROLES

    grp = sub.add_parser(
        "users",
        help="accounts for the web app (annotator, researcher, admin)",
        description="Accounts for the web app. Anyone who can run prefloop on the workspace "
        "folder manages them; the web app enforces the roles.",
    ).add_subparsers(dest="sub", required=True, metavar="SUBCOMMAND")
    pw_help = "read the password from the first line of standard input"
    p = add("add", cmd_users_add, "create an account (asks for its password)", grp)
    p.add_argument("name")
    p.add_argument("--role", required=True, choices=ROLES)
    p.add_argument("--password-stdin", action="store_true", help=pw_help)
    p = add("list", cmd_users_list, "list accounts and roles", grp)
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
