"""Judges that compare two completions of one prompt: programmatic functions or a local LLM."""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable

from store import db as storedb
from store import judges
from store.errors import PrefloopError
from store.judges import check_spec

# Set in the environment of jobs the web app starts: they run registered judges only.
REGISTERED_ONLY_ENV = "PREFLOOP_REGISTERED_JUDGES_ONLY"

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


def judge_function(spec: str) -> tuple[Callable, str]:
    """The function "module:function" names and its kind: "scorer" or "pairwise".

    The module must be importable as installed or from PYTHONPATH: the current directory is
    not searched, so a file that happens to lie there never runs.
    """
    module_name, _, func_name = check_spec(spec).partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the operator's module may fail in any way while importing
        raise PrefloopError(
            f"cannot load judge {spec!r}: {type(exc).__name__}: {exc}. Install the module or "
            "put the folder that holds it on PYTHONPATH (prefloop does not import from the "
            "current directory)"
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise PrefloopError(
            f"cannot load judge {spec!r}: {module_name} has no function {func_name}"
        )
    try:
        n_params = len(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        n_params = -1
    if n_params not in (2, 3):
        raise PrefloopError(
            f"judge {spec!r} does not take 2 or 3 arguments; write f(prompt, completion) -> score "
            "or f(prompt, a, b) -> 'a' | 'b' | 'tie'"
        )
    return func, "scorer" if n_params == 2 else "pairwise"


def load_programmatic_judge(spec: str) -> Judge:
    """A judge from "module:function".

    The function is either a scorer f(prompt, completion) -> float (higher is better) or a
    pairwise judge f(prompt, a, b) -> 'a' | 'b' | 'tie' (or 1 / 0 / 0.5).
    """
    func, kind = judge_function(spec)
    if kind == "scorer":

        def judge(prompt: str, a: str, b: str) -> float:
            sa, sb = float(func(prompt, a)), float(func(prompt, b))
            return 1.0 if sa > sb else 0.0 if sa < sb else 0.5

        return judge
    return lambda prompt, a, b: _outcome(func(prompt, a, b))


def _not_registered(judge: str) -> str:
    return (
        f"judge {judge!r} is not registered; the web app runs only llm and the judges the "
        "operator registered: `prefloop judges add NAME module:function`, then pick NAME"
    )


def resolve_judge(ws: storedb.Workspace, judge: str) -> str:
    """The module:function a judge stands for: a registered name's spec, else judge itself.

    In a job the web app started (REGISTERED_ONLY_ENV set) only registered names resolve.
    """
    with storedb.connect(ws) as con:
        spec = judges.get_judge(con, judge)
    if spec is not None:
        return spec
    if os.environ.get(REGISTERED_ONLY_ENV) == "1":
        raise PrefloopError(_not_registered(judge))
    if ":" not in judge:
        raise PrefloopError(
            f"no judge named {judge!r} is registered (see `prefloop judges list`); give a "
            "registered name, llm, or module:function"
        )
    return judge


def require_web_judge(ws: storedb.Workspace, judge: str) -> str:
    """The judge, if the web app may run it: a built-in (llm, human, rm:VERSION: a model, not
    code) or a registered name."""
    if judge in judges.RESERVED or judge.startswith(judges.RESERVED_PREFIXES):
        return judge
    with storedb.connect(ws) as con:
        if judges.get_judge(con, judge) is None:
            raise PrefloopError(_not_registered(judge))
    return judge


def register_judge(ws: storedb.Workspace, name: str, spec: str, author: str | None) -> str:
    """Register spec under name once it imports with a judge's signature; returns its kind."""
    name, spec = judges.check_name(name), check_spec(spec)
    _, kind = judge_function(spec)
    with storedb.connect(ws) as con:
        judges.add_judge(con, name, spec, author)
    return kind
