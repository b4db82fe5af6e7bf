"""SFT data records: read a file, the bundled `arith` set or a hub dataset, and turn each record into
an Example (prompt turns + the response to learn).

Formats (detected from the first record; every record must then have the same fields):
- Alpaca:      {"instruction", "input" (optional), "output"}
- MetaMathQA:  {"query", "response"}
- chat:        {"messages": [{"role", "content"}, ...]}; the last message is the assistant's answer

Sources: a .json (a list of records) or .jsonl file, the bundled synthetic set `arith`
(`arith`, `arith:train`, `arith:test`, see `pissa.data.synthetic`), or a Hugging Face dataset name
(needs the `datasets` package and network; `NAME` or `NAME:SPLIT`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import PissaError
from . import synthetic

FORMATS = {  # format -> (required fields, optional fields)
    "alpaca": (("instruction", "output"), ("input",)),
    "metamath": (("query", "response"), ()),
    "chat": (("messages",), ()),
}
ALPACA_HEADER = ("Below is an instruction that describes a task{ctx}. "
                 "Write a response that appropriately completes the request.\n\n")
ALPACA_PROMPT = ALPACA_HEADER.format(ctx="") + "### Instruction:\n{instruction}\n\n### Response:\n"
ALPACA_PROMPT_INPUT = (ALPACA_HEADER.format(ctx=", paired with an input that provides further context")
                       + "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@dataclass
class Example:
    """One training pair: prompt turns (chat messages) and the response to learn."""

    prompt: list[dict]
    response: str
    alpaca_input: str = ""  # kept apart so the Alpaca prompt can show its `### Input:` section


# --- reading -------------------------------------------------------------------------------------

def read_records(spec: str | Path) -> tuple[list[tuple[dict, str]], str]:
    """(record, where) pairs and a source label; `where` names the file and line for errors."""
    spec = str(spec)
    name, _, split = spec.partition(":")
    if name == synthetic.NAME:
        records = synthetic.arith_problems(split or "train")
        return [(r, f"{spec} item {i}") for i, r in enumerate(records, 1)], spec
    path = Path(spec).expanduser()
    if path.suffix in (".json", ".jsonl") or path.exists():
        return _read_file(path), str(path)
    return _read_hub(spec), spec


def _read_file(path: Path) -> list[tuple[dict, str]]:
    if not path.is_file():
        raise PissaError(f"data file {path} does not exist; give a .json/.jsonl file, `arith`, or a hub dataset name")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        return [(_parse_line(line, path, i), f"{path} line {i}")
                for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise PissaError(f"{path} is not valid JSON ({e}); a .json file must hold a list of records") from e
    return [(_check_object(r, f"{path} item {i}"), f"{path} item {i}") for i, r in enumerate(items, 1)]


def _parse_line(line: str, path: Path, lineno: int) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise PissaError(f"{path} line {lineno} is not valid JSON ({e.msg}); each line must be one JSON object") from e
    return _check_object(record, f"{path} line {lineno}")


def _check_object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise PissaError(f"{where}: expected a JSON object with fields, got {type(record).__name__}")
    return record


def _read_hub(spec: str) -> list[tuple[dict, str]]:
    try:
        import datasets
    except ImportError as e:
        raise PissaError(
            f"data {spec!r} is not a local .json/.jsonl file or the bundled `arith` set; to use a Hugging Face "
            "dataset name install `pip install datasets` (and have network access)"
        ) from e
    name, _, split = spec.partition(":")
    name, _, subset = name.partition("@")  # openai/gsm8k@main:test -> config "main" (GSM8K needs one)
    try:
        rows = datasets.load_dataset(name, subset or None, split=split or "train")
    except Exception as e:  # datasets raises many kinds (connection, not found, bad split)
        raise PissaError(f"could not load Hugging Face dataset {spec!r}: {e.__class__.__name__}: {e}") from e
    return [(dict(r), f"{spec} row {i}") for i, r in enumerate(rows, 1)]


# --- records -> examples -------------------------------------------------------------------------

def detect_format(record: dict, where: str) -> str:
    for fmt, (required, _) in FORMATS.items():
        if any(f in record for f in required):
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(req)}" for fmt, (req, _) in FORMATS.items())
    raise PissaError(f"{where}: unknown record format, fields are {sorted(record)}; expected one of ({expected})")


def to_example(record: dict, fmt: str, where: str) -> Example:
    """One record of format `fmt` as an Example; a missing or non-text field is named with its line."""
    required, _ = FORMATS[fmt]
    for f in required:
        if f not in record or record[f] is None:
            raise PissaError(f"{where}: missing field {f!r} ({fmt} format needs {', '.join(required)}); "
                             "fix or remove that record")
    if fmt == "chat":
        return _chat_example(record["messages"], where)
    prompt_field, response_field = required[0], required[1]
    for f in (*required, *FORMATS[fmt][1]):
        if f in record and record[f] is not None and not isinstance(record[f], str):
            raise PissaError(f"{where}: field {f!r} must be a string, got {type(record[f]).__name__}")
    if not record[response_field].strip():
        raise PissaError(f"{where}: field {response_field!r} is empty; there is nothing to learn from this record")
    extra = (record.get("input") or "") if fmt == "alpaca" else ""
    content = record[prompt_field] + (f"\n\n{extra}" if extra else "")
    return Example(prompt=[{"role": "user", "content": content}], response=record[response_field],
                   alpaca_input=extra)


def _chat_example(messages, where: str) -> Example:
    if not isinstance(messages, list) or not messages:
        raise PissaError(f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise PissaError(f"{where}: messages[{i}] is missing field 'role' or 'content'")
    if messages[-1]["role"] != "assistant":
        raise PissaError(f"{where}: the last message must have role 'assistant' (the response to learn), "
                         f"got {messages[-1]['role']!r}")
    if len(messages) < 2:
        raise PissaError(f"{where}: 'messages' needs at least one prompt turn before the assistant's answer")
    return Example(prompt=[dict(role=m["role"], content=m["content"]) for m in messages[:-1]],
                   response=messages[-1]["content"])


def load_examples(spec: str | Path, limit: int | None = None) -> tuple[list[Example], str, str]:
    """(examples, format, source) from a file, `arith[:split]` or a hub name; refuses an empty dataset."""
    pairs, source = read_records(spec)
    if limit is not None:
        pairs = pairs[:limit]
    if not pairs:
        raise PissaError(f"dataset {source} is empty; it must hold at least one record")
    fmt = detect_format(*pairs[0])
    return [to_example(r, fmt, where) for r, where in pairs], fmt, source


