"""`PissaConfig`: how adapters are initialised. Saved in every init's pissa.json so it can be repeated."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..decompose import get_method, make_options
from ..dtypes import parse_dtype
from ..errors import PissaError, check_number, check_regex

QUANT_OPTIONS = ("quant_fit", "quant_iters", "double_quant", "quant_storage", "compute_dtype")


@dataclass
class PissaConfig:
    """How to initialise adapters; saved beside every output so a run can be repeated."""

    rank: int = field(default=16, metadata={"help": "Adapter rank r for every targeted layer.", "flags": ("-r",)})
    alpha: float | None = field(
        default=None, metadata={"help": "LoRA alpha; the update is scaled by alpha/r. Default: alpha = r (scale 1)."}
    )
    method: str = field(default="pissa", metadata={"help": "Decomposition method (see `pissa methods`).",
                                                   "flags": ("-m",)})
    options: dict = field(default_factory=dict, metadata={"help": "Options of the method, e.g. {'niter': 4}."})
    targets: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module or expert-tensor names (suffix match) or one regex (full match); default: every "
                          "linear layer except the output head, and every MoE expert tensor (not the routers)."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules trained in full beside the adapters and saved in it (PEFT modules_to_save), e.g. "
                          "a classifier head; never targeted, never quantized."},
    )
    rank_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Per-layer rank overrides PATTERN=RANK (regex or name suffix)."}
    )
    use_rslora: bool = field(default=False, metadata={"help": "Scale by alpha/sqrt(r) (rsLoRA) instead of alpha/r.",
                                                      "flag": "rslora"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout used in training (paper: 0)."})
    seed: int = field(default=0, metadata={"help": "Seed of every randomized step (per-layer generators)."})
    adapter_dtype: str = field(default="float32", metadata={"help": "Storage dtype of A and B (paper: fp32)."})
    quantize: str | None = field(
        default=None,
        metadata={"flags": ("-q",),
                  "help": "QPiSSA: fit the adapter against the residual quantized to nf4 or fp4 (bitsandbytes "
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
        bad = {k: r for k, r in self.rank_pattern.items() if not isinstance(r, int) or r <= 0}
        if bad:
            raise PissaError(f"rank pattern ranks must be > 0 (whole numbers), got {bad}")
        check_number(self.alpha, "--alpha", above=0)
        check_number(self.dropout, "--dropout", minimum=0, below=1)
        if isinstance(self.targets, str):
            check_regex(self.targets, "--target-regex")
        for pattern in self.rank_pattern:
            check_regex(pattern, "--rank-pattern")
        get_method(self.method)
        make_options(self.method, self.options)  # refuses unknown options now, not mid-run
        parse_dtype(self.adapter_dtype)
        if self.quantize is not None or self.quant_fit != "qpissa":  # a fit without --quantize is refused there
            from .quantized import check_quant_config

            check_quant_config(self)
        else:
            self._check_no_quant_options()

    def _check_no_quant_options(self) -> None:
        """Quantization settings without --quantize would be silently ignored: refuse them."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [f"--{name.replace('_', '-')}" for name in QUANT_OPTIONS if getattr(self, name) != defaults[name]]
        if given:
            raise PissaError(f"{', '.join(given)} set how the residual is quantized; add --quantize nf4 (or fp4), "
                             "or drop them")

    def alpha_for(self, rank: int) -> float:
        """The paper's default alpha = r keeps scale 1 for every layer, overridden ranks included."""
        return float(rank) if self.alpha is None else self.alpha

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
