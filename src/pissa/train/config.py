"""`TrainConfig`: everything a training run depends on, saved as train_config.yaml beside the run.
Defaults are the paper's (section 5): AdamW, lr 2e-5, cosine schedule, warmup ratio 0.03, no weight
decay, alpha = r, dropout 0, adapters on every linear layer, fp32 adapters."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from ..data.tasks import CAUSAL_LM, get_task
from ..errors import PissaError, check_number
from .methods import TRAIN_METHODS, get_train_method

# Fields that may change between a run and its --resume without changing the run itself.
RESUME_FREE = {"resume", "overwrite", "convert_at_end", "tensorboard"}
STAGES = ("sft", "dpo")
DPO_BETA = 0.1
# Fields that shape the adapter initialised from --model; an --init folder brings its own.
INIT_FROM_MODEL = ("rank", "alpha", "targets", "niter", "quant_type", "quant_iters")
DEFAULT_RANK, DEFAULT_QUANT_TYPE, DEFAULT_QUANT_ITERS = 16, "nf4", 5


def schedulers() -> list[str]:
    """transformers' learning-rate schedule names, so a typo is refused before anything is loaded."""
    from transformers import SchedulerType

    return [s.value for s in SchedulerType]


def absolute_if_local(spec: str | None) -> str | None:
    """A path that exists here, made absolute (the run then works from any directory); a hub id, an embedded
    name or `arith` unchanged."""
    if spec is None or not Path(spec).expanduser().exists():
        return spec
    return str(Path(spec).expanduser().resolve())


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


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
    task: str = field(default=CAUSAL_LM, metadata={
        "help": f"{CAUSAL_LM}: a causal LM (--stage sft/dpo); classify: sequence classification of `text` "
                "(+ `text_pair`) / `label` records; image-classify: images (a folder tree ROOT/<label>/<image> or an "
                ".npz of images and labels). Classifiers get a new head, trained in full and saved in the adapter."})
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
    rank: int | None = field(default=None, metadata={"flags": ("-r",), "help": (
        f"Adapter rank r (--model only, default {DEFAULT_RANK}; --init keeps its rank).")})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; default alpha = r (paper)."})
    targets: list[str] | None = field(default=None, metadata={
        "flags": ("-t",),
        "help": "Module names to adapt; default every linear layer except the output head, and MoE expert tensors."})
    niter: int | None = field(default=None, metadata={
        "help": "pissa: randomized-SVD power iterations (fast init); omit for the exact SVD."})
    quant_type: str | None = field(default=None, metadata={
        "help": f"qlora/qpissa/loftq with --model: 4-bit type of the base, nf4 or fp4 (default {DEFAULT_QUANT_TYPE})."})
    quant_iters: int | None = field(default=None, metadata={
        "help": "qpissa/loftq with --model: alternating SVD/quantization steps T (report's Algorithm 1; 1 = one "
                f"step; default {DEFAULT_QUANT_ITERS})."})
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
        self.init, self.model, self.data = (absolute_if_local(p) for p in (self.init, self.model, self.data))
        self._check_numbers()
        self._check_init_options()
        self._check_stage()
        self._check_task()
        if self.scheduler not in schedulers():
            raise PissaError(f"unknown --scheduler {self.scheduler!r}; choose one of: {', '.join(schedulers())}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise PissaError("nothing to train: give --max-steps > 0 or --epochs > 0")

    def _check_numbers(self) -> None:
        """Every number finite and in range, named by its flag, before anything is loaded or written."""
        for name in ("batch_size", "grad_accum", "rank", "limit", "save_total_limit", "quant_iters"):
            check_number(getattr(self, name), flag_name(name), minimum=1)
        for name in ("orth_reg_weight", "weight_decay", "max_grad_norm", "save_steps", "niter"):
            check_number(getattr(self, name), flag_name(name), minimum=0)
        check_number(self.lr, "--lr", above=0)
        check_number(self.alpha, "--alpha", above=0)
        check_number(self.epochs, "--epochs")
        check_number(self.warmup_ratio, "--warmup-ratio", minimum=0, below=1)
        check_number(self.max_length, "--max-length", minimum=2)

    def _check_init_options(self) -> None:
        """With --init the adapter exists already: options that shape a new one would be silently ignored."""
        if self.init is None:
            return
        given = [flag_name(name) for name in INIT_FROM_MODEL if getattr(self, name) is not None]
        if given:
            raise PissaError(f"{', '.join(given)}: options for a new adapter, but --init {self.init} already holds "
                             "one (its rank, targets and quantization come from that folder); drop them, or re-run "
                             "`pissa init` with them")

    def _check_stage(self) -> None:
        if self.stage not in STAGES:
            raise PissaError(f"unknown --stage {self.stage!r}; choose one of: {', '.join(STAGES)}")
        if self.stage == "dpo" and (self.packing or self.padding_free):
            raise PissaError("--packing and --padding-free apply to --stage sft (TRL's DPOTrainer pads its batches); "
                             "drop them")
        if self.beta is not None and self.stage != "dpo":
            raise PissaError("--beta is DPO's; it applies to --stage dpo only")
        check_number(self.beta, "--beta", above=0)

    def _check_task(self) -> None:
        """A classifier task trains with a cross-entropy on the head: the LM-only options do not apply."""
        if get_task(self.task) is None:
            return
        lm_only = {"--stage dpo": self.stage == "dpo", "--packing": self.packing, "--padding-free": self.padding_free,
                   "--train-singular-values": self.train_singular_values}
        given = [flag for flag, on in lm_only.items() if on]
        if given:
            raise PissaError(f"{', '.join(given)}: not for --task {self.task} (they apply to causal LMs); drop them")

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
