"""Loading a `pissa init` output for training or evaluation: the residual base plus the adapter, with no
SVD. A residual fitted for quantization (`pissa init --quantize`) loads in 4-bit with the recorded
settings and is checked against the fitted Q before any forward pass."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import PissaError
from ..io.manifest import read_manifest
from ..layout import InitDir
from ..models import load_model
from ..models.load import model_class, read_config
from ..quant import QuantizationError, check_quantized_model, keep_exact_cpu_forward_, load_kwargs
from .experts import pattern_warnings_checked
from .layers import refresh_dora_magnitude_


def is_quantized_init(folder: str | Path) -> bool:
    """Whether an init folder's residual was fitted for 4-bit loading (`pissa init --quantize`)."""
    return bool(read_manifest(folder).get("quantization"))


def check_quantized_output(model: nn.Module, out: str | Path) -> dict:
    """`quant.check_quantized_model` against a `pissa init --quantize` output folder (reads pissa.json)."""
    manifest = read_manifest(out)
    record = manifest.get("quantization")
    if not record:
        raise QuantizationError(f"{out} was not written by `pissa init --quantize`; nothing to check")
    return check_quantized_model(model, record, manifest["layers"])


def load_quantized_residual(folder: str | Path, device):
    """The residual in bitsandbytes 4-bit, exactly as the adapter was fitted against (checked)."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    residual = InitDir(Path(folder)).residual
    kwargs = load_kwargs(residual)  # raises with an install hint when bitsandbytes is missing
    placed = {} if is_deepspeed_zero3_enabled() else {"device_map": {"": device}}  # ZeRO-3 refuses a device_map
    base = model_class(read_config(residual)).from_pretrained(residual, **placed, **kwargs)
    check_quantized_output(base, folder)  # before any forward pass (bnb's CPU path repacks weights)
    keep_exact_cpu_forward_(base)  # and keep it from ever doing so: it would leave the fit and cut gradients
    return base


def load_residual(folder: str | Path, dtype: str, device):
    """An init's residual model: in 4-bit as fitted when it was quantized, else in `dtype` on `device`."""
    if is_quantized_init(folder):
        return load_quantized_residual(folder, device)
    base, _, _ = load_model(InitDir(Path(folder)).residual, dtype, tokenizer=False)
    return base.to(device)


def load_init_dir(folder: str | Path, dtype: str, dora: bool, device):
    """PeftModel from a `pissa init` output: residual base + trainable adapter, no SVD."""
    from peft import LoraConfig, PeftModel

    init = InitDir(Path(folder))
    for part in (init.residual, init.adapter):
        if not part.is_dir():
            raise PissaError(f"--init {folder} has no {part.name}/ folder; point --init at a `pissa init --out` "
                             "folder")
    peft_config = LoraConfig.from_pretrained(str(init.adapter))
    if dora and peft_config.target_parameters:
        raise PissaError(f"--dora: {folder} adapts fused expert tensors, and PEFT has no DoRA for them (its "
                         "ParamWrapper refuses it); drop --dora")
    base = load_residual(folder, dtype, device)
    peft_config.use_dora = dora
    with pattern_warnings_checked(peft_config.target_parameters):
        model = PeftModel.from_pretrained(base, str(init.adapter), is_trainable=True, config=peft_config)
    if dora:
        refresh_dora_magnitude_(model)
    return model
