"""SVD-based methods: PiSSA (paper eq. 2-5) with exact or randomized SVD, and the choice of
which singular components initialise the adapter (principal, medium, minor: paper appendix F;
random: the follow-up report's Random PiSSA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .base import DecompositionError, register
from .linalg import one_thread, skinny_matmul

Components = Literal["principal", "medium", "minor", "random"]

# A new Krylov column with less than this fraction of its norm outside the basis is exhausted: what is left
# is rounding noise (fp32 rounding of the projection is ~1e-7 of the column, so the part kept is accurate
# to at least 1e-3 of itself).
BREAKDOWN = 1e-4


@dataclass
class SVDOptions:
    """Options of the `pissa` method."""

    niter: int | None = None
    """Depth q of the randomized block-Krylov SVD: 2q + 2 passes over W, as many as q power iterations
    (PEFT's `pissa_niter_q`), at a lower error; None runs the exact SVD."""
    oversample: int | None = None
    """Extra columns per Krylov block (block = r + oversample); None: 0 (see `block_size`)."""
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


def block_size(rank: int, oversample: int | None) -> int:
    """Columns of each Krylov block: r + oversample, by default r.

    The Krylov space already holds (niter + 1) blocks, so a wider block buys less than a deeper space:
    on SmolLM2's layers and 7B-shaped matrices every setting with oversample r/4..r was beaten in both
    time and error by oversample 0 at a larger niter (benchmarks/bench_pareto.py, thread CPU time).
    """
    return rank + (0 if oversample is None else oversample)


def exact_is_cheaper(W: torch.Tensor, block: int, niter: int) -> bool:
    """Whether the exact SVD replaces a Krylov basis of (niter + 1) * block columns.

    The basis cannot outgrow min(out, in); on the CPU its orthogonalisation and Rayleigh-Ritz cost grows
    with its square and matched the exact SVD at about 3/4 of min(out, in) (192x576, 256x192, 576x576,
    fp32, one thread), by which point it is close to exact anyway. On a GPU the exact SVD is relatively
    slow, so the basis is kept there as long as it fits.
    """
    columns, smaller = (niter + 1) * block, min(W.shape[-2:])
    return columns > smaller or (W.device.type == "cpu" and 4 * columns >= 3 * smaller)


def randomized_svd(
    W: torch.Tensor, rank: int, niter: int, oversample: int | None, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVD of W (out, in) by the randomized block-Krylov method (`randomized_svd_batch`)."""
    U, S, Vh = randomized_svd_batch(W[None], rank, niter, oversample, [generator])
    return U[0], S[0], Vh[0]


def gaussian_sketch(dim: int, k: int, generators: list[torch.Generator], W: torch.Tensor) -> torch.Tensor:
    """(b, dim, k) test matrices, each drawn on the CPU from its own matrix's generator: a matrix gets
    the same sketch alone or in a batch, and on any device."""
    return torch.stack([torch.randn(dim, k, generator=g, dtype=W.dtype) for g in generators]).to(W.device)


def orthonormal(Y: torch.Tensor, basis: torch.Tensor | None = None, fresh: torch.Tensor | None = None) -> torch.Tensor:
    """An orthonormal basis (b, s, k) of the part of Y (b, s, k) outside span(basis) (orthonormal columns).

    Project, orthonormalise, project again, orthonormalise again (normalising first makes the second
    projection exact to rounding). A column that is almost all inside the span (a Krylov space that holds
    W's whole range: rank(W) < its size) has only rounding noise outside it, which M Mᵀ would amplify
    into the span at the next step and wreck the basis (orthogonality 0.7 at depth 6 for a rank-3 W); such
    a column is replaced by the matching column of `fresh` (b, s, k), Gaussian, before projecting.
    """
    with one_thread():
        if basis is None:
            return torch.linalg.qr(Y).Q
        outside = Y - basis @ (basis.mT @ Y)  # (b, s, k)
        if fresh is not None:  # deflation: keep a column only if a useful part of it is new
            kept = torch.linalg.vector_norm(outside, dim=-2) > BREAKDOWN * torch.linalg.vector_norm(Y, dim=-2)
            outside = torch.where(kept[..., None, :], outside, fresh - basis @ (basis.mT @ fresh))
        Q = torch.linalg.qr(outside).Q
        return torch.linalg.qr(Q - basis @ (basis.mT @ Q)).Q


def krylov_basis(M: torch.Tensor, omega: torch.Tensor, depth: int,
                 generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    """An orthonormal basis P (b, s, K) of the block Krylov space [M Ω, (M Mᵀ) M Ω, ..., (M Mᵀ)^depth M Ω]
    of M (b, s, l), K = (depth + 1) k for Ω (b, l, k), and Mᵀ P (b, l, K), from 2 depth + 2 passes over M.

    Each Mᵀ Q_i is both the next step's input and a block of Mᵀ P, so keeping every block (Musco &
    Musco 2015) costs no pass more than the power iterations of Halko et al. (alg. 4.4), which keep
    only the last. `generators` (one per matrix) draw the replacements of exhausted columns.
    """
    k = omega.shape[-1]
    basis = M.new_empty(*M.shape[:-1], (depth + 1) * k)  # (b, s, K)
    image = M.new_empty(M.shape[0], M.shape[-1], (depth + 1) * k)  # (b, l, K) = Mᵀ basis
    Q = orthonormal(skinny_matmul(M, omega))  # (b, s, k)
    basis[..., :k] = Q
    for i in range(1, depth + 1):
        Z = skinny_matmul(M.mT, Q)  # (b, l, k)
        image[..., (i - 1) * k:i * k] = Z
        fresh = gaussian_sketch(M.shape[-2], k, generators, M)  # (b, s, k)
        Q = orthonormal(skinny_matmul(M, Z), basis[..., :i * k], fresh)  # (b, s, k)
        basis[..., i * k:(i + 1) * k] = Q
    image[..., depth * k:] = skinny_matmul(M.mT, Q)
    return basis, image


def rayleigh_ritz(basis: torch.Tensor, image: torch.Tensor, rank: int):
    """The top-`rank` SVD of M restricted to span(basis) (b, s, K), given image = Mᵀ basis (b, l, K):
    M ≈ basis imageᵀ, and imageᵀ = Rᵀ Qᵀ by a QR of image, so a (K, K) SVD of Rᵀ finishes it.
    Returns U (b, s, r), S (b, r), V (b, l, r) with M ≈ U diag(S) Vᵀ."""
    with one_thread():
        Qi, R = torch.linalg.qr(image)  # (b, l, K), (b, K, K)
        Ur, S, Vrh = torch.linalg.svd(R.mT)  # (b, K, K), (b, K), (b, K, K)
    U = basis @ Ur[..., :rank]  # (b, s, r)
    V = Qi @ Vrh[..., :rank, :].mT  # (b, l, r)
    return U, S[..., :rank], V


def randomized_svd_batch(
    W: torch.Tensor, rank: int, niter: int, oversample: int | None, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-`rank` SVDs of a batch W (b, out, in), one generator per matrix, by a randomized block Krylov
    method (Musco & Musco 2015): 2 niter + 2 passes over W, the count of PEFT's `svd_lowrank(W, q=r,
    niter)`, at a lower error (benchmarks/results/pareto.md).

    The basis lives in the smaller of W's two spaces (W or Wᵀ is M (b, s, l), s <= l), which keeps its
    orthogonalisation cheap; the Gaussian test matrix lives in the larger one.
    """
    tall = W.shape[-2] > W.shape[-1]
    M = W.mT if tall else W  # (b, s, l), s <= l
    omega = gaussian_sketch(M.shape[-1], block_size(rank, oversample), generators, W)  # (b, l, k)
    U, S, V = rayleigh_ritz(*krylov_basis(M, omega, niter, generators), rank)  # (b, s, r), (b, r), (b, l, r)
    return (V, S, U.mT) if tall else (U, S, V.mT)


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
    exact = opts.niter is None or exact_is_cheaper(W, block_size(rank, opts.oversample), opts.niter)
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
