"""`prefloop` subcommands (filled in by the module's owner)."""

from __future__ import annotations


def register(sub, add) -> None:
    """Add this module's subcommands to the parser."""
