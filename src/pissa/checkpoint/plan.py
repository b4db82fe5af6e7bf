"""Which checkpoint tensors to decompose, decided without loading any weights.

The model is instantiated on the `meta` device from its config, so PEFT's own matcher
(`adapters.resolve_targets`) picks the modules, exactly as it would on the loaded model; tied
embeddings and GPT-2 Conv1D layers are detected from the module graph. Each targeted module is
then mapped to its tensor in the checkpoint, and shapes, dtypes and ranks are checked against the
shard headers, so a bad target is refused before any output is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters import PissaConfig, check_not_quantized, is_conv1d, lora_config, output_head, resolve_targets
from ..decompose import lora_scale
from ..errors import PissaError
from ..models import is_causal_lm
from .reader import CheckpointReader, TensorEntry

FLOAT_CODES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class Target:
    """One weight to decompose: where PEFT puts its adapter and how it scales it."""

    module: str  # the module name PEFT uses in adapter keys
    rank: int
    scale: float
    kind: str  # linear | conv1d | embedding | conv2d: how the stored tensor maps to (out, in)
    save_base: bool = False  # PEFT also saves a targeted embedding's base weight in the adapter

    def matrix(self, W: torch.Tensor) -> torch.Tensor:
        """The stored weight as the (out, in) matrix PEFT's B @ A updates (as adapters.base_weight)."""
        if self.kind in ("conv1d", "embedding"):
            return W.T  # Conv1D (in, out), Embedding (num, dim) -> (dim, num)
        return W.flatten(1) if self.kind == "conv2d" else W  # Conv2d (out, in, kh, kw) -> (out, in*kh*kw)

    def stored(self, R: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A residual (out, in) back in the stored layout (inverse of `matrix`)."""
        if self.kind in ("conv1d", "embedding"):
            return R.T.contiguous()
        return R.reshape(shape).contiguous()

    def adapter_tensors(self, A: torch.Tensor, B: torch.Tensor, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """A (r, in) and B (out, r) under PEFT's key names and layouts (as adapters.set_factors_)."""
        if self.kind == "embedding":
            return {f"{self.module}.lora_embedding_A": A, f"{self.module}.lora_embedding_B": B}
        if self.kind == "conv2d":
            A = A.reshape(A.shape[0], *shape[1:])  # (r, in, kh, kw)
            B = B.reshape(*B.shape, 1, 1)  # (out, r, 1, 1)
        return {f"{self.module}.lora_A.weight": A, f"{self.module}.lora_B.weight": B}


def embeddings_saved(model, lora, ranks: dict[str, int]) -> set[str]:
    """Targeted input/output embeddings whose base weight PEFT's save_pretrained puts in the adapter
    (peft.utils.save_and_load: save_embedding_layers="auto" turns on when an embedding is targeted)."""
    import re

    from peft.utils.other import EMBEDDING_LAYER_NAMES, match_target_against_key

    targets = lora.target_modules
    if isinstance(targets, str):
        targeted = any(match_target_against_key(targets, n) for n, _ in model.named_modules()
                       if any(re.match(rf"(.*\.)?{e}$", n) for e in EMBEDDING_LAYER_NAMES))
    else:
        targeted = any(e in (targets or ()) for e in EMBEDDING_LAYER_NAMES)
    if not targeted:
        return set()
    layers = {id(m) for m in (model.get_input_embeddings(), output_head(model)) if m is not None}
    return {n for n, m in model.named_modules() if id(m) in layers and n in ranks}


def module_kind(module) -> str:
    from torch import nn

    if is_conv1d(module):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "conv2d" if isinstance(module, nn.Conv2d) else "linear"


@dataclass
class Plan:
    reader: CheckpointReader
    targets: dict[str, Target]  # checkpoint tensor name -> target, in model module order
    lora: object  # peft.LoraConfig equal to the one the in-memory path builds
    model_class: type


def meta_model(folder: Path, trust_remote_code: bool):
    """The model built from `folder`'s config on the meta device (no memory, no weights)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise PissaError(f"could not read {folder}/config.json ({e}); point at a Hugging Face model folder") from e
    cls = AutoModelForCausalLM if is_causal_lm(hf_config) else AutoModel
    with torch.device("meta"):
        return cls.from_config(hf_config, trust_remote_code=trust_remote_code)


def tensor_key(module: str, reader: CheckpointReader, prefix: str) -> str | None:
    """The checkpoint name of `module`'s weight, allowing the base-model prefix to differ."""
    candidates = [f"{module}.weight"]
    if prefix:
        candidates += [f"{prefix}.{module}.weight", f"{module.removeprefix(prefix + '.')}.weight"]
    return next((k for k in candidates if k in reader.weight_map), None)


def check_entry(entry: TensorEntry, param_shape: tuple[int, ...], rank: int, target: Target) -> None:
    """Refuse a target whose stored tensor the decomposition cannot take, naming it."""
    if entry.dtype not in FLOAT_CODES:
        raise PissaError(
            f"{entry.name} is stored as {entry.dtype}, which PiSSA cannot decompose (quantized checkpoint?); "
            "give the unquantized fp32/bf16/fp16 checkpoint"
        )
    if entry.shape != param_shape:
        raise PissaError(
            f"{entry.name} has shape {entry.shape} in the checkpoint but the model config expects {param_shape}; "
            "the config.json does not match the weights"
        )
    out_dim, in_dim = target.matrix(torch.empty(entry.shape, device="meta")).shape
    if rank > min(out_dim, in_dim):
        raise PissaError(
            f"{entry.name}: rank {rank} exceeds min(out, in) = {min(out_dim, in_dim)}; "
            "lower --rank or override it for this layer with --rank-pattern"
        )


def check_tied(model, ranks: dict[str, int]) -> None:
    head = output_head(model)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is None or embed is None or head.weight is not embed.weight:
        return
    modules = dict(model.named_modules())
    tied = [n for n in ranks if modules[n] is head]
    if tied:
        raise PissaError(
            f"target {tied[0]} is the output head, whose weight is tied to the input embeddings; "
            "decomposing it would change the embeddings too. Leave it out of --targets"
        )


def make_plan(folder: str | Path, config: PissaConfig, trust_remote_code: bool = False) -> Plan:
    """Validate the checkpoint and resolve every target to a tensor, rank and scale."""
    folder = Path(folder)
    reader = CheckpointReader(folder)
    model = meta_model(folder, trust_remote_code)
    check_not_quantized(model)
    ranks = resolve_targets(model, config)
    check_tied(model, ranks)
    modules = dict(model.named_modules())
    lora = lora_config(config, model, list(ranks))
    save_base = embeddings_saved(model, lora, ranks)
    targets = {}
    for name, rank in ranks.items():
        key = tensor_key(name, reader, getattr(model, "base_model_prefix", ""))
        if key is None:
            raise PissaError(
                f"layer {name} has no weight tensor {name}.weight in {folder}; the checkpoint's tensor names do "
                "not match its config (converted with other names?); re-export it with save_pretrained or pass "
                "--in-memory"
            )
        module = modules[name]
        scale = lora_scale(config.alpha_for(rank), rank, config.use_rslora)
        target = Target(name, rank, scale, module_kind(module), name in save_base)
        check_entry(reader.entry(key), tuple(module.weight.shape), rank, target)
        targets[key] = target
    return Plan(reader, targets, lora, type(model))
