"""The one markdown table helper and number formatting shared by every report."""

from __future__ import annotations


def fmt(value, spec: str = ".4g") -> str:
    """A table cell: floats formatted with `spec`, None as an en dash, anything else as text."""
    if value is None:
        return "–"
    return format(value, spec) if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
