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
    return W.device.type == "cpu" and (niter + 1) * k > 2 * min(W.shape[-2:])


def randomized_svd(
    W: torch.Tensor, rank: int, niter: int, oversample: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of W (out, in) by a randomized range finder with power iterations."""
    U, S, Vh = randomized_svd_batch(W[None], rank, niter, oversample, [generator])
    return U[0], S[0], Vh[0]


def gaussian_sketch(in_dim: int, k: int, generators: list[torch.Generator], W: torch.Tensor) -> torch.Tensor:
    """(b, in, k) test matrices, each drawn on the CPU from its own matrix's generator: a matrix gets
    the same sketch alone or in a batch, and on any device."""
    return torch.stack([torch.randn(in_dim, k, generator=g, dtype=W.dtype) for g in generators]).to(W.device)


def randomized_svd_batch(
    W: torch.Tensor, rank: int, niter: int, oversample: int | None, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVDs of a batch W (b, out, in), one generator per matrix (Halko et al., alg. 4.4).

    One QR per power iteration (after each W W^T step, not after each half step): the columns of
    W W^T Q spread by (s_1 / s_k)^2 at most, which fp32 QR resolves; the half-step QR it replaces
    cost ~10 % of the time without changing the error (measured on SmolLM2 layers).
    """
    k = sketch_size(rank, oversample, W.shape[-2:])
    omega = gaussian_sketch(W.shape[-1], k, generators, W)  # (b, in, k)
    Q = torch.linalg.qr(W @ omega).Q  # (b, out, k)
    for _ in range(niter):
        Q = torch.linalg.qr(W @ (W.mT @ Q)).Q  # (b, out, k)
    U_small, S, Vh = torch.linalg.svd(Q.mT @ W, full_matrices=False)  # (b, k, k), (b, k), (b, k, in)
    U = Q @ U_small  # (b, out, k)
    return U[..., :rank], S[..., :rank], Vh[..., :rank, :]


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


def pissa_batch(W: torch.Tensor, rank: int, opts: SVDOptions, generators: list[torch.Generator]):
    """PiSSA factors of a batch W (b, out, in) of same-shape matrices: B (b, out, r), A (b, r, in), infos.
    Each matrix uses only its own generator, so it gets the factors it gets alone (to rounding)."""
    k = sketch_size(rank, opts.oversample, W.shape[-2:])
    exact = opts.niter is None or exact_is_cheaper(W, k, opts.niter)
    if exact:
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)  # (b, out, n), (b, n), (b, n, in)
        idx = torch.stack([select_components(S.shape[-1], rank, opts.components, g) for g in generators])
        idx = idx.to(W.device)  # (b, r)
        U = U.gather(-1, idx[:, None, :].expand(-1, U.shape[-2], -1))  # (b, out, r)
        Vh = Vh.gather(-2, idx[:, :, None].expand(-1, -1, Vh.shape[-1]))  # (b, r, in)
        S = S.gather(-1, idx)  # (b, r)
    else:
        U, S, Vh = randomized_svd_batch(W, rank, opts.niter, opts.oversample, generators)
    root = S.sqrt()  # (b, r)
    B = U * root[:, None, :]  # (b, out, r)
    A = root[:, :, None] * Vh  # (b, r, in)
    svd = "exact" if exact else "randomized"
    return B, A, [{"svd": svd, "singular_values": [round(s, 6) for s in row[:8]]} for row in S.tolist()]


@register("pissa", SVDOptions, "PiSSA: adapter = top-r singular triplets of W, residual frozen.", batch=pissa_batch)
def pissa(W: torch.Tensor, rank: int, opts: SVDOptions, generator: torch.Generator):
    B, A, infos = pissa_batch(W[None], rank, opts, [generator])  # one path for one matrix and for many
    return B[0], A[0], infos[0]
