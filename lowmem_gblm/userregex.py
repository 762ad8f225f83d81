"""Regular expressions typed by users (``--targets``, ``--ignore``, ``report --linears``), matched in linear time.

Python's ``re`` backtracks: ``(([a-z_.0-9])+)+!`` against a module name runs for minutes inside C code, where
Ctrl-C is not seen. RE2 (google-re2) matches in time linear in the name, whatever the pattern. A pattern is
first compiled by ``re`` (Python's syntax and its error messages stay the reference), then by RE2; the few
``re`` features RE2 does not have (lookaround, backreferences, ``\\Z``, verbose mode, huge repeats) are refused
with a usage error that says so, rather than matched by the backtracking engine.
"""

from __future__ import annotations

import functools
import re
from typing import Protocol

import re2

from lowmem_gblm.errors import UsageError

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # RE2 would also print its parse errors to stderr; ours is the one error line


class Matcher(Protocol):
    pattern: str

    def search(self, text: str) -> object | None: ...


def _reason(exc: Exception) -> str:
    arg = exc.args[0] if exc.args else exc
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)


@functools.lru_cache(maxsize=64)
def compile_user_regex(flag: str, pattern: str) -> Matcher:
    """The compiled ``pattern`` of option ``flag`` (for messages), whose ``search`` runs in linear time.
    UsageError when it is no regular expression, or uses a feature the linear-time engine lacks."""
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise UsageError(f"{flag} {pattern!r} is not a regular expression ({exc})") from None
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as exc:
        raise UsageError(f"{flag} {pattern!r} uses a feature the linear-time matcher (RE2) does not have "
                         f"({_reason(exc)}): lookarounds, backreferences, \\Z, (?x) and repeats over 1000 are not "
                         "supported; write it without them (names are matched with re.search)") from None
