"""Merge a LoRA adapter into its base model and write a standalone model folder, tensor by tensor.

Two pairings are valid, and both are `W + scale·B@A` on the adapter's target weights:
- the original model + a converted adapter (`pissa convert`);
- the residual model (`INIT/residual`, or just `INIT`) + the trained PiSSA adapter.

The base is read with the same lazy reader and written with the same shard writer as a streaming
init (`pissa.io`), so one tensor is in memory at a time; every tensor keeps its stored dtype (the
update is added in fp32 and rounded once). Config, tokenizer and other small files are copied; a
sharded model keeps its index. The output appears only when complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PissaError
from ..io.atomic import atomic_output_dir, check_output_dir, dir_size
from ..io.reader import CheckpointReader, is_safetensors_folder, read_tensor
from ..io.writer import ShardWriter, copy_side_files, layout, write_index
from ..layout import (
    CONVERSION_FILE,
    MODEL_CONFIG_FILE,
    WEIGHT_SUFFIXES,
    InitDir,
    LayerKind,
    init_of_residual,
    is_init_dir,
    kind_from_factors,
)
from .experts import expert_updates
from .inputs import layer_scale, read_lora_adapter


@dataclass
class MergeResult:
    out: Path
    base: Path
    mode: str  # "residual + PiSSA adapter" or "base + LoRA adapter"
    layers: int
    shards: int
    seconds: float

    def size(self) -> int:
        return dir_size(self.out)


@dataclass(frozen=True)
class Update:
    """What to add to one stored weight: scale · B @ A in the weight's layout."""

    A: torch.Tensor  # (r, in) or conv (r, in, kh, kw)
    B: torch.Tensor  # (out, r) or conv (out, r, 1, 1)
    scale: float
    kind: LayerKind


# --- where the weights are ----------------------------------------------------------------------

def resolve_base(base: str | Path) -> Path:
    """The local model folder to merge into: an init folder means its residual model."""
    from ..models import resolve_model

    folder = Path(str(base)).expanduser()
    if is_init_dir(folder):
        return InitDir(folder).residual
    resolved = Path(resolve_model(str(base)))
    if resolved.is_dir():
        return resolved
    try:  # a hub id: fetch only what a merged folder needs
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # noqa: BLE001 (hub errors come in many classes)
        raise PissaError(f"could not fetch base model {base!r} ({e.__class__.__name__}); download it and pass "
                         "the local folder as --base") from e


def open_base(folder: Path) -> CheckpointReader:
    """The base's safetensors checkpoint, refusing pickled weights with the fix."""
    if not is_safetensors_folder(folder):
        other = sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
        hint = f" (found {', '.join(other)}: re-save it with save_pretrained, which writes safetensors)" \
            if other else ""
        raise PissaError(f"{folder} has no safetensors weights; merge reads safetensors only{hint}")
    return CheckpointReader(folder)


def weight_key(module: str, reader: CheckpointReader) -> str:
    """The checkpoint name of a module's weight; tolerates a head prefix such as `model.` or `bert.`."""
    key = f"{module}.weight"
    if key in reader.weight_map:
        return key
    matches = [k for k in reader.weight_map if k.endswith(f".{key}")]
    if len(matches) == 1:
        return matches[0]
    raise PissaError(f"the base model has no weight for adapter layer {module} ({key}); the adapter was "
                     "trained on a different model, give the matching --base")


# --- checking the pairing -----------------------------------------------------------------------

def check_pairing(adapter: Path, config: dict, base: Path) -> str:
    """Refuse the two silent mistakes (trained PiSSA adapter on the original, converted on the residual)."""
    if init_of_residual(base) is not None:
        if (adapter / CONVERSION_FILE).exists():
            raise PissaError(f"{adapter} is a converted LoRA adapter for the original model, but --base {base} is a "
                             "PiSSA residual; pass the original model as --base")
        return "residual + PiSSA adapter"
    trained_on = str(config.get("base_model_name_or_path") or "")
    init = init_of_residual(trained_on)
    if init is not None:
        raise PissaError(
            f"{adapter} was trained on the PiSSA residual {trained_on}, but --base {base} is not a residual. "
            f"Pass --base {init} (residual + adapter), or first run `pissa convert {adapter} "
            f"--init {init}` to merge into the original model"
        )
    return "base + LoRA adapter"


def plan_merge(adapter: Path, reader: CheckpointReader) -> tuple[dict[str, Update], str]:
    """(weight key -> Update, mode), checked against the base's shard headers before anything is written."""
    config, pairs, others, embeddings = read_lora_adapter(adapter, "adapter")
    if others:
        raise PissaError(f"{adapter} holds full weights ({next(iter(others))}, from modules_to_save); merge "
                         "supports LoRA layers only")
    mode = check_pairing(adapter, config, reader.folder)
    plan = expert_updates(adapter, config, pairs, reader)  # fused MoE expert tensors (taken out of `pairs`)
    for module, (A, B) in pairs.items():
        key = weight_key(module, reader)
        kind = kind_from_factors(A, module in embeddings, bool(config.get("fan_in_fan_out")))
        stored = reader.entry(key).shape
        # the stored shape B (out, r) @ A (r, in[, kh, kw]) updates: (in, out) for transposed kinds
        want = (A.shape[1], B.shape[0]) if kind.transposed else (B.shape[0], *A.shape[1:])
        if stored != want:
            raise PissaError(f"adapter layer {module} needs a weight of shape {want} but {key} in {reader.folder} "
                             f"is {stored}; the adapter was trained on a different model")
        plan[key] = Update(A, B, layer_scale(config, module), kind)
    return plan, mode


# --- writing ------------------------------------------------------------------------------------

def merged(W: torch.Tensor, update: Update) -> torch.Tensor:
    """W + scale·B@A in W's stored layout, added in fp32 and rounded once to W's dtype."""
    if hasattr(update, "merge_into"):  # a whole fused expert tensor (convert.experts.FusedUpdate)
        return update.merge_into(W)
    delta = update.scale * (update.B.flatten(1).float() @ update.A.flatten(1).float())  # (out, in)
    matrix = update.kind.to_matrix(W.float()) + delta  # (out, in)
    return update.kind.from_matrix(matrix, W.shape).to(W.dtype)


def write_shards(reader: CheckpointReader, out: Path, plan: dict[str, Update],
                 progress: Callable[[int, int, str], None] | None) -> None:
    """Stream every shard through tensor by tensor, merging the planned weights."""
    done = 0
    for shard in reader.shards:
        header, entries = reader.headers[shard], reader.entries(shard)
        specs = [(e.name, e.dtype, e.shape) for e in entries]  # merged weights keep their dtype and shape
        with open(reader.folder / shard, "rb") as f, ShardWriter(out / shard, layout(specs), header.metadata) as w:
            for entry in entries:
                W = read_tensor(f, header, entry)
                if entry.name in plan:
                    W = merged(W, plan[entry.name])
                    done += 1
                    if progress:
                        progress(done, len(plan), entry.name)
                w.write(entry.name, W)


def merge_adapter(
    adapter: str | Path,
    base: str | Path,
    out: str | Path,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> MergeResult:
    """Write `base` with `adapter` merged into it as a standalone model folder at `out`.

    `base` is a model folder, hub id or embedded name; a `pissa init` folder means its residual.
    """
    start = time.perf_counter()
    adapter = Path(adapter)
    out = check_output_dir(out, overwrite)
    base_dir = resolve_base(base)
    if not (base_dir / MODEL_CONFIG_FILE).exists():
        raise PissaError(f"{base_dir} has no {MODEL_CONFIG_FILE}; --base must be a model folder or a `pissa init` "
                         "folder")
    reader = open_base(base_dir)
    plan, mode = plan_merge(adapter, reader)
    with atomic_output_dir(out, overwrite) as tmp:
        copy_side_files(base_dir, tmp)
        write_shards(reader, tmp, plan, progress)
        if reader.sharded:
            total = sum(reader.headers[s].data_bytes for s in reader.shards)
            write_index(tmp, reader.weight_map, total)
    return MergeResult(out=out, base=base_dir, mode=mode, layers=len(plan), shards=len(reader.shards),
                       seconds=time.perf_counter() - start)
