"""User-facing errors: one line naming the problem and the fix, never a traceback."""


class MmiaError(Exception):
    """A problem the user can fix; the CLI prints it as one line and exits non-zero."""
