"""Answer extraction and matching, as the PiSSA paper evaluates GSM8K and MATH (MetaMath's eval).

- gsm8k: the model ends with "The answer is: N" (MetaMathQA's format). Take the first number
  after the last "The answer is"; if the phrase is missing, fall back to the last number in the text.
  A GSM8K gold solution ends with "#### N"; a MetaMathQA response with "The answer is: N".
- math: the last `\\boxed{...}` (nested braces allowed), else the text after "The answer is:",
  else the last number.
- generic-exact: the text after "The answer is:" if present, else the whole output, compared as
  normalised strings (and as numbers when both sides are numbers).

Numbers are normalised before comparing: thousands commas, `$`, `\\$`, `%`, spaces, a trailing `.`,
`.0`, negatives, and fractions (`1/2`, `\\frac{1}{2}`, `\\dfrac12`, `-\\frac{3}{4}`) are all read as
exact rationals, so "1,000", "$1000.00" and "1000" match, and "0.5" matches "\\frac{1}{2}".
"""

from __future__ import annotations

import re
from fractions import Fraction

from ..errors import PissaError

TASKS = ("gsm8k", "math", "generic-exact")

ANSWER_IS = re.compile(r"the\s+(?:final\s+)?answer\s+is\s*:?\s*", re.IGNORECASE)
# A number with optional thousands commas, decimals, `$` and a/b fraction. A minus sign counts only
# where it can't be a hyphen or a subtraction ("3-5", "10 - 5" hold no negative number).
NUMBER = re.compile(
    r"(?:(?<![\w)])-)?(?:\$\s?)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?"
)
LATEX_FRAC = re.compile(r"^(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
LATEX_FRAC_SHORT = re.compile(r"^(-?)\\[dt]?frac(\d)(\d)$")  # \frac12


def check_task(task: str) -> str:
    if task not in TASKS:
        raise PissaError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    return task


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), matching nested braces; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    open_brace = text.find("{", start)
    if open_brace < 0:
        # `\boxed 5` (no braces): the next token
        rest = text[start:].split(None, 2)
        return rest[1].rstrip(".$") if len(rest) > 1 else None
    depth = 0
    for i in range(open_brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[open_brace + 1 : i]
    return None  # unbalanced: generation was cut off inside the box


def after_answer_is(text: str) -> str | None:
    """The rest of the line after the last "The answer is:", or None if the phrase is absent."""
    matches = list(ANSWER_IS.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :].strip()
    return rest.splitlines()[0].strip() if rest else ""


def numbers_in(text: str) -> list[str]:
    return [m.group(0) for m in NUMBER.finditer(text)]


def last_number(text: str) -> str | None:
    found = numbers_in(text)
    return found[-1] if found else None


def extract_answer(text: str, task: str) -> str | None:
    """The answer a model (or a gold solution) gives in `text` for `task`; None if there is none."""
    check_task(task)
    if task == "gsm8k":
        if "####" in text:  # a GSM8K-style solution
            return first_number_or_text(text.rsplit("####", 1)[1])
        tail = after_answer_is(text)
        if tail is not None:
            found = first_number_or_text(tail)
            if found:
                return found
        return last_number(text)
    if task == "math":
        boxed = last_boxed(text)
        if boxed is not None:
            return boxed.strip()
        tail = after_answer_is(text)
        if tail:
            return tail.rstrip(".").strip().strip("$").strip()
        return last_number(text)
    tail = after_answer_is(text)
    return (tail if tail is not None else text).strip().rstrip(".").strip()


def gold_answer(text: str, task: str) -> str | None:
    """The gold answer in a dataset's answer field: a full solution ("#### 72", "The answer is: 72",
    "... \\boxed{\\frac{1}{2}}") or the bare answer itself ("72", "\\frac{1}{2}", "x^2+1")."""
    check_task(task)
    text = str(text).strip()
    if "####" in text or last_boxed(text) is not None or after_answer_is(text) is not None:
        return extract_answer(text, task)
    if task == "gsm8k" and to_number(text) is None:
        return last_number(text)
    return text or None


def first_number_or_text(tail: str) -> str | None:
    found = numbers_in(tail)
    if found:
        return found[0]
    tail = tail.strip().rstrip(".").strip()
    return tail or None


def clean(answer: str) -> str:
    """Strip formatting that never changes the value: `$`, `\\$`, `%`, spaces, `\\!`, `\\left`, ..."""
    s = answer.strip()
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,", "\\;", "\\left", "\\right", "^\\circ", "^{\\circ}"):
        s = s.replace(junk, "")
    s = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", s)  # trailing units: 5\text{ cm}
    s = re.sub(r"\s+", "", s)
    s = s.replace("dfrac", "frac").replace("tfrac", "frac")
    return s.rstrip(".")


def to_number(answer: str | None) -> Fraction | None:
    """The exact value of a numeric answer ("1,234.50", "-$3", "\\frac{1}{2}", "1/2"), else None."""
    if answer is None:
        return None
    s = clean(answer)
    m = LATEX_FRAC.match(s) or LATEX_FRAC_SHORT.match(s)
    if m:
        sign, num, den = m.groups()
        value = to_number(num), to_number(den)
        if value[0] is None or not value[1]:
            return None
        return (-1 if sign else 1) * value[0] / value[1]
    s = s.replace(",", "") if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s) else s
    if "/" in s:
        num, _, den = s.partition("/")
        a, b = to_number(num), to_number(den)
        return a / b if a is not None and b else None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def normalize(answer: str | None) -> str | None:
    """A canonical string: numbers as "p" or "p/q" (so 2.50 -> 5/2, 1,000 -> 1000), text cleaned."""
    if answer is None:
        return None
    value = to_number(answer)
    if value is not None:
        return str(value)
    return clean(answer)


def is_correct(predicted: str | None, gold: str | None) -> bool:
    """Exact match after normalisation (numbers compared by value)."""
    if predicted is None or gold is None:
        return False
    return normalize(predicted) == normalize(gold)


def accuracy(predicted: list[str | None], gold: list[str | None]) -> float:
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions for {len(gold)} gold answers")
    if not gold:
        return 0.0
    return sum(is_correct(p, g) for p, g in zip(predicted, gold, strict=True)) / len(gold)
