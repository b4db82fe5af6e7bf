"""The inputs of a conversion, read and checked before anything is computed: adapters split into factors and
the tensors carried unchanged, the checks that the trained adapter started from the init, and the per-layer
rank, alpha and scale exactly as PEFT resolves them. Where the init comes from is `sources`."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..decompose import lora_scale
from ..errors import PissaError
from ..io.adapter_files import embedding_modules, lora_pairs, read_lora_form
from ..layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_KEY_PREFIX,
    EMBEDDING_KEYS,
    LINEAR_KEYS,
    MAGNITUDE_KEY,
    embedding_base_key,
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
    """(config, lora pairs, tensors carried unchanged, embedding modules) of a PEFT LoRA adapter folder
    (`split_adapter`); refuses what we cannot convert."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PissaError(f"{role} {folder} does not exist; give the folder holding adapter_config.json")
    if is_init_dir(folder) and not (folder / ADAPTER_CONFIG_FILE).exists():
        raise PissaError(f"{folder} is a `pissa init` folder, not an adapter; give its trained adapter as {role}")
    config, state = read_lora_form(folder)  # --train-singular-values saves AdaLoRA: B·diag(E)·A
    return split_adapter(config, state, f"{role} {folder}")


def split_adapter(config: dict, state: dict, where: str) -> tuple[dict, dict, dict, set[str]]:
    """(config, lora pairs, tensors carried unchanged, embedding modules) of an adapter in LoRA form.

    Carried unchanged: DoRA magnitude vectors (DoRA normalises W + ΔW, the same matrix before and after
    conversion), modules_to_save copies and trained biases, which apply to the original model as they are.
    A targeted embedding's base weight, which PEFT also saves, is dropped: under PiSSA it is the residual,
    which must never reach the original model (and otherwise it is the base's own weight)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise PissaError(f"{where} is a {config['peft_type']} adapter; only LoRA adapters can be converted")
    known = LINEAR_KEYS + EMBEDDING_KEYS + (MAGNITUDE_KEY,)
    unsupported = [k for k in state if ".lora_" in k and not k.endswith(known)]
    if unsupported:
        why = " (lora_bias=True: a bias on lora_B)" if unsupported[0].endswith(".bias") else ""
        raise PissaError(f"{where} holds {unsupported[0]}{why}; only lora_A/lora_B factors and DoRA magnitudes "
                         "are supported")
    if config.get("use_dora") and not any(k.endswith(MAGNITUDE_KEY) for k in state):
        raise PissaError(f"{where} says use_dora but holds no {MAGNITUDE_KEY[1:]} (PEFT's own PiSSA conversion drops "
                         "them); convert the trained adapter again with `pissa convert`")
    pairs = lora_pairs(state)
    if not pairs:
        raise PissaError(f"{where} holds no lora_A/lora_B weights; is it a LoRA adapter?")
    embeddings = embedding_modules(state)
    residual_keys = {ADAPTER_KEY_PREFIX + embedding_base_key(m) for m in embeddings}
    others = {k: v for k, v in state.items() if k not in residual_keys
              and (k.endswith(MAGNITUDE_KEY) or ".lora_" not in k)}
    return config, pairs, others, embeddings


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
            converted = " (--init holds rank 2r: an already converted adapter?)" \
                if A0.shape[0] == 2 * A1.shape[0] and A0.shape[1:] == A1.shape[1:] else ""
            raise PissaError(
                f"layer {module}: trained A {tuple(A1.shape)}, B {tuple(B1.shape)} but init A {tuple(A0.shape)}, "
                f"B {tuple(B0.shape)} (different rank or model){converted}; give the --init folder it was trained from"
            )


def check_config_ranks(config: dict, pairs: dict, folder: Path) -> None:
    """The ranks the config gives each layer must be the ranks of its weights, or PEFT cannot load it."""
    for module, (A, _) in pairs.items():
        r = layer_rank_alpha(config, module)[0]
        if r != A.shape[0]:
            raise PissaError(f"{folder}: adapter_config.json gives layer {module} rank {r} but its lora_A has rank "
                             f"{A.shape[0]}; the adapter folder is inconsistent, re-save it")


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
