"""The one matplotlib set-up, and the figures pissa draws in more than one place: curves against a
step (training loss, gradient norm) and singular-value spectra. matplotlib is imported on first use
with the non-interactive Agg backend, so nothing here needs a screen."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

DPI = 120


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = DPI) -> Path:
    """Write `fig` as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return Path(path)


def curves_figure(curves: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str, ylabel: str,
                  log_y: bool = False, legend_title: str | None = None):
    """One line per named (xs, ys) curve."""
    fig, ax = pyplot().subplots(figsize=(7.5, 4.5))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) > 1 or legend_title:
        ax.legend(title=legend_title)
    return fig


def step_curves(runs: dict[str, list[dict]], key: str) -> dict[str, tuple[list, list]]:
    """{run: (steps, values)} of `key` (loss, grad_norm, ...) from per-step log records."""
    out = {}
    for label, records in runs.items():
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            out[label] = ([p[0] for p in points], [p[1] for p in points])
    return out


def plot_loss(runs: dict[str, list[dict]], path: str | Path, title: str = "training loss") -> Path:
    """Training loss against the optimizer step for each named run's log records."""
    return save(curves_figure(step_curves(runs, "loss"), title, "optimizer step", "loss"), path)


def spectra_figure(spectra: dict[str, dict[str, torch.Tensor]], rank: int | None = None,
                   title: str = "Singular values of W and of the PiSSA residual"):
    """One panel per layer, one line per spectrum: {layer: {"W": s, "W_res": s_res, ...}} on a log scale.

    A dotted line marks rank r: PiSSA moves the singular values left of it into the adapter.
    """
    fig, axes = pyplot().subplots(1, len(spectra), figsize=(4.6 * len(spectra), 3.8), squeeze=False)
    for ax, (layer, lines) in zip(axes[0], spectra.items(), strict=True):
        for label, values in lines.items():
            ax.semilogy(values.float().clamp_min(1e-12).cpu().numpy(), label=label, lw=1.2)
        if rank is not None:
            ax.axvline(rank, color="grey", linestyle=":", lw=1, label=f"rank r = {rank}")
        ax.set_xlabel("singular value index")
        ax.set_ylabel("singular value")
        ax.set_title(layer, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return fig
