"""The one base class for errors a user can fix; the CLI prints these without a traceback."""


class PissaError(Exception):
    """A bad input: the message names the offending file, tensor, layer or flag, and the fix."""
