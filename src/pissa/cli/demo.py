"""`pissa demo`: PiSSA vs LoRA end to end on the embedded SmolLM2-135M, written as a report."""

from __future__ import annotations

from pathlib import Path

import typer

from ..report.demo import DemoConfig
from .app import app, console, err_console, summary_table, user_errors
from .options import config_command


@config_command(app, "demo", {"config": (DemoConfig, ())})
def demo_command(
    config: DemoConfig,
    out: Path = typer.Option(Path("demo-report"), "--out", "-o", help="Report folder: report.md, PNGs, outputs."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing report folder."),
):
    """Show the whole method in one run: init PiSSA and LoRA, train both, evaluate base / LoRA / PiSSA on
    held-out problems, convert PiSSA to a plain LoRA and check it, and write a report.

    Examples:

    \b
      pissa demo                                  # SmolLM2-135M, 30 steps: ~10 min on 2 CPU cores
      pissa demo --steps 100 --out demo-long      # train longer
      pissa demo --tiny --steps 2 --out /tmp/demo # a 2-layer model: seconds, for CI
    """
    from ..report.demo import Demo

    with user_errors():
        demo = Demo(config, out, overwrite, log=err_console.print)
        report = demo.run()
    r = demo.results
    rows = [(f"accuracy {name}", f"{e['accuracy']:.1%} ({e['correct']}/{e['total']}), perplexity "
             f"{e['perplexity']:.3f}") for name, e in r["eval"].items()]
    rows += [(f"loss {m}", f"{t['first_loss']:.4f} -> {t['final_loss']:.4f} in {t['steps']} steps")
             for m, t in r["train"].items()]
    rows += [("PiSSA -> LoRA", f"max |logit diff| {r['convert']['max_abs_logit_diff']:.3g}"),
             ("wall time", f"{r['seconds']['total']:.1f} s"),
             ("report", str(report))]
    console.print(summary_table(f"pissa demo -> {out}", rows))
