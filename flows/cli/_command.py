"""A `dart` command from its options object: the typer options are built from the pydantic fields
(dart_core.options), so each option is declared once, for the command line, the flow, the Prefect
UI and the library alike.

    @options_command(app, AnnotateOptions)
    def annotate(options: AnnotateOptions) -> None: ...

Each field that is not `Cli(hidden=True)` becomes a typer option (or argument) with the field's
default, `description` as help, `ge`/`le` as typer's min/max and an `AfterValidator` check as the
option's callback, so a bad value is a usage error naming the option, with the check's message.
typer parses; the options object is built from what it parsed (validated once more by pydantic:
cross-field rules live in the model) and handed to the function.
"""
from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Callable

import annotated_types
import typer
from pydantic import BaseModel, ValidationError
from pydantic.functional_validators import AfterValidator

from dart_core.options._fields import Cli


def _cli(field) -> Cli:
    return next((m for m in field.metadata if isinstance(m, Cli)), Cli())


def _typer_type(tp: Any) -> Any:
    """`int | None` and `list[int]` spelled the way typer reads them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:  # a list item's own bounds: read by _constraints
        return _typer_type(args[0])
    if origin is types.UnionType:
        return typing.Union[tuple(_typer_type(a) for a in args)]
    if origin is list:
        return typing.List[_typer_type(args[0])]
    return tp


def _callback(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def callback(value):
        try:
            return check(value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

    return callback


def _constraints(field) -> list:
    """The field's metadata, and for a list that of its items (typer bounds each value given)."""
    found = list(field.metadata)
    if typing.get_origin(field.annotation) is list:
        (item,) = typing.get_args(field.annotation)
        if typing.get_origin(item) is typing.Annotated:
            for m in typing.get_args(item)[1:]:
                found += list(getattr(m, "metadata", [m]))
    return found


def _parameter_info(name: str, field, cli: Cli):
    default = ... if field.is_required() else field.get_default(call_default_factory=True)
    kw: dict[str, Any] = {"help": field.description}
    if cli.metavar:
        kw["metavar"] = cli.metavar
    for m in _constraints(field):
        if isinstance(m, annotated_types.Ge):
            kw["min"] = m.ge
        elif isinstance(m, annotated_types.Le):
            kw["max"] = m.le
        elif isinstance(m, AfterValidator):
            kw["callback"] = _callback(m.func)
    if cli.argument:
        return typer.Argument(default, **kw)
    return typer.Option(default, *cli.flags, **kw)


def _flag_of(options_cls: type[BaseModel], name: str) -> str:
    field = options_cls.model_fields.get(name)
    cli = _cli(field) if field is not None else Cli()
    if cli.argument:
        return name.upper()
    return cli.flags[0].split("/")[0] if cli.flags else "--" + name.replace("_", "-")


def build(options_cls: type[BaseModel], values: dict) -> BaseModel:
    """The options object from what typer parsed; a rule the options object states across fields
    (its model validators) fails as a usage error naming the option."""
    try:
        return options_cls(**values)
    except ValidationError as e:
        err = e.errors()[0]
        where = _flag_of(options_cls, str(err["loc"][0])) if err["loc"] else None
        msg = str(err.get("ctx", {}).get("error") or err["msg"])
        raise typer.BadParameter(msg, param_hint=f"'{where}'" if where else None) from None


def options_command(group: typer.Typer, options_cls: type[BaseModel], name: str | None = None):
    """Register `fn(options)` on `group` as a command whose options are `options_cls`'s fields."""

    def register(fn: Callable[[Any], None]) -> Callable[[Any], None]:
        params, hints = [], {}
        for fname, field in options_cls.model_fields.items():
            cli = _cli(field)
            if cli.hidden:
                continue
            tp = _typer_type(field.annotation)
            params.append(inspect.Parameter(fname, inspect.Parameter.KEYWORD_ONLY,
                                            default=_parameter_info(fname, field, cli), annotation=tp))
            hints[fname] = tp
        # arguments first: typer keeps the signature's order for --help and positional parsing
        params.sort(key=lambda p: not isinstance(p.default, typer.models.ArgumentInfo))

        def command(**values) -> None:
            return fn(build(options_cls, values))

        command.__signature__ = inspect.Signature(params, return_annotation=None)
        command.__annotations__ = {**hints, "return": None}
        command.__name__, command.__qualname__, command.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        command.__module__ = fn.__module__
        group.command(name)(command)
        return fn

    return register
