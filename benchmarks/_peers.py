"""PEFT's LoftQ as a reference on a machine without a GPU (tests and benchmarks compare against it).

PEFT's `loftq_init` hard-codes a cuda/xpu compute device; `cuda_moves_on_cpu()` sends those
moves to the CPU for the duration of a `with` block.
"""

from __future__ import annotations

import contextlib

import torch


def is_cuda(device) -> bool:
    return (isinstance(device, str) and device.startswith("cuda")) or \
        (isinstance(device, torch.device) and device.type == "cuda")


@contextlib.contextmanager
def cuda_moves_on_cpu():
    """Inside the block, `tensor.to("cuda")` (or device="cuda") stays on the CPU."""
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        args = tuple("cpu" if is_cuda(a) else a for a in args)
        if is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return real_to(self, *args, **kwargs)

    torch.Tensor.to = to
    try:
        yield
    finally:
        torch.Tensor.to = real_to
