"""Command-line options derived from the configuration dataclasses, so that a default, a type and
a help text are written once, in the dataclass and its ``Args:`` docstring section.

``add_config_args(parser, TrainConfig)`` adds one option per field (``batch_size`` becomes
``--batch-size``); ``config_from_args(TrainConfig, args)`` builds the dataclass back from the
parsed namespace. A field without an ``Args:`` entry (or an entry that names no field) is an
error as soon as the parser is built, so a new field cannot go undocumented.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Iterable, Mapping, Sequence

# The namespace attribute (a parser default) that records which fields of which dataclass a
# parser's options fill, so that two dataclasses can share one command without their fields
# of the same name (PriorTrainConfig.cond_codes, PriorConfig.cond_codes) mixing.
_REGISTRY = "_config_fields"

_ENTRY = re.compile(r"(?P<name>\*{0,2}\w+)\s*(\([^)]*\))?\s*:(?P<text>.*)$")


def docstring_args(doc: str | None) -> dict[str, str]:
    """The entries of a Google-style ``Args:`` section, name to text, continuation lines joined
    with single spaces; empty when the docstring has no such section."""
    if not doc:
        return {}
    lines = inspect.cleandoc(doc).splitlines()
    entries: dict[str, str] = {}
    section_indent = entry_indent = None
    name = None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if section_indent is None:
            if stripped == "Args:":
                section_indent = indent
            continue
        if not stripped:
            continue
        if indent <= section_indent:  # the next section (Returns:, ...) or prose
            break
        match = _ENTRY.match(stripped)
        if entry_indent is None:
            entry_indent = indent
        if indent == entry_indent and match:
            name = match["name"]
            entries[name] = match["text"].strip()
        elif indent > entry_indent and name is not None:
            entries[name] = f"{entries[name]} {stripped}".strip()
        else:
            raise TypeError(f"cannot read the Args: section at {stripped!r}")
    return entries


def field_help(cls: type) -> dict[str, str]:
    """Each field of the dataclass ``cls`` to its ``Args:`` entry, looked up along the MRO (so
    that a field inherited from a base such as PlacementConfig finds the base's entry). Raises
    TypeError naming a field that has no entry, or an entry that names no field."""
    names = [f.name for f in dataclasses.fields(cls)]
    docs: dict[str, str] = {}
    stale = []
    for klass in cls.__mro__:
        entries = docstring_args(klass.__dict__.get("__doc__"))
        stale += [f"{klass.__name__}.{n}" for n in entries if n not in names]
        for n, text in entries.items():
            docs.setdefault(n, text)
    missing = [n for n in names if not docs.get(n)]
    if missing:
        raise TypeError(f"{cls.__name__}: field(s) {', '.join(missing)} have no entry in the Args: section of "
                        "the class docstring (or a base's); document every field there")
    if stale:
        raise TypeError(f"{cls.__name__}: Args: entries {', '.join(stale)} name no field")
    return {n: docs[n] for n in names}


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _names(field_name: str, flags: Mapping[str, str | Sequence[str]]) -> list[str]:
    names = flags.get(field_name, flag_name(field_name))
    return [names] if isinstance(names, str) else list(names)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _unwrap_optional(tp) -> tuple[object, bool]:
    """``X | None`` (or ``Optional[X]``) to ``(X, True)``; anything else to ``(tp, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _argparse_kwargs(cls: type, f: dataclasses.Field, tp, default) -> dict:
    """The add_argument keywords for a field of annotation ``tp`` and ``default``."""
    inner, _ = _unwrap_optional(tp)
    if inner is bool:
        if default is False:
            return {"action": "store_true"}
        return {"action": argparse.BooleanOptionalAction}
    if inner in (int, float, str):
        return {"type": inner}
    if typing.get_origin(inner) is list and typing.get_args(inner) in ((str,), (int,), (float,)):
        return {"action": "append", "type": typing.get_args(inner)[0]}
    raise TypeError(f"{cls.__name__}.{f.name}: no command-line option for a field of type {tp}; "
                    "exclude it or write its option by hand")


def _help(text: str, default, kwargs: dict, names: Mapping[str, str]) -> str:
    """The Args: entry as help: the other fields it names given as the command line spells them
    (``val_codes`` as --val-codes, a positional ``codes`` as CODES), then the default."""
    if names:
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
        text = pattern.sub(lambda m: names[m[1]], text)
    text = text.replace("%", "%%")
    if kwargs.get("action") == "append":
        text += " Repeat the option for each."
    shown = default is not dataclasses.MISSING and default is not None and not isinstance(default, (bool, list))
    return f"{text.removesuffix('.')} (default: {default})" if shown else text


def add_config_args(parser: argparse.ArgumentParser | argparse._ActionsContainer, cls: type, *,
                    exclude: Iterable[str] = (), positional: Iterable[str] = (),
                    flags: Mapping[str, str | Sequence[str]] | None = None,
                    choices: Mapping[str, Sequence] | None = None,
                    unset: Mapping[str, str] | None = None) -> list[str]:
    """Add one option per field of the dataclass ``cls`` (less ``exclude``) to ``parser``: named
    ``--kebab-case`` of the field unless ``flags`` names it (``{"cond_codes": "--cond"}``, or a
    list of names), a positional argument for the fields in ``positional``; typed from the
    annotation (int, float, str, ``X | None``; bool as a ``--flag/--no-flag`` pair, or a plain
    switch where the default is False; ``list[str]`` as a repeatable option); the default the
    field's own; the help its ``Args:`` entry. ``choices`` restricts a field's values. The
    options of the fields in ``unset`` default to None, for the caller to decide, and their help
    gives ``unset[name]`` as the default (``{"dropout": "by the number of maps"}``). Returns
    the fields added; the dest of each is the field's name."""
    exclude, positional, flags, choices = set(exclude), set(positional), dict(flags or {}), dict(choices or {})
    unset = dict(unset or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = (exclude | positional | set(flags) | set(choices) | set(unset)) - set(fields)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    docs = field_help(cls)
    hints = typing.get_type_hints(cls)
    taken = {action.dest for action in parser._actions}
    # The class's own fields first, then those it inherits (the placement settings).
    own = [n for n in fields if n in cls.__dict__.get("__annotations__", {})]
    order = own + [n for n in fields if n not in own]
    # How the help texts spell the fields added here: a positional by its metavar; a field with
    # an underscore by its option (a one-word name like "data" is as likely to be plain English).
    spelled = {n: n.upper() if n in positional else _names(n, flags)[0] for n in order
               if n not in exclude and (n in positional or "_" in n)}
    added = []
    for name in order:
        if name in exclude:
            continue
        f = fields[name]
        if name in taken:
            raise TypeError(f"{cls.__name__}.{name}: the parser already has an option for {name!r}")
        default = _default(f)
        kwargs = _argparse_kwargs(cls, f, hints[name], default)
        if name in choices:
            kwargs["choices"] = choices[name]
        kwargs["help"] = _help(docs[name], default if name not in unset else unset[name], kwargs,
                               {n: v for n, v in spelled.items() if n != name})
        if name in unset:
            default = None
        if name in positional:
            if default is not dataclasses.MISSING:
                kwargs.update(nargs="?", default=default)
            parser.add_argument(name, metavar=spelled[name], **kwargs)
        else:
            names = _names(name, flags)
            if default is dataclasses.MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
            if kwargs.get("action") not in ("store_true", argparse.BooleanOptionalAction) and "choices" not in kwargs:
                kwargs["metavar"] = names[0].lstrip("-").upper().replace("-", "_")
            parser.add_argument(*names, dest=name, **kwargs)
        added.append(name)
    registry = dict(parser.get_default(_REGISTRY) or {})
    registry[cls] = (*registry.get(cls, ()), *added)
    parser.set_defaults(**{_REGISTRY: registry})
    return added


def config_args(cls: type, args: argparse.Namespace) -> dict:
    """The values of ``cls``'s fields that ``add_config_args`` added to the command ``args`` was
    parsed by, as keywords (fields it did not add are left out, so they keep their defaults)."""
    registry = getattr(args, _REGISTRY, None) or {}
    if cls not in registry:
        raise TypeError(f"the command was not given {cls.__name__}'s options (add_config_args)")
    return {name: getattr(args, name) for name in registry[cls]}


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
    """The dataclass ``cls`` built from the parsed ``args`` (see ``config_args``), with
    ``overrides`` taking precedence."""
    return cls(**{**config_args(cls, args), **overrides})
