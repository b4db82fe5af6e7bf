"""What a record means: the supervised formats `pissa train` reads, each turned into an `Example`.

| format              | fields                                          | what is learned                       |
|---------------------|-------------------------------------------------|---------------------------------------|
| `chat`              | `messages`: [{role, content}, ...]              | every assistant turn                  |
| `sharegpt`          | `conversations`: [{from, value}, ...]           | every assistant (gpt) turn            |
| `prompt-completion` | `prompt`, `completion`: strings (raw text) or   | the completion                        |
|                     | lists of turns (conversational, TRL's format)   |                                       |
| `alpaca`            | `instruction`, `input` (optional), `output`     | the output                            |
| `metamath`          | `query`, `response`                             | the response                          |
| `gsm8k`             | `question`, `answer`                            | the answer                            |
| `math`              | `problem`, `solution`                           | the solution                          |
| `text`              | `text`                                          | every token                           |

The format is detected from the first record (the first whose required fields are all present);
every record must then have that format. Preference records (`chosen`/`rejected`) are for
`--stage dpo` (`pissa.data.preference`). How an Example becomes TRL's records and tokens is
`pissa.data.sft`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PissaError
from .messages import chat_turns, split_last_answer
from .records import load_records


@dataclass
class Example:
    """One record, normalised: the prompt (chat turns, or raw text) and what to learn.

    `completion` is the assistant turn(s) to learn as chat turns, or raw text for the `text` and plain
    `prompt-completion` formats. In `chat`/`sharegpt` records, `prompt` may hold earlier assistant turns;
    those are learned too when the tokenizer has a chat template (see `pissa.data.sft`).
    """

    prompt: list[dict] | str
    completion: list[dict] | str
    alpaca_input: str = ""  # kept apart so the Alpaca prompt can show its `### Input:` section
    where: str = ""  # file and line, for errors

    @property
    def response(self) -> str:
        """The final answer as text (what evaluation scores)."""
        if isinstance(self.completion, str):
            return self.completion
        return self.completion[-1]["content"]

    @property
    def raw(self) -> bool:
        """Raw text, rendered by no template."""
        return isinstance(self.prompt, str)


@dataclass(frozen=True)
class Format:
    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[dict, str], Example]
    every_turn: bool = False  # earlier assistant turns are learned too

    @property
    def response_field(self) -> str | None:
        """The field holding the reference answer of a single-turn format (None for chats and text)."""
        return self.required[1] if len(self.required) == 2 and self.name != "prompt-completion" else None


def _strings(record: dict, fmt: str, fields: tuple[str, ...], where: str) -> None:
    for f in fields:
        if f in record and record[f] is not None and not isinstance(record[f], str):
            raise PissaError(f"{where}: field {f!r} must be a string in the {fmt} format, got "
                             f"{type(record[f]).__name__}")


def _question_answer(prompt_field: str, answer_field: str, fmt: str) -> Callable[[dict, str], Example]:
    def convert(record: dict, where: str) -> Example:
        _strings(record, fmt, (prompt_field, answer_field, "input"), where)
        if not record[answer_field].strip():
            raise PissaError(f"{where}: field {answer_field!r} is empty; there is nothing to learn from this record")
        extra = (record.get("input") or "") if fmt == "alpaca" else ""
        content = record[prompt_field] + (f"\n\n{extra}" if extra else "")
        return Example(prompt=[{"role": "user", "content": content}],
                       completion=[{"role": "assistant", "content": record[answer_field]}], alpaca_input=extra,
                       where=where)
    return convert


def _chat(field: str) -> Callable[[dict, str], Example]:
    def convert(record: dict, where: str) -> Example:
        prompt, answer = split_last_answer(chat_turns(record[field], where, field), where, field)
        return Example(prompt=prompt, completion=[answer], where=where)
    return convert


def _prompt_completion(record: dict, where: str) -> Example:
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise PissaError(f"{where}: field 'completion' is empty; there is nothing to learn from this record")
        return Example(prompt=prompt, completion=completion, where=where)
    if isinstance(prompt, str | list) and isinstance(completion, list):  # conversational (a string prompt: the user's)
        turns = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                 else chat_turns(prompt, where, "prompt"))
        answer = chat_turns(completion, where, "completion")
        if not any(t["role"] == "assistant" and t["content"].strip() for t in answer):
            raise PissaError(f"{where}: field 'completion' has no non-empty assistant turn; nothing to learn")
        return Example(prompt=turns, completion=answer, where=where)
    raise PissaError(f"{where}: 'prompt' and 'completion' must both be strings (plain text) or lists of turns "
                     f"(conversational), got {type(prompt).__name__} and {type(completion).__name__}")


def _text(record: dict, where: str) -> Example:
    _strings(record, "text", ("text",), where)
    if not record["text"].strip():
        raise PissaError(f"{where}: field 'text' is empty; there is nothing to learn from this record")
    return Example(prompt="", completion=record["text"], where=where)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("chat", ("messages",), (), _chat("messages"), every_turn=True),
    Format("sharegpt", ("conversations",), (), _chat("conversations"), every_turn=True),
    Format("prompt-completion", ("prompt", "completion"), (), _prompt_completion),
    Format("alpaca", ("instruction", "output"), ("input",), _question_answer("instruction", "output", "alpaca")),
    Format("metamath", ("query", "response"), (), _question_answer("query", "response", "metamath")),
    Format("gsm8k", ("question", "answer"), (), _question_answer("question", "answer", "gsm8k")),
    Format("math", ("problem", "solution"), (), _question_answer("problem", "solution", "math")),
    Format("text", ("text",), (), _text),
)}
PREFERENCE_FIELDS = ("chosen", "rejected")


def detect_format(record: dict, where: str) -> str:
    """The format whose required fields are all present, else the first with any present (so that a
    missing field is named), else a one-line error listing the formats."""
    if all(f in record for f in PREFERENCE_FIELDS):
        raise PissaError(f"{where}: a preference record (chosen/rejected); train on it with --stage dpo")
    for fmt in FORMATS.values():
        if all(f in record for f in fmt.required):
            return fmt.name
    for fmt in FORMATS.values():
        if any(f in record for f in fmt.required):
            return fmt.name
    expected = "; ".join(f"{f.name}: {', '.join(f.required)}" for f in FORMATS.values())
    hint = ""
    if len(record) == 1 and isinstance(next(iter(record.values())), list):
        hint = " (a .json file holding one object is one record: put the records in a top-level list)"
    raise PissaError(f"{where}: unknown record format, fields are {sorted(record)}; expected one of "
                     f"({expected}){hint}")


def to_example(record: dict, fmt: str, where: str) -> Example:
    """One record of format `fmt` as an Example; a missing or malformed field is named with its line."""
    spec = FORMATS[fmt]
    for f in spec.required:
        if f not in record or record[f] is None:
            raise PissaError(f"{where}: missing field {f!r} ({fmt} format needs {', '.join(spec.required)}); "
                             "fix or remove that record")
    return spec.convert(record, where)


def load_examples(spec: str | Path, limit: int | None = None) -> tuple[list[Example], str, str]:
    """(examples, format, source) from a file, `arith[:split]` or a hub name; refuses an empty dataset."""
    pairs, source = load_records(spec, limit)
    fmt = detect_format(*pairs[0])
    return [to_example(r, fmt, where) for r, where in pairs], fmt, source
