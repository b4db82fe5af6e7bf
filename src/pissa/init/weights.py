"""One layer's weight decomposed per a `PissaConfig`: `decompose_weight`, the single per-tensor entry point that
the in-memory (`layers`, `expert_layers`) and streaming (`shard_job`) paths share, so both give the same tensors,
and `decompose_weights`, its batched form for same-shape weights.

On the CPU a decomposition runs on one torch thread, whatever the process's count: its bits then depend on the
weight, the seed and the method only (LAPACK's and MKL's depend on the thread count), so a run resumed, split over
workers or ranks, or repeated under another OMP_NUM_THREADS writes the same tensors; and the cores go to several
weights at once (`init.concurrent`), which a shared 2-core machine served better than two threads per weight,
whose every parallel region waits at a barrier for the thread the reader, the writer or another process holds."""

from __future__ import annotations

import torch

from ..decompose import decompose, decompose_batch, get_method, layer_seed
from ..decompose.linalg import one_thread
from ..dtypes import parse_dtype
from .config import PissaConfig
from .quantized import quantized_decompose


def decompose_weight(W: torch.Tensor, name: str, config: PissaConfig, rank: int, scale: float):
    """Decompose one layer's (out, in) weight per `config`: the single per-tensor entry point
    shared by the in-memory and streaming paths, so both give the same tensors.
    With `config.quantize` set it runs QPiSSA or LoftQ (`config.quant_fit`, pissa.quant), fitting
    against the quantized residual."""
    # MKL's GEMM/LAPACK bits depend on the data's address alignment: an fp32 weight mmap'd from a
    # file, loaded by transformers or read into a fresh buffer would otherwise decompose to
    # different last bits. A fresh (allocator-aligned) copy makes the result depend on values only.
    # Other dtypes are copied anyway by the fp32 cast inside the decomposition.
    W = W.detach().clone() if W.dtype == torch.float32 else W
    with one_thread():
        if config.quantize is not None:
            return quantized_decompose(W, name, config, rank, scale)
        return decompose(W, config.method, rank, scale=scale, options=config.options,
                         seed=layer_seed(config.seed, name), adapter_dtype=parse_dtype(config.adapter_dtype),
                         name=f"{name}.weight")


def decompose_weights(Ws: list[torch.Tensor], names: list[str], config: PissaConfig, rank: int, scale: float):
    """`decompose_weight` for several same-shape weights: one batched call for a method with a
    batched form (each layer keeps its own seed), else exactly the per-tensor path, one by one."""
    if len(Ws) == 1 or config.quantize is not None or get_method(config.method).batch is None:
        return [decompose_weight(W, name, config, rank, scale) for W, name in zip(Ws, names, strict=True)]
    with one_thread():
        return decompose_batch(Ws, config.method, rank, scale=scale, options=config.options,
                               seeds=[layer_seed(config.seed, n) for n in names],
                               adapter_dtype=parse_dtype(config.adapter_dtype), names=[f"{n}.weight" for n in names])
