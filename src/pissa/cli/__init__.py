"""The `pissa` command line: one verb per module, all registered on one typer app."""

from . import (  # noqa: F401  (each module registers its command)
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
from .app import app
from .options import set_metavars

set_metavars(app)


def main() -> None:
    app()
