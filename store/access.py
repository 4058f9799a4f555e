"""Roles and what each may do; every guarded action calls `require` first."""

from __future__ import annotations

import re
from dataclasses import dataclass

from store.errors import PrefloopError

ANNOTATOR, RESEARCHER, ADMIN = "annotator", "researcher", "admin"
MAX_NAME = 64
NAME_RULE = (
    f"letters, digits, '_', '.', '@' or '-', starting with a letter or digit, at most {MAX_NAME} "
    "characters"
)
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.@-]{{0,{MAX_NAME - 1}}}")
ROLES = (ANNOTATOR, RESEARCHER, ADMIN)

# action -> roles allowed to do it
PERMISSIONS: dict[str, frozenset[str]] = {
    "label": frozenset(ROLES),
    "view_research": frozenset({RESEARCHER, ADMIN}),
    "read_labels": frozenset({RESEARCHER, ADMIN}),
    "start_jobs": frozenset({RESEARCHER, ADMIN}),
    "export": frozenset({RESEARCHER, ADMIN}),
    "curate": frozenset({RESEARCHER, ADMIN}),
    "manage_users": frozenset({ADMIN}),
}
ACTION_WORDS = {
    "label": "label groups",
    "view_research": "see the research pages",
    "read_labels": "read other annotators' labels",
    "start_jobs": "start sampling, tuning or evaluation jobs",
    "export": "export or freeze datasets",
    "curate": "change rounds, gold groups, guidelines or disputes",
    "manage_users": "manage accounts",
}


class AccessDenied(PrefloopError):
    """The signed-in user's role does not allow an action."""


@dataclass(frozen=True)
class User:
    """A signed-in account."""

    name: str
    role: str

    def can(self, action: str) -> bool:
        """Whether this user's role allows the action."""
        return self.role in PERMISSIONS[action]


def check_name(name: str, what: str = "account name") -> str:
    """The name (of an account, annotator or author) stripped, if valid; otherwise a clear error."""
    name = (name or "").strip() if isinstance(name, str) else name
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        shown = repr(name) if len(repr(name)) <= 40 else repr(name)[:40] + "..."
        raise PrefloopError(f"invalid {what} {shown}: use {NAME_RULE}")
    return name


def check_role(role: str) -> str:
    """The role, if it is one of ROLES; otherwise a clear error."""
    if role not in ROLES:
        raise PrefloopError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
    return role


def require(user: User | None, action: str) -> User:
    """The user, if their role allows the action; otherwise AccessDenied."""
    if action not in PERMISSIONS:
        raise KeyError(action)
    if user is None:
        raise AccessDenied("sign in first")
    if not user.can(action):
        allowed = " or ".join(r for r in ROLES if r in PERMISSIONS[action])
        raise AccessDenied(
            f"{user.name} ({user.role}) may not {ACTION_WORDS[action]}; "
            f"ask an admin for the {allowed} role"
        )
    return user
