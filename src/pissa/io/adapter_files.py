"""Read and write PEFT LoRA adapter folders as plain state dicts, with no model loaded.

A folder holds `adapter_config.json` and `adapter_model.safetensors`; keys look like
`base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PissaError, PissaWarning
from ..layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_KEY_PREFIX,
    ADAPTER_WEIGHTS_FILE,
    EMBEDDING_KEYS,
    LINEAR_KEYS,
)
from .jsonfile import read_json

# `init_lora_weights` values that make PEFT recompute the base weight whenever the adapter is loaded
# (peft/tuners/lora/layer.py `LoraLayer.update_layer`): pissa*, corda* by prefix, the others by name.
# A randomized one (pissa_niter_N) draws a new residual on every load.
BASE_CHANGING_PREFIXES = ("pissa", "corda")
BASE_CHANGING_NAMES = ("olora", "loftq", "lora_ga")


def base_changing_init(config: dict) -> str | None:
    """The config's init_lora_weights when loading it with PEFT would recompute the base weight, else None."""
    init = config.get("init_lora_weights")
    if not isinstance(init, str):
        return None
    name = init.lower()
    return init if name.startswith(BASE_CHANGING_PREFIXES) or name in BASE_CHANGING_NAMES else None


def read_adapter_config(folder: str | Path) -> dict:
    """adapter_config.json of a PEFT adapter folder; warns when PEFT would recompute the base on loading it."""
    config = read_json(Path(folder) / ADAPTER_CONFIG_FILE, f"{folder} is not a PEFT adapter folder",
                       "re-save the adapter")
    init = base_changing_init(config)
    if init is not None:
        warnings.warn(
            f"{folder}/{ADAPTER_CONFIG_FILE} says init_lora_weights={init!r}: PeftModel.from_pretrained reruns that "
            "init on every load and overwrites the base weights with what it computes"
            + (" (a new random draw each time)" if "niter" in init else "")
            + "; pissa reads only its tensors. To serve or share it, convert it to a LoRA on the original model with "
            "`pissa convert ADAPTER --init INITIAL_ADAPTER`", PissaWarning, stacklevel=1)
    return config


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, state dict) of a PEFT adapter folder; refuses missing or corrupt files."""
    config = read_adapter_config(folder)
    path = Path(folder) / ADAPTER_WEIGHTS_FILE
    if not path.exists():
        raise PissaError(f"{path} not found; the adapter folder {folder} has no safetensors weights")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise PissaError(f"{path} is corrupted or truncated ({e}); re-save the adapter") from e
    return config, state


def write_adapter(folder: str | Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """Write a PEFT adapter folder (the caller makes it atomic, e.g. with atomic_output_dir). Refuses a config
    that would make PEFT recompute the base on load: every adapter pissa writes loads as it is."""
    init = base_changing_init(config)
    if init is not None:
        raise PissaError(f"refusing to write {folder} with init_lora_weights={init!r} (PEFT would recompute the "
                         "base weights on every load); set it to true")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / ADAPTER_WEIGHTS_FILE, metadata={"format": "pt"})


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A (r, in), B (out, r)) from an adapter state dict (linear, conv and embedding)."""
    pairs = {}
    for a_suffix, b_suffix in (LINEAR_KEYS, EMBEDDING_KEYS):
        for key, A in state.items():
            if key.endswith(a_suffix):
                module = key[: -len(a_suffix)].removeprefix(ADAPTER_KEY_PREFIX)
                B = state.get(key[: -len(a_suffix)] + b_suffix)
                if B is None:
                    raise PissaError(f"adapter has {key} but no matching {b_suffix[1:]}; the adapter file is "
                                     "incomplete, re-save it")
                for name, factor in ((key, A), (key[: -len(a_suffix)] + b_suffix, B)):
                    if not bool(torch.isfinite(factor).all()):
                        raise PissaError(f"adapter tensor {name} contains NaN/Inf values (the training diverged?); "
                                         "use a checkpoint from before it did")
                pairs[module] = (A, B)
    return pairs


def embedding_modules(state: dict[str, torch.Tensor]) -> set[str]:
    """Modules whose factors are stored as embedding LoRA parameters."""
    suffix = EMBEDDING_KEYS[0]
    return {k[: -len(suffix)].removeprefix(ADAPTER_KEY_PREFIX) for k in state if k.endswith(suffix)}


# --- AdaLoRA adapters (pissa train --train-singular-values) read as LoRA -------------------------

RANKNUM_EPS = 1e-5  # PEFT's AdaLoRA divides by ranknum + 1e-5
# AdaLoRA's own fields: a LoRA view of its config drops them.
ADALORA_FIELDS = ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                  "total_step")


def read_lora_form(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """`read_adapter` in LoRA form: an AdaLoRA adapter is rewritten as the equivalent LoRA (`as_lora`)."""
    return as_lora(*read_adapter(folder))


def as_lora(config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A saved adapter (config, state) in LoRA form: an AdaLoRA one (--train-singular-values) rewritten
    by `adalora_as_lora`, any other as it is."""
    return adalora_as_lora(config, state) if config.get("peft_type") == "ADALORA" else (config, state)


def adalora_as_lora(config: dict, state: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor]]:
    """A saved AdaLoRA adapter (config, state) as an equivalent LoRA adapter (config, state).

    Each layer's B·diag(E)·A·alpha/(r + 1e-5) becomes LoRA factors with E split evenly between them
    (sign on B), under lora_alpha = alpha·r/(r + 1e-5) so that PEFT's alpha / r is the same multiplier.
    """
    if config.get("rank_pattern"):
        raise PissaError("the AdaLoRA adapter has a rank_pattern (its rank budget masked singular values); "
                         "only adapters trained without rank allocation (pissa train --train-singular-values) "
                         "can be read as LoRA")
    rank = int(config["init_r"])
    alpha = config["lora_alpha"] if config["lora_alpha"] > 0 else float(rank)
    lora_config = {k: v for k, v in config.items() if k not in ADALORA_FIELDS}
    lora_config.update(peft_type="LORA", r=rank, lora_alpha=alpha * rank / (rank + RANKNUM_EPS), rank_pattern={},
                       alpha_pattern={})
    lora_state = {}
    for key, A in state.items():
        if not key.endswith(".lora_A"):
            if not key.endswith((".lora_B", ".lora_E")):
                lora_state[key] = A
            continue
        stem = key[: -len(".lora_A")]
        B, E = state[stem + ".lora_B"].float(), state[stem + ".lora_E"].float()  # (out, r), (r, 1)
        root = E.abs().sqrt()
        lora_state[stem + ".lora_A.weight"] = (root * A.float()).to(A.dtype)
        lora_state[stem + ".lora_B.weight"] = (B * (E.sign() * root).T).to(A.dtype)
    return lora_config, lora_state
