"""Which checkpoint tensors to decompose, decided without loading any weights.

The model is instantiated on the `meta` device from its config, so PEFT's own matcher
(`init.targets.resolve_targets`) picks the modules, exactly as it would on the loaded model; tied
embeddings and GPT-2 Conv1D layers are detected from the module graph. Each targeted module is
then mapped to its tensor in the checkpoint, and shapes, dtypes and ranks are checked against the
shard headers, so a bad target is refused before any output is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..decompose import lora_scale
from ..dtypes import parse_dtype
from ..errors import PissaError
from ..io.reader import DTYPES, CheckpointReader, TensorEntry
from ..layout import LINEAR, ExpertLayout, LayerKind, kind_of
from ..models import check_not_quantized, meta_model
from .config import PissaConfig
from .coverage import coverage
from .expert_disk import ExpertSlot, expert_slots
from .experts import ExpertTarget
from .targets import check_tied, embeddings_saved, resolve_targets

FLOAT_CODES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class Target:
    """One weight to decompose: where PEFT puts its adapter, how it scales it, and how it is stored."""

    module: str  # the module name PEFT uses in adapter keys
    rank: int
    scale: float
    kind: LayerKind | ExpertLayout  # how the stored tensor maps to the (out, in) matrix and back
    save_base: bool = False  # PEFT also saves a targeted embedding's base weight in the adapter
    expert: ExpertTarget | None = None  # set when the tensor holds (part of) a fused expert tensor
    slot: ExpertSlot | None = None  # which expert and part it holds (module: that matrix's name, its seed)


@dataclass
class Plan:
    reader: CheckpointReader
    targets: dict[str, Target]  # checkpoint tensor name -> target, in model module order
    lora: object  # peft.LoraConfig equal to the one the in-memory path builds
    model_class: type
    experts: dict[str, ExpertTarget] = field(default_factory=dict)  # live fused tensor -> target
    coverage: dict = field(default_factory=dict)  # init.coverage: the share of matrix weights adapted
    casts: dict[str, torch.dtype] = field(default_factory=dict)  # --dtype: tensor name -> dtype it is cast to


def tensor_key(module: str, reader: CheckpointReader, prefix: str) -> str | None:
    """The checkpoint name of `module`'s weight, allowing the base-model prefix to differ."""
    candidates = [f"{module}.weight"]
    if prefix:
        candidates += [f"{prefix}.{module}.weight", f"{module.removeprefix(prefix + '.')}.weight"]
    return next((k for k in candidates if k in reader.weight_map), None)


def check_entry(entry: TensorEntry, param_shape: tuple[int, ...], rank: int, target: Target) -> None:
    """Refuse a target whose stored tensor the decomposition cannot take, naming it."""
    if entry.dtype not in FLOAT_CODES:
        raise PissaError(
            f"{entry.name} is stored as {entry.dtype}, which PiSSA cannot decompose (quantized checkpoint?); "
            "give the unquantized fp32/bf16/fp16 checkpoint"
        )
    if entry.shape != param_shape:
        raise PissaError(
            f"{entry.name} has shape {entry.shape} in the checkpoint but the model config expects {param_shape}; "
            "the config.json does not match the weights"
        )
    out_dim, in_dim = target.kind.to_matrix(torch.empty(entry.shape, device="meta")).shape
    if rank > min(out_dim, in_dim):
        raise PissaError(
            f"{entry.name}: rank {rank} exceeds min(out, in) = {min(out_dim, in_dim)}; "
            "lower --rank or override it for this layer with --rank-pattern"
        )


def cast_plan(reader: CheckpointReader, model, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Tensor name -> the dtype `from_pretrained(dtype=dtype)` loads it in, for the tensors that change: every
    float tensor goes to `dtype`, except those transformers keeps in fp32 at that dtype (the model's
    `_keep_in_fp32_modules`, matched as transformers matches them: a regex search in the name)."""
    keep = list(getattr(model, "_get_dtype_plan", lambda d: {})(dtype))
    kept = re.compile("|".join(k.replace("*", ".*") for k in keep)) if keep else None
    casts = {}
    for shard in reader.shards:
        for entry in reader.entries(shard):
            stored = DTYPES[entry.dtype]
            wanted = torch.float32 if kept is not None and kept.search(entry.name) else dtype
            if stored.is_floating_point and stored != wanted:
                casts[entry.name] = wanted
    return casts


def make_plan(folder: str | Path, config: PissaConfig, trust_remote_code: bool = False, dtype: str = "auto") -> Plan:
    """Validate the checkpoint and resolve every target to a tensor, rank and scale; `dtype` (not auto): the
    dtype every float tensor is cast to as it streams, as `from_pretrained(dtype=...)` would load it."""
    folder = Path(folder)
    reader = CheckpointReader(folder)
    model = meta_model(folder, trust_remote_code)
    check_not_quantized(model)
    resolved = resolve_targets(model, config)
    ranks, lora = resolved.modules, resolved.lora
    check_tied(model, ranks)
    modules = dict(model.named_modules())
    save_base = embeddings_saved(model, lora, ranks)
    targets = {}
    for name, rank in ranks.items():
        key = tensor_key(name, reader, getattr(model, "base_model_prefix", ""))
        if key is None:
            raise PissaError(
                f"layer {name} has no weight tensor {name}.weight in {folder}; the checkpoint's tensor names do "
                "not match its config (converted with other names?); re-export it with save_pretrained or pass "
                "--in-memory"
            )
        module = modules[name]
        scale = lora_scale(config.alpha_for(rank), rank, config.use_rslora)
        target = Target(name, rank, scale, kind_of(module), name in save_base)
        check_entry(reader.entry(key), tuple(module.weight.shape), rank, target)
        targets[key] = target
    targets.update(expert_plan(model, reader, resolved.experts))
    casts = {} if dtype == "auto" else cast_plan(reader, model, parse_dtype(dtype))
    fused = [k for k, t in targets.items() if t.slot is not None and t.slot.expert is None]
    if casts and fused:
        raise PissaError(f"--dtype {dtype}: {fused[0]} stores all its experts in one tensor, which the streaming "
                         "init decomposes one expert at a time in its stored dtype; omit --dtype, or pass --in-memory")
    return Plan(reader, targets, lora, type(model), resolved.experts, coverage(model, resolved), casts)


def expert_plan(model, reader: CheckpointReader, experts: dict[str, ExpertTarget]) -> dict[str, Target]:
    """Checkpoint tensor -> target for every tensor holding a targeted expert matrix (one per expert and
    part, named after it), or a whole fused tensor when the checkpoint stores it fused."""
    if not experts:
        return {}
    shapes = {k: reader.entry(k).shape for k in reader.weight_map}
    slots = expert_slots(model, shapes, {k: t.tensor for k, t in experts.items()})
    targets = {}
    for key, slot in slots.items():
        t = experts[slot.key]
        entry = reader.entry(key)
        if entry.dtype not in FLOAT_CODES:
            raise PissaError(f"{key} is stored as {entry.dtype}, which PiSSA cannot decompose (quantized "
                             "checkpoint?); give the unquantized fp32/bf16/fp16 checkpoint")
        if slot.expert is None:
            targets[key] = Target(t.key, t.rank, t.scale, t.layout, expert=t, slot=slot)
        else:
            targets[key] = Target(t.matrix_name(slot.expert, slot.part), t.rank, t.scale, LINEAR, expert=t,
                                  slot=slot)
    return targets
