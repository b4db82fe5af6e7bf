"""The per-matrix arithmetic that conversion and merging share, for dense layers and each expert of a fused
tensor alike (so `lora`, `merge` and `experts` all sit above it): the rank-2r factors of paper appendix C, the
norm of their product, their best lower-rank truncation, and the `Update` a merge adds to one stored weight.
Factors are in PEFT's orientation (pissa.layout): A (r, in), B (out, r), the update `scale * B @ A`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..decompose import factored_svd
from ..layout import LayerKind


def scaled(t: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """`factor * t` in `dtype`, computed in fp32; factor 1 is an exact copy."""
    return t.to(dtype) if factor == 1.0 else (t.float() * factor).to(dtype)


def stack_2r(trained, init, s_t: float, s_i: float, s_out: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-2r factors with s_out · B2 @ A2 = s_t·B'A' - s_i·BA."""
    (A1, B1), (A0, B0) = trained, init
    dtype = torch.promote_types(A1.dtype, A0.dtype)  # bf16 trained + fp32 init: fp32 keeps both exact
    A2 = torch.cat([A1.to(dtype), A0.to(dtype)], dim=0)  # (2r, in)
    B2 = torch.cat([scaled(B1, s_t / s_out, dtype), scaled(B0, -s_i / s_out, dtype)], dim=1)  # (out, 2r)
    return A2, B2


def delta_fro(A2: torch.Tensor, B2: torch.Tensor, scale: float) -> float:
    """‖scale·B2@A2‖_F without the dense product: trace((B2ᵀB2)(A2A2ᵀ)) on (2r, 2r) Gram matrices."""
    A, B = A2.double().flatten(1), B2.double().flatten(1)  # conv factors (2r, in, kh, kw), (out, 2r, 1, 1)
    sq = torch.sum((B.T @ B) * (A @ A.T))  # = ‖B@A‖_F², both Grams (2r, 2r) and symmetric
    return abs(scale) * float(sq.clamp_min(0).sqrt())


def truncate(A2: torch.Tensor, B2: torch.Tensor, scale: float, rank: int, s_out: float):
    """Best rank-`rank` approximation of ΔW = scale·B2@A2, never forming the dense ΔW.

    Returns (A (k, in), B (out, k), info) with s_out·B@A = the truncated ΔW (Eckart-Young). Conv
    factors (2r, in, kh, kw), (out, 2r, 1, 1) are unfolded to matrices and come back in their layout.
    """
    U, S, Vh = factored_svd(B2.double().flatten(1) * scale, A2.flatten(1))  # the core SVD is (2r, 2r)
    root = (S[:rank] / s_out).sqrt()  # (k,), split evenly between the two factors
    B = U[:, :rank] * root  # (out, k)
    A = root[:, None] * Vh[:rank]  # (k, in)
    total, tail = float(S.square().sum()), float(S[rank:].square().sum())
    info = {"delta_fro": math.sqrt(total), "err_fro": math.sqrt(tail),
            "rel_err": math.sqrt(tail / total) if total > 0 else 0.0,
            "sigma_kept": float(S[rank - 1]), "sigma_next": float(S[rank]) if rank < len(S) else 0.0}
    A = A.reshape(rank, *A2.shape[1:]).to(A2.dtype)
    B = B.reshape(B2.shape[0], rank, *B2.shape[2:]).to(B2.dtype)
    return A, B, info


@dataclass(frozen=True)
class Update:
    """What to add to one stored weight: scale · B @ A in the weight's layout."""

    A: torch.Tensor  # (r, in) or conv (r, in, kh, kw)
    B: torch.Tensor  # (out, r) or conv (out, r, 1, 1)
    scale: float
    kind: LayerKind
    magnitude: torch.Tensor | None = None  # DoRA: (out,), the norm each row of W + ΔW is rescaled to
