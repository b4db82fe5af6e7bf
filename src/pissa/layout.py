"""The one source of truth for where things are: the artefacts pissa writes (folders and file
names) and how each kind of layer stores its weight relative to the matrix PEFT's B @ A updates.

Orientation (PEFT's, used everywhere in pissa):
    W        (out, in)   the matrix a layer applies, y = x @ W.T
    lora_A   (r, in)
    lora_B   (out, r)
    update = scale * B @ A,  scale = alpha / r  (alpha / sqrt(r) with rsLoRA)

A layer kind says how its stored weight maps to that (out, in) matrix and back, and under which
keys PEFT saves its factors. Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

# --- artefacts: a `pissa init` folder -------------------------------------------------------------
RESIDUAL_DIR = "residual"  # HF model folder with W_res in place of each targeted W
ADAPTER_DIR = "adapter"  # PEFT LoRA adapter folder holding A and B
MANIFEST_FILE = "pissa.json"  # method, options, seed, versions, per-layer errors

# --- a `pissa train` run folder (also holds adapter/, residual/ and init/ as above) ----------------
RUN_CONFIG_FILE = "train_config.yaml"  # the resolved config; its first line repeats the run
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
LOG_JSONL = "log.jsonl"
LOG_CSV = "log.csv"
TENSORBOARD_DIR = "tensorboard"
LOSS_PNG = "loss.png"
RUN_INIT_DIR = "init"  # a `pissa init`-style folder with the initial adapter (what convert reads)
RUN_LORA_DIR = "lora"  # --convert-at-end: the trained adapter as a LoRA on the original model
RUN_MODEL_DIR = "model"  # --method full: the fine-tuned model
RUN_EVAL_DIR = "eval"  # `pissa eval RUN` keeps its results in RUN/eval/<data>-<task>/

# --- an eval results folder -------------------------------------------------------------------------
EVAL_FILE = "eval.json"
PREDICTIONS_FILE = "predictions.jsonl"

# --- a PEFT adapter folder (PEFT's own names) -------------------------------------------------------
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_KEY_PREFIX = "base_model.model."
CONVERSION_FILE = "conversion.json"  # written by `pissa convert` beside the converted adapter
EXPORT_FILE = "export.json"  # written by `pissa export`: ranks, errors, parity, the serving command
# Linear and conv layers hold their factors in submodules, embeddings in parameters.
LINEAR_KEYS = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_KEYS = (".lora_embedding_A", ".lora_embedding_B")
MAGNITUDE_KEY = ".lora_magnitude_vector"  # DoRA: one magnitude per output row of the (out, in) matrix
BASE_LAYER = ".base_layer."  # a wrapped layer's own tensors (bias="lora_only", a targeted embedding's weight)

# --- a LLaMA-Factory PiSSA output: the initial adapter PissaConvertCallback / scripts/pissa_init.py save ---
LLAMA_FACTORY_INIT_DIR = "pissa_init"

# --- a Hugging Face model folder --------------------------------------------------------------------
MODEL_CONFIG_FILE = "config.json"
SINGLE_WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
TOKENIZER_PREFIXES = ("tokenizer", "special_tokens_map", "added_tokens", "vocab.", "merges.txt", "chat_template",
                      "spiece.model", "sentencepiece")


@dataclass(frozen=True)
class InitDir:
    """A `pissa init` output folder: residual/ + adapter/ + pissa.json."""

    root: Path

    @property
    def residual(self) -> Path:
        return self.root / RESIDUAL_DIR

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    def exists(self) -> bool:
        return self.manifest.exists()


def is_init_dir(path: str | Path) -> bool:
    return InitDir(Path(path)).exists()


def init_of_residual(path: str | Path) -> Path | None:
    """The init folder whose residual/ `path` is, or None (a plain model folder)."""
    path = Path(path)
    return path.parent if path.name == RESIDUAL_DIR and is_init_dir(path.parent) else None


@dataclass(frozen=True)
class RunDir:
    """A `pissa train` run folder."""

    root: Path

    config = property(lambda self: self.root / RUN_CONFIG_FILE)
    summary = property(lambda self: self.root / SUMMARY_FILE)
    checkpoints = property(lambda self: self.root / CHECKPOINTS_DIR)
    log_jsonl = property(lambda self: self.root / LOG_JSONL)
    log_csv = property(lambda self: self.root / LOG_CSV)
    tensorboard = property(lambda self: self.root / TENSORBOARD_DIR)
    loss_png = property(lambda self: self.root / LOSS_PNG)
    adapter = property(lambda self: self.root / ADAPTER_DIR)
    residual = property(lambda self: self.root / RESIDUAL_DIR)
    lora = property(lambda self: self.root / RUN_LORA_DIR)
    model = property(lambda self: self.root / RUN_MODEL_DIR)
    eval = property(lambda self: self.root / RUN_EVAL_DIR)

    @property
    def init(self) -> InitDir:
        return InitDir(self.root / RUN_INIT_DIR)

    def exists(self) -> bool:
        return self.config.exists()


def is_run_dir(path: str | Path) -> bool:
    return RunDir(Path(path)).exists()


def owner_of_residual(path: str | Path) -> Path | None:
    """The `pissa init` folder or `pissa train` run whose residual/ `path` is, or None (a plain model)."""
    path = Path(path)
    if path.name != RESIDUAL_DIR:
        return None
    return path.parent if is_init_dir(path.parent) or is_run_dir(path.parent) else None


# --- layer kinds -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerKind:
    """How a kind of layer stores its weight relative to the (out, in) matrix of B @ A."""

    name: str
    transposed: bool = False  # stored (in, out): GPT-2 Conv1D; Embedding (num, dim) is the matrix (dim, num)
    kernel: bool = False  # Conv2d (out, in, kh, kw): the matrix is (out, in*kh*kw)
    embedding: bool = False  # PEFT keeps the factors as lora_embedding_A/B parameters

    def to_matrix(self, W: torch.Tensor) -> torch.Tensor:
        """The stored weight as the (out, in) matrix (a view where possible)."""
        if self.transposed:
            return W.T
        return W.flatten(1) if self.kernel else W

    def from_matrix(self, M: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """An (out, in) matrix back in the stored layout of a weight of `shape` (inverse of to_matrix)."""
        return M.T.contiguous() if self.transposed else M.reshape(shape).contiguous()

    def factor_suffixes(self) -> tuple[str, str]:
        return EMBEDDING_KEYS if self.embedding else LINEAR_KEYS

    def factor_keys(self, module: str, prefix: str = ADAPTER_KEY_PREFIX) -> tuple[str, str]:
        """The state-dict keys PEFT saves and loads a module's (A, B) under."""
        a_suffix, b_suffix = self.factor_suffixes()
        return f"{prefix}{module}{a_suffix}", f"{prefix}{module}{b_suffix}"

    def stored_factors(self, A: torch.Tensor, B: torch.Tensor, shape: tuple[int, ...]):
        """A (r, in) and B (out, r) in the layout PEFT's layer holds them for a weight of `shape`."""
        if self.kernel:
            return A.reshape(A.shape[0], *shape[1:]), B.reshape(*B.shape, 1, 1)  # (r, in, kh, kw), (out, r, 1, 1)
        return A, B

    def adapter_tensors(self, module: str, A: torch.Tensor, B: torch.Tensor, shape: tuple[int, ...]) -> dict:
        """{key without PEFT's prefix: tensor} of a module's factors, as PEFT saves them."""
        key_A, key_B = self.factor_keys(module, prefix="")
        A, B = self.stored_factors(A, B, shape)
        return {key_A: A, key_B: B}


LINEAR = LayerKind("linear")
CONV1D = LayerKind("conv1d", transposed=True)
EMBEDDING = LayerKind("embedding", transposed=True, embedding=True)
CONV2D = LayerKind("conv2d", kernel=True)
KINDS = {k.name: k for k in (LINEAR, CONV1D, EMBEDDING, CONV2D)}


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (transformers.pytorch_utils), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def kind_of(module: nn.Module) -> LayerKind | None:
    """The kind of a layer pissa can decompose, or None."""
    if is_conv1d(module):
        return CONV1D
    if isinstance(module, nn.Embedding):
        return EMBEDDING
    if isinstance(module, nn.Conv2d):
        return CONV2D
    return LINEAR if isinstance(module, nn.Linear) else None


def kind_from_factors(A: torch.Tensor, embedding: bool, fan_in_fan_out: bool) -> LayerKind:
    """The kind of layer a saved adapter's factors belong to (no model needed)."""
    if embedding:
        return EMBEDDING
    if A.ndim == 4:
        return CONV2D
    return CONV1D if fan_in_fan_out else LINEAR


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of the matrix a layer's B @ A updates. Not its weight's shape: a 4-bit Linear packs its
    weight, Conv1D and Embedding store it transposed, Conv2d unfolds the kernel."""
    if hasattr(module, "out_features") and hasattr(module, "in_features"):  # nn.Linear, bnb Linear4bit
        return module.out_features, module.in_features
    kind = kind_of(module)
    weight = module.weight
    if kind is None:
        return tuple(weight.shape[:2])
    return tuple(kind.to_matrix(torch.empty(weight.shape, device="meta")).shape)


def embedding_base_key(module: str) -> str:
    """Where PEFT also saves a targeted embedding's base weight (in the adapter file, unprefixed)."""
    return f"{module}.base_layer.weight"
