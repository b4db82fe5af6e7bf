"""The `pissa` command line: one verb per module, all registered on one typer app."""

from . import init, methods  # noqa: F401  (each module registers its command)
from .app import app


def main() -> None:
    app()
