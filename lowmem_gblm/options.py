"""Options declared once. A config field built with ``option(default, help, ...)`` carries everything the rest of
the tool needs to know about it: its command-line flag and help, how it is checked, whether it decides output bytes
(and so a resumed run's identity), whether a method reads it, which plan setting it feeds and whether it is part of
a gradient folder's identity. ``config`` derives its fingerprint, the method's options and its checks from these
declarations, the command line derives its flags, the engine its plan settings and gradient identity.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import cache
from pathlib import PurePath

from lowmem_gblm.errors import UsageError
from lowmem_gblm.units import check_count

BYTES = "bytes"  # decides output bytes: fingerprinted, a resumed run must match it
HOW = "how"  # only how the bytes are computed or where they go (same output either way): not fingerprinted
PATH = "path"  # a file or folder whose content the run records another way (a hash): not fingerprinted
_IDENTITIES = (BYTES, HOW, PATH)
ALWAYS = object()  # Spec.unless: fingerprinted at every value


class Choice(str, Enum):
    """A typed choice: compares equal to its value and prints as it (typer lists the values in --help)."""

    def __str__(self) -> str:
        return self.value


def choices(name: str, values) -> type[Choice]:
    return Choice(name, {v.upper(): v for v in values})


@dataclass(frozen=True)
class Spec:
    """What one option is (see ``option``)."""

    help: str
    identity: str = BYTES
    unless: object = ALWAYS  # fingerprinted only when not this value (runs from before the option still resume)
    when: Callable | None = None  # fingerprinted only when when(config) holds
    check: Callable | None = None  # check(flag, value) raises a UsageError for a bad value
    method: bool = False  # a method reads it: handed over in methods.MethodOptions under the same name
    plan: str | None = None  # the memory.plan.PlanSettings field it feeds
    gradients: bool = False  # part of a gradient folder's identity (engine.gradients)
    flag: str | None = None  # its command-line flag (default: --name-with-dashes)
    cli: bool = True  # a command-line option (False: set from another one, e.g. progress from --quiet)
    cli_type: object = None  # its command-line type when not the field's (e.g. Path for a file)
    show_default: bool = True

    def __post_init__(self) -> None:
        if self.identity not in _IDENTITIES:
            raise ValueError(f"identity must be one of {_IDENTITIES}, got {self.identity!r}")


def option(default, help: str, *, legacy: bool = False, **spec) -> dataclasses.Field:
    """A config field with its ``Spec``. ``legacy``: fingerprinted only when not at ``default`` (an option added
    after runs were made: those runs, which had its default, still resume)."""
    if legacy:
        spec["unless"] = plain(default)
    return dataclasses.field(default=default, metadata={"spec": Spec(help, **spec)})


def plain(value):
    """The JSON value of an option (a choice as its string)."""
    return json.loads(json.dumps(value.value if isinstance(value, Enum) else value))


@cache
def specs(cls: type) -> dict[str, tuple[dataclasses.Field, Spec]]:
    """Every declared option of a config class, in field order: name -> (field, spec)."""
    return {f.name: (f, f.metadata["spec"]) for f in dataclasses.fields(cls) if "spec" in f.metadata}


@cache
def hints(cls: type) -> dict[str, object]:
    """The config class's field types, resolved."""
    return typing.get_type_hints(cls)


def nested_configs(cls: type) -> dict[str, type]:
    """The options of ``cls`` that are configs themselves (e.g. ``calib``): name -> their class."""
    return {n: t for n in specs(cls) if dataclasses.is_dataclass(t := hints(cls)[n])}


def build(cls: type, values: dict):
    """A ``cls`` from flat option values, a nested config's options among them (a command line's); paths become
    strings."""
    values = {k: str(v) if isinstance(v, PurePath) else v for k, v in values.items()}
    for name, kind in nested_configs(cls).items():
        if name not in values:
            values[name] = build(kind, {k: values.pop(k) for k in list(values) if k in specs(kind)})
    return cls(**values)


def choice_of(tp) -> type[Choice] | None:
    """The Choice an option's type names (``X`` or ``X | None``), or None."""
    for t in (tp, *typing.get_args(tp)):
        if isinstance(t, type) and issubclass(t, Choice):
            return t
    return None


def flag(name: str, spec: Spec) -> str:
    return spec.flag or "--" + name.replace("_", "-")


def coerce(config, name: str, kind: type[Choice]) -> None:
    """Turn a plain string option into its Choice (None stays None), or say which values it takes."""
    value = getattr(config, name)
    if value is None:
        return
    try:
        object.__setattr__(config, name, kind(str(value.value if isinstance(value, Enum) else value)))
    except ValueError:
        raise UsageError(f"{flag(name, specs(type(config))[name][1])} must be one of "
                         f"{', '.join(m.value for m in kind)}, got {value!r}") from None


def validate(config) -> None:
    """Coerce every choice and run every declared check of ``config``'s options."""
    for name, (_, spec) in specs(type(config)).items():
        kind = choice_of(hints(type(config))[name])
        if kind is not None:
            coerce(config, name, kind)
        if spec.check is not None:
            spec.check(flag(name, spec), getattr(config, name))


def fingerprinted(config) -> dict:
    """The options of ``config`` that decide the output bytes, as plain JSON values (a nested config, such as the
    calibration's, as its own dict)."""
    out = {}
    for name, (_, spec) in specs(type(config)).items():
        value = getattr(config, name)
        if dataclasses.is_dataclass(value):
            out[name] = fingerprinted(value)
            continue
        value = plain(value)
        if spec.identity != BYTES or (spec.unless is not ALWAYS and value == spec.unless):
            continue
        if spec.when is None or spec.when(config):
            out[name] = value
    return out


def named(cls: type, **where) -> tuple[str, ...]:
    """The options of ``cls`` whose spec has every attribute of ``where`` at that value, in field order."""
    return tuple(n for n, (_, s) in specs(cls).items() if all(getattr(s, k) == v for k, v in where.items()))


# checks (flag, value) -> None, for Spec.check


def count(lo: int = 1) -> Callable:
    """An integer >= lo, or None."""
    return lambda flag, value: check_count(flag, value, lo)


def within(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False, what: str = "") -> Callable:
    """A number in [lo, hi] (an open end excluded); NaN is refused."""
    def check(flag: str, value) -> None:
        ok = isinstance(value, (int, float)) and (lo < value if open_lo else lo <= value) and (
            value < hi if open_hi else value <= hi)
        if not ok:
            span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
            raise UsageError(f"{flag} must be in {span}{what}, got {value}")
    return check
