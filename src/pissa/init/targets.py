"""Which layers get adapters: PEFT's own target matcher on a live or meta model, and the checks that
refuse a target PiSSA cannot decompose before any work is done. MoE models also get their fused expert
tensors (`init.experts`, resolved in `init.moe_targets`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from torch import nn

from ..decompose import check_weight
from ..errors import PissaError
from ..layout import CONV1D, LINEAR, kind_of
from ..models import is_causal_lm_model
from .config import PissaConfig
from .experts import (
    ExpertTarget,
    check_peft_keeps,
    default_expert_targets,
    expert_containers,
    expert_patterns,
    expert_targets,
    expert_tensors,
    peft_rewrites,
    router_modules,
)


@dataclass
class Targets:
    """What an init adapts, decided before any work: the layers and fused expert tensors, with their ranks, and
    the PEFT LoraConfig both init paths save."""

    modules: dict[str, int]  # module name -> rank (linear, Conv1D, Conv2d, Embedding)
    experts: dict[str, ExpertTarget]  # live parameter name -> fused expert tensor target
    lora: object  # peft.LoraConfig
    left_out: dict[str, str] = field(default_factory=dict)  # what the default targets leave out -> why


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter else None


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D in the model except the output head and MoE routers, by full name."""
    head = output_head(model)
    routers = router_modules(model)
    return {n: m for n, m in model.named_modules()
            if kind_of(m) in (LINEAR, CONV1D) and m is not head and n not in routers}


def default_targets(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the head and routers, as PEFT's `target_modules` list."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_modules(model)})


def targets_of(config: PissaConfig, model: nn.Module):
    """--targets, or the default: every linear layer but the output head and the modules to save (a classifier
    head, trained in full)."""
    if config.targets is not None:
        return config.targets
    if config.modules_to_save:
        from .heads import body_targets

        return body_targets(model, list(config.modules_to_save), conv=False)
    return default_targets(model)


def lora_config(config: PissaConfig, model: nn.Module, matched: list[str], **moe):
    """The PEFT LoraConfig for `config`; `matched` are the module names it targets. `moe` overrides the
    fields a MoE model sets (target_modules, target_parameters, rank_pattern, alpha_pattern)."""
    from peft import LoraConfig

    modules = dict(model.named_modules())
    fields = dict(
        r=config.rank,
        lora_alpha=config.alpha_for(config.rank),
        target_modules=targets_of(config, model),
        rank_pattern=dict(config.rank_pattern),
        # alpha = r per layer keeps scale 1 where the rank is overridden, as the paper does.
        alpha_pattern={k: float(r) for k, r in config.rank_pattern.items()} if config.alpha is None else {},
        lora_dropout=config.dropout,
        use_rslora=config.use_rslora,
        fan_in_fan_out=any(kind_of(modules[n]) is CONV1D for n in matched),
        init_lora_weights=True,
        modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
        task_type=peft_task_type(model),
    )
    return LoraConfig(**{**fields, **moe})


def peft_task_type(model: nn.Module) -> str | None:
    """PEFT's task type: CAUSAL_LM, SEQ_CLS for a sequence classifier (PEFT then also saves its head), else None
    (a bare encoder, an image classifier, a plain nn.Module with no HF config)."""
    if is_causal_lm_model(model):
        return "CAUSAL_LM"
    return "SEQ_CLS" if type(model).__name__.endswith("ForSequenceClassification") else None


def resolve_targets(model: nn.Module, config: PissaConfig) -> Targets:
    """Every module and fused expert tensor PEFT will adapt, with ranks, refusing bad targets up front."""
    tensors = expert_tensors(model)
    if tensors:
        return resolve_moe(model, config, tensors)
    targets = targets_of(config, model)
    ranks = match_modules(model, config, targets, set())
    if not ranks:
        raise PissaError(
            f"no module matches targets {targets!r}; linear layers in this model are named: "
            f"{', '.join(default_targets(model))}"
        )
    check_patterns_used(config, list(ranks))
    return Targets(ranks, {}, lora_config(config, model, list(ranks)))


def match_modules(model: nn.Module, config: PissaConfig, targets, skip: set[str]) -> dict[str, int]:
    """Full module name -> rank for the modules `targets` match (PEFT's matcher), refusing unsupported ones."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    probe = LoraConfig(r=config.rank, target_modules=targets)
    modules = dict(model.named_modules())
    matched = [n for n in modules if n and n not in skip and check_target_module_exists(probe, n)]
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
    return {n: config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), n), config.rank) for n in matched}


def check_patterns_used(config: PissaConfig, names: list[str]) -> None:
    """A --rank-pattern that matches no targeted layer or expert tensor would be silently ignored: refuse it."""
    from peft.utils.other import get_pattern_key

    used = {get_pattern_key(list(config.rank_pattern), n) for n in names}
    unused = sorted(set(config.rank_pattern) - used)
    if unused:
        raise PissaError(f"--rank-pattern {unused[0]} matches none of the targeted layers (names end like "
                         f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in names})[:6])}); fix or drop it")


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



def resolve_moe(model: nn.Module, config: PissaConfig, tensors: dict) -> Targets:
    """`resolve_targets` of a model with fused experts: dense layers as PEFT modules, expert tensors as PEFT
    `target_parameters` (`init.experts`). Routers are never default targets; default names PEFT would rewrite
    (huggingface/peft#3711) are left out and said so; a user's target PEFT would rewrite is refused."""
    boxes = expert_containers(model)
    left_out = {}
    if config.targets is None:
        names, params = default_targets(model), default_expert_targets(tensors)
        for name in peft_rewrites(lora_config(config, model, [], target_modules=names, target_parameters=params),
                                  model):
            names.remove(name)
            left_out[name] = "PEFT rewrites this name to the fused experts on this model family (peft#3711)"
        left_out.update({r: "router (never a default target)" for r in router_modules(model)})
    else:
        names, params = split_targets(model, config.targets, tensors, boxes)
    ranks = match_modules(model, config, names, boxes) if names else {}
    keys = [k for k in tensors if params and matches(params, k)]
    if not ranks and not keys:
        raise PissaError(f"no layer or expert tensor matches targets {config.targets!r}; linear layers are named "
                         f"{', '.join(default_targets(model))}, expert tensors "
                         f"{', '.join(default_expert_targets(tensors))}")
    if keys and config.quantize is not None:
        raise PissaError(
            f"--quantize {config.quantize}: bitsandbytes 4-bit does not quantize fused expert tensors (transformers "
            "loads them unquantized), so QPiSSA would quantize only the linear layers while the experts, most of "
            "the weights, stay in 16 bits. Drop --quantize, or leave the experts out of --targets (e.g. --targets "
            "q_proj k_proj v_proj o_proj) to fit the linear layers only")
    if config.quantize is not None:
        left_out.update({k: "expert tensor: bitsandbytes does not quantize it, it stays in 16 bits"
                         for k in tensors if k not in keys})
    if keys and config.dropout:
        raise PissaError(f"--dropout {config.dropout}: PEFT cannot apply LoRA dropout to fused expert tensors "
                         "(its ParamWrapper needs dropout 0); drop --dropout or leave the experts out of --targets")
    by_module = {}
    for k in keys:
        by_module.setdefault(tensors[k].module, []).append(tensors[k].param)  # registration order
    experts = expert_targets(config, [tensors[k] for k in keys], by_module)
    rank_pattern, alpha_pattern = expert_patterns(config, ranks, experts)
    lora = lora_config(config, model, list(ranks), target_modules=names, target_parameters=params or None,
                       rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    check_peft_keeps(lora, model, config.targets is not None)
    check_patterns_used(config, [*ranks, *(t.key for t in experts.values())])
    return Targets(ranks, experts, lora, left_out)


def matches(targets, key: str) -> bool:
    """PEFT's own matcher (suffix of a name list, or a full-match regex) on a module or parameter name."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(LoraConfig(target_modules=targets), key))


def split_targets(model: nn.Module, targets, tensors: dict, boxes: set[str]) -> tuple[list[str], list[str]]:
    """A user's --targets / --target-regex as (target_modules, target_parameters) lists: a name goes where it
    matches (modules, expert tensors or both). A regex becomes the full names it matches, because PEFT would
    also match it against the expert containers (and, on some families, rewrite it)."""
    names = [n for n in dict(model.named_modules()) if n and n not in boxes]
    if isinstance(targets, str):
        return [n for n in names if matches(targets, n)], [k for k in tensors if matches(targets, k)]
    modules, params = [], []
    for t in targets:
        hit_module, hit_param = any(matches([t], n) for n in names), any(matches([t], k) for k in tensors)
        if not (hit_module or hit_param) and any(matches([t], b) for b in boxes):
            raise PissaError(f"--targets {t} names the container of the fused expert tensors; name the tensors "
                             f"instead: {', '.join(default_expert_targets(tensors))}")
        if hit_module or not hit_param:
            modules.append(t)
        if hit_param:
            params.append(t)
    return modules, params
