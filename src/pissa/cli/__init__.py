"""The `pissa` command line: one verb per module, all registered on one typer app."""

from . import analyze, convert, demo, eval, init, merge, methods, quant_report, report, train  # noqa: F401  (each module registers its command)
from .app import app


def main() -> None:
    app()
