"""The SFT recipe behind `pissa train`: one readable class, setup -> train -> save.

It runs on `transformers.Trainer` + PEFT, so `accelerate launch` / `torchrun` (DDP, FSDP,
DeepSpeed) work with no code change. Two ways in:

- `--init DIR`: a `pissa init` output. The residual model and the adapter load as stock
  artefacts (`AutoModelForCausalLM` + `PeftModel.from_pretrained(is_trainable=True)`); no SVD.
- `--model MODEL --method M`: the adapter is initialised on the fly, in memory
  (`pissa.adapters`), with the same per-layer seeds as `pissa init`, so both give the same run.

Defaults are the paper's (section 5): AdamW, lr 2e-5, cosine schedule, warmup ratio 0.03, no
weight decay, alpha = r, dropout 0, adapters on every linear layer, fp32 adapters.

A run folder holds:
    train_config.yaml    the resolved config; its first line is the command that repeats the run
    checkpoints/         Trainer checkpoints (adapter + optimizer + scheduler + RNG) for --resume
    log.jsonl, log.csv   loss, grad norm, lr, tokens and tokens/s per step; tensorboard/ the same
    adapter/             the trained PEFT adapter (model/ for --method full)
    residual/, init/     with --model --method pissa: the frozen residual base the adapter needs, and
                         a `pissa init`-style folder with the initial A, B (what `pissa convert` reads);
                         qlora/qpissa/loftq with --model write the whole init (residual inside) to init/ first
    lora/                with --convert-at-end: the trained adapter as a rank-2r LoRA on the original base
    loss.png, summary.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapters import (
    ADAPTER_NAME,
    PissaConfig,
    check_not_quantized,
    check_targets,
    init_layer_,
    lora_config,
    resolve_targets,
)
from .checkpoint.atomic import atomic_output_dir
from .errors import PissaError

CONFIG_FILE = "train_config.yaml"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
# train method -> the init method of its adapter (pissa.decompose registry name)
ADAPTER_METHODS = {"lora": "lora-kaiming", "lora-gaussian": "lora-gaussian", "pissa": "pissa",
                   "qlora": "lora-kaiming", "qpissa": "pissa", "loftq": "pissa"}
# The base is the residual quantized to 4 bits (pissa.quant); method -> PissaConfig.quant_fit, how the
# adapter is fitted to it (qlora: a LoRA init, B = 0, has nothing to fit).
QUANT_METHODS = {"qlora": "qpissa", "qpissa": "qpissa", "loftq": "loftq"}
CONVERTIBLE_METHODS = ("pissa", "qpissa", "loftq")  # --convert-at-end: an adapter that changed the base
METHODS = ("full", *ADAPTER_METHODS)
# Fields that may change between a run and its --resume without changing the run itself.
RESUME_FREE = {"resume", "overwrite", "convert_at_end", "tensorboard"}


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as train_config.yaml beside the run."""

    out: str = field(metadata={"help": "Run folder: checkpoints, logs, the trained adapter, loss.png."})
    model: str | None = field(default=None, metadata={
        "help": "Base model (embedded name, folder or hub id); the adapter is initialised on the fly."})
    init: str | None = field(default=None, metadata={
        "help": "A `pissa init` output folder (residual/ + adapter/); trains it with no SVD."})
    method: str | None = field(default=None, metadata={
        "help": f"One of {', '.join(METHODS)}. Default: pissa with --model, the init's method with --init."})
    dora: bool = field(default=False, metadata={"help": "DoRA: add a trainable magnitude vector (use_dora)."})
    train_singular_values: bool = field(default=False, metadata={
        "help": "pissa: train the singular values as their own vector, B·diag(S)·A (paper appendix A), with an "
                "orthogonality regulariser; saved as a stock PEFT AdaLoRA adapter."})
    orth_reg_weight: float = field(default=0.1, metadata={
        "help": "--train-singular-values: weight of the regulariser ‖AAᵀ−I‖ + ‖BᵀB−I‖ added to the loss."})
    data: str = field(default="arith", metadata={
        "help": "A .json/.jsonl file (Alpaca, MetaMathQA or chat `messages`), `arith[:split]` (bundled, "
                "synthetic), or a Hugging Face dataset NAME[@CONFIG][:SPLIT], e.g. openai/gsm8k@main:train "
                "(needs `datasets` and network)."})
    limit: int | None = field(default=None, metadata={"help": "Use only the first N records."})
    max_length: int = field(default=512, metadata={"help": "Drop examples longer than this many tokens."})
    rank: int = field(default=16, metadata={"help": "Adapter rank r (--model only; --init keeps its rank)."})
    alpha: float | None = field(default=None, metadata={"help": "LoRA alpha; default alpha = r (paper)."})
    targets: list[str] | None = field(default=None, metadata={
        "help": "Module names to adapt; default every linear layer except the output head."})
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
    batch_size: int = field(default=4, metadata={"help": "Examples per device per micro-batch."})
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
        if self.method is not None and self.method not in METHODS:
            raise PissaError(f"unknown --method {self.method!r}; choose one of: {', '.join(METHODS)}")
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
        if self.lr <= 0:
            raise PissaError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise PissaError(f"--warmup-ratio is a fraction of the steps in [0, 1), got {self.warmup_ratio}")
        if self.max_steps == 0 or (self.max_steps < 0 and self.epochs <= 0):
            raise PissaError("nothing to train: give --max-steps > 0 or --epochs > 0")

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


class SFTRecipe:
    """Supervised fine-tuning with the loss on response tokens: `setup()`, `train()`, `save()`.

    `callbacks` are extra TrainerCallbacks; `progress(step, max_steps, loss)` is called per step.
    """

    def __init__(self, config: TrainConfig, callbacks=(), progress=None):
        self.config = config
        self.out = Path(config.out)
        self.callbacks = list(callbacks)
        self.progress = progress
        self.init_report: dict = {}
        self.initial_adapter: dict[str, torch.Tensor] = {}

    # --- setup -----------------------------------------------------------------------------------

    def setup(self) -> SFTRecipe:
        """Check the run folder, load model + adapter + data, and build the Trainer."""
        from accelerate import PartialState

        self._check_out()
        self.method = self._resolve_method()
        if self.config.convert_at_end and self.method not in CONVERTIBLE_METHODS:
            raise PissaError(f"--convert-at-end rewrites a PiSSA adapter as a LoRA on the original model; a "
                             f"{self.method} run needs no conversion, drop --convert-at-end")
        if self.config.train_singular_values and self.method != "pissa":
            raise PissaError(f"--train-singular-values trains PiSSA's singular values; it applies to --method pissa, "
                             f"not {self.method}")
        self.args = self._training_args()
        state = PartialState()  # the process group under torchrun / accelerate launch (a no-op alone)
        self.tokenizer = load_tokenizer(self._tokenizer_source())
        self.dataset = self._load_data()  # bad data fails here, before anything is written
        state.wait_for_everyone()  # every rank has checked --out before rank 0 creates it
        fresh = not self.config.resume
        if state.is_main_process:
            self._prepare_out()
        state.wait_for_everyone()
        try:
            torch.manual_seed(self.config.seed)
            self.model = self._load_model()
            self.trainer = self._trainer()
        except BaseException:
            if fresh and state.is_main_process:
                shutil.rmtree(self.out, ignore_errors=True)  # a run that never started leaves nothing behind
            raise
        return self

    def _check_out(self) -> None:
        c, out = self.config, self.out
        if c.resume:
            if not self._last_checkpoint():
                raise PissaError(f"--resume: {out} has no checkpoint under {CHECKPOINTS}/ to continue from; "
                                 "drop --resume to start a new run")
            self._check_same_config()
        elif out.exists() and not c.overwrite:
            raise PissaError(f"run folder {out} already exists; pass --resume to continue it, --overwrite to "
                             "replace it, or choose another --out")

    def _check_same_config(self) -> None:
        import yaml

        saved = yaml.safe_load((self.out / CONFIG_FILE).read_text())
        now = self.config.to_dict()
        changed = sorted(k for k in now if k not in RESUME_FREE and saved.get(k) != now[k])
        if changed:
            raise PissaError(f"--resume with different options than the run in {self.out}: {', '.join(changed)}; "
                             f"repeat the command in {self.out / CONFIG_FILE}")

    def _last_checkpoint(self) -> str | None:
        from transformers.trainer_utils import get_last_checkpoint

        folder = self.out / CHECKPOINTS
        return get_last_checkpoint(str(folder)) if folder.is_dir() else None

    def _resolve_method(self) -> str:
        c = self.config
        if c.init is None:
            method = c.method or "pissa"
            if method in QUANT_METHODS:
                check_quant_available(method)
            return method
        from .manifest import read_manifest

        manifest = read_manifest(c.init)
        made_with = manifest["method"]
        names = {"lora-kaiming": "lora", "lora-gaussian": "lora-gaussian", "pissa": "pissa"}
        method = names.get(made_with, made_with)
        quantization = manifest.get("quantization")
        if quantization:  # a record without "fit" predates LoftQ inits: qpissa
            fitted = "loftq" if quantization.get("fit") == "loftq" else "qpissa"
            method = {"pissa": fitted, "lora": "qlora"}.get(method, method)
        if c.method not in (None, method):
            raise PissaError(f"--init {c.init} was made with method {made_with!r} (it trains as --method {method}); "
                             f"--method {c.method} does not apply to it (drop --method, or re-run `pissa init` with "
                             "the method you want)")
        return method

    def _training_args(self):
        from transformers import TrainingArguments

        c = self.config
        return TrainingArguments(
            output_dir=str(self.out / CHECKPOINTS),
            learning_rate=c.lr,
            lr_scheduler_type=c.scheduler,
            warmup_steps=c.warmup_ratio,  # a float < 1 is a ratio of the total steps
            weight_decay=c.weight_decay,
            optim="adamw_torch",
            num_train_epochs=c.epochs,
            max_steps=c.max_steps,
            per_device_train_batch_size=c.batch_size,
            gradient_accumulation_steps=c.grad_accum,
            max_grad_norm=c.max_grad_norm,
            bf16=c.precision == "bf16",
            # Named only when on: transformers 5 renames it (activation_checkpointing) and warns on the old name.
            **({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}}
               if c.gradient_checkpointing else {}),
            seed=c.seed,
            data_seed=c.seed,
            logging_steps=1,
            save_strategy="steps" if c.save_steps > 0 else "no",
            save_steps=c.save_steps if c.save_steps > 0 else 500,
            save_total_limit=c.save_total_limit,
            report_to="none",  # our MetricsLogger writes JSONL/CSV/TensorBoard itself
            include_num_input_tokens_seen="non_padding",
            disable_tqdm=True,
            remove_unused_columns=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=torch.cuda.is_available(),
            # With no GPU, say so: accelerate then builds a gloo process group under torchrun/accelerate launch.
            use_cpu=not torch.cuda.is_available(),
        )

    def _tokenizer_source(self) -> Path | str:
        from .models import resolve_model

        if self.config.init is not None:
            return Path(self.config.init) / "residual"
        return resolve_model(self.config.model)

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.config.precision == "bf16" else "float32"

    def _load_model(self):
        c = self.config
        if c.init is not None:
            return self._with_singular_values(load_init_dir(c.init, self.dtype, c.dora, self.args.device))
        if self.method in QUANT_METHODS:
            return self._quantized_on_the_fly()
        from .models import load_model

        model, _, self.model_path = load_model(c.model, self.dtype)
        model.to(self.args.device)  # decompose where the weights will train (GPU when there is one)
        if self.method == "full":
            return model.requires_grad_(True)
        peft_model, self.init_report = init_adapters(model, self.pissa_config(), c.dora)
        self.initial_adapter = adapter_state(peft_model)  # conversion to a LoRA needs the starting A, B
        self.initial_config = peft_model.peft_config[ADAPTER_NAME]
        return self._with_singular_values(peft_model)

    def _with_singular_values(self, peft_model):
        """With --train-singular-values, the PiSSA adapter re-expressed as B·diag(S)·A (pissa.singular_values)."""
        if not self.config.train_singular_values:
            return peft_model
        from .singular_values import to_singular_value_adapters

        return to_singular_value_adapters(peft_model, self.config.orth_reg_weight, self._planned_steps())

    def _planned_steps(self) -> int:
        """Optimizer steps this run will take (recorded in the AdaLoRA config, which requires one)."""
        c, world = self.config, self.args.world_size
        if c.max_steps > 0:
            return c.max_steps
        batches = math.ceil(len(self.dataset) / (c.batch_size * world))
        return math.ceil(c.epochs * batches / c.grad_accum)

    def _quantized_on_the_fly(self):
        """QLoRA / QPiSSA from --model: `pissa init --quantize` into RUN/init (rank 0, once), then load it
        in 4-bit like --init. transformers quantizes at load, so the residual goes through disk."""
        from accelerate import PartialState

        from .initialize import run_init

        init_dir = self.out / "init"
        with PartialState().main_process_first():
            if PartialState().is_main_process and not (init_dir / "pissa.json").exists():
                run_init(self.config.model, self.pissa_config(), init_dir, dtype=self.dtype)
        return load_init_dir(init_dir, self.dtype, self.config.dora, self.args.device)

    def pissa_config(self) -> PissaConfig:
        c = self.config
        base_method = ADAPTER_METHODS.get(self.method, "pissa")
        options = {"niter": c.niter} if c.niter is not None and base_method == "pissa" else {}
        quant = {"quantize": c.quant_type, "quant_iters": c.quant_iters, "quant_fit": QUANT_METHODS[self.method]} \
            if self.method in QUANT_METHODS else {}
        return PissaConfig(rank=c.rank, alpha=c.alpha, method=base_method, options=options, targets=c.targets,
                           seed=c.seed, **quant)

    def _load_data(self):
        from .data import build_dataset

        return build_dataset(self.config.data, self.tokenizer, self.config.max_length, self.config.limit)

    def _trainer(self):
        from transformers import PrinterCallback, Trainer

        from .data import PadCollator, pad_id
        from .trainlog import MetricsLogger, ProgressHook

        callbacks = [MetricsLogger(self.out, tensorboard=self.config.tensorboard)]
        if self.progress is not None:
            callbacks.append(ProgressHook(self.progress))
        trainer = Trainer(model=self.model, args=self.args, train_dataset=self.dataset,
                          data_collator=PadCollator(pad_id(self.tokenizer)), callbacks=callbacks + self.callbacks)
        trainer.remove_callback(PrinterCallback)  # it prints every log dict; our logger and bar replace it
        return trainer

    def _prepare_out(self) -> None:
        import yaml

        if self.config.overwrite and self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)
        header = f"# {self.config.command()}\n# resolved config of this run; add --resume to continue it\n"
        (self.out / CONFIG_FILE).write_text(header + yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    # --- train -----------------------------------------------------------------------------------

    def train(self):
        """Run the Trainer (from the last checkpoint with --resume)."""
        start = time.perf_counter()
        resume = self._last_checkpoint() if self.config.resume else None
        self.train_output = self.trainer.train(resume_from_checkpoint=resume)
        self.train_seconds = time.perf_counter() - start
        return self.train_output

    # --- save ------------------------------------------------------------------------------------

    def save(self) -> dict:
        """Write the trained weights, the loss curve and summary.json; returns the summary."""
        self.trainer.accelerator.wait_for_everyone()
        if not self.trainer.is_world_process_zero():
            return {}
        self._save_weights()
        summary = self._summary()
        from .trainlog import CURVE_PNG, plot_curves, read_log

        plot_curves({self.method: read_log(self.out)}, self.out / CURVE_PNG, title=f"{self.method}: training loss")
        if self.config.convert_at_end:
            summary["converted"] = str(self._convert())
        (self.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary

    def _save_weights(self) -> None:
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        name = "model" if self.method == "full" else "adapter"
        on_its_residual = self.config.model is not None and self.method == "pissa"
        if on_its_residual:
            # The adapter belongs on the residual, not on the original model: point loaders (AutoPeftModel*) there.
            model.peft_config[ADAPTER_NAME].base_model_name_or_path = str((self.out / "residual").resolve())
            if self.config.save_residual:  # first: saving the adapter reads its base's config.json
                self._save_residual(model)
        with atomic_output_dir(self.out / name, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        if on_its_residual:
            self._save_init()  # (qpissa on the fly already wrote RUN/init before training)

    def _save_residual(self, model) -> None:
        """RUN/residual: the frozen base the trained adapter needs."""
        from .adapters import residual_state_dict

        with atomic_output_dir(self.out / "residual", overwrite=True) as tmp:
            model.get_base_model().save_pretrained(tmp, state_dict=residual_state_dict(model))
            self.tokenizer.save_pretrained(tmp)

    def _save_init(self) -> None:
        """RUN/init: a `pissa init`-style folder (initial adapter + pissa.json), what `pissa convert` reads."""
        from .checkpoint.adapter_io import read_adapter_config, write_adapter
        from .manifest import build_manifest, write_manifest

        # The trained adapter's config, unless it was re-expressed as AdaLoRA: then the initial LoRA's.
        config = (json.loads(json.dumps(self.initial_config.to_dict(), default=sorted))
                  if self.config.train_singular_values else read_adapter_config(self.out / "adapter"))
        adapter_config = {**config, "base_model_name_or_path": str((self.out / "residual").resolve())}
        with atomic_output_dir(self.out / "init", overwrite=True) as tmp:
            write_adapter(tmp / "adapter", adapter_config, self.initial_adapter)
            write_manifest(tmp, build_manifest(source=self.config.model, config=self.pissa_config().to_dict(),
                                               layers=self.init_report, resolved_path=self.model_path))

    def _convert(self) -> Path:
        """The trained PiSSA adapter as a rank-2r LoRA on the original base (RUN/lora), via pissa.convert."""
        from .convert import convert_to_lora

        init_dir = Path(self.config.init) if self.config.init else self.out / "init"
        return convert_to_lora(self.out / "adapter", init_dir, self.out / "lora", overwrite=True).out

    def _summary(self) -> dict:
        from .trainlog import read_log

        log = read_log(self.out)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        speeds = [r["tokens_per_s"] for r in log if r["tokens_per_s"]]
        return {
            "command": self.config.command(),
            "method": self.method + ("+dora" if self.config.dora else "")
            + ("+singular-values" if self.config.train_singular_values else ""),
            "steps": self.trainer.state.global_step,
            "first_loss": log[0]["loss"] if log else None,
            "final_loss": log[-1]["loss"] if log else None,
            "tokens": self.trainer.state.num_input_tokens_seen,
            "tokens_per_s_median": sorted(speeds)[len(speeds) // 2] if speeds else None,
            "train_seconds": round(getattr(self, "train_seconds", 0.0), 2),
            "trainable_params": trainable,
            "examples": self.dataset.stats.kept,
            "dropped_too_long": self.dataset.stats.too_long,
            "data_format": self.dataset.stats.format,
        }

    def run(self) -> dict:
        self.setup()
        self.train()
        return self.save()


# --- model building --------------------------------------------------------------------------------

def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """A copy of the adapter's tensors, as PEFT saves them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def init_adapters(model, config: PissaConfig, dora: bool = False):
    """`pissa.adapters.init_model` plus DoRA: wrap `model` (in place) and initialise every adapter.

    DoRA's magnitude is recomputed after the init so that it equals ||W_res + scale B A|| = ||W||
    column-wise, which leaves the model's outputs unchanged.
    """
    from peft import get_peft_model

    from .adapters import init_model

    if not dora:
        return init_model(model, config)
    check_not_quantized(model)
    ranks = resolve_targets(model, config)
    check_targets(model, ranks)
    peft_config = dataclasses.replace(lora_config(config, model, list(ranks)), use_dora=True)
    peft_model = get_peft_model(model, peft_config)
    modules = dict(peft_model.base_model.model.named_modules())
    report = {name: init_layer_(modules[name], name, config) for name in ranks}
    refresh_dora_magnitude_(peft_model)
    return peft_model, report


@torch.no_grad()
def refresh_dora_magnitude_(peft_model) -> None:
    """Set (in place) each DoRA magnitude vector to the column norms of base + scale * B @ A."""
    for module in peft_model.modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if magnitudes is None or ADAPTER_NAME not in magnitudes:
            continue
        magnitudes[ADAPTER_NAME].update_layer(
            base_layer=module.get_base_layer(), lora_A=module.lora_A[ADAPTER_NAME].weight,
            lora_B=module.lora_B[ADAPTER_NAME].weight, scaling=module.scaling[ADAPTER_NAME])


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise PissaError(f"could not load a tokenizer from {path} ({e.__class__.__name__}); training needs the "
                         "model's tokenizer files beside its weights") from e


def load_init_dir(folder: str | Path, dtype: str, dora: bool, device):
    """PeftModel from a `pissa init` output: residual base + trainable adapter, no SVD.

    A residual fitted for quantization (`pissa init --quantize`) loads in 4-bit with the recorded
    settings and is checked against the fitted Q before any forward pass.
    """
    from peft import LoraConfig, PeftModel

    from .initialize import ADAPTER_DIR, RESIDUAL_DIR
    from .models import load_model

    folder = Path(folder)
    for part in (RESIDUAL_DIR, ADAPTER_DIR):
        if not (folder / part).is_dir():
            raise PissaError(f"--init {folder} has no {part}/ folder; point --init at a `pissa init --out` folder")
    if is_quantized_init(folder):
        base = load_quantized_residual(folder, device)
    else:
        base, _, _ = load_model(folder / RESIDUAL_DIR, dtype)
        base.to(device)
    peft_config = LoraConfig.from_pretrained(str(folder / ADAPTER_DIR))
    peft_config.use_dora = dora
    model = PeftModel.from_pretrained(base, str(folder / ADAPTER_DIR), is_trainable=True, config=peft_config)
    if dora:
        refresh_dora_magnitude_(model)
    return model


def is_quantized_init(folder: Path) -> bool:
    from .manifest import read_manifest

    return bool(read_manifest(folder).get("quantization"))


def load_quantized_residual(folder: Path, device):
    """The residual in bitsandbytes 4-bit, exactly as the adapter was fitted against (checked)."""
    from transformers import AutoModelForCausalLM

    from .quant import check_quantized_output, load_kwargs

    residual = folder / "residual"
    kwargs = load_kwargs(residual)  # raises with an install hint when bitsandbytes is missing
    base = AutoModelForCausalLM.from_pretrained(residual, device_map={"": device}, **kwargs)
    check_quantized_output(base, folder)  # before any forward pass (bnb's CPU path repacks weights)
    return base


def check_quant_available(method: str) -> None:
    """Quantized methods need bitsandbytes; say so before any model is loaded."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise PissaError(f"--method {method} quantizes the base model and needs bitsandbytes: "
                         "`pip install 'pissa[quant]'` (or `pip install bitsandbytes`)")
