"""Sizes: read a size a user typed, write a byte count for people. The one formatter of the package."""

from __future__ import annotations

import re

from lowmem_gblm.errors import UsageError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str | int | float | None) -> int | None:
    """'24GiB', '6GB', '512MiB', '1.5g', 1234 -> bytes (binary for K/M/G/T alone). None stays None."""
    if text is None or isinstance(text, int | float):
        return None if text is None else int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise UsageError(f"cannot read the size {text!r}; write it like 24GiB, 6GB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


MAX_COUNT = 2**31 - 1  # the largest count option (windows, tokens, batch, ...) a run can mean; far below int64


def check_count(flag: str, value: int | None, lo: int = 1) -> None:
    """UsageError unless ``value`` (None: the option was not given) is an integer in [lo, MAX_COUNT]: a count
    past int32 is a typo, and past int64 it would overflow inside torch (an OverflowError, not an error line)."""
    if value is not None and not lo <= value <= MAX_COUNT:
        raise UsageError(f"{flag} must be an integer in [{lo}, {MAX_COUNT}], got {value}")


def fmt_size(n: float) -> str:
    """1536 -> '1.50 KiB' (binary units, two decimals; whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def fmt_budget(n: int | None) -> str:
    """A budget: 'unlimited' when there is none."""
    return "unlimited" if n is None else fmt_size(n)


def prod(shape) -> int:
    """Number of elements of a shape (any iterable of ints)."""
    n = 1
    for s in shape:
        n *= int(s)
    return n
