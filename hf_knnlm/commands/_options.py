"""Command-line options generated from the library's settings dataclasses and function signatures.

A CLI default is the library default by construction: an option's type, default and help come from
the dataclass field (``metadata["help"]``, or the class docstring's ``Args:`` entry) or from the
function parameter it sets, so ``hf-knnlm evaluate`` and ``evaluate_perplexity`` cannot disagree
(tests/test_cli_defaults.py checks every verb). Types map through one table; ``X | None`` accepts
``none``, ``tuple[...]`` a comma-separated list.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

_MISSING = object()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _scalar(cast: type, what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            return cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None

    return parse


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    return lambda text: None if text.strip().lower() == "none" else parse(text)


def _list(parse: Callable[[str], Any]) -> Callable[[str], tuple]:
    return lambda text: tuple(parse(part) for part in text.split(",") if part.strip())


_SCALARS: dict[Any, Callable[[str], Any]] = {
    int: _scalar(int, "an integer"),
    float: _scalar(float, "a number"),
    str: str,
}


def _argparse_kwargs(annotation: Any, default: Any) -> dict[str, Any]:
    """argparse keyword arguments for one annotated value (the table and its fallbacks)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is typing.Literal:
        return {"choices": list(args), "type": type(args[0])}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        numbers = {int, float} >= set(rest)
        inner = _argparse_kwargs(float if numbers and len(rest) > 1 else rest[0], default)
        if len(rest) < len(args) and "type" in inner:  # Optional: "none" gives None
            inner["type"] = _optional(inner["type"])
        return inner
    if origin is tuple:
        return {"type": _list(_SCALARS[args[0]]), "metavar": "A,B,..."}
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    return {"type": str}


def _shown(default: Any) -> str:
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    return "none" if default is None else str(default)


def _help(text: str, default: Any) -> str:
    text = " ".join((text or "").split())
    if "default" in text.lower():
        return text
    return f"{text.rstrip('.')} (default: {_shown(default)}).".strip()


def docstring_args(obj: Any) -> dict[str, str]:
    """``name -> text`` of the ``Args:`` section of ``obj``'s docstring (transformers style)."""
    doc = inspect.getdoc(obj) or ""
    found: dict[str, str] = {}
    section = doc.split("Args:", 1)[1] if "Args:" in doc else ""
    for match in re.finditer(
        r"^ {0,4}(\w+) \((.*?)\):\s*(.*?)(?=^ {0,4}\w+ \(|\Z|^\S)", section, re.M | re.S
    ):
        found[match.group(1)] = match.group(3)
    return found


def _field_type(cls: type, field: dataclasses.Field) -> Any:
    if not isinstance(field.type, str):
        return field.type
    return eval(field.type, vars(sys.modules[cls.__module__]), {"typing": typing})  # noqa: S307


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return _MISSING


def add_dataclass_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    helps: dict[str, str] | None = None,
    prefix: str = "",
) -> list[str]:
    """One option per field of the dataclass ``cls`` (those in ``only``, minus ``exclude``); returns
    the field names added. ``prefix`` goes before every option and destination name (two dataclasses
    with a field of the same name in one parser)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = [n for n in (only if only is not None else fields) if n not in set(exclude)]
    documented = docstring_args(cls)
    for name in names:
        field = fields[name]
        default = _field_default(field)
        text = (helps or {}).get(name) or field.metadata.get("help") or documented.get(name, "")
        kwargs = _argparse_kwargs(_field_type(cls, field), default)
        parser.add_argument(
            flag(prefix + name), dest=prefix + name, default=default, help=_help(text, default), **kwargs
        )
    return names


def add_signature_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    function: Callable,
    helps: dict[str, str],
    *,
    types_: dict[str, Callable[[str], Any]] | None = None,
) -> list[str]:
    """One option per parameter of ``function`` named in ``helps``, with the parameter's default."""
    hints = typing.get_type_hints(function)
    parameters = inspect.signature(function).parameters
    for name, text in helps.items():
        default = parameters[name].default
        kwargs = _argparse_kwargs(hints.get(name, str), default)
        if types_ and name in types_:
            kwargs = {"type": types_[name]}
        parser.add_argument(flag(name), dest=name, default=default, help=_help(text, default), **kwargs)
    return list(helps)


def values(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The parsed values of ``names`` as keyword arguments."""
    return {name: getattr(args, name) for name in names}


def dataclass_from_args(
    args: argparse.Namespace,
    cls: type,
    names: Iterable[str] | None = None,
    *,
    prefix: str = "",
    **fixed: Any,
) -> Any:
    """An instance of ``cls`` from the options ``add_dataclass_options`` added (with that ``prefix``),
    ``fixed`` fields as given, other fields default."""
    names = [f.name for f in dataclasses.fields(cls)] if names is None else list(names)
    found = {name: getattr(args, prefix + name) for name in names if hasattr(args, prefix + name)}
    return cls(**{**found, **fixed})


__all__ = [
    "add_dataclass_options",
    "add_signature_options",
    "dataclass_from_args",
    "docstring_args",
    "flag",
    "values",
]
