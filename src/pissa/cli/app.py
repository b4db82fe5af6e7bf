"""The typer app and what every command shares: error handling, progress bars, summary tables."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import PissaError, PissaWarning

app = typer.Typer(
    name="pissa",
    help="PiSSA fine-tuning: principal-singular-value adapter init, QPiSSA, conversion to LoRA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: option names are never cut and flags show no <bool> metavar at 80 columns.
    rich_markup_mode=None,
)
console = Console()
err_console = Console(stderr=True)


INTERRUPTED = "interrupted; nothing was written (outputs appear only when complete)"


@contextmanager
def user_errors(interrupted: str = INTERRUPTED) -> Iterator[None]:
    """Print a user-fixable error in one line and exit with status 2 (no traceback); Ctrl-C prints one line
    (`interrupted`: what happened to the output and how to go on) and exits 130."""
    try:
        yield
    except PissaError as e:
        # soft_wrap: one unbroken line, so long paths in the message stay greppable
        err_console.print(f"[bold red]error:[/] {e}", soft_wrap=True)
        raise typer.Exit(2) from e
    except KeyboardInterrupt as e:
        err_console.print(f"[bold yellow]{interrupted}[/]", soft_wrap=True)
        raise typer.Exit(130) from e


@contextmanager
def layer_progress(description: str) -> Iterator:
    """A rich progress bar driven by `callback(done, total, name)`."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[name]}", style="dim"),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=None, name="")

        def callback(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, name=name)

        yield callback


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def summary_table(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", overflow="fold")  # paths are keys too: wrap, never cut
    table.add_column(overflow="fold")  # wrap long values (paths) instead of cutting them: users copy them
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.callback()
def _root() -> None:
    """PiSSA fine-tuning: principal-singular-value adapter init, QPiSSA, conversion to LoRA."""
    # Our own progress bars replace transformers' per-file ones.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    # pissa's warnings say where a command did other than asked: shown even under PYTHONWARNINGS=ignore or -W ignore.
    warnings.filterwarnings("default", category=PissaWarning)
    warnings.showwarning = show_warning


_python_showwarning = warnings.showwarning


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """pissa's own warnings in one line, like its errors; any other warning as Python shows it."""
    if issubclass(category, PissaWarning):
        err_console.print(f"[bold yellow]warning:[/] {message}", soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)
