"""The one exception type for errors a user can cause and fix."""


class PrefloopError(Exception):
    """A user-facing error whose message says what to do."""
