"""Resolve what the user typed as a model (embedded name, local folder, or Hugging Face id) and
load it with stock transformers. Never sets trust_remote_code unless the user asked."""

from __future__ import annotations

from pathlib import Path

import torch

from .embedded import EMBEDDED, is_embedded, resolve_embedded
from .errors import PissaError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise PissaError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or spec.endswith(".safetensors")


def resolve_model(spec: str | Path) -> str:
    """A local folder (embedded models are converted on first use) or a hub id, as a string."""
    spec = str(spec)
    if is_embedded(spec):
        return str(resolve_embedded(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise PissaError(f"model folder {path} has no config.json; point at a Hugging Face model folder")
        return str(path)
    if looks_like_path(spec):
        raise PissaError(
            f"model path {spec} does not exist; give a local folder, a hub id, or an embedded name "
            f"({', '.join(EMBEDDED)})"
        )
    return spec  # a hub id; from_pretrained reports if it cannot be reached


CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(config) -> bool:
    return any(a.endswith(CAUSAL_LM_SUFFIXES) for a in (config.architectures or []))


def is_causal_lm_model(model) -> bool:
    """A loaded causal LM; a model built from a config has no `architectures`, so its class also counts."""
    config = getattr(model, "config", None)
    return type(model).__name__.endswith(CAUSAL_LM_SUFFIXES) or (config is not None and is_causal_lm(config))


def load_model(spec: str | Path, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False):
    """Load (model, tokenizer or None, resolved path) with stock transformers.

    `dtype="auto"` keeps the checkpoint's dtype. Causal LMs load with their LM head, other
    architectures (BERT, ...) as the bare AutoModel.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise PissaError(
            f"could not load model {spec!r}: not a local folder, an embedded name ({', '.join(EMBEDDED)}), "
            f"or a reachable hub id ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from e
    cls = AutoModelForCausalLM if is_causal_lm(config) else AutoModel
    torch_dtype = dtype if dtype == "auto" else parse_dtype(dtype)
    model = cls.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        tokenizer = None
    return model, tokenizer, path
