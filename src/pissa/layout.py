"""The one source of truth for where things are: the artefacts pissa writes (folders and file
names) and how each kind of layer stores its weight relative to the matrix PEFT's B @ A updates.

Orientation (PEFT's, used everywhere in pissa):
    W        (out, in)   the matrix a layer applies, y = x @ W.T
    lora_A   (r, in)
    lora_B   (out, r)
    update = scale * B @ A,  scale = alpha / r  (alpha / sqrt(r) with rsLoRA)

A layer kind says how its stored weight maps to that (out, in) matrix and back, and under which
keys PEFT saves its factors; `ExpertLayout` does so for the fused 3-D expert tensors of MoE models, one
(out, in) matrix per expert. Imports torch only.
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
RUN_BASE_DIR = "base"  # a classifier task: the model with its new head as training started (the original model)
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
    base = property(lambda self: self.root / RUN_BASE_DIR)
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


def init_of_residual(path: str | Path) -> Path | None:
    """The `pissa init` folder whose residual/ `path` is, or None (a run's residual, or a plain model)."""
    owner = owner_of_residual(path)
    return owner if owner is not None and is_init_dir(owner) else None


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


# --- fused 3-D expert tensors (transformers 5 MoE blocks) -------------------------------------------

EXPERTS = "experts"  # the layer kind of a fused expert tensor (manifest `kind`)
GATE_UP = "gate_up_proj"  # the fused tensor that holds two matrices per expert (gate, up)
GATE_UP_PARTS = ("gate", "up")


@dataclass(frozen=True)
class ExpertLayout:
    """How a fused expert tensor of shape (E, ., .) holds each expert's (out, in) matrix, and how PEFT's
    `ParamWrapper` (`LoraConfig(target_parameters=...)`) packs the factors of all E experts.

    Expert e's matrix is P[e] (out, in), or P[e].T when `transposed` (gpt-oss stores (E, in, out)). A fused
    gate_up tensor holds `parts` = (gate, up) along `out`: rows [:out/2] then [out/2:], or alternating rows
    when `interleaved` (gpt-oss). pissa decomposes each part of each expert on its own at rank k, as it does
    a dense model's gate_proj and up_proj, so an expert's adapter has rank R = k * len(parts):
        A_e = [A_gate; A_up]   (R, in)        B_e = blockdiag(B_gate, B_up)   (out, R)
    PEFT packs the experts as
        lora_A (R*E, in):   expert e at rows e*R .. (e+1)*R
        lora_B (out, R*E):  expert e at columns e::E   (column j*E + e holds B_e[:, j])
    and adds scale * B_e @ A_e to expert e's matrix (the delta's transpose when `transposed`).
    """

    parts: tuple[str, ...] = ()  # () for one matrix per expert (down_proj)
    transposed: bool = False
    interleaved: bool = False
    name: str = EXPERTS

    @property
    def n_parts(self) -> int:
        return max(1, len(self.parts))

    def part_names(self) -> tuple[str, ...]:
        return self.parts or ("",)

    def matrices(self, P: torch.Tensor) -> torch.Tensor:
        """The stored (E, ., .) tensor as its experts' (E, out, in) matrices (a view)."""
        return P.transpose(-2, -1) if self.transposed else P

    def from_matrices(self, M: torch.Tensor) -> torch.Tensor:
        """(E, out, in) matrices back in the stored layout (inverse of `matrices`)."""
        return (M.transpose(-2, -1) if self.transposed else M).contiguous()

    def rows(self, out: int, part: int) -> slice:
        """The rows of `part` in an expert's fused (out, in) matrix."""
        if self.interleaved:
            return slice(part, None, self.n_parts)
        size = out // self.n_parts
        return slice(part * size, (part + 1) * size)

    def split(self, M: torch.Tensor) -> list[torch.Tensor]:
        """(..., out, in) -> one (..., out/parts, in) view per part."""
        return [M[..., self.rows(M.shape[-2], p), :] for p in range(self.n_parts)]

    def block_factors(self, As: list[torch.Tensor], Bs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-part factors A_p (E, k, in), B_p (E, out/parts, k) -> the experts' A (E, R, in), B (E, out, R),
        with B block-diagonal so that B @ A holds each part's own B_p @ A_p in its rows."""
        A = torch.cat(As, dim=1)  # (E, R, in)
        k, n = As[0].shape[1], len(Bs)
        out = Bs[0].shape[1] * n
        B = Bs[0].new_zeros(Bs[0].shape[0], out, k * n)  # (E, out, R)
        for p, Bp in enumerate(Bs):
            B[:, self.rows(out, p), p * k:(p + 1) * k] = Bp
        return A, B

    @staticmethod
    def pack(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A (E, R, in), B (E, out, R) -> PEFT's lora_A (R*E, in), lora_B (out, R*E)."""
        E, R, n_in = A.shape
        return A.reshape(E * R, n_in).contiguous(), B.permute(1, 2, 0).reshape(B.shape[1], R * E).contiguous()

    @staticmethod
    def unpack(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
        """PEFT's lora_A (R*E, in), lora_B (out, R*E) -> A (E, R, in), B (E, out, R) (inverse of `pack`)."""
        A = lora_A.reshape(num_experts, -1, lora_A.shape[-1])  # (E, R, in)
        B = lora_B.reshape(lora_B.shape[0], -1, num_experts).permute(2, 0, 1)  # (E, out, R)
        return A, B

    def factor_keys(self, module: str, prefix: str = ADAPTER_KEY_PREFIX) -> tuple[str, str]:
        return f"{prefix}{module}{LINEAR_KEYS[0]}", f"{prefix}{module}{LINEAR_KEYS[1]}"

    def to_dict(self) -> dict:
        return {"parts": list(self.parts), "transposed": self.transposed, "interleaved": self.interleaved}

    @classmethod
    def from_dict(cls, d: dict) -> ExpertLayout:
        return cls(tuple(d.get("parts") or ()), bool(d.get("transposed")), bool(d.get("interleaved")))


def is_experts_module(module: nn.Module) -> bool:
    """A transformers 5 fused-experts module (`@use_experts_implementation`: it records its weights' layout)."""
    return hasattr(module, "is_transposed") and hasattr(module, "is_concatenated") and any(
        p.ndim == 3 for p in module.parameters(recurse=False))


def expert_layout(module: nn.Module, param: str) -> ExpertLayout | None:
    """The layout of `module.param` when it is a fused expert weight, else None (biases, other tensors)."""
    tensor = getattr(module, param, None)
    if not is_experts_module(module) or not isinstance(tensor, torch.Tensor) or tensor.ndim != 3:
        return None
    parts = GATE_UP_PARTS if param == GATE_UP and getattr(module, "has_gate", True) else ()
    return ExpertLayout(parts, bool(module.is_transposed), bool(parts) and not module.is_concatenated)


def wrapper_modules(module: str, params: list[str]) -> dict[str, str]:
    """Where PEFT saves the factors of each targeted parameter of one module: `params` in registration
    order are wrapped in turn, each ParamWrapper around the previous one, so the first is innermost:
    `module.base_layer....` (one `.base_layer` per later parameter), the last is `module` itself."""
    return {p: module + ".base_layer" * (len(params) - 1 - i) for i, p in enumerate(params)}


def embedding_base_key(module: str) -> str:
    """Where PEFT also saves a targeted embedding's base weight (in the adapter file, unprefixed)."""
    return f"{module}.base_layer.weight"
