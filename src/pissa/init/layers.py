"""In-memory PiSSA init of a live `transformers` model through PEFT.

Targets are matched with PEFT's own matcher (`init.targets`), so the set we decompose is exactly the
set PEFT wraps. Each targeted weight is viewed as its (out, in) matrix (`pissa.layout` says how for
each layer kind), decomposed in fp32 (`pissa.decompose`); A and B go into the LoRA layers and the
residual replaces the base weight, in the layer's own layout. For a Conv2d, PEFT's conv LoRA is
lora_A = Conv2d(in, r, k) holding A reshaped to (r, in, kh, kw) and lora_B = Conv2d(r, out, 1)
holding B (out, r, 1, 1), so its update is exactly B @ A folded back into the kernel.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import torch
from torch import nn

from ..errors import PissaError
from ..layout import kind_of
from ..models import check_not_quantized
from .concurrent import OrderedWork
from .config import PissaConfig
from .expert_layers import check_expert_weights, check_wrapped, init_experts_
from .experts import pattern_warnings_checked
from .targets import check_targets, resolve_targets
from .weights import decompose_weight

ADAPTER_NAME = "default"


def set_factors_(layer, A: torch.Tensor, B: torch.Tensor) -> None:
    """Write A (r, in) and B (out, r) into a PEFT LoRA layer in its layout (Linear, Conv2d, Embedding)."""
    if ADAPTER_NAME in getattr(layer, "lora_embedding_A", {}):
        layer.lora_embedding_A[ADAPTER_NAME].data = A  # (r, num)
        layer.lora_embedding_B[ADAPTER_NAME].data = B  # (dim, r)
        return
    lora_A, lora_B = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
    lora_A.weight.data = A.reshape(lora_A.weight.shape)  # (r, in) or conv (r, in, kh, kw)
    lora_B.weight.data = B.reshape(lora_B.weight.shape)  # (out, r) or conv (out, r, 1, 1)


def init_model(
    model: nn.Module,
    config: PissaConfig | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    dora: bool = False,
):
    """Wrap `model` (in place) with PEFT LoRA layers initialised by `config.method`.

    Returns (PeftModel, report) where report maps each layer name to its decomposition info.
    `progress(done, total, layer_name)` is called after each layer. The model's outputs are unchanged:
    base weight = residual, and scale * B @ A = what was removed. With `dora`, DoRA's magnitude is set
    after the init to the column norms of W_res + scale B A = W, which keeps the outputs unchanged too.
    """
    from peft import get_peft_model

    config = config or PissaConfig()
    check_not_quantized(model)
    targets = resolve_targets(model, config)
    check_targets(model, targets.modules)
    check_expert_weights(model, targets.experts)
    if dora and targets.experts:
        raise PissaError("--dora: PEFT has no DoRA for fused expert tensors (its ParamWrapper refuses it); drop "
                         "--dora or leave the experts out of --targets")
    peft_config = targets.lora
    peft_config.use_dora = dora
    with pattern_warnings_checked(peft_config.target_parameters):
        peft_model = get_peft_model(model, peft_config)
    check_wrapped(peft_model, targets)
    total = len(targets.modules) + len(targets.experts)
    modules = dict(peft_model.base_model.model.named_modules())

    def layer_done(done: int, name: str) -> None:
        if progress:
            progress(done, total, name)

    report = init_layers_(modules, list(targets.modules), config, layer_done)
    for done, t in enumerate(targets.experts.values(), len(targets.modules) + 1):
        report[t.adapter_module] = init_experts_(modules[t.adapter_module], t, config, ADAPTER_NAME)
        if progress:
            progress(done, total, t.key)
    if dora:
        refresh_dora_magnitude_(peft_model)
    return peft_model, report


@torch.no_grad()
def refresh_dora_magnitude_(peft_model) -> None:
    """Set (in place) each DoRA magnitude vector to the column norms of base + scale * B @ A."""
    for module in peft_model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes is None or ADAPTER_NAME not in magnitudes:
            continue
        magnitudes[ADAPTER_NAME].update_layer(
            base_layer=module.get_base_layer(), lora_A=module.lora_A[ADAPTER_NAME].weight,
            lora_B=module.lora_B[ADAPTER_NAME].weight, scaling=module.scaling[ADAPTER_NAME])


@torch.no_grad()
def init_layer_(layer, name: str, config: PissaConfig) -> dict:
    """Decompose one PEFT LoRA layer's base weight in place; returns its info."""
    factors, seconds = timed_factors(layer, name, config)
    return set_layer_(layer, factors, seconds)


@torch.no_grad()
def init_layers_(modules: dict, names: list[str], config: PissaConfig, progress: Callable[[int, str], None]) -> dict:
    """`init_layer_` (in place) of each named PEFT LoRA layer, several at once on the CPU (`init.concurrent`), each
    set and reported in order; returns name -> info."""
    report = {}

    def take(name: str, result) -> None:
        report[name] = set_layer_(modules[name], *result)
        progress(len(report), name)

    on_cpu = all(modules[n].get_base_layer().weight.device.type == "cpu" for n in names)
    with OrderedWork(torch.get_num_threads() if on_cpu else 1, take) as work:
        for name in names:
            work.take_result(name, work.submit(lambda n=name: [timed_factors(modules[n], n, config)]), 0)
        work.close()
    return report


def timed_factors(layer, name: str, config: PissaConfig):
    """(Factors of the layer's base weight, seconds taken): the decomposition alone, no layer changed."""
    start = time.perf_counter()
    W = kind_of(layer.get_base_layer()).to_matrix(layer.get_base_layer().weight)  # (out, in)
    factors = decompose_weight(W, name, config, layer.r[ADAPTER_NAME], layer.scaling[ADAPTER_NAME])
    return factors, time.perf_counter() - start


def set_layer_(layer, factors, seconds: float) -> dict:
    """Put the factors into the PEFT layer and the residual into its base (in place); returns the layer's info."""
    base = layer.get_base_layer()
    set_factors_(layer, factors.A, factors.B)  # A (r, in), B (out, r)
    base.weight.data = kind_of(base).from_matrix(factors.residual, base.weight.shape)
    return {**factors.info, "seconds": seconds}


def residual_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict with the residual weights under their original names."""
    state = peft_model.get_base_model().state_dict()
    # ranknum: AdaLoRA's (not saved) rank buffer; modules_to_save: the trained copy of a head (the adapter's)
    adapter_parts = (".lora_", ".ranknum.", ".modules_to_save.")
    # A module with several targeted expert tensors nests one `.base_layer` per PEFT ParamWrapper; a module
    # to save keeps its untouched original as `.original_module`.
    return {re.sub(r"(\.base_layer|\.original_module)+\.", ".", k): v for k, v in state.items()
            if not any(p in k for p in adapter_parts)}
