"""`pissa report`: one markdown report with plots from one or more training runs and their evaluations."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, summary_table, user_errors


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="Run folders of `pissa train` (with eval/ results inside), or "
                                                 "`pissa eval` results folders."),
    out: Path = typer.Option(..., "--out", "-o", help="Report folder: report.md, PNGs, predictions/."),
    title: str = typer.Option("PiSSA runs", "--title", help="Title of report.md."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report folder."),
):
    """Compare runs side by side: loss and grad-norm curves, a training table, accuracy and perplexity.

    Examples:

    \b
      pissa report runs/lora runs/pissa --out report/
      pissa eval runs/pissa --data arith && pissa report runs/pissa --out report-pissa/
      pissa report runs/*/ --out all-runs --title "rank sweep" --overwrite
    """
    from ..report.runs import eval_rows, load_runs, write_run_report

    with user_errors():
        loaded = load_runs(runs)
        path = write_run_report(loaded, out, title=title, overwrite=overwrite)
    files = sorted(p.name for p in path.parent.iterdir() if p.is_file())
    rows = [("runs", ", ".join(run.name for run in loaded)),
            ("training logs", str(sum(bool(run.log) for run in loaded))),
            ("evaluations", str(len(eval_rows(loaded)))),
            ("report", str(path)),
            ("files", ", ".join(files))]
    console.print(summary_table(f"pissa report -> {out}", rows))
