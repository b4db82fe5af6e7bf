"""The bridge from `PissaConfig` (quantize, quant_fit, quant_iters, double_quant, quant_storage,
compute_dtype) to the QPiSSA or LoftQ fit, used by `init.weights.decompose_weight` for both the in-memory
and streaming paths."""

from __future__ import annotations

import torch

from ..decompose import layer_seed
from ..dtypes import dtype_name, parse_dtype
from ..quant.fit import check_iters, loftq_decompose, qpissa_decompose
from ..quant.formats import FORMATS, QuantizationError, QuantSpec, require_bnb
from ..quant.loading import annotate_config_, quant_record

# A fitted Q is only useful if a loader reproduces it; transformers loads bnb 4-bit on the fly.
INIT_TYPES = tuple(name for name, fmt in FORMATS.items() if fmt.bits == 4)
# How `pissa init --quantize` fits the adapter: qpissa (SVD first, paper Algorithm 1) or loftq (quantize
# first, Li et al. 2023). QLoRA is a LoRA --method with --quantize (B = 0, nothing to fit).
INIT_FITS = ("qpissa", "loftq")
DEFAULT_FIT = "qpissa"


def check_quant_fit(config) -> None:
    """--quant-fit must name a fit, and loftq needs --quantize and the SVD method."""
    if config.quant_fit not in INIT_FITS:
        raise QuantizationError(f"unknown --quant-fit {config.quant_fit!r}; choose one of: {', '.join(INIT_FITS)}")
    if config.quant_fit == DEFAULT_FIT:
        return
    if config.quantize is None:
        raise QuantizationError(f"--quant-fit {config.quant_fit} fits the adapter against a quantized base; add "
                                f"--quantize {INIT_TYPES[0]} (or {', '.join(INIT_TYPES[1:])})")
    if config.method != "pissa":
        raise QuantizationError(f"--quant-fit {config.quant_fit} takes the adapter from the SVD of the "
                                f"quantization error (method pissa); drop --method {config.method}, or use "
                                f"--quant-fit {DEFAULT_FIT}")


def check_quant_config(config) -> None:
    """Refuse bad quantization settings of a PissaConfig up front (PissaConfig.__post_init__)."""
    check_quant_fit(config)
    if config.quantize not in INIT_TYPES:
        extra = " (int8 is measured by `pissa quant-report`, but no int8 loader reproduces a fitted Q)" \
            if config.quantize == "int8" else ""
        raise QuantizationError(
            f"--quantize {config.quantize!r} is not supported; choose one of: {', '.join(INIT_TYPES)}{extra}"
        )
    check_iters(config.quant_iters)
    QuantSpec(quant_type=config.quantize, double_quant=config.double_quant, quant_storage=config.quant_storage)
    if config.compute_dtype is not None:
        parse_dtype(config.compute_dtype)
    require_bnb()


def spec_for(config, dtype: torch.dtype) -> QuantSpec:
    """The quantization of a residual stored in `dtype` (the loader quantizes from that dtype)."""
    return QuantSpec(
        quant_type=config.quantize,
        double_quant=config.double_quant,
        dtype=dtype_name(dtype),
        quant_storage=config.quant_storage,
    )


def quantized_decompose(W: torch.Tensor, name: str, config, rank: int, scale: float):
    """`decompose_weight` with quantization: QPiSSA (QLoRA for a LoRA method) or LoftQ of one layer."""
    common = dict(options=config.options, scale=scale, seed=layer_seed(config.seed, name),
                  adapter_dtype=parse_dtype(config.adapter_dtype), name=f"{name}.weight")
    spec = spec_for(config, W.dtype)
    if config.quant_fit == "loftq":
        return loftq_decompose(W, rank, spec, config.quant_iters, **common)
    return qpissa_decompose(W, rank, spec, config.quant_iters, method=config.method, **common)


def record_for(config, layers: dict[str, dict]) -> dict | None:
    """The quantization record of an init output (None without quantization); `layers` are the infos."""
    if config.quantize is None:
        return None
    dtypes = {info["quant"]["dtype"] for info in layers.values()}
    if len(dtypes) != 1:
        raise QuantizationError(
            f"targeted layers have mixed dtypes {sorted(dtypes)}; a 4-bit loader casts all of them to one "
            "dtype. Load the model with one --dtype"
        )
    spec = spec_for(config, parse_dtype(dtypes.pop()))
    record = quant_record(spec, config.quant_iters, config.compute_dtype, config.quant_fit)
    if config.modules_to_save:  # trained in full (a classifier head): the loader must keep them unquantized
        record["bnb_config"]["llm_int8_skip_modules"] = list(config.modules_to_save)
    return record


def record_into_(hf_config, config, layers: dict[str, dict]) -> dict | None:
    """Write the quantization record into a transformers config (in place; saved as config.json)
    and return it for the manifest; a no-op returning None without quantization."""
    record = record_for(config, layers)
    if record is not None:
        annotate_config_(hf_config, record)
    return record
