"""Merge a LoRA adapter into its base model and write a standalone model folder, shard by shard.

Two pairings are valid, and both are `W + scale·B@A` on the adapter's target weights:
- the original model + a converted adapter (`pissa convert`);
- the residual model (`INIT/residual`, or just `INIT`) + the trained PiSSA adapter.

Only one shard is in memory at a time; every tensor keeps its stored dtype (the update is added
in fp32 and rounded once). Config, tokenizer and other small files are copied; a sharded model
gets its index rebuilt. The output appears only when complete.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint.atomic import atomic_output_dir, check_output_dir, dir_size
from .convert import CONVERSION_FILE, layer_scale, read_lora_adapter
from .errors import PissaError
from .manifest import MANIFEST

RESIDUAL_DIR = "residual"  # initialize.RESIDUAL_DIR
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


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


# --- where the weights are ----------------------------------------------------------------------

def is_residual(folder: Path) -> bool:
    """A `pissa init` residual: `INIT/residual` next to `INIT/pissa.json`."""
    return folder.name == RESIDUAL_DIR and (folder.parent / MANIFEST).exists()


def resolve_base(base: str | Path) -> Path:
    """The local model folder to merge into: an init folder means its residual model."""
    from .models import resolve_model

    folder = Path(str(base)).expanduser()
    if (folder / MANIFEST).exists():
        return folder / RESIDUAL_DIR
    resolved = Path(resolve_model(str(base)))
    if resolved.is_dir():
        return resolved
    try:  # a hub id: fetch only what a merged folder needs
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(base), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # noqa: BLE001 (hub errors come in many classes)
        raise PissaError(f"could not fetch base model {base!r} ({e.__class__.__name__}); download it and pass "
                         "the local folder as --base") from e


def weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> shard file name of a safetensors model folder."""
    from safetensors import safe_open

    index = folder / INDEX_FILE
    if index.exists():
        try:
            return json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise PissaError(f"{index} is not a valid safetensors index ({e}); re-save the model") from e
    if (folder / SINGLE_FILE).exists():
        with safe_open(folder / SINGLE_FILE, framework="pt") as f:
            return {key: SINGLE_FILE for key in f.keys()}
    other = sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    hint = f" (found {', '.join(other)}: re-save it with safe_serialization=True)" if other else ""
    raise PissaError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; merge reads safetensors only{hint}")


def tensor_shapes(folder: Path, wmap: dict[str, str], keys: list[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of `keys` read from the shard headers alone (no tensor data)."""
    from safetensors import safe_open

    shapes, by_shard = {}, {}
    for key in keys:
        by_shard.setdefault(wmap[key], []).append(key)
    for shard, names in by_shard.items():
        with safe_open(folder / shard, framework="pt") as f:
            for key in names:
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def weight_key(module: str, wmap: dict[str, str]) -> str:
    """The checkpoint name of a module's weight; tolerates a head prefix such as `model.` or `bert.`."""
    key = f"{module}.weight"
    if key in wmap:
        return key
    matches = [k for k in wmap if k.endswith(f".{key}")]
    if len(matches) == 1:
        return matches[0]
    raise PissaError(f"the base model has no weight for adapter layer {module} ({key}); the adapter was "
                     "trained on a different model, give the matching --base")


# --- checking the pairing -----------------------------------------------------------------------

def check_pairing(adapter: Path, config: dict, base: Path) -> str:
    """Refuse the two silent mistakes (trained PiSSA adapter on the original, converted on the residual)."""
    trained_on = Path(str(config.get("base_model_name_or_path") or ""))
    if is_residual(base):
        if (adapter / CONVERSION_FILE).exists():
            raise PissaError(f"{adapter} is a converted LoRA adapter for the original model, but --base {base} is a "
                             "PiSSA residual; pass the original model as --base")
        return "residual + PiSSA adapter"
    if trained_on.name == RESIDUAL_DIR and (trained_on.parent / MANIFEST).exists():
        raise PissaError(
            f"{adapter} was trained on the PiSSA residual {trained_on}, but --base {base} is not a residual. "
            f"Pass --base {trained_on.parent} (residual + adapter), or first run `pissa convert {adapter} "
            f"--init {trained_on.parent}` to merge into the original model"
        )
    return "base + LoRA adapter"


def plan_merge(adapter: Path, base: Path) -> tuple[dict, dict[str, str], str]:
    """(weight key -> (A, B, scale, transposed), weight map, mode), checked against the base before
    anything is written."""
    config, pairs, others, embeddings = read_lora_adapter(adapter, "adapter")
    if others:
        raise PissaError(f"{adapter} holds full weights ({next(iter(others))}, from modules_to_save); merge "
                         "supports LoRA layers only")
    mode = check_pairing(adapter, config, base)
    wmap = weight_map(base)
    keys = {module: weight_key(module, wmap) for module in pairs}
    shapes = tensor_shapes(base, wmap, list(keys.values()))
    plan = {}
    for module, (A, B) in pairs.items():
        # Conv1D and Embedding store their weight (in, out); a Conv2d kernel is (out, in, kh, kw) like its A.
        transposed = bool(config.get("fan_in_fan_out")) or module in embeddings
        want = (A.shape[1], B.shape[0]) if transposed else (B.shape[0], *A.shape[1:])
        if shapes[keys[module]] != want:
            raise PissaError(f"adapter layer {module} needs a weight of shape {want} but {keys[module]} in {base} "
                             f"is {shapes[keys[module]]}; the adapter was trained on a different model")
        plan[keys[module]] = (A, B, layer_scale(config, module), transposed)
    return plan, wmap, mode


# --- writing ------------------------------------------------------------------------------------

def merged(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float, transposed: bool) -> torch.Tensor:
    """W + scale·B@A, added in fp32 and rounded once to W's dtype. Conv factors B (out, r, 1, 1) and
    A (r, in, kh, kw) multiply unfolded; `transposed`: W is stored (in, out) (Conv1D, Embedding)."""
    delta = scale * (B.flatten(1).float() @ A.flatten(1).float())  # (out, in·kh·kw)
    if transposed:
        delta = delta.T
    return (W.float() + delta.reshape(W.shape)).to(W.dtype)


def copy_small_files(base: Path, out: Path) -> None:
    """Config, tokenizer and generation files: everything but the weights and their index."""
    for path in base.iterdir():
        if path.is_file() and not path.name.endswith(WEIGHT_SUFFIXES) and path.name != INDEX_FILE:
            shutil.copy2(path, out / path.name)


def write_shards(base: Path, out: Path, wmap: dict[str, str], plan: dict,
                 progress: Callable[[int, int, str], None] | None) -> int:
    """Stream every shard through, merging the planned weights; returns the total tensor bytes."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    total, done = 0, 0
    for shard in sorted(set(wmap.values())):
        tensors = {}
        with safe_open(base / shard, framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():
                W = f.get_tensor(key)
                if key in plan:
                    W = merged(W, *plan[key])
                    done += 1
                    if progress:
                        progress(done, len(plan), key)
                tensors[key] = W
        save_file(tensors, out / shard, metadata={**metadata, "format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors  # one shard in memory at a time
    return total


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
    if not (base_dir / "config.json").exists():
        raise PissaError(f"{base_dir} has no config.json; --base must be a model folder or a `pissa init` folder")
    plan, wmap, mode = plan_merge(adapter, base_dir)
    with atomic_output_dir(out, overwrite) as tmp:
        copy_small_files(base_dir, tmp)
        total = write_shards(base_dir, tmp, wmap, plan, progress)
        if (base_dir / INDEX_FILE).exists():
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return MergeResult(out=out, base=base_dir, mode=mode, layers=len(plan), shards=len(set(wmap.values())),
                       seconds=time.perf_counter() - start)

