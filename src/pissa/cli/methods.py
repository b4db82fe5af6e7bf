"""`pissa methods`: the decomposition registry, with each method's options."""

from __future__ import annotations

import dataclasses

from rich.table import Table

from .app import app, console


@app.command("methods")
def methods_command():
    """List the decomposition methods and their options.

    Example:

    \b
      pissa methods
    """
    from ..decompose import METHODS

    table = Table(title="decomposition methods (pissa init --method NAME --option KEY=VALUE)")
    for column in ("method", "what it does", "options (default)"):
        table.add_column(column)
    for name, method in sorted(METHODS.items()):
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(method.options)) or "-"
        table.add_row(name, method.help, opts)
    console.print(table)
