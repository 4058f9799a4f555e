"""Command-line options generated from the config dataclasses, and configs built back from them.

One option per dataclass field (nested dataclasses too: `lora.r` → `--lora-r`), named after
the field (`max_new_tokens` → `--max-new-tokens`) unless its metadata names a "flag", typed
from its annotation, with its help text and "(default: X)" from the dataclass. Options default
to argparse.SUPPRESS, so the parsed namespace holds only what the user typed and the dataclass
fills in the rest.
"""

from __future__ import annotations

import argparse
import copy
import json
import typing
from collections.abc import Collection, Iterable
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

from store.errors import PrefloopError
from tuning.config import DTYPE_HELP, DTYPES, field_types, settings_from_values

NONE_WORDS = ("none", "None", "null")


@dataclass(frozen=True)
class ConfigOption:
    """One command-line option for one (possibly nested) dataclass field."""

    path: tuple[str, ...]  # field names from the top dataclass, e.g. ("lora", "r")
    flag: str  # e.g. "--lora-r"
    type: Any  # the field's resolved annotation
    default: Any
    help: str
    choices: tuple = ()
    repeat: bool = False  # given once per value: --reward a --reward b

    @property
    def dest(self) -> str:
        """The namespace attribute argparse stores the value in."""
        return self.flag.removeprefix("--").replace("-", "_")


def format_default(value: Any) -> str:
    """A default as the help text shows it (and as it is typed on the command line)."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def config_options(cls: type, *, skip: Collection[str] = ()) -> list[ConfigOption]:
    """The options of every field of a config dataclass, nested ones flattened, in field order."""
    return list(_options(cls, cls(), (), set(skip)))


def _options(cls: type, defaults: Any, prefix: tuple[str, ...], skip: set[str]):
    types = field_types(cls)
    for f in fields(cls):
        path = (*prefix, f.name)
        if f.name in skip or ".".join(path) in skip:
            continue
        tp, default = types[f.name], getattr(defaults, f.name)
        if is_dataclass(tp):
            yield from _options(tp, default, path, skip)
            continue
        flag = "--" + (f.metadata.get("flag") or "-".join(path).replace("_", "-"))
        yield ConfigOption(
            path=path,
            flag=flag,
            type=tp,
            default=default,
            help=f.metadata.get("help", "") + (" (repeatable)" if f.metadata.get("repeat") else ""),
            choices=tuple(f.metadata.get("choices", ())),
            repeat=bool(f.metadata.get("repeat")),
        )


def _optional(parse):
    """An argparse type that also takes "none" for None."""

    def convert(text: str):
        return None if text in NONE_WORDS else parse(text)

    convert.__name__ = parse.__name__  # argparse names it in "invalid float value"
    return convert


def _comma_list(text: str) -> list[str]:
    """A comma-separated list, as typed after --target-modules."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _argparse_kwargs(tp: Any) -> dict[str, Any]:
    """The add_argument keywords for a field's annotation."""
    args = typing.get_args(tp)
    optional = type(None) in args
    if optional:
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(tp) is list:
        parse, metavar = _comma_list, "A,B,..."
    elif tp in (int, float, str):
        parse, metavar = tp, None
    else:
        raise TypeError(f"no command-line option for settings of type {tp!r}")
    kwargs: dict[str, Any] = {"type": _optional(parse) if optional else parse}
    if metavar:
        kwargs["metavar"] = metavar
    return kwargs


class _Repeated(argparse.Action):
    """A list option given once per value; "none" empties the list."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, [] if values in NONE_WORDS else [*items, values])


def _add(parser_or_group, opt: ConfigOption, help_text: str) -> None:
    kwargs = _argparse_kwargs(opt.type)
    if opt.repeat:
        kwargs = {"action": _Repeated, "metavar": "VALUE"}
    if opt.choices:
        kwargs["choices"] = opt.choices
    parser_or_group.add_argument(
        opt.flag,
        dest=opt.dest,
        default=argparse.SUPPRESS,
        help=help_text.replace("%", "%%"),
        **kwargs,
    )


def add_config_options(
    parser_or_group, cls: type, *, skip: Collection[str] = ()
) -> list[ConfigOption]:
    """Add one option per field of the config dataclass cls; returns the options added."""
    options = config_options(cls, skip=skip)
    for opt in options:
        _add(parser_or_group, opt, shared_help({"": opt}))
    return options


def add_method_options(
    parser: argparse.ArgumentParser,
    classes: dict[str, type],
    *,
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """Add the options of several methods' config dataclasses, each shared option once.

    An option every method has goes into a "settings of every method" group; where the
    methods' defaults or help differ, its help names each method's. The others go into one
    group per method, or per set of methods sharing it. Returns the argument groups by method
    name ("" for the shared one; "dpo,rm" for one that some methods share).
    """
    by_method = {m: config_options(c, skip=skip) for m, c in classes.items()}
    by_flag: dict[str, dict[str, ConfigOption]] = {}
    for method, options in by_method.items():
        for opt in options:
            by_flag.setdefault(opt.flag, {})[method] = opt
    groups = {"": parser.add_argument_group("settings of every method")}
    for method in classes:
        groups[method] = parser.add_argument_group(f"{method} settings (--method {method})")
    for method, options in by_method.items():
        for opt in options:
            owners = by_flag[opt.flag]
            if next(iter(owners)) != method:
                continue  # added with the first method that has it
            _check_same_kind(list(owners.values()))
            choices = tuple(dict.fromkeys(c for o in owners.values() for c in o.choices))
            if len(owners) == len(classes):
                group = groups[""]
            elif len(owners) == 1:
                group = groups[method]
            else:  # shared by some methods: a group of its own, named after them
                names = " and ".join(owners)
                key = ",".join(owners)
                if key not in groups:
                    groups[key] = parser.add_argument_group(
                        f"{names} settings (--method {' or '.join(owners)})"
                    )
                group = groups[key]
            _add(group, replace(opt, choices=choices), shared_help(owners))
    return groups


def _check_same_kind(options: list[ConfigOption]) -> None:
    """Options sharing a flag must share a type; their choices may differ by method (the
    command line accepts any method's, the chosen method's config refuses the others')."""
    first = options[0]
    for opt in options[1:]:
        if opt.type != first.type or bool(opt.choices) != bool(first.choices):
            raise ValueError(f"{first.flag} has a different type in each method")


def shared_help(owners: dict[str, ConfigOption]) -> str:
    """An option's help for the methods that have it: each one's help and default if they differ."""
    helps = {o.help for o in owners.values()}
    if len(helps) == 1:
        text = helps.pop()
    else:
        text = "; ".join(f"{m}: {o.help}" for m, o in owners.items())
    defaults = {format_default(o.default) for o in owners.values()}
    if len(defaults) == 1:
        return f"{text} (default: {defaults.pop()})"
    each = ", ".join(f"{m} {format_default(o.default)}" for m, o in owners.items())
    return f"{text} (default: {each})"


def options_given(args: argparse.Namespace, cls: type) -> list[ConfigOption]:
    """The options of cls that the command line set."""
    given = vars(args)
    return [opt for opt in config_options(cls) if opt.dest in given]


def config_from_args(cls: type, args: argparse.Namespace, base: dict | None = None) -> Any:
    """The config dataclass built from base (e.g. a file's values) overridden by given flags."""
    values = copy.deepcopy(base) if base else {}
    for opt in options_given(args, cls):
        target = values
        for name in opt.path[:-1]:
            if not isinstance(target.get(name), dict):
                target[name] = {}
            target = target[name]
        target[opt.path[-1]] = getattr(args, opt.dest)
    return settings_from_values(cls, values)


def read_config_file(path: str) -> dict:
    """The JSON object of settings in a --config file (a user error if unreadable or not one)."""
    example = '{"method": "dpo", "beta": 0.1, "epochs": 3}'
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise PrefloopError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise PrefloopError(f"config file {path} is not UTF-8 text; save it as JSON") from None
    except json.JSONDecodeError as exc:
        raise PrefloopError(
            f"config file {path} is not valid JSON ({exc.msg} at line {exc.lineno} column "
            f"{exc.colno}); write the settings as one object such as {example}"
        ) from None
    if not isinstance(data, dict):
        raise PrefloopError(
            f"config file {path} holds a JSON {type(data).__name__}, not an object of "
            f"settings; write it as one object such as {example}"
        )
    return data


def flags(options: Iterable[ConfigOption]) -> str:
    """The options' flags, comma-separated, for messages."""
    return ", ".join(opt.flag for opt in options)


def add_dtype_option(p: argparse.ArgumentParser, note: str = "") -> None:
    """--dtype of a command whose options are not generated from a config dataclass (eval,
    judge); note: what the command does with it beyond DTYPE_HELP."""
    p.add_argument(
        "--dtype",
        default=DTYPES[0],
        choices=DTYPES,
        help=f"{DTYPE_HELP}{note} (default: {DTYPES[0]})",
    )
