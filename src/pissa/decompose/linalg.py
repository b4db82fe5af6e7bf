"""Small linear-algebra helpers shared by the methods, the training variants and conversion."""

from __future__ import annotations

import math

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
