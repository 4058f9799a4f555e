"""Programmatic judges used by the tests (loaded as module:function, as users pass them)."""


def shorter(prompt: str, completion: str) -> float:
    """Prefer the shorter completion."""
    return -len(completion)


def always_a(prompt: str, a: str, b: str) -> str:
    """A pairwise judge that always picks the first answer."""
    return "a"
