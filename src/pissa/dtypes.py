"""Dtype names as users type them (--dtype bf16, adapter_dtype float32) and their torch dtypes."""

from __future__ import annotations

import torch

from .errors import PissaError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """A torch dtype from its name (float32, fp32, bfloat16, bf16, float16, fp16) or itself."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise PissaError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> "bfloat16" (the name transformers' configs and pissa's records use)."""
    return str(dtype).removeprefix("torch.")
