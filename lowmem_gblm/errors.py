"""Errors a user can fix. The CLI prints them as one line on stderr and exits with code 2."""

import importlib


class UsageError(Exception):
    """Bad input or a bad option. The message names the problem and the fix."""


class InputError(UsageError):
    """A model, data or output folder that cannot be used as given."""


class ResumeMismatch(UsageError):
    """OUT_DIR holds a run made with other options or another input model."""


class OutOfSpace(UsageError):
    """A write failed for lack of disk space; the run stopped cleanly and can be resumed."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception for a one-line message: its first non-blank line (transformers and datasets write
    paragraphs of advice after it), cut at ``limit`` characters; the type's name when it says nothing."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def require_extra(module: str, needed_by: str, extra: str, after: str = "") -> None:
    """Refuse (UsageError naming ``pip install 'lowmem-gblm[extra]'``) when the optional ``module`` of that extra
    is not installed; ``needed_by`` names the option that needs it, ``after`` is added to the message."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise UsageError(f"{needed_by}, which is not installed ({exc}); install it with: "
                         f"pip install 'lowmem-gblm[{extra}]'{after}") from exc
