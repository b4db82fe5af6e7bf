"""Where a fused expert tensor's matrices are in a safetensors checkpoint, decided without reading any data.

transformers 5 loads most MoE checkpoints from one tensor per expert: Qwen-style
`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`, Mixtral `...block_sparse_moe.experts.E.{w1,w3,w2}.weight`,
each an nn.Linear (out, in) matrix, merged into the live `mlp.experts.gate_up_proj` (E, 2I, H) by its weight
conversion mapping (`MergeModulelist` over experts, then `Concatenate` of gate and up). A few (gpt-oss, or a model
saved with `save_original_format=False`) store the fused tensor itself. The mapping is transformers' own
(`get_model_conversion_mapping` + `rename_source_key`), read on the meta model, so every checkpoint name is
resolved to (fused tensor, expert, part) exactly as `from_pretrained` would load it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import PissaError
from .experts import ExpertTensor

SUPPORTED_OPS = (["MergeModulelist"], ["MergeModulelist", "Concatenate"])  # experts stacked on dim 0, parts on 1


@dataclass(frozen=True)
class ExpertSlot:
    """What one checkpoint tensor holds of a fused expert tensor."""

    key: str  # the live fused parameter
    expert: int | None  # None: the checkpoint tensor is the whole fused tensor (all experts, all parts)
    part: int | None


def conversions(model):
    """(renamings, converters, meta state dict) transformers applies when it loads `model`'s checkpoint."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers 4: no conversions, checkpoint names are the live names
        return [], [], model.state_dict()
    mapping = get_model_conversion_mapping(model, add_legacy=False)
    renamings = [c for c in mapping if isinstance(c, WeightRenaming)]
    converters = [c for c in mapping if isinstance(c, WeightConverter)]
    return renamings, converters, model.state_dict()


def live_name(key: str, model, renamings, converters, meta_state) -> tuple[str, str | None]:
    """(live parameter, matched converter source pattern or None) of a checkpoint tensor name."""
    if not renamings and not converters:
        return key, None
    from transformers.core_model_loading import rename_source_key

    return rename_source_key(key, renamings, converters, getattr(model, "base_model_prefix", None), meta_state)


def expert_index(key: str, pattern: str, renamings) -> int | None:
    """The expert number the `*` of a converter's source pattern stands for in `key`."""
    from transformers.core_model_loading import apply_renamings

    regex = re.escape(pattern).replace(r"\*\.", r"(\d+)\.")
    found = re.search(regex, apply_renamings(key, renamings) if renamings else key)
    return int(found.group(1)) if found else None


def check_converter(converter, tensor: ExpertTensor, key: str) -> None:
    """Only the conversions pissa knows how to invert tensor by tensor: experts stacked, parts concatenated."""
    ops = converter.operations
    names = [type(op).__name__ for op in ops]
    dims = [getattr(op, "dim", None) for op in ops]
    parts = len(converter.source_patterns)
    ok = names in SUPPORTED_OPS and dims == [0, 1][: len(dims)] and parts == tensor.layout.n_parts and (
        parts == 1 or (not tensor.layout.interleaved and not tensor.layout.transposed))
    if not ok:
        raise PissaError(f"{key}: the checkpoint stores {tensor.key} through a conversion pissa cannot stream "
                         f"({', '.join(names)}); pass --in-memory")


def expert_slots(model, shapes: dict[str, tuple[int, ...]], tensors: dict[str, ExpertTensor]) -> dict[str, ExpertSlot]:
    """Checkpoint tensor name -> the slot it fills, for every targeted fused tensor in `tensors`; refuses a
    checkpoint that misses an expert's matrix or stores one in an unexpected shape. `shapes` maps every
    checkpoint tensor name to its shape."""
    renamings, converters, meta_state = conversions(model)
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    slots = {}
    for key, shape in shapes.items():
        live, pattern = live_name(key, model, renamings, converters, meta_state)
        tensor = tensors.get(live)
        if tensor is None:
            continue
        if pattern is None:  # stored fused, as the live parameter
            if tuple(shape) != tensor.shape:
                raise PissaError(f"{key} has shape {tuple(shape)} in the checkpoint but the model config expects "
                                 f"{tensor.shape}; the config.json does not match the weights")
            slots[key] = ExpertSlot(live, None, None)
            continue
        converter = by_pattern[pattern]
        check_converter(converter, tensor, key)
        expert, part = expert_index(key, pattern, renamings), converter.source_patterns.index(pattern)
        if expert is None or not 0 <= expert < tensor.num_experts or tuple(shape) != tensor.part_shape:
            raise PissaError(f"{key} (shape {tuple(shape)}) does not fit expert tensor {tensor.key} "
                             f"({tensor.num_experts} experts of {tensor.part_shape}); the config.json does not match "
                             "the weights, or pass --in-memory")
        slots[key] = ExpertSlot(live, expert, part)
    check_complete(slots, tensors)
    return slots


def check_complete(slots: dict[str, ExpertSlot], tensors: dict[str, ExpertTensor]) -> None:
    """Every expert and part of every targeted tensor is in the checkpoint exactly once."""
    seen: dict[str, set] = {k: set() for k in tensors}
    for name, slot in slots.items():
        cells = ({(e, p) for e in range(tensors[slot.key].num_experts) for p in range(tensors[slot.key].layout.n_parts)}
                 if slot.expert is None else {(slot.expert, slot.part)})
        if seen[slot.key] & cells:
            raise PissaError(f"{name} stores part of {slot.key} that another checkpoint tensor stores too; "
                             "re-export the checkpoint")
        seen[slot.key] |= cells
    for key, tensor in tensors.items():
        missing = tensor.num_experts * tensor.layout.n_parts - len(seen[key])
        if missing:
            raise PissaError(f"the checkpoint misses {missing} expert matrices of {key} (as transformers would "
                             "load it); give the complete checkpoint")
