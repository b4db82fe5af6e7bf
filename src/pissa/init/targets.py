"""Which layers get adapters: PEFT's own target matcher on a live or meta model, and the checks that
refuse a target PiSSA cannot decompose before any work is done."""

from __future__ import annotations

import re

from torch import nn

from ..decompose import check_weight
from ..errors import PissaError
from ..layout import CONV1D, LINEAR, kind_of
from ..models import is_causal_lm_model
from .config import PissaConfig


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter else None


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D in the model except the output head, by full name."""
    head = output_head(model)
    return {n: m for n, m in model.named_modules() if kind_of(m) in (LINEAR, CONV1D) and m is not head}


def default_targets(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the head, as PEFT's `target_modules` list."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_modules(model)})


def lora_config(config: PissaConfig, model: nn.Module, matched: list[str]):
    """The PEFT LoraConfig for `config`; `matched` are the module names it targets."""
    from peft import LoraConfig

    modules = dict(model.named_modules())
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha_for(config.rank),
        target_modules=config.targets if config.targets is not None else default_targets(model),
        rank_pattern=dict(config.rank_pattern),
        # alpha = r per layer keeps scale 1 where the rank is overridden, as the paper does.
        alpha_pattern={k: float(r) for k, r in config.rank_pattern.items()} if config.alpha is None else {},
        lora_dropout=config.dropout,
        use_rslora=config.use_rslora,
        fan_in_fan_out=any(kind_of(modules[n]) is CONV1D for n in matched),
        init_lora_weights=True,
        # plain nn.Modules (a small CNN) have no HF config and get no task type
        task_type="CAUSAL_LM" if is_causal_lm_model(model) else None,
    )


def resolve_targets(model: nn.Module, config: PissaConfig) -> dict[str, int]:
    """Full module name -> rank for every module PEFT will wrap, refusing bad targets up front."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    targets = config.targets if config.targets is not None else default_targets(model)
    probe = LoraConfig(r=config.rank, target_modules=targets)
    modules = dict(model.named_modules())
    matched = [n for n in modules if n and check_target_module_exists(probe, n)]
    if not matched:
        raise PissaError(
            f"no module matches targets {targets!r}; linear layers in this model are named: "
            f"{', '.join(default_targets(model))}"
        )
    unsupported = [n for n in matched if not is_supported(modules[n])]
    if unsupported:
        kinds = sorted({type(modules[n]).__name__ for n in unsupported})
        raise PissaError(
            f"targets match {len(unsupported)} modules that are not linear layers, Conv2d or Embedding "
            f"({', '.join(kinds)}), e.g. {unsupported[0]}; narrow --targets to supported layers"
        )
    for n in matched:
        check_module(model, n, modules[n])
    # PEFT's own pattern lookup, so our ranks are the ones PEFT gives each layer.
    keys = {n: get_pattern_key(list(config.rank_pattern), n) for n in matched}
    unused = sorted(set(config.rank_pattern) - set(keys.values()))
    if unused:
        raise PissaError(f"--rank-pattern {unused[0]} matches none of the targeted layers (names end like "
                         f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in matched})[:6])}); fix or drop it")
    return {n: config.rank_pattern.get(keys[n], config.rank) for n in matched}


def is_supported(module: nn.Module) -> bool:
    return kind_of(module) is not None


def check_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Refuse Conv2d and Embedding variants whose PEFT LoRA layer could not reproduce the output."""
    if isinstance(module, nn.Conv2d):
        # PEFT's lora_A conv copies kernel, stride and padding only, and B's 1x1 conv is grouped.
        bad = {"groups": (module.groups, 1), "dilation": (module.dilation, (1, 1)),
               "padding_mode": (module.padding_mode, "zeros")}
        for key, (value, ok) in bad.items():
            if value != ok:
                raise PissaError(
                    f"{name}: Conv2d with {key}={value!r} is not supported by PiSSA init (only {key}={ok!r}: "
                    "the kernel is decomposed as one (out, in*kh*kw) matrix); leave this layer out of --targets"
                )
    head = output_head(model)
    if isinstance(module, nn.Embedding) and head is not None and head.weight is module.weight:
        raise PissaError(
            f"{name}: this embedding is tied to the output head (tie_word_embeddings), so replacing it by "
            "its residual would change the head too; leave it out of --targets or untie the weights first"
        )


def check_targets(model: nn.Module, ranks: dict[str, int]) -> None:
    """Refuse ranks beyond a layer's size and non-finite weights before touching the model."""
    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        module = modules[name]
        check_weight(kind_of(module).to_matrix(module.weight).detach(), rank, f"{name}.weight")


def embeddings_saved(model, lora, ranks: dict[str, int]) -> set[str]:
    """Targeted input/output embeddings whose base weight PEFT's save_pretrained puts in the adapter
    (peft.utils.save_and_load: save_embedding_layers="auto" turns on when an embedding is targeted)."""
    from peft.utils.other import EMBEDDING_LAYER_NAMES, match_target_against_key

    targets = lora.target_modules
    if isinstance(targets, str):
        targeted = any(match_target_against_key(targets, n) for n, _ in model.named_modules()
                       if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES))
    else:
        targeted = any(e in (targets or ()) for e in EMBEDDING_LAYER_NAMES)
    if not targeted:
        return set()
    layers = {id(m) for m in (model.get_input_embeddings(), output_head(model)) if m is not None}
    return {n for n, m in model.named_modules() if id(m) in layers and n in ranks}


def check_tied(model, ranks: dict[str, int]) -> None:
    head = output_head(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or head.weight is not embed.weight:
        return
    modules = dict(model.named_modules())
    tied = [n for n in ranks if modules[n] is head]
    if tied:
        raise PissaError(
            f"target {tied[0]} is the output head, whose weight is tied to the input embeddings; "
            "decomposing it would change the embeddings too. Leave it out of --targets"
        )
