"""`pissa quant-report`: the paper's table 4 (quantization-error reduction of LoftQ and QPiSSA vs
QLoRA, per layer type) for any model, written as CSV, markdown and a PNG bar chart."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from ..report.quant import ReportConfig
from .app import app, console, layer_progress, user_errors
from .options import config_command


@config_command(app, "quant-report", {"config": (ReportConfig, ())})
def quant_report_command(
    config: ReportConfig,
    model: str = typer.Argument(..., help="Embedded name (smollm2-135m, minilm-l6), local folder, or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: layers.csv, summary.csv/.md, chart.png."),
    dtype: str = typer.Option("auto", "--dtype", help="Dtype to load and quantize from: auto (as stored), bf16, ..."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
):
    """Measure how much LoftQ and QPiSSA reduce the quantization error of QLoRA (paper table 4).

    Error of a layer: nuclear norm of W - (Q + B @ A); ratio = 1 - error / error(QLoRA).

    Examples:

    \b
      pissa quant-report smollm2-135m --ranks 16 64 --iters 1 5 --out out/quant-smollm2
      pissa quant-report minilm-l6 --ranks 16 --iters 1 5 --quant-type int8 --out out/quant-int8
      pissa quant-report ./llama --ranks 64 --iters 5 --niter 8 --targets q_proj --out out/q
    """
    from ..report.quant import run_quant_report, summarize

    start = time.perf_counter()
    with user_errors(), layer_progress("measuring") as progress:
        rows, files, title = run_quant_report(model, config, out, overwrite, dtype, progress=progress)
    types, table = summarize(rows)
    layers = len({r["layer"] for r in rows})
    console.print(summary_rich(types, table, title))
    console.print(f"{layers} layers in {time.perf_counter() - start:.1f} s; wrote "
                  + ", ".join(str(f) for f in files.values()))


def summary_rich(types: list[str], table: list[dict], title: str) -> Table:
    from ..report.quant import FIT_LABELS, short_names

    names = short_names(types)
    t = Table(title=f"error reduction vs QLoRA (nuclear norm, %) - {title}", title_justify="left")
    for col in ("method", "rank", "T", *[names[x] for x in types], "AVG"):
        t.add_column(col, justify="right" if col != "method" else "left")
    for r in table:
        rank, iters = (str(r["rank"]), str(r["iters"])) if r["fit"] != "qlora" else ("-", "-")
        t.add_row(FIT_LABELS[r["fit"]], rank, iters, *[f"{r[x]:.1f}" if x in r else "" for x in types],
                  f"{r['AVG']:.1f}")
    return t
