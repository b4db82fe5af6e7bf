"""`pissa analyze`: spectra, value distributions and initial gradients of a model (paper fig. 3,
appendices G and M) as PNGs and markdown tables."""

from __future__ import annotations

from pathlib import Path

import typer

from ..report.analyze import AnalyzeConfig
from .app import app, console, human_bytes, layer_progress, summary_table, user_errors
from .options import config_command


@config_command(app, "analyze", {"config": (AnalyzeConfig, ())})
def analyze_command(
    config: AnalyzeConfig,
    model: str = typer.Argument(..., help="Embedded name (smollm2-135m, minilm-l6), local folder, or hub id."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder: spectra.png, distributions.png, analysis.md, analysis.json."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code."),
):
    """Analyse a model's weights the way the PiSSA paper does: spectra of W and W_res, value histograms with
    Gaussian fits per layer type, and the initial gradients of LoRA vs PiSSA across seeds.

    Examples:

    \b
      pissa analyze smollm2-135m --out out/analysis
      pissa analyze smollm2-135m --rank 64 --layer layers.0.self_attn.q_proj --layer layers.15.mlp.down_proj --out out/a
      pissa analyze ./my-model --method robust --seeds 3 --out out/robust-analysis
    """
    import time

    from ..report.analyze_report import run_analyze

    start = time.perf_counter()
    with user_errors(), layer_progress("analysing") as progress:
        analysis, files = run_analyze(model, config, out, overwrite, trust_remote_code, progress)
    rows = [(str(p), human_bytes(p.stat().st_size)) for p in files.values()]
    summary = [("layers (spectra)", ", ".join(analysis.spectra)), ("layer types", str(len(analysis.distributions)))]
    if analysis.gradients is not None:
        lora, pissa = analysis.gradients["LoRA"], analysis.gradients["PiSSA"]
        summary += [
            ("LoRA max |grad A|", f"{lora['A']['max_abs']:.3g} (B = 0 at init)"),
            ("LoRA grad B mean cosine", f"{lora['B']['mean_cosine']:.3f} across {config.seeds} seeds"),
            ("PiSSA grad max diff vs seed 0", f"A {pissa['A']['max_diff_vs_seed0']:.3g}, "
                                              f"B {pissa['B']['max_diff_vs_seed0']:.3g}"),
        ]
    console.print(summary_table(f"pissa analyze: {model} -> {out}",
                                [*summary, *rows, ("wall time", f"{time.perf_counter() - start:.1f} s")]))
