"""Pure tensor math: `decompose(W, method, rank, ...) -> Factors`. Imports torch only.

Importing the method modules fills the registry; add a method by registering it in a new file
and importing that file here.
"""

from . import cur, lora, robust, svd  # noqa: F401  (registers methods)
from .base import (
    METHODS,
    DecompositionError,
    Factors,
    Method,
    check_weight,
    decompose,
    decompose_batch,
    get_method,
    layer_seed,
    lora_scale,
    make_options,
    register,
)
from .svd import randomized_svd

__all__ = [
    "METHODS",
    "DecompositionError",
    "Factors",
    "Method",
    "check_weight",
    "decompose",
    "decompose_batch",
    "get_method",
    "layer_seed",
    "lora_scale",
    "make_options",
    "randomized_svd",
    "register",
]
