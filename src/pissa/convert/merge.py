"""Merge a LoRA adapter into its base model and write a standalone model folder, tensor by tensor.

Two pairings are valid, and both are `W + scale·B@A` on the adapter's target weights:
- the original model + a converted adapter (`pissa convert`);
- the residual model (`INIT/residual`, or just `INIT`) + the trained PiSSA adapter.
A DoRA adapter's rows are then rescaled to its magnitudes, `m / ‖W + ΔW‖_row · (W + ΔW)`, as PEFT merges
them; modules_to_save copies and trained biases replace the base's tensors.

The base is read with the same lazy reader and written with the same shard writer as a streaming
init (`pissa.io`), so one tensor is in memory at a time; every tensor keeps its stored dtype (the
update is added in fp32 and rounded once). Config, tokenizer and other small files are copied; a
sharded model keeps its index. The output appears only when complete.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PissaError
from ..io.adapter_files import base_changing_init
from ..io.atomic import atomic_output_dir, check_output_dir, dir_size
from ..io.reader import CheckpointReader, is_safetensors_folder, read_tensor
from ..io.writer import ShardWriter, copy_side_files, layout, write_index
from ..layout import (
    ADAPTER_KEY_PREFIX,
    BASE_LAYER,
    CONVERSION_FILE,
    MAGNITUDE_KEY,
    MODEL_CONFIG_FILE,
    WEIGHT_SUFFIXES,
    InitDir,
    LayerKind,
    RunDir,
    is_init_dir,
    is_run_dir,
    kind_from_factors,
    owner_of_residual,
)
from .experts import expert_updates
from .factors import Update
from .inputs import layer_scale, read_lora_adapter


@dataclass
class MergeResult:
    out: Path
    base: Path
    mode: str  # "residual + PiSSA adapter" or "base + LoRA adapter"
    layers: int  # weights updated by B @ A (LoRA, DoRA)
    shards: int
    seconds: float
    replaced: int = 0  # base tensors replaced by the adapter's full copies (modules_to_save, trained biases)

    def size(self) -> int:
        return dir_size(self.out)


# --- where the weights are ----------------------------------------------------------------------

def resolve_base(base: str | Path) -> Path:
    """The local model folder to merge into: an init folder means its residual model."""
    from ..models import resolve_model

    folder = Path(str(base)).expanduser()
    if is_init_dir(folder):
        residual = InitDir(folder).residual
        if not residual.is_dir() and RunDir(folder.parent).residual.is_dir():
            raise PissaError(f"--base {base} holds only the run's initial adapter, not a model; the residual this "
                             f"run trained on is {RunDir(folder.parent).residual}: pass --base {folder.parent}")
        return residual
    if is_run_dir(folder) and RunDir(folder).residual.is_dir():
        return RunDir(folder).residual  # a `pissa train --model` PiSSA run: the residual it trained on
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
    return checkpoint_key(f"{module}.weight", reader, f"adapter layer {module}")


def checkpoint_key(key: str, reader: CheckpointReader, what: str) -> str:
    """`key` as the checkpoint names it (exactly, or under one head prefix such as `model.` or `bert.`)."""
    if key in reader.weight_map:
        return key
    matches = [k for k in reader.weight_map if k.endswith(f".{key}")]
    if len(matches) == 1:
        return matches[0]
    renamed = renamed_keys(reader.folder, tuple(reader.weight_map)).get(key)
    if renamed is not None:
        return renamed
    raise PissaError(f"the base model has no weight for {what} ({key}); the adapter was "
                     "trained on a different model, give the matching --base")


def check_fits(module: str, A: torch.Tensor, B: torch.Tensor, kind: LayerKind, reader: CheckpointReader) -> str:
    """The checkpoint key of the weight a layer's B @ A updates, refusing a weight of another shape."""
    key = weight_key(module, reader)
    stored = reader.entry(key).shape
    # the stored shape B (out, r) @ A (r, in[, kh, kw]) updates: (in, out) for transposed kinds
    want = (A.shape[1], B.shape[0]) if kind.transposed else (B.shape[0], *A.shape[1:])
    if stored != want:
        raise PissaError(f"adapter layer {module} needs a weight of shape {want} but {key} in {reader.folder} "
                         f"is {stored}; the adapter was trained on a different model")
    return key


def replaced_key(name: str, tensor: torch.Tensor, reader: CheckpointReader) -> str:
    """The base tensor a full tensor of the adapter replaces (a modules_to_save copy, a trained bias)."""
    key = checkpoint_key(name.removeprefix(ADAPTER_KEY_PREFIX).replace(BASE_LAYER, "."), reader,
                         f"the adapter's full tensor {name} (modules_to_save or bias)")
    stored = reader.entry(key).shape
    if stored != tuple(tensor.shape):
        raise PissaError(f"the adapter's {name} is {tuple(tensor.shape)} but {key} in {reader.folder} is {stored}; "
                         "the adapter was trained on a different model")
    return key


@functools.cache
def renamed_keys(folder: Path, keys: tuple[str, ...]) -> dict[str, str]:
    """Live parameter name -> checkpoint name, for a model that transformers renames on load (ViT's
    `encoder.layer.N.attention.attention.query` is the live `layers.N.attention.q_proj`); read on the meta model."""
    from ..init.expert_disk import conversions, live_name
    from ..models import meta_model

    model = meta_model(folder)
    renamings, _, meta_state = conversions(model)
    if not renamings:
        return {}
    return {live_name(k, model, renamings, [], meta_state)[0]: k for k in keys}


# --- checking the pairing -----------------------------------------------------------------------

def check_pairing(adapter: Path, config: dict, base: Path) -> str:
    """Refuse the two silent mistakes (trained PiSSA adapter on the original, converted on the residual)."""
    if owner_of_residual(base) is not None:
        if (adapter / CONVERSION_FILE).exists():
            raise PissaError(f"{adapter} is a converted LoRA adapter for the original model, but --base {base} is a "
                             "PiSSA residual; pass the original model as --base")
        return "residual + PiSSA adapter"
    trained_on = str(config.get("base_model_name_or_path") or "")
    if base_changing_init(config) is not None:
        raise PissaError(f"{adapter} says init_lora_weights={config['init_lora_weights']!r}: PEFT trained it on a "
                         f"base it changed in memory, not on --base {base}. Convert it first with `pissa convert "
                         f"{adapter} --init INITIAL_ADAPTER`, then merge the converted adapter")
    owner = owner_of_residual(trained_on)
    if owner is not None:
        init = owner if is_init_dir(owner) else RunDir(owner).init.root  # a run keeps its initial adapter in init/
        raise PissaError(
            f"{adapter} was trained on the PiSSA residual {trained_on}, but --base {base} is not a residual. "
            f"Pass --base {owner} (residual + adapter), or first run `pissa convert {adapter} "
            f"--init {init}` to merge into the original model"
        )
    return "base + LoRA adapter"


def plan_merge(adapter: Path, reader: CheckpointReader) -> tuple[dict[str, Update | torch.Tensor], str]:
    """(weight key -> Update, or the full tensor that replaces it; mode), checked against the base's shard
    headers before anything is written."""
    config, pairs, others, embeddings = read_lora_adapter(adapter, "adapter")
    mode = check_pairing(adapter, config, reader.folder)
    magnitudes = {k.removeprefix(ADAPTER_KEY_PREFIX).removesuffix(MAGNITUDE_KEY): v for k, v in others.items()
                  if k.endswith(MAGNITUDE_KEY)}
    plan = expert_updates(adapter, config, pairs, reader)  # fused MoE expert tensors (taken out of `pairs`)
    for module, (A, B) in pairs.items():
        kind = kind_from_factors(A, module in embeddings, bool(config.get("fan_in_fan_out")))
        key = check_fits(module, A, B, kind, reader)
        plan[key] = Update(A, B, layer_scale(config, module), kind, magnitudes.get(module))
    for name, tensor in others.items():
        if not name.endswith(MAGNITUDE_KEY):
            plan[replaced_key(name, tensor, reader)] = tensor
    return plan, mode


# --- writing ------------------------------------------------------------------------------------

def merged(W: torch.Tensor, update: Update) -> torch.Tensor:
    """W + scale·B@A in W's stored layout, added in fp32 and rounded once to W's dtype; with DoRA, each row
    of the (out, in) matrix rescaled to its magnitude (PEFT's DoRA merge, computed in fp32)."""
    if hasattr(update, "merge_into"):  # a whole fused expert tensor (convert.experts.FusedUpdate)
        return update.merge_into(W)
    delta = update.scale * (update.B.flatten(1).float() @ update.A.flatten(1).float())  # (out, in)
    matrix = update.kind.to_matrix(W.float()) + delta  # (out, in)
    if update.magnitude is not None:
        matrix = matrix * (update.magnitude.float() / matrix.norm(dim=1))[:, None]  # (out, in)
    return update.kind.from_matrix(matrix, W.shape).to(W.dtype)


def check_finite(W: torch.Tensor, name: str, folder: Path) -> None:
    if W.is_floating_point() and not bool(torch.isfinite(W).all()):
        raise PissaError(f"{name} in {folder} contains NaN/Inf values; a merged model would carry them. Fix or "
                         "re-export the base model")


def write_shards(reader: CheckpointReader, out: Path, plan: dict[str, Update | torch.Tensor],
                 progress: Callable[[int, int, str], None] | None) -> None:
    """Stream every shard through tensor by tensor, merging the planned weights."""
    done = 0
    for shard in reader.shards:
        header, entries = reader.headers[shard], reader.entries(shard)
        specs = [(e.name, e.dtype, e.shape) for e in entries]  # merged weights keep their dtype and shape
        with open(reader.folder / shard, "rb") as f, ShardWriter(out / shard, layout(specs), header.metadata) as w:
            for entry in entries:
                W = read_tensor(f, header, entry)
                check_finite(W, entry.name, reader.folder)
                if entry.name in plan:
                    new = plan[entry.name]
                    W = new.to(W.dtype) if isinstance(new, torch.Tensor) else merged(W, new)  # a full tensor replaces W
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
    out = check_output_dir(out, overwrite, inputs=[adapter, base])
    base_dir = resolve_base(base)
    check_output_dir(out, overwrite, inputs=[base_dir])  # a hub id's downloaded folder, an init's residual
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
    layers = sum(isinstance(v, Update) for v in plan.values())
    return MergeResult(out=out, base=base_dir, mode=mode, layers=layers, shards=len(reader.shards),
                       seconds=time.perf_counter() - start, replaced=len(plan) - layers)
