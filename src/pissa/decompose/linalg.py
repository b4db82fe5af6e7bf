"""Small linear-algebra helpers shared by the methods, the training variants and conversion."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def lora_scale(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's scaling of the LoRA update: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def factored_svd(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD of B @ A ((out, k) @ (k, in)) without forming it: QR of both factors, then a (k, k) SVD.

    Returns U (out, k), S (k,), Vh (k, in) in the promoted dtype of B and A (pass float64 factors for
    float64 results), with B @ A = U diag(S) Vh.
    """
    dtype = torch.promote_types(B.dtype, A.dtype)
    Qb, Rb = torch.linalg.qr(B.to(dtype))  # Qb (out, k) orthonormal, Rb (k, k)
    Qa, Ra = torch.linalg.qr(A.to(dtype).T)  # Qa (in, k) orthonormal, Ra (k, k)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # (k, k), (k,), (k, k)
    return Qb @ U, S, Vh @ Qa.T  # (out, k), (k,), (k, in)


def balanced(B: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-factor B @ A as (U sqrt(S), sqrt(S) Vh): the same product, orthogonal columns and equal factor
    norms, like PiSSA's own factors."""
    U, S, Vh = factored_svd(B, A)
    root = S.sqrt()  # (k,)
    return U * root, root[:, None] * Vh  # (out, k), (k, in)


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the enclosed CPU ops on one torch thread (a process-wide setting, restored on exit).

    For LAPACK calls on thin matrices (QR of (m, k), SVD of (k, k)), whose many short parallel
    regions gain nothing from a second thread and wait for it when another process holds its core:
    a QR of a (4096, 32) fp32 matrix took 0.76 ms on one thread and 26-86 ms on two on a shared
    2-core machine (0.76 vs ~0.9 ms when idle). Their results then also stop depending on the
    process's thread count. GPU ops are unaffected.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def skinny_matmul(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M @ X for a matrix M (..., a, c) and a thin X (..., c, k).

    When M is the transpose of a row-major matrix (W.mT), this computes (Xᵀ @ W)ᵀ, which streams W in
    its memory order: on MKL, 11008x4096 fp32, one thread, it took 31/41/58 ms against 39/57/91 ms for
    W.mT @ X at k = 16/32/64 (thread time, medians of 7 interleaved runs). The result is a transposed
    view; its values are those of a product, not bit-equal to the other order.
    """
    if not M.is_contiguous() and M.mT.is_contiguous():
        return (X.mT @ M.mT).mT
    return M @ X
