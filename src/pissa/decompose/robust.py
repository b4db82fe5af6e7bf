"""Robust PiSSA (follow-up report, section 5 and appendix B): the adapter is a rank-r fit of W
in the entrywise l1 norm, min ||W - B @ A||_1, instead of the Frobenius-optimal truncated SVD.

The problem is NP-hard, so this is a local search that can only improve on the SVD:
- every run starts from truncated-SVD factors: the top-r triplets of W; `shifted_starts` more runs
  from the triplets [s, s + r), which escape the SVD's basin (on the report's eq. 8 example the
  SVD start is a stationary point of the l1 loss, the shift-1 start is the l1 optimum); and one
  run from the top-r SVD of W with its entries clipped at `clip` x median |W|, a classic robust
  start that ignores large outliers (which otherwise own the top singular triplets);
- the l1 error is measured at every iterate and the best one is kept, the SVD itself included,
  so the result is never worse in l1 than the truncated SVD;
- a run stops when the best l1 error improved by less than `tol` (relative) over `patience`
  iterations, or after `max_iter`;
- a run that diverges (NaN/Inf, or l1 error above `diverge_factor` times its start) is stopped;
  when no run beat the SVD the method returns the SVD and says so in its info and a warning.

Two solvers:
- `huber-gd` (default): the report's Algorithm 1, Adam on a Huber loss of W - B @ A (delta
  relative to the SVD residual's mean absolute value, lr relative to the factors' RMS), then
  `polish` IRLS iterations from its best iterate (kept only if they lower the l1 error);
- `irls`: iteratively reweighted least squares, alternating exact weighted LS solves for A and B
  with weights 1/max(|E|, eps). Each half-step minimises a quadratic majoriser of the l1 loss.
benchmarks/results/variants.md compares them on SmolLM2 layers: Huber-GD reached the lower l1
error on 12/12 layer-ranks, IRLS was ~5x faster; hence the default.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

from .base import DecompositionError, register
from .linalg import balanced


@dataclass
class RobustOptions:
    """Options of the `robust` method (Robust PiSSA)."""

    solver: Literal["irls", "huber-gd"] = "huber-gd"
    """huber-gd (the report's Adam on a Huber loss; lower l1 on real weights) or irls (faster)."""
    max_iter: int | None = None
    """Iterations per start; None: 30 for irls, 300 for huber-gd."""
    tol: float = 1e-4
    """Stop a start when its best l1 error improved by less than this fraction over `patience` iterations."""
    patience: int | None = None
    """Iterations the tolerance is measured over; None: 1 for irls, 25 for huber-gd."""
    shifted_starts: int = 1
    """Extra starts from the singular triplets [s, s + r) for s = 1..shifted_starts (0: SVD start only)."""
    clip: float = 6.0
    """Also start from the SVD of W clipped entrywise at clip x median |W| (0: no such start)."""
    lr: float = 0.01
    """huber-gd: Adam step size, relative to the RMS of the SVD factors."""
    delta: float = 0.01
    """huber-gd: Huber threshold, relative to the mean |W - W_svd|."""
    eps: float = 1e-3
    """irls: weight floor, relative to the mean |W - W_svd|: weights are 1 / max(|E|, eps)."""
    polish: int = 5
    """huber-gd: IRLS iterations run from the best Huber iterate afterwards (0: none)."""
    diverge_factor: float = 10.0
    """A start whose l1 error exceeds this many times its starting error counts as diverged."""

    def __post_init__(self):
        if self.solver not in ("irls", "huber-gd"):
            raise DecompositionError(f"robust option solver must be 'irls' or 'huber-gd', got {self.solver!r}")
        for key in ("max_iter", "patience"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise DecompositionError(f"robust option {key} must be >= 1 or None, got {value}")
        if self.polish < 0:
            raise DecompositionError(f"robust option polish must be >= 0, got {self.polish}")
        if self.shifted_starts < 0:
            raise DecompositionError(f"robust option shifted_starts must be >= 0, got {self.shifted_starts}")
        if self.clip < 0:
            raise DecompositionError(f"robust option clip must be >= 0 (0: off), got {self.clip}")
        for key in ("tol", "lr", "delta", "eps"):
            if not getattr(self, key) > 0:
                raise DecompositionError(f"robust option {key} must be > 0, got {getattr(self, key)}")
        if not self.diverge_factor > 1:
            raise DecompositionError(f"robust option diverge_factor must be > 1, got {self.diverge_factor}")


DEFAULTS = {"irls": (30, 1), "huber-gd": (300, 25)}  # solver -> (max_iter, patience)


def l1(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    return (W - B @ A).abs().sum().item()


def weighted_ls(B: torch.Tensor, W: torch.Tensor, D: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_A sum_ij D_ij (W - B @ A)_ij^2 for B (out, r), W and D (out, in): A (r, in).

    Each column j is its own r x r system (B^T diag(D_j) B) a_j = B^T (D_j * w_j). All the Gram
    matrices come from one matmul D^T @ (b_o b_o^T)_o, solved in column chunks of ~16M elements.
    """
    out_dim, in_dim = W.shape
    r = B.shape[1]
    outer = (B[:, :, None] * B[:, None, :]).reshape(out_dim, r * r)  # (out, r*r): b_o b_o^T per row
    eye = torch.eye(r, dtype=W.dtype, device=W.device) * ridge  # (r, r)
    rhs = B.T @ (D * W)  # (r, in)
    chunk = max(1, (1 << 24) // (r * r))
    cols = []
    for j in range(0, in_dim, chunk):
        G = (D[:, j:j + chunk].T @ outer).reshape(-1, r, r) + eye  # (c, r, r)
        cols.append(torch.linalg.solve(G, rhs[:, j:j + chunk].T.unsqueeze(-1)).squeeze(-1))  # (c, r)
    return torch.cat(cols).T  # (r, in)


def irls_steps(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, opts: RobustOptions, floor: float):
    """Yield (B, A) after each IRLS iteration (an A half-step, then a B half-step)."""
    while True:
        D = 1.0 / (W - B @ A).abs().clamp_min(floor)  # (out, in)
        # a tiny ridge keeps rank-deficient systems (zero singular values) solvable
        ridge = 1e-10 * D.mean().item() * B.pow(2).sum().item() + 1e-30
        A = weighted_ls(B, W, D, ridge)  # (r, in)
        D = 1.0 / (W - B @ A).abs().clamp_min(floor)  # (out, in)
        ridge = 1e-10 * D.mean().item() * A.pow(2).sum().item() + 1e-30
        B = weighted_ls(A.T, W.T, D.T, ridge).T  # (out, r): the same problem transposed
        yield B, A


def huber_steps(W: torch.Tensor, B: torch.Tensor, A: torch.Tensor, opts: RobustOptions, delta: float):
    """Yield (B, A) after each Adam step on the Huber loss of W - B @ A (report, Algorithm 1)."""
    B = B.clone().requires_grad_(True)
    A = A.clone().requires_grad_(True)
    rms = torch.cat([B.detach().flatten(), A.detach().flatten()]).pow(2).mean().sqrt().item()
    optim = torch.optim.Adam([B, A], lr=opts.lr * max(rms, 1e-12))
    while True:
        with torch.enable_grad():
            loss = torch.nn.functional.huber_loss(B @ A, W, delta=delta, reduction="sum")
            optim.zero_grad()
            loss.backward()
        optim.step()
        yield B.detach().clone(), A.detach().clone()


def svd_start(U, S, Vh, start: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = S[start:start + rank].sqrt()  # (r,)
    return U[:, start:start + rank] * root, root[:, None] * Vh[start:start + rank]  # (out, r), (r, in)


def clipped_start(W: torch.Tensor, rank: int, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r SVD factors of W with entries clipped at clip x median |W| (outliers flattened)."""
    bound = clip * W.abs().median().item()
    U, S, Vh = torch.linalg.svd(W.clamp(-bound, bound), full_matrices=False)  # (out, k), (k,), (k, in)
    return svd_start(U, S, Vh, 0, rank)


def starts(W: torch.Tensor, rank: int, opts: RobustOptions, U, S, Vh):
    """(label, B, A) of every start: the SVD, its shifts, and the clipped SVD."""
    for s in range(0, min(opts.shifted_starts, S.numel() - rank) + 1):
        yield s, *svd_start(U, S, Vh, s, rank)
    if opts.clip > 0 and W.abs().median() > 0:  # a mostly-zero W has nothing to clip against
        yield "clipped", *clipped_start(W, rank, opts.clip)


def run_start(W, B, A, opts: RobustOptions, scale: float) -> tuple[float, torch.Tensor, torch.Tensor, int, bool]:
    """Run one solver from (B, A); returns (best l1, best B, best A, iterations, diverged)."""
    max_iter, patience = DEFAULTS[opts.solver]
    max_iter, patience = opts.max_iter or max_iter, opts.patience or patience
    steps = irls_steps(W, B, A, opts, opts.eps * scale) if opts.solver == "irls" else \
        huber_steps(W, B, A, opts, opts.delta * scale)
    start_err = best = l1(W, B, A)
    history = [best]
    it = 0
    for it, (B_t, A_t) in enumerate(steps, 1):
        err = l1(W, B_t, A_t)
        if not math.isfinite(err) or err > opts.diverge_factor * start_err:
            return best, B, A, it, True
        if err < best:
            best, B, A = err, B_t, A_t
        history.append(best)
        stalled = len(history) > patience and history[-1 - patience] - best <= opts.tol * history[-1 - patience]
        if it >= max_iter or stalled:
            break
    return best, B, A, it, False


@register("robust", RobustOptions, "Robust PiSSA: rank-r fit of W in the l1 norm (IRLS or Huber GD), SVD-started.")
def robust(W: torch.Tensor, rank: int, opts: RobustOptions, generator: torch.Generator):
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (out, k), (k,), (k, in)
    B0, A0 = svd_start(U, S, Vh, 0, rank)  # (out, r), (r, in)
    svd_l1 = l1(W, B0, A0)
    scale = max(svd_l1 / W.numel(), 1e-30)  # mean |W - W_svd|: the unit of eps and delta
    best, B, A = svd_l1, B0, A0
    iterations, diverged, best_start = 0, [], None
    for start, B_s, A_s in starts(W, rank, opts, U, S, Vh):
        err, B_s, A_s, its, div = run_start(W, B_s, A_s, opts, scale)
        iterations += its
        if div:
            diverged.append(start)
        if err < best:
            best, B, A, best_start = err, B_s, A_s, start
    if best_start is not None and opts.solver == "huber-gd" and opts.polish:
        irls = dataclasses.replace(opts, solver="irls", max_iter=opts.polish)
        err, B_p, A_p, _, _ = run_start(W, B, A, irls, scale)
        if err < best:
            best, B, A = err, B_p, A_p
    info = {"solver": opts.solver, "svd_l1": svd_l1, "l1": best, "l1_gain": 1 - best / svd_l1 if svd_l1 else 0.0,
            "iterations": iterations, "best_start": best_start}
    if diverged:
        info["diverged_starts"] = diverged
    if best_start is None:
        info["fallback"] = "svd" + (" (the robust fit diverged)" if diverged else " (no start improved the l1 error)")
        if diverged:
            warnings.warn(f"robust: {opts.solver} diverged from starts {diverged}; fell back to the truncated SVD "
                          "(lower the lr option or use solver=irls)", stacklevel=2)
        return B0, A0, info  # the SVD factors themselves: exactly the SVD's l1 error
    return (*balanced(B, A), info)
