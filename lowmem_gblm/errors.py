"""Errors a user can fix. The CLI prints them as one line on stderr and exits with code 2."""


class UsageError(Exception):
    """Bad input or a bad option. The message names the problem and the fix."""


class InputError(UsageError):
    """A model, data or output folder that cannot be used as given."""


class ResumeMismatch(UsageError):
    """OUT_DIR holds a run made with other options or another input model."""


class OutOfSpace(UsageError):
    """A write failed for lack of disk space; the run stopped cleanly and can be resumed."""
