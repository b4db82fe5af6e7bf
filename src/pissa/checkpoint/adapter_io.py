"""Read and write PEFT LoRA adapter folders as plain state dicts, with no model loaded.

A folder holds `adapter_config.json` and `adapter_model.safetensors`; keys look like
`base_model.model.<module>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PissaError
from ..jsonfile import read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def read_adapter_config(folder: str | Path) -> dict:
    return read_json(Path(folder) / CONFIG_FILE, f"{folder} is not a PEFT adapter folder", "re-save the adapter")


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, state dict) of a PEFT adapter folder; refuses missing or corrupt files."""
    config = read_adapter_config(folder)
    path = Path(folder) / WEIGHTS_FILE
    if not path.exists():
        raise PissaError(f"{path} not found; the adapter folder {folder} has no safetensors weights")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise PissaError(f"{path} is corrupted or truncated ({e}); re-save the adapter") from e
    return config, state


def write_adapter(folder: str | Path, config: dict, state: dict[str, torch.Tensor]) -> None:
    """Write a PEFT adapter folder (the caller makes it atomic, e.g. with atomic_output_dir)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, folder / WEIGHTS_FILE, metadata={"format": "pt"})


# PEFT names the factors of a linear/conv layer `lora_A.weight`/`lora_B.weight` (submodules) and
# those of an embedding `lora_embedding_A`/`lora_embedding_B` (parameters); both are (r, in), (out, r).
LINEAR_KEYS = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_KEYS = (".lora_embedding_A", ".lora_embedding_B")


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A (r, in), B (out, r)) from an adapter state dict (linear, conv and embedding)."""
    pairs = {}
    for a_suffix, b_suffix in (LINEAR_KEYS, EMBEDDING_KEYS):
        for key, A in state.items():
            if key.endswith(a_suffix):
                module = key[: -len(a_suffix)].removeprefix(KEY_PREFIX)
                B = state.get(key[: -len(a_suffix)] + b_suffix)
                if B is None:
                    raise PissaError(f"adapter has {key} but no matching {b_suffix[1:]}; the adapter file is "
                                     "incomplete, re-save it")
                pairs[module] = (A, B)
    return pairs


def factor_keys(module: str, embedding: bool) -> tuple[str, str]:
    """The state-dict keys PEFT loads a module's (A, B) from."""
    a_suffix, b_suffix = EMBEDDING_KEYS if embedding else LINEAR_KEYS
    return f"{KEY_PREFIX}{module}{a_suffix}", f"{KEY_PREFIX}{module}{b_suffix}"


def embedding_modules(state: dict[str, torch.Tensor]) -> set[str]:
    """Modules whose factors are stored as embedding LoRA parameters."""
    suffix = EMBEDDING_KEYS[0]
    return {k[: -len(suffix)].removeprefix(KEY_PREFIX) for k in state if k.endswith(suffix)}
