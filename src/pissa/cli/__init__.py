"""The `pissa` command line: one verb per module, all registered on one typer app."""

import os

# Transparent huge pages for torch's CPU tensors of 2 MB and more (torch reads this once, at its first
# allocation, so before the imports below). A fresh W-sized tensor otherwise costs ~0.5 ms per MB in 4 KB
# page faults, as much as the rest of a layer's init: a streaming init used 15% less CPU time with it.
# Only the command line sets it; a program that imports pissa keeps its own allocator settings.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from . import (  # noqa: E402, F401  (each module registers its command)
    analyze,
    convert,
    demo,
    eval,
    export,
    init,
    merge,
    methods,
    quant_report,
    report,
    train,
)
from .app import app  # noqa: E402
from .options import set_metavars  # noqa: E402

set_metavars(app)


def main() -> None:
    app()
