"""Training methods as data: what each `pissa train --method` initialises, whether its base is quantized,
and whether its adapter changed the base (so that `pissa convert` is needed to apply it to the original
model). "method" in a training config means one of these; the adapter's own init is a decomposition
method (`pissa.decompose` registry) and a quantized base has a fit (`PissaConfig.quant_fit`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..decompose import get_method
from ..errors import PissaError


@dataclass(frozen=True)
class TrainMethod:
    name: str
    help: str
    init: str | None  # decomposition method of the adapter (None: full fine-tuning, no adapter)
    quant_fit: str | None = None  # the base is the residual in 4-bit, fitted this way (PissaConfig.quant_fit)

    @property
    def adapter(self) -> bool:
        return self.init is not None

    @property
    def quantized(self) -> bool:
        return self.quant_fit is not None

    @property
    def converts(self) -> bool:
        """The adapter took part of W out of the base: on the original model it needs `pissa convert`."""
        return self.adapter and get_method(self.init).extracts


TRAIN_METHODS: dict[str, TrainMethod] = {m.name: m for m in (
    TrainMethod("full", "full fine-tuning of every weight", None),
    TrainMethod("lora", "LoRA: A kaiming-uniform, B = 0 (PEFT's default)", "lora-kaiming"),
    TrainMethod("lora-gaussian", "LoRA with A ~ N(0, 1/r^2), B = 0", "lora-gaussian"),
    TrainMethod("pissa", "PiSSA: the adapter holds the top-r singular triplets, the residual is frozen", "pissa"),
    # QLoRA quantizes W itself: a LoRA init has nothing to fit, so its residual is W (the qpissa fit of B = 0).
    TrainMethod("qlora", "QLoRA: LoRA on the base quantized to 4 bits", "lora-kaiming", quant_fit="qpissa"),
    TrainMethod("qpissa", "QPiSSA: PiSSA on the residual quantized to 4 bits (paper Algorithm 1)", "pissa",
                quant_fit="qpissa"),
    TrainMethod("loftq", "LoftQ: the adapter fits the quantization error of the 4-bit base", "pissa",
                quant_fit="loftq"),
)}


def get_train_method(name: str) -> TrainMethod:
    if name not in TRAIN_METHODS:
        raise PissaError(f"unknown --method {name!r}; choose one of: {', '.join(TRAIN_METHODS)}")
    return TRAIN_METHODS[name]


def method_of_init(manifest: dict) -> TrainMethod:
    """The training method of a `pissa init` output: the registered one with its decomposition and fit, or,
    for another decomposition (cur, robust, ...), a method named after it."""
    quantization = manifest.get("quantization")
    fit = (quantization.get("fit") or "qpissa") if quantization else None  # a record without "fit" is qpissa
    init = manifest["method"]
    for method in TRAIN_METHODS.values():
        if method.init == init and method.quant_fit == fit:
            return method
    return TrainMethod(init, f"an adapter initialised with {init}", init, fit)
