"""The one base class for errors a user can fix; the CLI prints these without a traceback."""


class PissaError(Exception):
    """A bad input: the message names the offending file, tensor, layer or flag, and the fix."""


class PissaWarning(UserWarning):
    """Something the user should know about an input that pissa can still use (the CLI prints it in one line)."""
