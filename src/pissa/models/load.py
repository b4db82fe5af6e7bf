"""Resolve what the user typed as a model (embedded name, local folder, or Hugging Face id) and
load it with stock transformers. Never sets trust_remote_code unless the user asked."""

from __future__ import annotations

from pathlib import Path

import torch

from ..dtypes import parse_dtype
from ..errors import PissaError
from ..layout import MODEL_CONFIG_FILE, WEIGHT_SUFFIXES
from .embedded import EMBEDDED, is_embedded, resolve_embedded

CAUSAL_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Architectures that load with their head: the Auto class each suffix of config.architectures stands for.
HEAD_CLASSES = {"ForSequenceClassification": "AutoModelForSequenceClassification",
                "ForImageClassification": "AutoModelForImageClassification"}


def looks_like_path(spec: str) -> bool:
    """A name that can only be a local path: absolute, relative with ./ or ../, more than one slash, a
    safetensors file, or one whose first folder exists here (h/nope when ./h exists)."""
    first = spec.split("/", 1)[0]
    return (spec.startswith(("/", "./", "../", "~")) or spec.count("/") > 1 or spec.endswith(".safetensors")
            or ("/" in spec and Path(first).is_dir()))


def resolve_model(spec: str | Path) -> str:
    """A local folder (embedded models are converted on first use) or a hub id, as a string."""
    spec = str(spec)
    if is_embedded(spec):
        return str(resolve_embedded(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / MODEL_CONFIG_FILE).exists():
            raise PissaError(f"model folder {path} has no {MODEL_CONFIG_FILE}; point at a Hugging Face model folder")
        return str(path)
    if looks_like_path(spec):
        raise PissaError(
            f"model path {spec} does not exist; give a local folder, a hub id, or an embedded name "
            f"({', '.join(EMBEDDED)})"
        )
    return spec  # a hub id; from_pretrained reports if it cannot be reached


def is_causal_lm(config) -> bool:
    return any(a.endswith(CAUSAL_LM_SUFFIXES) for a in (config.architectures or []))


def is_causal_lm_model(model) -> bool:
    """A loaded causal LM; a model built from a config has no `architectures`, so its class also counts."""
    config = getattr(model, "config", None)
    return type(model).__name__.endswith(CAUSAL_LM_SUFFIXES) or (config is not None and is_causal_lm(config))


def read_config(spec: str | Path, trust_remote_code: bool = False):
    """The transformers config of a resolved model, refusing what cannot be read with one line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PissaError(
            f"could not load model {spec!r}: not a local folder, an embedded name ({', '.join(EMBEDDED)}), "
            f"or a reachable hub id ({e.__class__.__name__}: {str(e).splitlines()[0]})"
        ) from e


def model_class(config):
    """Causal LMs load with their LM head, sequence and image classifiers with their classifier head, other
    architectures (BERT, ...) as the bare AutoModel."""
    import transformers

    if is_causal_lm(config):
        return transformers.AutoModelForCausalLM
    for suffix, auto in HEAD_CLASSES.items():
        if any(a.endswith(suffix) for a in (config.architectures or [])):
            return getattr(transformers, auto)
    return transformers.AutoModel


def check_weights(folder: Path) -> None:
    """A local model folder must hold its weights, and safetensors shards must be whole (their headers are
    checked by the one reader, which names a truncated or corrupted file)."""
    from ..io.reader import CheckpointReader, is_safetensors_folder

    if is_safetensors_folder(folder):
        CheckpointReader(folder)
    elif not any(f.name.endswith(WEIGHT_SUFFIXES) for f in folder.iterdir()):
        raise PissaError(f"model folder {folder} has a {MODEL_CONFIG_FILE} but no weights (model.safetensors or "
                         "its shards); download the weight files into it, or point at the complete folder")


def load_model(spec: str | Path, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False,
               tokenizer: bool = True):
    """Load (model, tokenizer or None, resolved path) with stock transformers; `dtype="auto"` keeps the
    checkpoint's dtype. `tokenizer=False` skips reading one (a large vocabulary takes a second) for callers
    that have theirs."""
    path = resolve_model(spec)
    if Path(path).is_dir():
        check_weights(Path(path))
    config = read_config(path, trust_remote_code)
    torch_dtype = dtype if dtype == "auto" else parse_dtype(dtype)
    model = model_class(config).from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return model, load_tokenizer(path, trust_remote_code=trust_remote_code) if tokenizer else None, path


def meta_model(folder: str | Path, trust_remote_code: bool = False):
    """The model built from `folder`'s config on the meta device (no memory, no weights)."""
    from transformers.modeling_utils import set_zero3_state

    config = read_config(folder, trust_remote_code)
    # set_zero3_state: in a ZeRO-3 launch, transformers would build it inside deepspeed.zero.Init, which cannot
    # partition (nor initialise) meta tensors
    with torch.device("meta"), set_zero3_state():
        return model_class(config).from_config(config, trust_remote_code=trust_remote_code)


def load_tokenizer(path: str | Path, required_for: str | None = None, trust_remote_code: bool = False):
    """The tokenizer saved beside a model or adapter; None when there is none, unless `required_for`
    names what needs it (then a PissaError says so)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if required_for is None:
            return None
        raise PissaError(f"could not load a tokenizer from {path} ({e.__class__.__name__}); {required_for} needs "
                         "the model's tokenizer files beside its weights") from e


def check_not_quantized(model) -> None:
    """PiSSA decomposes full-precision weights; refuse a model whose weights are already quantized."""
    quant = getattr(model, "hf_quantizer", None) or getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is not None:
        raise PissaError(
            "the model's weights are already quantized; PiSSA needs the full-precision weights. Load the "
            "unquantized checkpoint (QPiSSA quantizes the residual after the decomposition)"
        )
