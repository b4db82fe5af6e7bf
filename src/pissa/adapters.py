"""In-memory PiSSA init of a live `transformers` model through PEFT.

Targets are matched with PEFT's own matcher, so the set we decompose is exactly the set PEFT
wraps. Each targeted weight W is decomposed in fp32 (see `pissa.decompose`); A and B go into the
LoRA layers, the residual replaces the base weight. Each supported module type has a 2-D
(out, in) view of its weight (`base_weight`) and writers back (`set_base_weight_`, `set_factors_`):
- GPT-2 style Conv1D weights are stored transposed (in, out): decomposed as W.T, written back transposed.
- nn.Conv2d kernels (out, in, kh, kw) are decomposed as (out, in*kh*kw); PEFT's conv LoRA is
  lora_A = Conv2d(in, r, k) with weight A.reshape(r, in, kh, kw), lora_B = Conv2d(r, out, 1) with
  weight B (out, r, 1, 1), so its update is exactly B @ A reshaped to the kernel.
- nn.Embedding weights are (num, dim) and PEFT's update is (B @ A).T with lora_embedding_A
  (r, num) and lora_embedding_B (dim, r): decomposed as W.T (dim, num).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .decompose import decompose, get_method, layer_seed, make_options
from .errors import PissaError
from .models import is_causal_lm_model, parse_dtype

ADAPTER_NAME = "default"


@dataclass
class PissaConfig:
    """How to initialise adapters; saved beside every output so a run can be repeated."""

    rank: int = field(default=16, metadata={"help": "Adapter rank r for every targeted layer."})
    alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha; the update is scaled by alpha/r. Default: alpha = r (scale 1)."}
    )
    method: str = field(default="pissa", metadata={"help": "Decomposition method (see `pissa methods`)."})
    options: dict = field(default_factory=dict, metadata={"help": "Options of the method, e.g. {'niter': 4}."})
    targets: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (suffix match) or one regex (full match); default: every linear "
                          "layer except the output head."},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-layer rank overrides: {regex or name suffix: rank}."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout used in training (paper: 0)."})
    seed: int = field(default=0, metadata={"help": "Seed of every randomized step (per-layer generators)."})
    adapter_dtype: str = field(default="float32", metadata={"help": "Storage dtype of A and B (paper: fp32)."})
    quantize: str | None = field(
        default=None,
        metadata={"help": "QPiSSA: fit the adapter against the residual quantized to nf4 or fp4 (bitsandbytes "
                          "4-bit, as the loader will quantize it). Default: no quantization."},
    )
    quant_fit: str = field(
        default="qpissa",
        metadata={"help": "With --quantize, how the adapter is fitted: qpissa (SVD of W, then quantize the "
                          "residual; paper Algorithm 1) or loftq (quantize W, then SVD of the quantization error; "
                          "Li et al. 2023)."},
    )
    quant_iters: int = field(
        default=5, metadata={"help": "Alternating SVD/quantization steps T of the quantized fit (paper Algorithm 1; "
                                     "1 = plain QPiSSA or LoftQ, paper uses 5)."}
    )
    double_quant: bool = field(
        default=False, metadata={"help": "Also quantize the 4-bit absmax values (bnb_4bit_use_double_quant)."}
    )
    quant_storage: str = field(
        default="uint8", metadata={"help": "Packed 4-bit storage dtype (bnb_4bit_quant_storage; bfloat16 for FSDP)."}
    )
    compute_dtype: str | None = field(
        default=None, metadata={"help": "bnb_4bit_compute_dtype to record for loading; default: the residual dtype."}
    )

    def __post_init__(self):
        if self.rank <= 0:
            raise PissaError(f"--rank must be > 0, got {self.rank}")
        bad = {k: r for k, r in self.rank_pattern.items() if r <= 0}
        if bad:
            raise PissaError(f"rank pattern ranks must be > 0, got {bad}")
        if self.alpha is not None and self.alpha <= 0:
            raise PissaError(f"--alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise PissaError(f"--dropout must be in [0, 1), got {self.dropout}")
        get_method(self.method)
        make_options(self.method, self.options)  # refuses unknown options now, not mid-run
        parse_dtype(self.adapter_dtype)
        if self.quantize is not None or self.quant_fit != "qpissa":  # a fit without --quantize is refused there
            from .quant.config import check_quant_config

            check_quant_config(self)

    def alpha_for(self, rank: int) -> float:
        """The paper's default alpha = r keeps scale 1 for every layer, overridden ranks included."""
        return float(rank) if self.alpha is None else self.alpha

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def fields_help(cls) -> dict[str, str]:
    """Field name -> help text of a config dataclass (the CLI builds its option help from it)."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def output_head(model: nn.Module) -> nn.Module | None:
    getter = getattr(model, "get_output_embeddings", None)
    return getter() if getter else None


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every nn.Linear / Conv1D in the model except the output head, by full name."""
    head = output_head(model)
    return {n: m for n, m in model.named_modules() if (isinstance(m, nn.Linear) or is_conv1d(m)) and m is not head}


def default_targets(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the head, as PEFT's `target_modules` list."""
    return sorted({name.rsplit(".", 1)[-1] for name in linear_modules(model)})


def lora_config(config: PissaConfig, model: nn.Module, matched: list[str]):
    """The PEFT LoraConfig for `config`; `matched` are the module names it targets."""
    from peft import LoraConfig

    modules = dict(model.named_modules())
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha_for(config.rank),
        target_modules=config.targets if config.targets is not None else default_targets(model),
        rank_pattern=dict(config.rank_pattern),
        # alpha = r per layer keeps scale 1 where the rank is overridden, as the paper does.
        alpha_pattern={k: float(r) for k, r in config.rank_pattern.items()} if config.alpha is None else {},
        lora_dropout=config.dropout,
        use_rslora=config.use_rslora,
        fan_in_fan_out=any(is_conv1d(modules[n]) for n in matched),
        init_lora_weights=True,
        # plain nn.Modules (a small CNN) have no HF config and get no task type
        task_type="CAUSAL_LM" if is_causal_lm_model(model) else None,
    )


def resolve_targets(model: nn.Module, config: PissaConfig) -> dict[str, int]:
    """Full module name -> rank for every module PEFT will wrap, refusing bad targets up front."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    targets = config.targets if config.targets is not None else default_targets(model)
    probe = LoraConfig(r=config.rank, target_modules=targets)
    modules = dict(model.named_modules())
    matched = [n for n in modules if n and check_target_module_exists(probe, n)]
    if not matched:
        raise PissaError(
            f"no module matches targets {targets!r}; linear layers in this model are named: "
            f"{', '.join(default_targets(model))}"
        )
    unsupported = [n for n in matched if not is_supported(modules[n])]
    if unsupported:
        kinds = sorted({type(modules[n]).__name__ for n in unsupported})
        raise PissaError(
            f"targets match {len(unsupported)} modules that are not linear layers, Conv2d or Embedding "
            f"({', '.join(kinds)}), e.g. {unsupported[0]}; narrow --targets to supported layers"
        )
    for n in matched:
        check_module(model, n, modules[n])
    # PEFT's own pattern lookup, so our ranks are the ones PEFT gives each layer.
    return {n: config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), n), config.rank)
            for n in matched}


def check_not_quantized(model: nn.Module) -> None:
    quant = getattr(model, "hf_quantizer", None) or getattr(getattr(model, "config", None), "quantization_config", None)
    if quant is not None:
        raise PissaError(
            "the model's weights are already quantized; PiSSA needs the full-precision weights. Load the "
            "unquantized checkpoint (QPiSSA quantizes the residual after the decomposition)"
        )


def is_supported(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or is_conv1d(module)


def check_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Refuse Conv2d and Embedding variants whose PEFT LoRA layer could not reproduce the output."""
    if isinstance(module, nn.Conv2d):
        # PEFT's lora_A conv copies kernel, stride and padding only, and B's 1x1 conv is grouped.
        bad = {"groups": (module.groups, 1), "dilation": (module.dilation, (1, 1)),
               "padding_mode": (module.padding_mode, "zeros")}
        for key, (value, ok) in bad.items():
            if value != ok:
                raise PissaError(
                    f"{name}: Conv2d with {key}={value!r} is not supported by PiSSA init (only {key}={ok!r}: "
                    "the kernel is decomposed as one (out, in*kh*kw) matrix); leave this layer out of --targets"
                )
    head = output_head(model)
    if isinstance(module, nn.Embedding) and head is not None and head.weight is module.weight:
        raise PissaError(
            f"{name}: this embedding is tied to the output head (tie_word_embeddings), so replacing it by "
            "its residual would change the head too; leave it out of --targets or untie the weights first"
        )


def base_weight(module: nn.Module) -> torch.Tensor:
    """The 2-D (out, in) view of a supported layer's weight, in PEFT's orientation of B @ A."""
    if is_conv1d(module) or isinstance(module, nn.Embedding):
        return module.weight.T  # Conv1D (in, out), Embedding (num, dim) -> (dim, num)
    if isinstance(module, nn.Conv2d):
        return module.weight.flatten(1)  # (out, in*kh*kw)
    return module.weight


def set_base_weight_(module: nn.Module, W: torch.Tensor) -> None:
    """Write a 2-D (out, in) weight back into `module` in its own layout (inverse of base_weight)."""
    if is_conv1d(module) or isinstance(module, nn.Embedding):
        module.weight.data = W.T.contiguous()
    else:
        module.weight.data = W.reshape(module.weight.shape).contiguous()  # Conv2d: (out, in, kh, kw)


def set_factors_(layer, A: torch.Tensor, B: torch.Tensor) -> None:
    """Write A (r, in) and B (out, r) into a PEFT LoRA layer in its layout (Linear, Conv2d, Embedding)."""
    if ADAPTER_NAME in getattr(layer, "lora_embedding_A", {}):
        layer.lora_embedding_A[ADAPTER_NAME].data = A  # (r, num)
        layer.lora_embedding_B[ADAPTER_NAME].data = B  # (dim, r)
        return
    lora_A, lora_B = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
    lora_A.weight.data = A.reshape(lora_A.weight.shape)  # (r, in) or conv (r, in, kh, kw)
    lora_B.weight.data = B.reshape(lora_B.weight.shape)  # (out, r) or conv (out, r, 1, 1)


def check_targets(model: nn.Module, ranks: dict[str, int]) -> None:
    """Refuse ranks beyond a layer's size and non-finite weights before touching the model."""
    from .decompose import check_weight

    modules = dict(model.named_modules())
    for name, rank in ranks.items():
        check_weight(base_weight(modules[name]).detach(), rank, f"{name}.weight")


def init_model(
    model: nn.Module,
    config: PissaConfig | None = None,
    progress: Callable[[int, int, str], None] | None = None,
):
    """Wrap `model` (in place) with PEFT LoRA layers initialised by `config.method`.

    Returns (PeftModel, report) where report maps each layer name to its decomposition info.
    `progress(done, total, layer_name)` is called after each layer.
    The model's outputs are unchanged: base weight = residual, and scale * B @ A = what was removed.
    """
    from peft import get_peft_model

    config = config or PissaConfig()
    check_not_quantized(model)
    ranks = resolve_targets(model, config)
    check_targets(model, ranks)
    peft_model = get_peft_model(model, lora_config(config, model, list(ranks)))
    report = {}
    modules = dict(peft_model.base_model.model.named_modules())
    for done, name in enumerate(ranks, 1):
        report[name] = init_layer_(modules[name], name, config)
        if progress:
            progress(done, len(ranks), name)
    return peft_model, report


def decompose_weight(W: torch.Tensor, name: str, config: PissaConfig, rank: int, scale: float):
    """Decompose one layer's (out, in) weight per `config`: the single per-tensor entry point
    shared by the in-memory and streaming paths, so both give the same tensors.
    With `config.quantize` set it runs QPiSSA or LoftQ (`config.quant_fit`, pissa.quant), fitting
    against the quantized residual."""
    # MKL's GEMM/LAPACK bits depend on the data's address alignment: an fp32 weight mmap'd from a
    # file, loaded by transformers or read into a fresh buffer would otherwise decompose to
    # different last bits. A fresh (allocator-aligned) copy makes the result depend on values only.
    # Other dtypes are copied anyway by the fp32 cast inside the decomposition.
    W = W.detach().clone() if W.dtype == torch.float32 else W
    if config.quantize is not None:
        from .quant.config import quantized_decompose

        return quantized_decompose(W, name, config, rank, scale)
    return decompose(
        W,
        config.method,
        rank,
        scale=scale,
        options=config.options,
        seed=layer_seed(config.seed, name),
        adapter_dtype=parse_dtype(config.adapter_dtype),
        name=f"{name}.weight",
    )


@torch.no_grad()
def init_layer_(layer, name: str, config: PissaConfig) -> dict:
    """Decompose one PEFT LoRA layer's base weight in place; returns its info."""
    start = time.perf_counter()
    base = layer.get_base_layer()
    factors = decompose_weight(base_weight(base), name, config, layer.r[ADAPTER_NAME], layer.scaling[ADAPTER_NAME])
    set_factors_(layer, factors.A, factors.B)  # A (r, in), B (out, r)
    set_base_weight_(base, factors.residual)
    return {**factors.info, "seconds": time.perf_counter() - start}


def residual_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's state dict with the residual weights under their original names."""
    state = peft_model.get_base_model().state_dict()
    adapter_parts = (".lora_", ".ranknum.")  # ranknum: AdaLoRA's (not saved) rank buffer
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if not any(p in k for p in adapter_parts)}

