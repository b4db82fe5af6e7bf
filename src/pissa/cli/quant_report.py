"""`pissa quant-report`: the paper's table 4 (quantization-error reduction of LoftQ and QPiSSA vs
QLoRA, per layer type) for any model, written as CSV, markdown and a PNG bar chart."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import typer
from rich.table import Table
from typer.core import TyperCommand

from .app import app, console, layer_progress, user_errors

GREEDY = ("--ranks", "--iters")


def expand_greedy(args: list[str], greedy=GREEDY) -> list[str]:
    """`--ranks 16 64` -> `--ranks 16 --ranks 64`, so list options take space-separated values."""
    out, current = [], None
    for arg in args:
        if arg in greedy:
            current = arg
            out.append(arg)
        elif current is not None and arg.isdigit():
            out += [arg] if out[-1] == current else [current, arg]  # repeat the flag before extra values
        else:
            current = None
            out.append(arg)
    return out


class GreedyListCommand(TyperCommand):
    def parse_args(self, ctx, args):
        return super().parse_args(ctx, expand_greedy(list(args)))


@app.command("quant-report", cls=GreedyListCommand)
def quant_report_command(
    model: str = typer.Argument(..., help="Embedded name (smollm2-135m, minilm-l6), local folder, or hub id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: layers.csv, summary.csv/.md, chart.png."),
    ranks: list[int] = typer.Option([16, 64], "--ranks", help="Adapter ranks, e.g. --ranks 16 64."),
    iters: list[int] = typer.Option([1, 5], "--iters", help="LoftQ/QPiSSA alternating steps T, e.g. --iters 1 5."),
    quant_type: str = typer.Option("nf4", "--quant-type", help="nf4, fp4 (bitsandbytes 4-bit, blocksize 64) or int8."),
    double_quant: bool = typer.Option(False, "--double-quant", help="Quantize the 4-bit absmax values too."),
    dtype: str = typer.Option("auto", "--dtype", help="Dtype to load and quantize from: auto (as stored), bf16, ..."),
    niter: int = typer.Option(
        None, "--niter", help="Randomized-SVD power iterations for the SVD steps (omit: exact SVD). niter=8 moved "
                              "layer ratios by <= 0.21 points on SmolLM2/MiniLM (benchmarks/results/quant.md)."),
    targets: list[str] = typer.Option([], "--targets", "-t", help="Only layers ending with this name (repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the randomized SVD."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
):
    """Measure how much LoftQ and QPiSSA reduce the quantization error of QLoRA (paper table 4).

    Error of a layer: nuclear norm of W - (Q + B @ A); ratio = 1 - error / error(QLoRA).

    Examples:

      pissa quant-report smollm2-135m --ranks 16 64 --iters 1 5 --out out/quant-smollm2

      pissa quant-report minilm-l6 --ranks 16 --iters 1 5 --quant-type int8 --out out/quant-int8

      pissa quant-report ./llama --ranks 64 --iters 5 --niter 8 --targets q_proj --out out/q
    """
    from ..checkpoint.atomic import atomic_output_dir, check_output_dir
    from ..quant.formats import QuantSpec
    from ..quant.report import ReportConfig, measure, model_weights, summarize, write_report

    with user_errors():
        check_output_dir(out, overwrite)
        # Refuse bad settings before the (slow) model load; the dtype is known only after it.
        config = ReportConfig(ranks=list(ranks), iters=list(iters), spec=QuantSpec(quant_type, double_quant),
                              niter=niter, seed=seed)
        start = time.perf_counter()
        weights, path = model_weights(model, dtype, list(targets) or None)
        first = next(iter(weights.values()))
        spec = QuantSpec(quant_type=quant_type, double_quant=double_quant,
                         dtype=str(first.dtype).removeprefix("torch."))
        config = dataclasses.replace(config, spec=spec)
        with layer_progress("measuring") as progress:
            rows = measure(weights.items(), config, total=len(weights), progress=progress)
        svd = "exact SVD" if niter is None else f"randomized SVD, niter={niter}"
        title = f"{model}: {quant_type}{' + double quant' if double_quant else ''} from {spec.dtype}, {svd}"
        with atomic_output_dir(out, overwrite) as tmp:
            files = write_report(tmp, rows, title, {"model": path, "layers": len(weights)})
    types, table = summarize(rows)
    console.print(summary_rich(types, table, title))
    console.print(f"{len(weights)} layers in {time.perf_counter() - start:.1f} s; wrote "
                  + ", ".join(str(out / f.name) for f in files.values()))


def summary_rich(types: list[str], table: list[dict], title: str) -> Table:
    from ..quant.report import FIT_LABELS, short_names

    names = short_names(types)
    t = Table(title=f"error reduction vs QLoRA (nuclear norm, %) - {title}", title_justify="left")
    for col in ("method", "rank", "T", *[names[x] for x in types], "AVG"):
        t.add_column(col, justify="right" if col != "method" else "left")
    for r in table:
        rank, iters = (str(r["rank"]), str(r["iters"])) if r["fit"] != "qlora" else ("-", "-")
        t.add_row(FIT_LABELS[r["fit"]], rank, iters, *[f"{r[x]:.1f}" if x in r else "" for x in types],
                  f"{r['AVG']:.1f}")
    return t
