"""The one base class for errors a user can fix (the CLI prints these as one line, without a traceback),
and the small checks every config uses to raise them before any work is done."""

from __future__ import annotations

import math
import re


class PissaError(Exception):
    """A bad input: the message names the offending file, tensor, layer or flag, and the fix."""


def check_number(value: float | None, flag: str, minimum: float | None = None, maximum: float | None = None, *,
                 above: float | None = None, below: float | None = None) -> None:
    """Refuse NaN, infinities and values outside [minimum, maximum] (or the open bounds above/below),
    naming the flag; None (an option left unset) passes."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise PissaError(f"{flag} must be a finite number, got {value}")
    bounds = [(minimum, value >= minimum if minimum is not None else True, ">="),
              (maximum, value <= maximum if maximum is not None else True, "<="),
              (above, value > above if above is not None else True, ">"),
              (below, value < below if below is not None else True, "<")]
    for bound, ok, sign in bounds:
        if not ok:
            raise PissaError(f"{flag} must be {sign} {bound}, got {value}")


def check_regex(pattern: str, flag: str) -> re.Pattern:
    """Compile a user's regular expression, refusing a broken one with the reason."""
    try:
        return re.compile(pattern)
    except re.error as e:
        raise PissaError(f"{flag} {pattern!r} is not a valid regular expression ({e}); fix the pattern") from e


class PissaWarning(UserWarning):
    """Something the user should know about an input that pissa can still use (the CLI prints it in one line)."""
