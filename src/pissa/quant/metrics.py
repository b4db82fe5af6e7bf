"""Quantization-error metrics.

The paper (section 5.3, appendix H) measures the error of W ~ Q + scale * B @ A with the nuclear
norm (sum of singular values) of E = W - (Q + scale * B @ A), and reports the reduction ratio
1 - ||E_method||_* / ||W - nf4(W)||_*  relative to plain quantization (QLoRA).
"""

from __future__ import annotations

import torch


def nuclear(E: torch.Tensor) -> float:
    """||E||_*: the sum of E's singular values (the paper's error measure)."""
    return torch.linalg.svdvals(E.to(torch.float32)).sum().item()


def frobenius(E: torch.Tensor) -> float:
    return torch.linalg.matrix_norm(E.to(torch.float32)).item()


def relative(E: torch.Tensor, W: torch.Tensor) -> float:
    """||E||_F / ||W||_F."""
    return frobenius(E) / max(frobenius(W), 1e-30)


def reduction_ratio(error: float, baseline: float) -> float:
    """The paper's error-reduction ratio in percent: (1 - error / baseline) * 100."""
    return (1.0 - error / baseline) * 100.0 if baseline > 0 else 0.0


def errors(E: torch.Tensor, W: torch.Tensor, nuclear_norm: bool = True) -> dict[str, float]:
    """All metrics of one error matrix E (out, in) of weight W; the nuclear norm costs an SVD."""
    out = {"fro": frobenius(E), "rel_fro": relative(E, W), "max_abs": E.abs().max().item()}
    if nuclear_norm:
        out["nuclear"] = nuclear(E)
    return out
