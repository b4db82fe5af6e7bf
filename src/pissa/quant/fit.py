"""Fitting a quantized base plus a low-rank adapter: W ~ Q + B @ A.

Three ways, all built on the decomposition registry (its `pissa` method does the SVD steps, with
exact or randomized SVD from the same options):

    QLoRA   Q = nf4(W), B = 0                        no reduction of the quantization error
    LoftQ   L_0 = 0;      repeat T times: Q = nf4(W - L),  L = SVD_r(W - Q)      (Li et al., 2023)
    QPiSSA  Q_0 = 0;      repeat T times: L = SVD_r(W - Q), Q = nf4(W - L)      (paper, Algorithm 1)

QPiSSA's first step is plain PiSSA (L = top-r of W, Q = nf4(W_res)); later steps re-fit the
adapter to what the quantized residual lost. LoftQ ends on an SVD step (the adapter fits the final
Q); QPiSSA ends on a quantization step (Q is nf4 of the final residual, which is what gets
stored and quantized by the loader). T = t in these loops is the same as stopping a longer run
after step t, so one run of T = 5 gives the results for every T <= 5.

`pissa init` stores an unquantized residual R that the loader quantizes, chosen so that nf4(R as
stored) is the fitted Q: QPiSSA stores R = W - B @ A (so R + B @ A = W), LoftQ stores
R = W - L_{T-1} (Q_T = nf4(R), and the adapter is the top-r of W - Q_T; R + B @ A != W).

Here L = B @ A is unscaled, B (out, r), A (r, in), all fp32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..decompose import Factors, check_weight, decompose, get_method, make_options
from ..dtypes import dtype_name
from .formats import QuantizationError, QuantSpec, digest, fake_quantize
from .metrics import frobenius, reduction_ratio

FITS = ("qlora", "loftq", "qpissa")


@dataclass
class Iterate:
    """The state after step t of a fitting loop."""

    t: int
    Q: torch.Tensor  # (out, in) dequantized base, fp32
    B: torch.Tensor  # (out, r)
    A: torch.Tensor  # (r, in)

    def error(self, W32: torch.Tensor) -> torch.Tensor:
        return W32 - self.Q - self.B @ self.A  # (out, in)


def check_iters(iters: int, flag: str = "--quant-iters") -> None:
    if iters < 1:
        raise QuantizationError(f"{flag} must be >= 1 (1 = one step, the paper uses 5), got {iters}")


def low_rank(target: torch.Tensor, rank: int, method: str, options: dict | None, seed: int):
    """(B (out, r), A (r, in)) with B @ A the part of `target` that registry `method` extracts."""
    m = get_method(method)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    B, A, _ = m.fn(target, rank, make_options(method, options), generator)  # (out, r), (r, in)
    return B.to(torch.float32), A.to(torch.float32)


def qpissa_iterates(W32: torch.Tensor, rank: int, spec: QuantSpec, iters: int, method: str = "pissa",
                    options: dict | None = None, seed: int = 0) -> Iterator[Iterate]:
    """QPiSSA (Algorithm 1): step t fits the adapter to W - Q_{t-1} (Q_0 = 0), then quantizes the residual."""
    check_iters(iters)
    target = W32  # (out, in)
    for t in range(1, iters + 1):
        B, A = low_rank(target, rank, method, options, seed + t - 1)  # (out, r), (r, in)
        Q = fake_quantize(W32 - B @ A, spec)  # (out, in) nf4(W_res)
        yield Iterate(t, Q, B, A)
        target = W32 - Q  # (out, in) what the quantized residual misses


def loftq_iterates(W32: torch.Tensor, rank: int, spec: QuantSpec, iters: int, options: dict | None = None,
                   seed: int = 0) -> Iterator[Iterate]:
    """LoftQ: step t quantizes W - L_{t-1} (L_0 = 0), then fits the adapter to the quantization error."""
    check_iters(iters)
    Q = fake_quantize(W32, spec)  # (out, in)
    for t in range(1, iters + 1):
        B, A = low_rank(W32 - Q, rank, "pissa", options, seed + t - 1)  # top-r of the error
        yield Iterate(t, Q, B, A)
        Q = fake_quantize(W32 - B @ A, spec)  # (out, in)


def qlora_iterate(W32: torch.Tensor, rank: int, spec: QuantSpec) -> Iterate:
    """QLoRA: quantize W, start the adapter at zero (B = 0), so the error is W - nf4(W)."""
    out_dim, in_dim = W32.shape
    return Iterate(1, fake_quantize(W32, spec), torch.zeros(out_dim, rank), torch.zeros(rank, in_dim))


def fit_iterates(fit: str, W32: torch.Tensor, rank: int, spec: QuantSpec, iters: int,
                 options: dict | None = None, seed: int = 0) -> Iterator[Iterate]:
    """The iterates of `fit` (qlora, loftq or qpissa); qlora has a single one."""
    if fit == "qlora":
        yield qlora_iterate(W32, rank, spec)
    elif fit == "loftq":
        yield from loftq_iterates(W32, rank, spec, iters, options, seed)
    elif fit == "qpissa":
        yield from qpissa_iterates(W32, rank, spec, iters, "pissa", options, seed)
    else:
        raise QuantizationError(f"unknown fit {fit!r}; choose one of: {', '.join(FITS)}")


def check_fit_input(W: torch.Tensor, rank: int, spec: QuantSpec, iters: int, name: str) -> None:
    check_weight(W, rank, name)
    check_iters(iters)
    if spec.dtype != dtype_name(W.dtype):
        raise QuantizationError(f"{name}: quantization dtype {spec.dtype} differs from the weight's {W.dtype}")


@torch.no_grad()
def qpissa_decompose(
    W: torch.Tensor,
    rank: int,
    spec: QuantSpec,
    iters: int,
    *,
    method: str = "pissa",
    options: dict | None = None,
    scale: float = 1.0,
    seed: int = 0,
    adapter_dtype: torch.dtype = torch.float32,
    name: str = "weight",
) -> Factors:
    """QPiSSA for `pissa init`: adapter factors plus the residual to store (in W's dtype, unquantized).

    The last step runs on the factors *as stored* (scaled by 1/sqrt(scale), cast to adapter_dtype):
    residual = W - scale * B @ A, and the reported Q = fake_quantize(residual) is bit for bit what
    a 4-bit loader makes of the stored residual (its sha256 goes into info for later checks).
    A LoRA-style method (B = 0) gives QLoRA: residual = W.
    """
    check_fit_input(W, rank, spec, iters, name)
    W32 = W.detach().to(torch.float32)  # (out, in)
    target, history = W32, []
    # Steps 1 .. T-1 as in the report; a LoRA method (B = 0) has nothing to refit.
    refits = iters - 1 if get_method(method).extracts else 0
    for it in qpissa_iterates(W32, rank, spec, refits, method, options, seed) if refits else ():
        history.append(frobenius(it.error(W32)))
        target = W32 - it.Q  # (out, in) the last step fits the adapter to what Q_{T-1} misses
    f = decompose(target, method, rank, scale=scale, options=options, seed=seed + len(history),
                  adapter_dtype=adapter_dtype, name=name)
    update = scale * (f.B.to(torch.float32) @ f.A.to(torch.float32))  # (out, in), the adapter as stored
    residual = (W32 - update).to(W.dtype)  # (out, in), written unquantized; the loader quantizes it
    return fitted_factors(W32, f, residual, fake_quantize(residual, spec), update, spec, iters, history, "qpissa")


@torch.no_grad()
def loftq_decompose(
    W: torch.Tensor,
    rank: int,
    spec: QuantSpec,
    iters: int,
    *,
    options: dict | None = None,
    scale: float = 1.0,
    seed: int = 0,
    adapter_dtype: torch.dtype = torch.float32,
    name: str = "weight",
) -> Factors:
    """LoftQ for `pissa init`: the residual to store is R = W - L_{T-1} (in W's dtype; R = W for T = 1).

    The loop's Q_T is nf4(W - L_{T-1}) computed from W - L_{T-1} cast to W's dtype, so
    fake_quantize(R as stored) is Q_T bit for bit: exactly what a 4-bit loader makes of R. The adapter
    is the top-r of W - Q_T (LoftQ's last SVD step), scaled by 1/sqrt(scale) and cast as stored.
    Unlike QPiSSA, R + scale * B @ A is not W before quantization: LoftQ fits Q + B @ A ~ W, and
    what it leaves, W - Q - scale * B @ A, is reported as the quantization error.
    """
    check_fit_input(W, rank, spec, iters, name)
    W32 = W.detach().to(torch.float32)  # (out, in)
    prior, history = None, []  # L_{T-1} = B @ A of step T-1 (L_0 = 0)
    for it in loftq_iterates(W32, rank, spec, iters - 1, options, seed) if iters > 1 else ():
        history.append(frobenius(it.error(W32)))
        prior = it.B @ it.A  # (out, in)
    residual = (W32 if prior is None else W32 - prior).to(W.dtype)  # (out, in), the loader quantizes it
    Q = fake_quantize(residual, spec)  # (out, in) Q_T
    f = decompose(W32 - Q, "pissa", rank, scale=scale, options=options, seed=seed + len(history),
                  adapter_dtype=adapter_dtype, name=name)
    update = scale * (f.B.to(torch.float32) @ f.A.to(torch.float32))  # (out, in), the adapter as stored
    return fitted_factors(W32, f, residual, Q, update, spec, iters, history, "loftq")


def fitted_factors(W32: torch.Tensor, f: Factors, residual: torch.Tensor, Q: torch.Tensor, update: torch.Tensor,
                   spec: QuantSpec, iters: int, history: list[float], fit: str) -> Factors:
    """The init's factors: f's adapter with `residual` to store. Q = fake_quantize(residual) is what the
    loader will compute with; info measures the error W - Q - update against QLoRA's W - nf4(W)."""
    error = W32 - Q - update  # (out, in)
    history = [*history, frobenius(error)]
    recon = (residual.to(torch.float32) + update - W32).abs()  # (out, in), the unquantized identity (QPiSSA)
    qlora_fro = frobenius(W32 - fake_quantize(W32, spec))  # the cast to spec.dtype gives back W exactly
    info = {
        **f.info,
        "shape": list(W32.shape),
        "recon_max_abs_err": recon.max().item(),
        "recon_rel_fro_err": (recon.norm() / W32.norm().clamp_min(1e-30)).item(),
        "residual_fro": residual.to(torch.float32).norm().item(),
        "quant": {
            **spec.to_dict(),
            "fit": fit,
            "iters": iters,
            "error_fro": history[-1],
            "error_rel_fro": history[-1] / max(W32.norm().item(), 1e-30),
            "qlora_error_fro": qlora_fro,
            "reduction_fro_pct": reduction_ratio(history[-1], qlora_fro),
            "iter_error_fro": history,
            "dequant_sha256": digest(Q),
        },
    }
    return Factors(A=f.A, B=f.B, residual=residual, info=info)
