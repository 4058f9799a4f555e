"""Judges that compare two completions of one prompt: programmatic functions or a local LLM."""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from store.errors import PrefloopError

# (prompt, completion_a, completion_b) -> 1.0 if a is better, 0.0 if b is, 0.5 for a tie
Judge = Callable[[str, str, str], float]

DEFAULT_RUBRIC = (
    "You compare two answers to the same request. Prefer the answer that is helpful, correct, "
    "clear and concise, and that follows the request. Ignore which answer comes first."
)


def _outcome(value: object) -> float:
    if isinstance(value, str):
        table = {"a": 1.0, "b": 0.0, "tie": 0.5}
        if value.lower() not in table:
            raise PrefloopError(f"a pairwise judge returned {value!r}; return 'a', 'b' or 'tie'")
        return table[value.lower()]
    v = float(value)
    return 1.0 if v > 0.5 else 0.0 if v < 0.5 else 0.5


def load_programmatic_judge(spec: str) -> Judge:
    """A judge from "module:function".

    The function is either a scorer f(prompt, completion) -> float (higher is better) or a
    pairwise judge f(prompt, a, b) -> 'a' | 'b' | 'tie' (or 1 / 0 / 0.5).
    """
    module_name, _, func_name = spec.partition(":")
    if not module_name or not func_name:
        raise PrefloopError(f"judge {spec!r} is not of the form module:function")
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as exc:
        raise PrefloopError(f"cannot load judge {spec!r}: {exc}") from exc
    n_params = len(inspect.signature(func).parameters)
    if n_params == 2:

        def judge(prompt: str, a: str, b: str) -> float:
            sa, sb = float(func(prompt, a)), float(func(prompt, b))
            return 1.0 if sa > sb else 0.0 if sa < sb else 0.5

        return judge
    if n_params == 3:
        return lambda prompt, a, b: _outcome(func(prompt, a, b))
    raise PrefloopError(
        f"judge {spec!r} takes {n_params} arguments; write f(prompt, completion) -> score "
        "or f(prompt, a, b) -> 'a' | 'b' | 'tie'"
    )
