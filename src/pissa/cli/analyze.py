"""`pissa analyze`: spectra, value distributions and initial gradients of a model (paper fig. 3,
appendices G and M) as PNGs and markdown tables."""

from __future__ import annotations

from pathlib import Path

import typer

from ..adapters import fields_help
from ..analyze import AnalyzeConfig
from .app import app, console, human_bytes, layer_progress, summary_table, user_errors

H = fields_help(AnalyzeConfig)


@app.command("analyze")
def analyze_command(
    model: str = typer.Argument(..., help="Embedded name (smollm2-135m, minilm-l6), local folder, or hub id."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output folder: spectra.png, distributions.png, analysis.md, analysis.json."
    ),
    rank: int = typer.Option(16, "--rank", "-r", help=H["rank"]),
    method: str = typer.Option("pissa", "--method", "-m", help=H["method"]),
    layer: list[str] = typer.Option(["layers.0.self_attn.q_proj"], "--layer", "-l", help=H["layers"] + " Repeatable."),
    seeds: int = typer.Option(5, "--seeds", help=H["seeds"]),
    max_length: int = typer.Option(64, "--max-length", help=H["max_length"]),
    seed: int = typer.Option(0, "--seed", help=H["seed"]),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow custom model code."),
):
    """Analyse a model's weights the way the PiSSA paper does: spectra of W and W_res, value histograms with
    Gaussian fits per layer type, and the initial gradients of LoRA vs PiSSA across seeds.

    Examples:

      pissa analyze smollm2-135m --out out/analysis

      pissa analyze smollm2-135m --rank 64 --layer layers.0.self_attn.q_proj --layer layers.15.mlp.down_proj --out out/a

      pissa analyze ./my-model --method robust --seeds 3 --out out/robust-analysis
    """
    import time

    from ..analyze import analyze_model
    from ..analyze_report import write_report
    from ..checkpoint.atomic import atomic_output_dir, check_output_dir
    from ..models import load_model

    start = time.perf_counter()
    with user_errors():
        config = AnalyzeConfig(rank=rank, method=method, layers=list(layer), seeds=seeds, max_length=max_length,
                               seed=seed)
        from ..decompose import get_method

        get_method(method)
        check_output_dir(out, overwrite)
        loaded, tokenizer, _ = load_model(model, dtype="float32", trust_remote_code=trust_remote_code)
        with layer_progress("analysing") as progress:
            analysis = analyze_model(loaded, tokenizer, config, progress)
        with atomic_output_dir(out, overwrite) as tmp:
            files = write_report(analysis, config, model, tmp)
    rows = [(str(out / p.name), human_bytes((out / p.name).stat().st_size)) for p in files.values()]
    summary = [("layers (spectra)", ", ".join(analysis.spectra)), ("layer types", str(len(analysis.distributions)))]
    if analysis.gradients is not None:
        lora, pissa = analysis.gradients["LoRA"], analysis.gradients["PiSSA"]
        summary += [
            ("LoRA max |grad A|", f"{lora['A']['max_abs']:.3g} (B = 0 at init)"),
            ("LoRA grad B mean cosine", f"{lora['B']['mean_cosine']:.3f} across {seeds} seeds"),
            ("PiSSA grad max diff vs seed 0", f"A {pissa['A']['max_diff_vs_seed0']:.3g}, "
                                              f"B {pissa['B']['max_diff_vs_seed0']:.3g}"),
        ]
    console.print(summary_table(f"pissa analyze: {model} -> {out}",
                                [*summary, *rows, ("wall time", f"{time.perf_counter() - start:.1f} s")]))
