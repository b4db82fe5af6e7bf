"""Reading data records: a local file, the bundled `arith` set, or a Hugging Face dataset.

Sources:
- a `.jsonl` file (one JSON object per line), a `.json` file holding a list of records, or a `.json`
  file holding one (possibly pretty-printed) object, which is one record. UTF-8, with or without a
  byte-order mark; anything else is refused with the file and line;
- the bundled synthetic set `arith` (`arith`, `arith:train`, `arith:test`, see `pissa.data.synthetic`);
- a Hugging Face dataset name, `NAME[@CONFIG][:SPLIT]` (network needed).

Every record comes with `where` (file and line, item or row) so errors can name it. What a record
means (its format) is `pissa.data.formats`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PissaError
from . import synthetic

Located = tuple[dict, str]  # (record, where)


def read_records(spec: str | Path) -> tuple[list[Located], str]:
    """(record, where) pairs and a source label; `where` names the file and line for errors."""
    spec = str(spec)
    name, _, split = spec.partition(":")
    if name == synthetic.NAME:
        records = synthetic.arith_problems(split or "train")
        return [(r, f"{spec} item {i}") for i, r in enumerate(records, 1)], spec
    path = Path(spec).expanduser()
    if path.suffix in (".json", ".jsonl") or path.exists():
        return read_file(path), str(path)
    return _read_hub(spec), spec


def load_records(spec: str | Path, limit: int | None = None) -> tuple[list[Located], str]:
    """`read_records`, the first `limit` only; refuses a bad limit and an empty dataset."""
    if limit is not None and limit <= 0:
        raise PissaError(f"--limit must be a positive number of records, got {limit}")
    pairs, source = read_records(spec)
    pairs = pairs[:limit] if limit is not None else pairs
    if not pairs:
        raise PissaError(f"dataset {source} is empty; it must hold at least one record")
    return pairs, source


def decode_text(path: Path) -> str:
    """The file's text: UTF-8 with or without a byte-order mark; anything else names the line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PissaError(f"{path} line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
                         "UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None


def read_file(path: Path) -> list[Located]:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise PissaError(f"data file {path} {what}; give a .json/.jsonl file, `arith`, or a hub dataset name")
    text = decode_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        items = _parse_document(text, path, "a .json file must hold a list of records or one record")
        return [(_check_object(r, f"{path} item {i}"), f"{path} item {i}") for i, r in enumerate(items, 1)]
    if path.suffix == ".json" and stripped.startswith("{"):
        return [(_parse_document(text, path, "a .json file must hold a list of records or one record"),
                 f"{path} (its one record)")]
    return _read_lines(text, path)


def _read_lines(text: str, path: Path) -> list[Located]:
    """JSON Lines; a file whose first line is not JSON but which is one JSON object is that one record."""
    pairs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            pairs.append((_check_object(json.loads(line), f"{path} line {i}"), f"{path} line {i}"))
        except json.JSONDecodeError as e:
            if not pairs:  # maybe one pretty-printed object
                try:
                    record = json.loads(text)
                except json.JSONDecodeError:
                    pass
                else:
                    return [(_check_object(record, f"{path}"), f"{path} (its one record)")]
            raise PissaError(f"{path} line {i} is not valid JSON ({e.msg}, column {e.colno}); each line must be "
                             "one JSON object") from None
    return pairs


def _parse_document(text: str, path: Path, expected: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PissaError(f"{path} line {e.lineno} is not valid JSON ({e.msg}, column {e.colno}); {expected}") \
            from None


def _check_object(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise PissaError(f"{where}: expected a JSON object with fields, got {type(record).__name__}")
    return record


def _read_hub(spec: str) -> list[Located]:
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
