"""SVD-based methods: PiSSA (paper eq. 2-5) with exact or randomized SVD, and the choice of
which singular components initialise the adapter (principal, medium, minor: paper appendix F;
random: the follow-up report's Random PiSSA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .base import DecompositionError, register

Components = Literal["principal", "medium", "minor", "random"]


@dataclass
class SVDOptions:
    """Options of the `pissa` method."""

    niter: int | None = None
    """Power iterations of randomized SVD (Halko et al.); None runs the exact SVD."""
    oversample: int | None = None
    """Extra sketch columns for randomized SVD; None uses r (sketch size 2r, capped at min(out, in))."""
    components: Components = "principal"
    """Which singular triplets go into the adapter: principal (PiSSA), medium, minor, or random."""

    def __post_init__(self):
        if self.niter is not None and self.niter < 0:
            raise DecompositionError(f"niter must be >= 0 or None (exact SVD), got {self.niter}")
        if self.oversample is not None and self.oversample < 0:
            raise DecompositionError(f"oversample must be >= 0, got {self.oversample}")
        if self.components not in ("principal", "medium", "minor", "random"):
            raise DecompositionError(
                f"components must be principal, medium, minor or random, got {self.components!r}"
            )
        if self.niter is not None and self.components != "principal":
            raise DecompositionError(
                f"randomized SVD (niter={self.niter}) finds only principal components; "
                f"use the exact SVD (niter=None) for components={self.components!r}"
            )


def sketch_size(rank: int, oversample: int | None, shape) -> int:
    """Columns of the randomized range finder: r + oversample (default r), capped at min(out, in)."""
    return min(rank + (rank if oversample is None else oversample), *shape)


def exact_is_cheaper(W: torch.Tensor, k: int, niter: int) -> bool:
    """Whether the exact SVD beats a k-column sketch with `niter` power iterations on the CPU.

    Measured on 1536x576 fp32 (the sketch costs ~(niter + 1.3) * k / 1400 of the exact SVD): a sketch
    covering much of the spectrum, or many power iterations, takes longer than the exact answer.
    On a GPU the exact SVD is relatively slow, so the sketch is always kept there.
    """
    return W.device.type == "cpu" and (niter + 1) * k > 2 * min(W.shape)


def randomized_svd(
    W: torch.Tensor, rank: int, niter: int, oversample: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of W (out, in) by a randomized range finder with power iterations.

    The Gaussian sketch is drawn on the CPU from `generator`, so a seed gives the same factors
    on any device. Re-orthonormalising between power steps keeps small singular values accurate.
    """
    out_dim, in_dim = W.shape
    k = sketch_size(rank, oversample, W.shape)
    omega = torch.randn(in_dim, k, generator=generator, dtype=W.dtype).to(W.device)  # (in, k)
    Q = torch.linalg.qr(W @ omega).Q  # (out, k)
    for _ in range(niter):
        Z = torch.linalg.qr(W.T @ Q).Q  # (in, k)
        Q = torch.linalg.qr(W @ Z).Q  # (out, k)
    U_small, S, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (k, k), (k,), (k, in)
    U = Q @ U_small  # (out, k)
    return U[:, :rank], S[:rank], Vh[:rank]


def select_components(n: int, rank: int, components: Components, generator: torch.Generator) -> torch.Tensor:
    """Indices of the `rank` singular triplets (sorted descending by value) that form the adapter."""
    if components == "principal":
        return torch.arange(rank)
    if components == "minor":
        return torch.arange(n - rank, n)
    if components == "medium":
        start = (n - rank) // 2
        return torch.arange(start, start + rank)
    return torch.randperm(n, generator=generator)[:rank].sort().values


@register("pissa", SVDOptions, "PiSSA: adapter = top-r singular triplets of W, residual frozen.")
def pissa(W: torch.Tensor, rank: int, opts: SVDOptions, generator: torch.Generator):
    exact = opts.niter is None or exact_is_cheaper(W, sketch_size(rank, opts.oversample, W.shape), opts.niter)
    if exact:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (out, k), (k,), (k, in)
        idx = select_components(S.numel(), rank, opts.components, generator).to(W.device)
        U, S, Vh = U[:, idx], S[idx], Vh[idx]  # (out, r), (r,), (r, in)
    else:
        U, S, Vh = randomized_svd(W, rank, opts.niter, opts.oversample, generator)
    root = S.sqrt()  # (r,)
    B = U * root  # (out, r)
    A = root[:, None] * Vh  # (r, in)
    return B, A, {"svd": "exact" if exact else "randomized", "singular_values": [round(s, 6) for s in S.tolist()[:8]]}
