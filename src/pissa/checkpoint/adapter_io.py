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

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def read_adapter_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG_FILE
    if not path.exists():
        raise PissaError(f"{path} not found; {folder} is not a PEFT adapter folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PissaError(f"{path} is not valid JSON ({e}); re-save the adapter") from e


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


def lora_pairs(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module name -> (A (r, in), B (out, r)) from an adapter state dict."""
    pairs = {}
    for key, A in state.items():
        if key.endswith(".lora_A.weight"):
            module = key[: -len(".lora_A.weight")].removeprefix(KEY_PREFIX)
            B = state.get(key.replace(".lora_A.weight", ".lora_B.weight"))
            if B is None:
                raise PissaError(f"adapter has {key} but no matching lora_B; the adapter file is incomplete")
            pairs[module] = (A, B)
    return pairs
