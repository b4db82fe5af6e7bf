"""Rendering of `pissa.analyze` results: PNG figures, a markdown report and a JSON dump."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..plots import pyplot, save, spectra_figure
from .analyze import Analysis, AnalyzeConfig, gaussian_pdf


def plot_spectra(spectra: dict, rank: int, path: Path) -> None:
    """Paper fig. 3a/b: singular values of W and W_res per chosen layer (log scale)."""
    lines = {name: {"W": s["s"], "W_res": s["s_res"]} for name, s in spectra.items()}
    save(spectra_figure(lines, rank, title="Singular values of W and of the residual W_res"), path, dpi=110)


def plot_distributions(dist: dict, path: Path) -> None:
    """Appendix G: value histograms of W and W_res per layer type, with their Gaussian fits."""
    n = len(dist)
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = pyplot().subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (kind, d) in zip(list(axes.flat)[:n], dist.items(), strict=True):
        lim = 4 * d["W"]["sigma"] + abs(d["W"]["mu"])
        x = torch.linspace(-lim, lim, 400)
        for key, color in (("W", "tab:blue"), ("W_res", "tab:orange")):
            fit = d[key]
            ax.hist(fit["sample"].numpy(), bins=200, range=(-lim, lim), density=True, alpha=0.45, color=color,
                    label=f"{key}: mu={fit['mu']:.2g}, sigma={fit['sigma']:.3g}")
            ax.plot(x.numpy(), gaussian_pdf(x, fit["mu"], fit["sigma"]).numpy(), color=color, lw=1)
        ax.set_title(kind, fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    save(fig, path, dpi=110)


def fmt(x: float) -> str:
    return f"{x:.3g}"


def markdown(analysis: Analysis, config: AnalyzeConfig, model: str) -> str:
    lines = [f"# pissa analyze: {model}", "",
             f"method `{config.method}`, rank {config.rank}; W_res = W minus the rank-{config.rank} adapter part.", "",
             "## Spectra (paper fig. 3a/b): `spectra.png`", "",
             "| layer | sigma_max(W) | sigma_max(W_res) | share of ‖W‖_F² in the top r |", "|---|---|---|---|"]
    for name, s in analysis.spectra.items():
        lines.append(f"| {name} | {fmt(s['s_max'])} | {fmt(s['s_res_max'])} | {s['top_r_energy']:.1%} |")
    lines += ["", "## Value distributions with Gaussian fits (appendix G): `distributions.png`", "",
              "Excess kurtosis is 0 for a Gaussian (NF4 assumes one); absmax/sigma sets the quantization range.", "",
              "| layer type | mu(W) | sigma(W) | kurtosis(W) | absmax/sigma(W) | mu(W_res) | sigma(W_res) "
              "| kurtosis(W_res) | absmax/sigma(W_res) |", "|---|---|---|---|---|---|---|---|---|"]
    for kind, d in analysis.distributions.items():
        w, r = d["W"], d["W_res"]
        lines.append(f"| {kind} | {fmt(w['mu'])} | {fmt(w['sigma'])} | {fmt(w['excess_kurtosis'])} "
                     f"| {fmt(w['absmax_over_sigma'])} | {fmt(r['mu'])} | {fmt(r['sigma'])} "
                     f"| {fmt(r['excess_kurtosis'])} | {fmt(r['absmax_over_sigma'])} |")
    if analysis.gradients is not None:
        g = analysis.gradients
        lines += ["", f"## Initial gradients (appendix M, table 11): `{analysis.gradient_layer}`, {config.seeds} seeds",
                  "", "One backward pass of the LM loss on a fixed batch, adapter of that layer only. LoRA is "
                  "PEFT's gaussian init (A noise, B = 0).", "",
                  "| init | factor | grad norm per seed | max abs | mean pairwise cosine | max diff vs seed 0 |",
                  "|---|---|---|---|---|---|"]
        for label, row in g.items():
            for key in ("A", "B"):
                v = row[key]
                norms = ", ".join(fmt(x) for x in v["norms"])
                lines.append(f"| {label} | grad {key} | {norms} | {fmt(v['max_abs'])} | {v['mean_cosine']:.3f} "
                             f"| {fmt(v['max_diff_vs_seed0'])} |")
        lines += ["", "Pairwise cosine similarity of LoRA's grad B across seeds:", "",
                  "| seed | " + " | ".join(str(i) for i in range(config.seeds)) + " |",
                  "|---" * (config.seeds + 1) + "|"]
        for i, row in enumerate(g["LoRA"]["B"]["cosine"]):
            lines.append(f"| {i} | " + " | ".join(f"{c:.3f}" for c in row) + " |")
    return "\n".join(lines) + "\n"


def to_json(analysis: Analysis) -> dict:
    """Everything but the tensors (singular values are kept, value samples dropped)."""
    spectra = {n: {**{k: v for k, v in s.items() if k not in ("s", "s_res")},
                   "s": s["s"].tolist(), "s_res": s["s_res"].tolist()} for n, s in analysis.spectra.items()}
    dist = {kind: {key: {k: v for k, v in fit.items() if k != "sample"} for key, fit in d.items()}
            for kind, d in analysis.distributions.items()}
    return {"spectra": spectra, "distributions": dist, "gradients": analysis.gradients,
            "gradient_layer": analysis.gradient_layer}


def write_analysis(analysis: Analysis, config: AnalyzeConfig, model: str, folder: Path) -> dict[str, Path]:
    """Write spectra.png, distributions.png, analysis.md and analysis.json into `folder`."""
    files = {"spectra": folder / "spectra.png", "distributions": folder / "distributions.png",
             "report": folder / "analysis.md", "json": folder / "analysis.json"}
    plot_spectra(analysis.spectra, config.rank, files["spectra"])
    plot_distributions(analysis.distributions, files["distributions"])
    files["report"].write_text(markdown(analysis, config, model))
    payload = {"model": model, "config": config.__dict__, **to_json(analysis)}
    files["json"].write_text(json.dumps(payload, indent=1))
    return files


def run_analyze(model: str, config: AnalyzeConfig, out: str | Path, overwrite: bool = False,
                trust_remote_code: bool = False, progress=None) -> tuple[Analysis, dict[str, Path]]:
    """`pissa analyze` as a library call: load `model` in fp32, analyse it, and write OUT atomically
    (spectra.png, distributions.png, analysis.md, analysis.json). Returns the analysis and the files."""
    from ..io.atomic import atomic_output_dir, check_output_dir
    from ..models import load_model
    from .analyze import analyze_model

    out = check_output_dir(out, overwrite, inputs=[model])  # before the (slow) load
    loaded, tokenizer, _ = load_model(model, dtype="float32", trust_remote_code=trust_remote_code)
    analysis = analyze_model(loaded, tokenizer, config, progress)
    with atomic_output_dir(out, overwrite) as tmp:
        files = write_analysis(analysis, config, model, tmp)
    return analysis, {key: out / path.name for key, path in files.items()}
