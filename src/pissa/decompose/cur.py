"""CURA (follow-up report, section 4): the adapter is a CUR decomposition of W instead of its SVD.

r rows I and r columns J of W (out, in) are sampled without replacement with probability
proportional to their squared l2 norms (Hamm & Huang), and

    W_cur = C @ U @ R,   C = W[:, J] (out, r),  U = pinv(W[I, J]) (r, r),  R = W[I, :] (r, in).

The report writes the forward pass as Y = X (W_res + A B) with W stored (in, out), and sets
A = C (its columns of W are our rows) and B = U R. In PEFT's orientation (update = B @ A with
A (r, in) on the input side) that is

    lora_A = R = W[I, :]            (r, in)   actual rows of W, untouched
    lora_B = C @ U = W[:, J] pinv(W[I, J])   (out, r)

so B @ A is exactly the CUR approximation. `balance=True` instead re-factors that same product
into PiSSA-like factors (orthogonal columns, equal norms); the product, hence the residual, is
the same. `core="projection"` uses the Frobenius-optimal core U = pinv(C) W pinv(R) for the
sampled C and R (more accurate, one extra pass over W) instead of the report's intersection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .base import DecompositionError, register
from .linalg import balanced


@dataclass
class CUROptions:
    """Options of the `cur` method (CURA)."""

    core: Literal["intersection", "projection"] = "intersection"
    """U = pinv(W[I, J]) as in the report (intersection), or pinv(C) W pinv(R) (projection)."""
    balance: bool = False
    """Re-factor B @ A into balanced factors (like PiSSA's U sqrt(S), sqrt(S) V^T); same product."""
    rcond: float = 1e-6
    """Relative cutoff of the pseudo-inverse: singular values below rcond * largest count as zero."""

    def __post_init__(self):
        if self.core not in ("intersection", "projection"):
            raise DecompositionError(f"cur option core must be 'intersection' or 'projection', got {self.core!r}")
        if not 0 <= self.rcond < 1:
            raise DecompositionError(f"cur option rcond must be in [0, 1), got {self.rcond}")


def sample_by_norm(sq_norms: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct indices drawn without replacement with probability ∝ sq_norms, sorted.

    Zero-norm rows/columns keep a tiny weight so a weight with fewer than k nonzero rows still
    yields k distinct indices (the zero ones are drawn last and add nothing to the product).
    """
    p = sq_norms.double().cpu()  # (n,)
    total = p.sum()
    p = p / total if total > 0 else torch.ones_like(p)
    p = p.clamp_min(1e-30)
    return torch.multinomial(p, k, replacement=False, generator=generator).sort().values


@register("cur", CUROptions, "CURA: adapter = CUR decomposition (norm-sampled rows/columns), residual frozen.")
def cur(W: torch.Tensor, rank: int, opts: CUROptions, generator: torch.Generator):
    out_dim, in_dim = W.shape
    if rank > out_dim or rank > in_dim:  # decompose() checks this too; kept for direct callers
        raise DecompositionError(
            f"cur: rank {rank} needs {rank} distinct rows and columns but the weight is {out_dim}x{in_dim}; "
            "lower --rank"
        )
    rows = sample_by_norm(W.pow(2).sum(1), rank, generator).to(W.device)  # (r,) indices into out
    cols = sample_by_norm(W.pow(2).sum(0), rank, generator).to(W.device)  # (r,) indices into in
    C = W[:, cols]  # (out, r)
    R = W[rows, :]  # (r, in)
    if opts.core == "intersection":
        U = torch.linalg.pinv(W[rows][:, cols], rtol=opts.rcond)  # (r, r)
    else:
        U = torch.linalg.pinv(C, rtol=opts.rcond) @ W @ torch.linalg.pinv(R, rtol=opts.rcond)  # (r, r)
    B, A = C @ U, R.clone()  # (out, r), (r, in)
    if opts.balance:
        B, A = balanced(B, A)
    cond = torch.linalg.cond(W[rows][:, cols]).item()  # how ill-posed the report's core is
    info = {"rows": rows.tolist()[:8], "cols": cols.tolist()[:8], "core_cond": cond if math.isfinite(cond) else None}
    return B, A, info
