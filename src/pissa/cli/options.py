"""Command-line options generated from the config dataclasses, as litgpt generates its CLI from function
signatures: each field's name, type, default and help text become one option, so a command cannot drift
from the config it builds.

Field metadata a config may set:
    help      the option's help text
    flags     extra names, e.g. ("-r",)
    flag      the long name without dashes when it differs from the field's (batch -> batch-same-shape)
    negative  the name of a boolean's off switch (default: no-<flag>)

Types: bool -> --x/--no-x; list[T] -> a repeatable option that also takes several values after one flag
(`--ranks 16 64`); dict[str, T] -> repeatable KEY=VALUE; `T | None` -> an optional T.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from collections.abc import Callable
from pathlib import Path

import typer
from typer.core import TyperCommand

from ..errors import PissaError


def parse_key_values(pairs: list[str], flag: str) -> dict:
    """`["niter=4", "tol=1e-3"]` -> {"niter": 4, "tol": 0.001} (values parsed as JSON when they can be)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise PissaError(f"{flag} expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


METAVARS = {int: "N", float: "X", str: "TEXT"}


def flag_of(field: dataclasses.Field) -> str:
    return "--" + field.metadata.get("flag", field.name.replace("_", "-"))


def unwrap_optional(hint):
    """`T | None` -> T; anything else unchanged."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def default_of(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return ...  # required


def option_param(field: dataclasses.Field, hint) -> inspect.Parameter:
    """The typer option of one config field."""
    hint = unwrap_optional(hint)
    origin, flag, default = typing.get_origin(hint), flag_of(field), default_of(field)
    help_text = field.metadata.get("help", "")
    extra = tuple(field.metadata.get("flags", ()))
    if hint is bool:
        off = "--" + field.metadata.get("negative", "no-" + flag[2:])
        decls, annotation = (f"{flag}/{off}", *extra), bool
    elif origin is list:
        item = typing.get_args(hint)[0]
        decls, annotation, default = (flag, *extra), list[item], list(default or [])
        help_text += " Repeatable, or several values after one flag."
    elif origin is dict:
        decls, annotation, default = (flag, *extra), list[str], [f"{k}={v}" for k, v in (default or {}).items()]
        help_text += " Repeatable."
    else:
        decls, annotation = (flag, *extra), hint
    metavar = "KEY=VALUE" if origin is dict else metavar_for(annotation)
    option = typer.Option(default, *decls, help=help_text, metavar=metavar,
                          show_default=default not in (None, [], ...))
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def config_fields(cls, skip: tuple[str, ...] = ()) -> list[tuple[dataclasses.Field, object]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.name not in skip]


def config_from(cls, values: dict, skip: tuple[str, ...] = ()):
    """Build `cls` from parsed option values (lists back to None or dicts where the field says so)."""
    kwargs = {}
    for field, hint in config_fields(cls, skip):
        value, inner = values[field.name], unwrap_optional(hint)
        if typing.get_origin(inner) is dict:
            value_type = typing.get_args(inner)[1] if typing.get_args(inner) else object
            parsed = parse_key_values(value, flag_of(field))
            value = {k: value_type(v) if value_type in (int, float, str) else v for k, v in parsed.items()}
        elif typing.get_origin(inner) is list and not value and default_of(field) is None:
            value = None
        kwargs[field.name] = value
    return cls(**kwargs)


def metavar_for(annotation) -> str | None:
    """N, X, TEXT, PATH (and "N ...", "TEXT ..." for lists) instead of typer's <int>, <list[str]>."""
    annotation = unwrap_optional(annotation)
    if annotation is bool:
        return None
    if typing.get_origin(annotation) is list:
        return f"{metavar_for(typing.get_args(annotation)[0])} ..."
    return METAVARS.get(annotation, "PATH" if annotation is Path else "TEXT")


def set_metavars(app: typer.Typer) -> None:
    """Give every option and argument of every command a readable metavar (in place, before click builds)."""
    for info in app.registered_commands:
        for param in inspect.signature(info.callback, eval_str=True).parameters.values():
            default = param.default
            if isinstance(default, typer.models.OptionInfo) and default.metavar is None:
                default.metavar = metavar_for(param.annotation)


class ListOptionsCommand(TyperCommand):
    """Lets every list option take several values after one flag: `--ranks 16 64` = `--ranks 16 --ranks 64`.
    A subclass per command sets `lists` (see `list_options`)."""

    lists: dict[str, bool] = {}

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, expand_lists(list(args), self.lists))


def list_options(params: list[inspect.Parameter]) -> dict[str, bool]:
    """{flag: takes integers} of every list-typed option among `params`."""
    lists = {}
    for p in params:
        if typing.get_origin(p.annotation) is list and isinstance(p.default, typer.models.OptionInfo):
            for decl in p.default.param_decls:
                lists[decl] = typing.get_args(p.annotation) == (int,)
    return lists


def expand_lists(args: list[str], lists: dict[str, bool]) -> list[str]:
    """Repeat a list option's flag before each further value, until the next option. `lists` maps each list
    option to whether it takes integers: those stop at the first non-integer (a positional argument)."""
    out, current = [], None
    for arg in args:
        takes = current is not None and not arg.startswith("-") and (not lists[current] or arg.lstrip("-").isdigit())
        if arg in lists:
            current = arg
            out.append(arg)
        elif takes:
            out += [arg] if out[-1] == current else [current, arg]
        else:
            current = None
            out.append(arg)
    return out


def config_command(app: typer.Typer, name: str, configs: dict[str, tuple[type, tuple[str, ...]]]):
    """Register `fn` as command `name`, with one option per field of each config class.

    `configs` maps a parameter of `fn` to (config class, fields left out); `fn` receives that built config
    and its own parameters (arguments and options that are not config fields) as declared. Returns the
    registered command, whose signature lists every option.
    """
    from .app import user_errors

    def wrap(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name not in configs]
        generated = [option_param(f, h) for cls, skip in configs.values() for f, h in config_fields(cls, skip)]

        def command(**values):
            with user_errors():
                built = {arg: config_from(cls, values, skip) for arg, (cls, skip) in configs.items()}
            return fn(**built, **{p.name: values[p.name] for p in own})

        positional = [p for p in own if isinstance(p.default, typer.models.ArgumentInfo)]
        options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own if p not in positional]
        command.__signature__ = inspect.Signature(
            [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) for p in positional] + options + generated)
        command.__annotations__ = {}
        command.__doc__ = fn.__doc__
        command.__name__ = fn.__name__
        cls = type(f"{fn.__name__}_class", (ListOptionsCommand,), {"lists": list_options(options + generated)})
        app.command(name, cls=cls)(command)
        return command

    return wrap
