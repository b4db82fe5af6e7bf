"""`TrainConfig`: everything a training run depends on, saved as train_config.yaml beside the run.
Defaults are the paper's (section 5): AdamW, lr 2e-5, cosine schedule, warmup ratio 0.03, no weight
decay, alpha = r, dropout 0, adapters on every linear layer, fp32 adapters."""

from __future__ import annotations

import dataclasses
import math
import shlex
from dataclasses import dataclass, field

from ..errors import PissaError
from .methods import TRAIN_METHODS, get_train_method

# Fields that may change between a run and its --resume without changing the run itself.
RESUME_FREE = {"resume", "overwrite", "convert_at_end", "tensorboard"}
STAGES = ("sft", "dpo")
DPO_BETA = 0.1


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as train_config.yaml beside the run."""

    out: str = field(metadata={"flags": ("-o",),
                               "help": "Run folder: checkpoints, logs, the trained adapter, loss.png."})
    model: str | None = field(default=None, metadata={
        "help": "Base model (embedded name, folder or hub id); the adapter is initialised on the fly."})
    init: str | None = field(default=None, metadata={
        "help": "A `pissa init` output folder (residual/ + adapter/); trains it with no SVD."})
    method: str | None = field(default=None, metadata={
        "help": f"One of {', '.join(TRAIN_METHODS)}. Default: pissa with --model, the init's method with --init.",
        "flags": ("-m",)})
    dora: bool = field(default=False, metadata={"help": "DoRA: add a trainable magnitude vector (use_dora)."})
    train_singular_values: bool = field(default=False, metadata={
        "help": "pissa: train the singular values as their own vector, B·diag(S)·A (paper appendix A), with an "
                "orthogonality regulariser; saved as a stock PEFT AdaLoRA adapter."})
    orth_reg_weight: float = field(default=0.1, metadata={
        "help": "--train-singular-values: weight of the regulariser ‖AAᵀ−I‖ + ‖BᵀB−I‖ added to the loss."})
    stage: str = field(default="sft", metadata={
        "help": "sft: supervised, the loss on the answers only (TRL SFTTrainer); dpo: preference tuning on "
                "prompt/chosen/rejected records against the model before training (TRL DPOTrainer)."})
    data: str = field(default="arith", metadata={
        "flags": ("-d",),
        "help": "A .json/.jsonl file (sft: chat `messages`, ShareGPT `conversations`, prompt/completion, Alpaca, "
                "MetaMathQA, GSM8K question/answer, MATH, `text`; dpo: prompt/chosen/rejected), `arith[:split]` "
                "(bundled, synthetic), or a Hugging Face dataset NAME[@CONFIG][:SPLIT], e.g. "
                "openai/gsm8k@main:train (network needed)."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N records."})
    max_length: int = field(default=512, metadata={"help": "Drop examples longer than this many tokens."})
    packing: bool = field(default=False, metadata={
        "help": "sft: pack examples into rows of --max-length tokens (TRL best-fit packing, padding-free: no "
                "attention across examples)."})
    padding_free: bool = field(default=False, metadata={
        "help": "sft: each batch as one row with no padding (TRL padding-free; sdpa/flash attention)."})
    beta: float | None = field(default=None, metadata={
        "help": "dpo: how far the policy may move from the reference (DPO's beta; default 0.1)."})
    rank: int = field(default=16, metadata={"flags": ("-r",),
                                            "help": "Adapter rank r (--model only; --init keeps its rank)."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; default alpha = r (paper)."})
    targets: list[str] | None = field(default=None, metadata={
        "flags": ("-t",), "help": "Module names to adapt; default every linear layer except the output head."})
    niter: int | None = field(default=None, metadata={
        "help": "pissa: randomized-SVD power iterations (fast init); omit for the exact SVD."})
    quant_type: str = field(default="nf4", metadata={
        "help": "qlora/qpissa/loftq: 4-bit type of the base, nf4 or fp4."})
    quant_iters: int = field(default=5, metadata={
        "help": "qpissa/loftq: alternating SVD/quantization steps T (report's Algorithm 1; 1 = one step)."})
    lr: float = field(default=2e-5, metadata={"help": "Peak learning rate (paper: 2e-5)."})
    scheduler: str = field(default="cosine", metadata={"help": "LR schedule (any transformers name)."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Fraction of steps of linear warmup."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (paper: 0)."})
    epochs: float = field(default=1.0, metadata={"help": "Passes over the data (ignored when --max-steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Stop after this many optimizer steps (-1: use --epochs)."})
    batch_size: int = field(default=4, metadata={"flags": ("-b",), "help": "Examples per device per micro-batch."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm (0: off)."})
    precision: str = field(default="fp32", metadata={
        "help": "fp32, or bf16 (base weights in bf16 with autocast; adapters stay fp32)."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations to save memory."})
    seed: int = field(default=0, metadata={"help": "Seed of init, data order and dropout."})
    save_steps: int = field(default=0, metadata={"help": "Checkpoint every N steps, for --resume (0: never)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints."})
    save_residual: bool = field(default=True, metadata={
        "help": "--model with pissa: also write residual/ (the base the adapter needs)."})
    tensorboard: bool = field(default=True, metadata={"help": "Also write TensorBoard logs."})
    convert_at_end: bool = field(default=False, metadata={
        "help": "pissa/qpissa/loftq: also write the trained adapter as a rank-2r LoRA on the original base "
                "(RUN/lora)."})
    resume: bool = field(default=False, metadata={"help": "Continue the run in --out from its last checkpoint."})
    overwrite: bool = field(default=False, metadata={"help": "Delete an existing --out and start again."})

    def __post_init__(self):
        if (self.model is None) == (self.init is None):
            raise PissaError("give exactly one of --model (init on the fly) or --init DIR (a `pissa init` output)")
        if self.method is not None:
            get_train_method(self.method)
        if self.resume and self.overwrite:
            raise PissaError("--resume continues the run in --out, --overwrite deletes it: give one of them")
        if self.precision not in ("fp32", "bf16"):
            raise PissaError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.method == "full" and self.dora:
            raise PissaError("--dora applies to adapters; drop it or choose an adapter --method")
        if self.train_singular_values and self.dora:
            raise PissaError("--train-singular-values and --dora cannot be combined (PEFT's AdaLoRA layout has no "
                             "DoRA magnitude); drop one of them")
        if self.orth_reg_weight < 0:
            raise PissaError(f"--orth-reg-weight must be >= 0, got {self.orth_reg_weight}")
        for name in ("batch_size", "grad_accum", "rank"):
            if getattr(self, name) <= 0:
                raise PissaError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise PissaError(f"--lr must be a finite number > 0, got {self.lr}")
        if self.limit is not None and self.limit <= 0:
            raise PissaError(f"--limit must be a positive number of records, got {self.limit}")
        if self.max_length < 2:
            raise PissaError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        self._check_stage()
        if not 0 <= self.warmup_ratio < 1:
            raise PissaError(f"--warmup-ratio is a fraction of the steps in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise PissaError("nothing to train: give --max-steps > 0 or --epochs > 0")

    def _check_stage(self) -> None:
        if self.stage not in STAGES:
            raise PissaError(f"unknown --stage {self.stage!r}; choose one of: {', '.join(STAGES)}")
        if self.stage == "dpo" and (self.packing or self.padding_free):
            raise PissaError("--packing and --padding-free apply to --stage sft (TRL's DPOTrainer pads its batches); "
                             "drop them")
        if self.beta is not None and self.stage != "dpo":
            raise PissaError("--beta is DPO's; it applies to --stage dpo only")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta > 0):
            raise PissaError(f"--beta must be a finite number > 0, got {self.beta}")

    @property
    def dpo_beta(self) -> float:
        return DPO_BETA if self.beta is None else self.beta

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def command(self) -> str:
        """The `pissa train` command line that repeats this run (options left at default omitted)."""
        parts = ["pissa", "train"]
        for f in dataclasses.fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if f.name in ("resume", "overwrite") or value == f.default:
                continue
            if isinstance(value, bool):
                parts.append(flag if value else "--no-" + flag[2:])
            elif isinstance(value, list):
                parts += [x for v in value for x in (flag, str(v))]
            else:
                parts += [flag, str(value)]
        return shlex.join(parts)
