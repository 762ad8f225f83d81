"""Command-line options derived from the config's declarations (lowmem_gblm.options): a command lists the config it
builds, and gets one typer option per declared field (flag, type, default and help as declared)."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Annotated

import typer

from lowmem_gblm.options import flag, hints, nested_configs, plain, specs

_KW = inspect.Parameter.KEYWORD_ONLY


def opt(cls: type, name: str, **override) -> object:
    """The typer annotation of ``cls``'s option ``name`` (``help`` / ``flag`` / ``cli_type`` may be overridden)."""
    spec = specs(cls)[name][1]
    kind = override.pop("cli_type", None) or spec.cli_type or hints(cls)[name]
    decl = override.pop("flag", None) or flag(name, spec)
    info = {"help": spec.help, "show_default": spec.show_default} | override
    return Annotated[kind, typer.Option(decl, **info)]


def default(cls: type, name: str):
    """The command-line default of ``cls``'s option ``name``: the declared default as a plain value."""
    return plain(specs(cls)[name][0].default)


def option_names(cls: type, skip: tuple[str, ...] = ()) -> list[tuple[type, str]]:
    """(declaring class, name) of every command-line option of ``cls``, nested configs' included: the class's own
    options first (the ones a command is about), then the nested configs', then the inherited ones."""
    nested = nested_configs(cls)
    inherited = set().union(*(specs(base) for base in cls.__mro__[1:] if dataclasses.is_dataclass(base)))
    own = [n for n in specs(cls) if n not in inherited]
    order = own + [n for n in specs(cls) if n in inherited]
    out = []
    for name in order:
        if name in nested:
            out += option_names(nested[name], skip)
        elif specs(cls)[name][1].cli and name not in skip:
            out.append((cls, name))
    return out


def derived(cls: type, skip: tuple[str, ...] = ()) -> Callable:
    """Give a command ``def cmd(positional..., extra=..., **options)`` one keyword option per option of ``cls``
    (``option_names``); they arrive in ``options`` (hand them to ``build``)."""

    def wrap(fn: Callable) -> Callable:
        own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
        positional = [p for p in own if p.default is p.empty]
        extra = [p.replace(kind=_KW) for p in own if p.default is not p.empty]
        options = [inspect.Parameter(name, _KW, default=default(owner, name), annotation=opt(owner, name))
                   for owner, name in option_names(cls, skip)]
        fn.__signature__ = inspect.Signature(positional + options + extra, return_annotation=None)
        return fn

    return wrap
