"""LoRA baselines: W is left untouched, B = 0, so the model is unchanged at init and the update
starts from noise in A (Hu et al.). `lora-kaiming` is PEFT's default init, `lora-gaussian` its
`init_lora_weights="gaussian"`."""

from __future__ import annotations

import math

import torch

from .base import register


@register("lora-kaiming", help="LoRA baseline: A ~ kaiming-uniform (PEFT's default), B = 0, W untouched.",
          extracts=False)
def lora_kaiming(W: torch.Tensor, rank: int, opts, generator: torch.Generator):
    out_dim, in_dim = W.shape
    bound = 1.0 / math.sqrt(in_dim)  # kaiming_uniform_(a=sqrt(5)) on a (r, in) matrix
    A = (torch.rand(rank, in_dim, generator=generator) * 2 - 1) * bound  # (r, in)
    B = torch.zeros(out_dim, rank)  # (out, r)
    return B.to(W.device), A.to(W.device), {}


@register("lora-gaussian", help="LoRA baseline: A ~ N(0, 1/r^2) (PEFT's 'gaussian'), B = 0, W untouched.",
          extracts=False)
def lora_gaussian(W: torch.Tensor, rank: int, opts, generator: torch.Generator):
    out_dim, in_dim = W.shape
    A = torch.randn(rank, in_dim, generator=generator) / rank  # (r, in)
    B = torch.zeros(out_dim, rank)  # (out, r)
    return B.to(W.device), A.to(W.device), {}
