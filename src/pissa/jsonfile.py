"""Reading the small JSON files pissa's folders are recognised by, with errors that say what to do."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import PissaError


def read_json(path: Path, missing: str, fix: str) -> dict:
    """Parse `path`; a missing file raises PissaError(f"{path} not found; {missing}"), bad JSON names `fix`."""
    if not path.exists():
        raise PissaError(f"{path} not found; {missing}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PissaError(f"{path} is not valid JSON ({e}); {fix}") from e
