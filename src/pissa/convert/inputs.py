"""The inputs of a conversion, read and checked before anything is computed: the trained adapter, the
init it started from, and the per-layer rank, alpha and scale exactly as PEFT resolves them."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..decompose import lora_scale
from ..errors import PissaError
from ..io.adapter_files import embedding_modules, lora_pairs, read_lora_form
from ..io.manifest import read_manifest
from ..layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_KEY_PREFIX,
    ADAPTER_WEIGHTS_FILE,
    EMBEDDING_KEYS,
    LINEAR_KEYS,
    InitDir,
    embedding_base_key,
    init_of_residual,
    is_init_dir,
)

# Below this median per-layer cosine between the trained and the initial factors, the trained
# adapter did not start from this init (unrelated factors give ~0; fine-tuning keeps it near 1).
MIN_INIT_SIMILARITY = 0.5


# --- per-layer rank, alpha and scale, exactly as PEFT resolves them ----------------------------

def layer_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """(r, alpha) that PEFT gives `module` under an adapter_config dict (rank/alpha patterns included)."""
    from peft.utils.other import get_pattern_key

    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config["r"])
    alpha = alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config["lora_alpha"])
    return int(r), float(alpha)


def layer_scale(config: dict, module: str) -> float:
    """The factor PEFT multiplies `B @ A` by for `module`: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    r, alpha = layer_rank_alpha(config, module)
    return lora_scale(alpha, r, bool(config.get("use_rslora")))


# --- reading and checking the inputs ----------------------------------------------------------

def read_lora_adapter(folder: str | Path, role: str) -> tuple[dict, dict, dict, set[str]]:
    """(config, lora pairs, other tensors, embedding modules) of a PEFT LoRA adapter folder; refuses what we
    cannot convert."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PissaError(f"{role} {folder} does not exist; give the folder holding adapter_config.json")
    if is_init_dir(folder) and not (folder / ADAPTER_CONFIG_FILE).exists():
        raise PissaError(f"{folder} is a `pissa init` folder, not an adapter; give its trained adapter as {role}")
    config, state = read_lora_form(folder)  # --train-singular-values saves AdaLoRA: B·diag(E)·A
    if config.get("peft_type", "LORA") != "LORA":
        raise PissaError(f"{role} {folder} is a {config['peft_type']} adapter; only LoRA adapters can be converted")
    if config.get("use_dora"):
        raise PissaError(f"{role} {folder} uses DoRA; its magnitude vectors have no LoRA equivalent")
    unsupported = [k for k in state if ".lora_" in k and not k.endswith(LINEAR_KEYS + EMBEDDING_KEYS)]
    if unsupported:
        raise PissaError(f"{role} {folder} holds {unsupported[0]}; only lora_A/lora_B of linear layers are supported")
    pairs = lora_pairs(state)
    if not pairs:
        raise PissaError(f"{role} {folder} holds no lora_A/lora_B weights; is it a LoRA adapter?")
    # PEFT also saves a targeted embedding's base weight: under PiSSA that is the residual, which must
    # never reach the original model. What remains are modules_to_save copies: apply them as they are.
    residual_keys = {ADAPTER_KEY_PREFIX + embedding_base_key(m) for m in embedding_modules(state)}
    others = {k: v for k, v in state.items() if ".lora_" not in k and k not in residual_keys}
    return config, pairs, others, embedding_modules(state)


def read_init(init_dir: str | Path) -> tuple[dict, dict, dict]:
    """(manifest, initial adapter config, initial lora pairs) of a `pissa init` output folder."""
    init_dir = Path(init_dir)
    manifest = read_manifest(init_dir)
    if manifest.get("kind") != "pissa-init":
        raise PissaError(f"{init_dir}/pissa.json is a {manifest.get('kind')!r} manifest; give a `pissa init` folder")
    config, pairs, _, _ = read_lora_adapter(InitDir(init_dir).adapter, "init adapter")
    missing = sorted(set(manifest.get("layers", {})) ^ set(pairs))
    if missing:
        raise PissaError(f"{init_dir}: the initial adapter and pissa.json disagree about layer {missing[0]}; "
                         "the init folder was modified, re-run `pissa init`")
    return manifest, config, pairs


def check_same_layers(trained: dict, init: dict, trained_dir: Path, init_dir: Path) -> None:
    """Same modules, same ranks and shapes: otherwise the adapter was trained from another init."""
    only_trained, only_init = sorted(set(trained) - set(init)), sorted(set(init) - set(trained))
    if only_trained or only_init:
        which = f"{only_trained[0]} is only in the trained adapter" if only_trained else \
            f"{only_init[0]} is only in the init folder"
        raise PissaError(f"targets differ: {which} ({len(only_trained)} + {len(only_init)} layers differ); "
                         f"{trained_dir} was not trained from {init_dir}, give the matching --init folder")
    for module, (A1, B1) in trained.items():
        A0, B0 = init[module]
        if A1.shape != A0.shape or B1.shape != B0.shape:
            raise PissaError(
                f"layer {module}: trained A {tuple(A1.shape)}, B {tuple(B1.shape)} but init A {tuple(A0.shape)}, "
                f"B {tuple(B0.shape)} (different rank or model); give the --init folder it was trained from"
            )


def check_config_ranks(config: dict, pairs: dict, folder: Path) -> None:
    """The ranks the config gives each layer must be the ranks of its weights, or PEFT cannot load it."""
    for module, (A, _) in pairs.items():
        r = layer_rank_alpha(config, module)[0]
        if r != A.shape[0]:
            raise PissaError(f"{folder}: adapter_config.json gives layer {module} rank {r} but its lora_A has rank "
                             f"{A.shape[0]}; the adapter folder is inconsistent, re-save it")


def check_provenance(trained_config: dict, init_dir: Path, trained_dir: Path) -> None:
    """Refuse an adapter whose config names the residual of another, still existing, init folder."""
    other = init_of_residual(str(trained_config.get("base_model_name_or_path") or ""))
    if other is None or other.resolve() == init_dir.resolve():
        return
    theirs, ours = InitDir(other).adapter / ADAPTER_WEIGHTS_FILE, InitDir(init_dir).adapter / ADAPTER_WEIGHTS_FILE
    if not theirs.exists():
        return
    if theirs.read_bytes() != ours.read_bytes():
        raise PissaError(f"{trained_dir} was trained on {InitDir(other).residual}, whose init folder {other} differs "
                         f"from --init "
                         f"{init_dir}; pass --init {other}")


def init_similarity(trained: tuple[torch.Tensor, torch.Tensor], init: tuple[torch.Tensor, torch.Tensor]) -> float:
    """Cosine between the trained and initial (A, B) of one layer, as one flattened vector each."""
    x = torch.cat([t.float().flatten() for t in trained])  # (r·in + out·r,)
    y = torch.cat([t.float().flatten() for t in init])  # (r·in + out·r,)
    denom = x.norm() * y.norm()
    return float(x @ y / denom) if denom > 0 else 0.0


def check_init_match(similarity: dict[str, float], trained_dir: Path, init_dir: Path) -> None:
    median = statistics.median(similarity.values())
    if median < MIN_INIT_SIMILARITY:
        raise PissaError(
            f"{trained_dir} does not look trained from {init_dir}: its factors are unrelated to the initial "
            f"PiSSA factors (median cosine {median:.2f} < {MIN_INIT_SIMILARITY}). Give the init folder it was "
            "trained from; a plain LoRA adapter needs no conversion. If you are sure, pass --no-init-check"
        )


def check_compress_rank(rank: int, trained: dict) -> None:
    if rank <= 0:
        raise PissaError(f"--rank must be > 0, got {rank}")
    for module, (A, B) in trained.items():
        limit = min(2 * A.shape[0], A.shape[1], B.shape[0])
        if rank > limit:
            raise PissaError(f"--rank {rank} is larger than the converted rank of layer {module} ({limit} = "
                             f"min(2r, in, out)); choose --rank <= {limit}, or omit it for the exact 2r adapter")


def base_model_of(manifest: dict) -> str:
    """The original model the converted adapter applies to (a loadable path for embedded models)."""
    from ..models import is_embedded

    source = manifest.get("source_model", "")
    resolved = manifest.get("resolved_path")
    if resolved and (is_embedded(source) or Path(resolved).exists()):
        return str(Path(resolved).resolve()) if Path(resolved).exists() else resolved
    return source
