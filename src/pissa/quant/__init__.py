"""QPiSSA: quantized residuals (NF4/FP4/INT8 through bitsandbytes), error metrics, and the
QPiSSA / LoftQ / QLoRA fitting loops. bitsandbytes is imported lazily (`pip install 'pissa[quant]'`)."""

from .fit import (
    FITS,
    Iterate,
    fit_iterates,
    loftq_decompose,
    loftq_iterates,
    qlora_iterate,
    qpissa_decompose,
    qpissa_iterates,
)
from .formats import FORMATS, INSTALL_HINT, QuantizationError, QuantSpec, digest, fake_quantize, require_bnb
from .loading import (
    CONFIG_KEY,
    annotate_config_,
    bnb_config,
    check_quantized_model,
    keep_exact_cpu_forward_,
    load_kwargs,
    quant_record,
    read_record,
)
from .metrics import errors, frobenius, nuclear, reduction_ratio, relative

__all__ = [
    "CONFIG_KEY",
    "FITS",
    "FORMATS",
    "INSTALL_HINT",
    "Iterate",
    "QuantSpec",
    "QuantizationError",
    "annotate_config_",
    "bnb_config",
    "check_quantized_model",
    "digest",
    "errors",
    "fake_quantize",
    "fit_iterates",
    "keep_exact_cpu_forward_",
    "frobenius",
    "load_kwargs",
    "loftq_decompose",
    "loftq_iterates",
    "nuclear",
    "qlora_iterate",
    "qpissa_decompose",
    "qpissa_iterates",
    "quant_record",
    "read_record",
    "reduction_ratio",
    "relative",
    "require_bnb",
]
