"""Loading a QPiSSA residual in 4-bit with stock transformers, and proving it is the one we fitted.

`pissa init --quantize nf4` writes the residual unquantized, in the dtype it was fitted from, and
fits the adapter against fake_quantize(residual as stored). Why not save packed 4-bit weights?
- transformers quantizes at load by casting the stored tensor to the model dtype and calling the
  same bitsandbytes quantize_4bit we fit with, so the stored residual plus the recorded settings
  reproduce the fitted Q bit for bit (tested on CPU);
- the residual stays a normal checkpoint: usable in full precision, mergeable, streamable, and
  loadable with FSDP's quant_storage or any later bitsandbytes release;
- what can go wrong (another dtype, double quant, quant type, blocksize, or a kernel that rounds
  differently) is caught by `check_quantized_model`, which compares every loaded layer's
  dequantized weight with the sha256 recorded at fit time.

The settings live in two places: `pissa.json` ("quantization") and the residual's config.json
under "pissa_quantization" (not "quantization_config": transformers would then expect packed
weights). `load_kwargs(residual_dir)` turns them back into from_pretrained arguments.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from ..dtypes import dtype_name, parse_dtype
from ..errors import PissaWarning
from ..layout import MODEL_CONFIG_FILE
from .formats import QuantizationError, QuantSpec, digest, require_bnb, storage_dtype

CONFIG_KEY = "pissa_quantization"
SPEC_KEYS = ("quant_type", "double_quant", "blocksize", "dtype", "quant_storage")


def quant_record(spec: QuantSpec, iters: int, compute_dtype: str | None, fit: str = "qpissa") -> dict:
    """What a loader needs to reproduce the fitted Q, as saved in config.json and pissa.json, and which
    fit (qpissa or loftq) made it: train and convert read it back (a record without one is qpissa)."""
    compute = compute_dtype or spec.dtype
    return {
        **spec.to_dict(),
        "fit": fit,
        "iters": iters,
        "compute_dtype": compute,
        "bnb_config": {  # BitsAndBytesConfig(**bnb_config), plus dtype=<dtype> in from_pretrained
            "load_in_4bit": True,
            "bnb_4bit_quant_type": spec.quant_type,
            "bnb_4bit_use_double_quant": spec.double_quant,
            "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_storage": spec.quant_storage,
        },
    }


def spec_from_record(record: dict) -> QuantSpec:
    return QuantSpec(**{k: record[k] for k in SPEC_KEYS})


def annotate_config_(hf_config, record: dict) -> None:
    """Record the quantization settings in a transformers config (in place); saved in config.json."""
    setattr(hf_config, CONFIG_KEY, record)


def read_record(residual_dir: str | Path) -> dict:
    """The recorded settings of a QPiSSA residual folder (OUT/residual)."""
    path = Path(residual_dir) / MODEL_CONFIG_FILE
    if not path.exists():
        raise QuantizationError(f"{path} not found; give the residual/ folder written by `pissa init --quantize`")
    record = json.loads(path.read_text()).get(CONFIG_KEY)
    if record is None:
        raise QuantizationError(f"{path} has no {CONFIG_KEY!r}: this residual was not fitted for quantization")
    return record


def bnb_config(record: dict):
    """The stock BitsAndBytesConfig that reproduces the fitted quantization."""
    require_bnb()
    from transformers import BitsAndBytesConfig

    cfg = dict(record["bnb_config"])
    cfg["bnb_4bit_compute_dtype"] = parse_dtype(cfg["bnb_4bit_compute_dtype"])
    cfg["bnb_4bit_quant_storage"] = storage_dtype(cfg["bnb_4bit_quant_storage"])
    return BitsAndBytesConfig(**cfg)


def load_kwargs(residual_dir: str | Path) -> dict:
    """from_pretrained(residual_dir, **load_kwargs(residual_dir)) loads the residual as fitted.

    dtype matters: transformers casts the stored weight to `dtype` before quantizing it.
    """
    record = read_record(residual_dir)
    return {"quantization_config": bnb_config(record), "dtype": parse_dtype(record["dtype"])}


CPU_KERNEL_NOTICE = (
    "4-bit layers compute as dequantize + fp32 matmul on this CPU, exactly as the adapter was fitted: "
    "bitsandbytes' bf16 CPU kernel is turned off, because it rounds weights and inputs to bf16 and, once used "
    "in an eval pass, passes no gradient to earlier layers; what it costs: one-token decoding is 2.5-5x slower per "
    "layer than with that kernel, batches of prompts are 2x faster (benchmarks/results/cpu_4bit.md)"
)


def keep_exact_cpu_forward_(model: nn.Module) -> int:
    """Turn off bitsandbytes' bf16 CPU inference path on every Linear4bit of `model` (in place); returns how
    many layers it was on for, and says once what that costs.

    On a CPU with AVX512-BF16, bitsandbytes >= 0.49 repacks a 4-bit weight in place at its first eval-mode,
    no-grad forward and from then on computes that layer in bf16, in training mode too, through a kernel with
    no autograd formula: the layer's output moves by ~1e-2 from the fitted nf4(W_res) (a DPO reference is no
    longer the model before training) and its input gets no gradient (earlier layers' adapters train on a
    wrong gradient). The dequantize + matmul path is what the fit was measured against, and is differentiable.
    """
    layers = [m for m in model.modules() if isinstance(m, require_bnb().nn.Linear4bit)]
    repacking = [m for m in layers if getattr(m, "support_avx512bf16_for_cpu", False)]
    for module in repacking:
        module.support_avx512bf16_for_cpu = False
    if repacking and any(p.device.type == "cpu" for m in repacking for p in m.parameters()):
        warnings.warn(CPU_KERNEL_NOTICE, PissaWarning, stacklevel=2)
    return len(repacking)


def layer_name(module_name: str) -> str:
    """A module's name in the original model: drop PEFT's wrappers."""
    return module_name.removeprefix("base_model.model.").replace(".base_layer", "")


def loaded_weight(module: nn.Module) -> tuple[torch.Tensor, object]:
    """The (out, in) dequantized weight of a bitsandbytes Linear4bit, and its QuantState."""
    F = require_bnb().functional
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        raise QuantizationError(
            "weights were repacked by bitsandbytes' CPU inference path (absmax rounded to bf16); "
            "run check_quantized_model right after loading, before any eval-mode forward pass"
        )
    return F.dequantize_4bit(module.weight.data, state), state


def setting_mismatches(state, spec: QuantSpec) -> list[str]:
    loaded = {
        "quant_type": state.quant_type,
        "double_quant": bool(state.nested),
        "blocksize": state.blocksize,
        "dtype": dtype_name(state.dtype),
    }
    return [f"{k}={v} (fitted with {getattr(spec, k)})" for k, v in loaded.items() if v != getattr(spec, k)]


def check_quantized_model(model: nn.Module, record: dict, layers: dict[str, dict]) -> dict:
    """Verify a loaded 4-bit model holds exactly the quantized residual the adapter was fitted against.

    `record` is the saved quantization record and `layers` the manifest's per-layer infos (each with
    quant.dequant_sha256). Raises QuantizationError naming the first mismatching layer and the fix.
    Returns {"layers": n checked, "compute_dtype": ...}.
    """
    bnb = require_bnb()
    spec = spec_from_record(record)
    modules = {layer_name(n): m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    fix = "load with from_pretrained(residual_dir, **pissa.quant.load_kwargs(residual_dir))"
    for name, info in layers.items():
        if name not in modules:
            raise QuantizationError(f"{name} is not a 4-bit layer in the loaded model; {fix}")
        W, state = loaded_weight(modules[name])
        wrong = setting_mismatches(state, spec)
        if wrong:
            raise QuantizationError(f"{name} was loaded with {', '.join(wrong)}; {fix}")
        if digest(W) != info["quant"]["dequant_sha256"]:
            raise QuantizationError(
                f"{name}: the loaded 4-bit weight differs from the quantized residual the adapter was "
                f"fitted against (same settings, other values: a different residual file or kernel); {fix}"
            )
    computes = {dtype_name(m.compute_dtype) for m in modules.values()}
    return {"layers": len(layers), "compute_dtype": sorted(computes)}
