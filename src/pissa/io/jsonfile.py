"""Reading the small JSON files pissa's folders are recognised by, with errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import PissaError


def read_json(path: Path, missing: str, fix: str) -> dict:
    """Parse `path`; a missing file raises PissaError(f"{path} not found; {missing}"), bad JSON names `fix`."""
    if not path.exists():
        raise PissaError(f"{path} not found; {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PissaError(f"{path} is not valid JSON ({e}); {fix}") from e


def write_json(path: Path, data: dict, **dump_kwargs) -> Path:
    """Write `data` as indented JSON with a final newline."""
    path.write_text(json.dumps(data, indent=2, **dump_kwargs) + "\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (blank lines skipped); a damaged line is named."""
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise PissaError(f"{path} line {number} is not valid JSON ({e}); the file is damaged") from e
    return records
