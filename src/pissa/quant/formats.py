"""Quantization formats, done by bitsandbytes exactly as its loaders do them.

`fake_quantize(W, spec)` returns dequant(quant(W)): the weight a quantized layer actually computes
with. It casts W to `spec.dtype` first, because that is what transformers does when it quantizes
a checkpoint at load time (the stored tensor is cast to the model's `dtype`, then packed). So
fitting against `fake_quantize(residual_as_stored, spec)` fits against exactly what the loader
will produce on the same kernels (checked by `pissa.quant.loading.check_quantized_model`).

Formats (a registry, not an if/elif chain):
    nf4, fp4   4-bit blockwise absmax (QLoRA), optional double quantization of the absmax values
    int8       row-wise absmax (LLM.int8's vector-wise quantization, no outlier decomposition)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..dtypes import parse_dtype
from ..errors import PissaError

INSTALL_HINT = "pip install 'pissa[quant]'  (or: pip install bitsandbytes)"
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STORAGE_DTYPES = ("uint8", "bfloat16", "float16", "float32")


class QuantizationError(PissaError, ValueError):
    """A quantization setting or input that cannot be used."""


def require_bnb():
    """Import bitsandbytes lazily; a missing install becomes an error that says how to install it."""
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
    except ImportError as e:
        raise QuantizationError(
            f"quantization needs bitsandbytes, which is not installed ({e}); install it with: {INSTALL_HINT}"
        ) from e
    return bitsandbytes


@dataclass(frozen=True)
class QuantSpec:
    """How a weight is quantized; recorded next to every quantized output so a loader can match it."""

    quant_type: str = "nf4"
    """nf4 or fp4 (4-bit, bitsandbytes), or int8 (row-wise absmax)."""
    double_quant: bool = False
    """4-bit only: also quantize the per-block absmax values (QLoRA's double quantization)."""
    blocksize: int = 64
    """4-bit only: values per absmax block; transformers' 4-bit loader always uses 64."""
    dtype: str = "float32"
    """The dtype W is cast to before quantizing (the loader casts the stored weight to the model dtype)."""
    quant_storage: str = "uint8"
    """4-bit only: storage dtype of the packed codes (bfloat16 for FSDP); does not change values."""

    def __post_init__(self):
        if self.quant_type not in FORMATS:
            raise QuantizationError(
                f"unsupported quant type {self.quant_type!r}; choose one of: {', '.join(FORMATS)}"
            )
        if self.blocksize not in BLOCKSIZES:
            raise QuantizationError(f"blocksize must be one of {BLOCKSIZES}, got {self.blocksize}")
        if self.quant_storage not in STORAGE_DTYPES:
            raise QuantizationError(
                f"quant storage must be one of {', '.join(STORAGE_DTYPES)}, got {self.quant_storage!r}"
            )
        if parse_dtype(self.dtype) not in (torch.float32, torch.bfloat16, torch.float16):
            raise QuantizationError(f"can only quantize from float32/bfloat16/float16, got {self.dtype!r}")

    @property
    def is_4bit(self) -> bool:
        return FORMATS[self.quant_type].bits == 4

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Format:
    name: str
    bits: int
    fake_quantize: Callable[[torch.Tensor, QuantSpec], torch.Tensor]
    help: str


def storage_dtype(name: str) -> torch.dtype:
    return torch.uint8 if name == "uint8" else parse_dtype(name)


def quantize_4bit(W: torch.Tensor, spec: QuantSpec):
    """Pack W (out, in) into 4-bit codes and a bitsandbytes QuantState, as Params4bit does at load."""
    F = require_bnb().functional
    return F.quantize_4bit(
        W.to(parse_dtype(spec.dtype)).contiguous(),
        blocksize=spec.blocksize,
        compress_statistics=spec.double_quant,
        quant_type=spec.quant_type,
        quant_storage=storage_dtype(spec.quant_storage),
    )


def dequantize_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """The (out, in) weight a bitsandbytes 4-bit layer computes with, in the state's dtype."""
    return require_bnb().functional.dequantize_4bit(packed, state)


def _fake_4bit(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    return dequantize_4bit(*quantize_4bit(W, spec))  # (out, in), spec.dtype


def _fake_int8(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    F = require_bnb().functional
    CB, SCB, _ = F.int8_vectorwise_quant(W.to(parse_dtype(spec.dtype)).contiguous())  # (out, in) int8, (out,)
    return F.int8_vectorwise_dequant(CB, SCB)  # (out, in) = CB * absmax_row / 127


FORMATS: dict[str, Format] = {
    "nf4": Format("nf4", 4, _fake_4bit, "4-bit NormalFloat, blockwise absmax (QLoRA)"),
    "fp4": Format("fp4", 4, _fake_4bit, "4-bit float, blockwise absmax"),
    "int8": Format("int8", 8, _fake_int8, "8-bit integer, row-wise absmax (LLM.int8 vector-wise)"),
}


@torch.no_grad()
def fake_quantize(W: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """dequant(quant(W)) as fp32 (out, in): the weight the quantized layer computes with."""
    if W.ndim != 2:
        raise QuantizationError(f"can only quantize 2-D weights, got shape {tuple(W.shape)}")
    return FORMATS[spec.quant_type].fake_quantize(W, spec).to(torch.float32)


def digest(W: torch.Tensor) -> str:
    """sha256 of a tensor's fp32 bytes: compares dequantized weights across processes and files."""
    data = W.detach().to(torch.float32).contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()
