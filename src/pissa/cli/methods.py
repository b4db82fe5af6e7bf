"""`pissa methods`: the decomposition registry, with each method's options, and what each depth of the
randomized SVD costs and buys."""

from __future__ import annotations

import dataclasses

from rich.table import Table

from .app import app, console

# Residual excess (||W - B A||_F / ||W - W_r||_F - 1, W_r the exact truncated SVD) over SmolLM2-135M's layers
# (blocks 0, 10, 20, 29, all seven projections) and over 7B-shaped matrices (4096x4096, 11008x4096, a
# realistic spectrum), at r = 16 and r = 64, seed 0: benchmarks/bench_pareto.py's workloads. The excess is
# deterministic for a seed; a pass over W is the work that dominates. tests/test_decompose.py recomputes the
# SmolLM2 r = 16 column.
DEPTHS = [  # (setting, passes over W, SmolLM2 r=16, r=64, 7B-shaped r=16, r=64), excess in %
    ("--niter 1", "4", 1.2749, 2.6551, 1.0663, 1.4422),
    ("--niter 2", "6", 0.4361, 0.7047, 0.2463, 0.2662),
    ("--niter 3", "8", 0.1686, 0.1716, 0.0627, 0.0302),
    ("--niter 4", "10", 0.0683, 0.0308, 0.0108, 0.0020),
    ("--niter 6", "14", 0.0102, 0.0000, 0.0000, 0.0000),
    ("exact SVD (default)", "full SVD", 0.0, 0.0, 0.0, 0.0),
]
PEFT = [  # PEFT's init_lora_weights="pissa_niter_N" (torch.svd_lowrank with q = r) on the same matrices
    ("PEFT niter 2", "6", 0.9633, 2.1969, 0.4401, 0.6783),
    ("PEFT niter 4", "10", 0.4223, 0.8774, 0.1299, 0.2171),
    ("PEFT niter 16", "34", 0.0465, 0.0805, 0.0085, 0.0170),
]


@app.command("methods")
def methods_command():
    """List the decomposition methods and their options, and what each --niter costs and buys.

    Example:

    \b
      pissa methods
    """
    from ..decompose import METHODS

    table = Table(title="decomposition methods (pissa init --method NAME --option KEY=VALUE)")
    for column in ("method", "what it does", "options (default)"):
        table.add_column(column)
    for name, method in sorted(METHODS.items()):
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(method.options)) or "-"
        table.add_row(name, method.help, opts)
    console.print(table)
    console.print(depth_table())


def depth_table() -> Table:
    table = Table(title="pissa --niter N: block-Krylov depth, its cost (passes over each weight) and residual "
                        "excess over the exact truncated SVD, against PEFT's init_lora_weights=pissa_niter_N "
                        "(benchmarks/bench_pareto.py; times in benchmarks/results/pareto.md). --niter 3 beats "
                        "PEFT's pissa_niter_4 with 8 passes to 10.")
    for column in ("setting", "passes", "SmolLM2 r16", "SmolLM2 r64", "7B-shape r16", "7B-shape r64"):
        table.add_column(column)
    for setting, passes, *excess in DEPTHS + PEFT:
        table.add_row(setting, passes, *(f"{e:.4f}%" for e in excess))
    return table
