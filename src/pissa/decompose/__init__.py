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
    make_options,
    register,
    reused_fp32_copies,
)
from .linalg import balanced, factored_svd, lora_scale
from .svd import randomized_svd

__all__ = [
    "METHODS",
    "balanced",
    "DecompositionError",
    "Factors",
    "Method",
    "check_weight",
    "decompose",
    "decompose_batch",
    "factored_svd",
    "get_method",
    "layer_seed",
    "lora_scale",
    "make_options",
    "randomized_svd",
    "register",
    "reused_fp32_copies",
]
