"""The recipe behind `pissa train`: one readable class, setup -> train -> save.

It runs on TRL (`SFTTrainer` for --stage sft, `DPOTrainer` for --stage dpo, see `train.trainers`) with
PEFT, launched alone or by `accelerate launch` / `torchrun` under DDP, FSDP2 or DeepSpeed ZeRO-2/3 (`train.engines`:
what a sharding engine needs, and what it refuses; docs/distributed.md). Two ways in:

- `--init DIR`: a `pissa init` output. The residual model and the adapter load as stock
  artefacts (`AutoModelForCausalLM` + `PeftModel.from_pretrained(is_trainable=True)`); no SVD.
- `--model MODEL --method M`: the adapter is initialised on the fly, in memory (`pissa.init`), with
  the same per-layer seeds as `pissa init`, so both give the same run.
The data are read and converted to TRL's records by `pissa.data` (`sft`, `preference`).

A run folder holds (pissa.layout.RunDir names them):
    train_config.yaml    the resolved config; its first line is the command that repeats the run
    checkpoints/         Trainer checkpoints (adapter + optimizer + scheduler + RNG) for --resume
    log.jsonl, log.csv   loss, grad norm, lr, tokens and tokens/s per step (DPO: margin, accuracy); tensorboard/
    adapter/             the trained PEFT adapter (model/ for --method full)
    residual/, init/     with --model and a PiSSA-style method: the frozen residual base the adapter needs,
                         and a `pissa init`-style folder with the initial A, B (what `pissa convert` reads);
                         quantized methods, and any adapter under FSDP or ZeRO-3, with --model write the whole
                         init (residual inside) to init/ first
    lora/                with --convert-at-end: the trained adapter as a rank-2r LoRA on the original base
    loss.png, summary.json
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import torch

from ..errors import PissaError
from ..init import ADAPTER_NAME, PissaConfig, init_model
from ..io.atomic import check_not_overlapping
from ..io.manifest import read_manifest
from ..layout import RunDir
from .config import DEFAULT_QUANT_ITERS, DEFAULT_QUANT_TYPE, DEFAULT_RANK, RESUME_FREE, TrainConfig
from .engines import Engine, check_engine, launched_engine, whole_weights
from .methods import TrainMethod, get_train_method, method_of_init
from .save import RunWriter


class TrainRecipe:
    """Fine-tuning, supervised (loss on the answers) or DPO: `setup()`, `train()`, `save()`.

    `callbacks` are extra TrainerCallbacks; `progress(step, max_steps, loss)` is called per step.
    """

    def __init__(self, config: TrainConfig, callbacks=(), progress=None):
        self.config = config
        self.out = Path(config.out)
        self.run_dir = RunDir(self.out)
        self.callbacks = list(callbacks)
        self.progress = progress
        self.method: TrainMethod | None = None
        self.engine: Engine = launched_engine()  # single, DDP, FSDP or DeepSpeed, as launched
        self.args = None  # trl.SFTConfig or trl.DPOConfig
        self.tokenizer = None
        self.data = None  # pissa.data.sft.SFTData or pissa.data.preference.PreferenceData
        self.model = None
        self.trainer = None
        self.model_path: str | None = None  # the resolved --model
        self.init_report: dict = {}  # --model: per-layer decomposition info of the on-the-fly init
        self.initial_adapter: dict[str, torch.Tensor] = {}  # --model: A, B as initialised (for pissa convert)
        self.initial_config = None  # --model: the initial LoraConfig
        self.train_output = None
        self.train_seconds = 0.0

    # --- setup -----------------------------------------------------------------------------------

    def setup(self) -> TrainRecipe:
        """Check the run folder, load model + adapter + data, and build the Trainer."""
        from accelerate import PartialState

        self._check_out()
        self.method = self._resolve_method()
        self._check_method_options()
        check_engine(self.engine, self.config, self.method)
        self.args = self._training_args()
        state = PartialState()  # the process group under torchrun / accelerate launch (a no-op alone)
        self.tokenizer = self._load_processor()
        self.data = self._load_data()  # bad data fails here, before anything is written
        state.wait_for_everyone()  # every rank has checked --out before rank 0 creates it
        fresh = not self.config.resume
        if state.is_main_process:
            RunWriter(self).prepare()
        state.wait_for_everyone()
        try:
            torch.manual_seed(self.config.seed)
            self.model = self._load_model()
            self._check_convertible()
            self.trainer = self._trainer()
        except BaseException:
            if fresh and state.is_main_process:
                shutil.rmtree(self.out, ignore_errors=True)  # a run that never started leaves nothing behind
            raise
        return self

    def _load_processor(self):
        """What turns records into model inputs (and is saved beside the weights): the tokenizer."""
        from ..models import load_tokenizer

        return load_tokenizer(self._tokenizer_source(), required_for="training")

    def _check_method_options(self) -> None:
        if self.config.convert_at_end and not self.method.converts:
            raise PissaError(f"--convert-at-end rewrites a PiSSA adapter as a LoRA on the original model; a "
                             f"{self.method.name} run needs no conversion, drop --convert-at-end")
        if self.config.train_singular_values and self.method.name != "pissa":
            raise PissaError(f"--train-singular-values trains PiSSA's singular values; it applies to --method pissa, "
                             f"not {self.method.name}")

    def _check_out(self) -> None:
        c, out = self.config, self.out
        check_not_overlapping(out, [c.init, c.model, c.data])  # even --overwrite may not delete an input
        if c.resume:
            if not self._last_checkpoint():
                raise PissaError(f"--resume: {out} has no checkpoint under {self.run_dir.checkpoints.name}/ to "
                                 "continue from (it stopped before its first --save-steps); pass --overwrite "
                                 "instead of --resume to start it again")
            self._check_same_config()
        elif out.exists() and not c.overwrite:
            if self._last_checkpoint():
                raise PissaError(f"run folder {out} already exists; pass --resume to continue it from its last "
                                 "checkpoint, --overwrite to replace it, or choose another --out")
            raise PissaError(f"run folder {out} already exists and holds no checkpoint to resume from; pass "
                             "--overwrite to replace it, or choose another --out")

    def _check_same_config(self) -> None:
        import yaml

        saved = yaml.safe_load(self.run_dir.config.read_text())
        now = self.config.to_dict()
        changed = sorted(k for k in now if k not in RESUME_FREE and saved.get(k) != now[k])
        if changed:
            raise PissaError(f"--resume with different options than the run in {self.out}: {', '.join(changed)}; "
                             f"repeat the command in {self.run_dir.config}")

    def _last_checkpoint(self) -> str | None:
        from transformers.trainer_utils import get_last_checkpoint

        folder = self.run_dir.checkpoints
        return get_last_checkpoint(str(folder)) if folder.is_dir() else None

    def _resolve_method(self) -> TrainMethod:
        c = self.config
        if c.init is None:
            method = get_train_method(c.method or "pissa")
            if method.quantized:
                check_quant_available(method.name)
            return method
        manifest = read_manifest(c.init)
        method = method_of_init(manifest)
        if c.method not in (None, method.name):
            raise PissaError(f"--init {c.init} was made with method {manifest['method']!r} (it trains as --method "
                             f"{method.name}); --method {c.method} does not apply to it (drop --method, or re-run "
                             "`pissa init` with the method you want)")
        return method

    def _training_args(self):
        from .trainers import training_args

        return training_args(self.config, str(self.run_dir.checkpoints), self.method.adapter)

    def _tokenizer_source(self) -> Path | str:
        from ..layout import InitDir
        from ..models import resolve_model

        if self.config.init is not None:
            return InitDir(Path(self.config.init)).residual
        return resolve_model(self.config.model)

    @property
    def dtype(self) -> str:
        return "bfloat16" if self.config.precision == "bf16" else "float32"

    def _load_model(self):
        from ..init.load import load_init_dir

        c = self.config
        if c.init is not None:
            return self._with_singular_values(load_init_dir(c.init, self.dtype, c.dora, self.args.device))
        if self.init_written_first:
            return self._init_written_first()
        from ..models import load_model

        model, _, self.model_path = load_model(self._model_spec(), self.dtype, tokenizer=False)
        model.to(self.args.device)  # decompose where the weights will train (GPU when there is one)
        if not self.method.adapter:
            return model.requires_grad_(True)
        peft_model, self.init_report = init_model(model, self.pissa_config(), dora=c.dora)
        self.initial_adapter = adapter_state(peft_model)  # conversion to a LoRA needs the starting A, B
        self.initial_config = peft_model.peft_config[ADAPTER_NAME]
        return self._with_singular_values(peft_model)

    def _model_spec(self) -> str:
        """The model --model initialises from (a classifier task: RUN/base, the model with its new head)."""
        return self.config.model

    def _check_convertible(self) -> None:
        """--convert-at-end: convert the step-0 adapter now (in memory), so that what the conversion after the
        last step would refuse is refused before the first."""
        if not self.config.convert_at_end:
            return
        from ..convert import InitSource, check_convertible, read_init_source

        if self.config.init is not None:
            init = read_init_source(self.config.init)
        elif self.initial_adapter:
            init = InitSource.in_memory(config_dict(self.initial_config), self.initial_adapter, self.model_path,
                                        self.init_report)
        else:  # RUN/init was written before loading (init_written_first)
            init = read_init_source(self.run_dir.init.root)
        check_convertible(config_dict(self.model.peft_config[ADAPTER_NAME]), adapter_state(self.model), init)

    def _with_singular_values(self, peft_model):
        """With --train-singular-values, the PiSSA adapter re-expressed as B·diag(S)·A (train.singular_values)."""
        if not self.config.train_singular_values:
            return peft_model
        if peft_model.peft_config[ADAPTER_NAME].target_parameters:
            raise PissaError("--train-singular-values: PEFT's AdaLoRA cannot adapt fused MoE expert tensors; drop "
                             "it, or leave the experts out of --targets")
        from .singular_values import to_singular_value_adapters

        return to_singular_value_adapters(peft_model, self.config.orth_reg_weight, self._planned_steps())

    def _planned_steps(self) -> int:
        """Optimizer steps this run will take (recorded in the AdaLoRA config, which requires one)."""
        c, world = self.config, self.args.world_size
        if c.max_steps > 0:
            return c.max_steps
        batches = math.ceil(len(self.data.records) / (c.batch_size * world))
        return math.ceil(c.epochs * batches / c.grad_accum)

    @property
    def init_written_first(self) -> bool:
        """--model, and the adapter is initialised on disk (RUN/init) rather than in memory: a quantized base
        (transformers quantizes at load), or an engine that shards the weights (an SVD needs each whole)."""
        return self.config.init is None and self.method.adapter and (
            self.method.quantized or self.engine.shards_weights)

    def _init_written_first(self):
        """`pissa init` (--quantize for a quantized method) into RUN/init, once (--resume finds it); then every
        process loads it like --init. A local folder streams, each process taking its share of the shards
        (`init.parallel`); anything else is initialised in memory by the main process alone."""
        from accelerate import PartialState

        from ..init import run_init
        from ..init.load import load_init_dir
        from ..io.reader import is_safetensors_folder
        from ..models import resolve_model

        state, init_dir = PartialState(), self.run_dir.init
        written = init_dir.exists()
        state.wait_for_everyone()  # every process has looked before any writes it
        if not written and (state.is_main_process or is_safetensors_folder(resolve_model(self.config.model))):
            run_init(self._model_spec(), self.pissa_config(), init_dir.root, dtype=self.dtype)
        state.wait_for_everyone()
        return load_init_dir(init_dir.root, self.dtype, self.config.dora, self.args.device)

    def pissa_config(self) -> PissaConfig:
        """The init of this run's adapter (--model), as `pissa init` would be given it."""
        c, method = self.config, self.method
        options = {"niter": c.niter} if c.niter is not None and method.init == "pissa" else {}
        quant = {"quantize": c.quant_type or DEFAULT_QUANT_TYPE, "quant_iters": c.quant_iters or DEFAULT_QUANT_ITERS,
                 "quant_fit": method.quant_fit} if method.quantized else {}
        if method.quantized and self.engine.name == "fsdp":
            quant["quant_storage"] = "bfloat16"  # what FSDP shards (engines.check_quant_storage); the same codes
        return PissaConfig(rank=c.rank or DEFAULT_RANK, alpha=c.alpha, method=method.init, options=options,
                           targets=c.targets, seed=c.seed, **quant)

    def _load_data(self):
        c = self.config
        if c.stage == "dpo":
            from ..data.preference import build_preference_data

            return build_preference_data(c.data, self.tokenizer, c.max_length, c.limit)
        from ..data.sft import build_sft_data

        return build_sft_data(c.data, self.tokenizer, c.max_length, c.limit)

    def _trainer(self):
        from transformers import PrinterCallback

        from .trainers import build_dpo_trainer, build_sft_trainer

        callbacks = self._callbacks()
        if self.config.stage == "dpo":
            trainer = build_dpo_trainer(self.model, self.data, self.tokenizer, self.args, self.method.adapter,
                                        self.config.train_singular_values, callbacks)
        else:
            trainer = build_sft_trainer(self.model, self.data, self.args, callbacks)
            self.data.stats.loss_tokens = sum(sum(t != -100 for t in row) for row in trainer.train_dataset["labels"])
        trainer.remove_callback(PrinterCallback)  # it prints every log dict; our logger and bar replace it
        return trainer

    def _callbacks(self) -> list:
        """The per-step logger, the progress hook and the caller's callbacks."""
        from .log import MetricsLogger, ProgressHook

        callbacks = [MetricsLogger(self.out, tensorboard=self.config.tensorboard, stage=self.config.stage)]
        if self.progress is not None:
            callbacks.append(ProgressHook(self.progress))
        return callbacks + self.callbacks

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
        """Write the trained weights, the loss curve and summary.json; returns the summary (empty on
        every process but the main one). Every process calls it: FSDP and ZeRO-3 gather the weights first."""
        weights = whole_weights(self.trainer.model, self.method.adapter)  # None unless sharded
        self.trainer.accelerator.wait_for_everyone()
        if not self.trainer.is_world_process_zero():
            return {}
        return RunWriter(self).save(weights)

    def run(self) -> dict:
        self.setup()
        self.train()
        return self.save()


def adapter_state(peft_model) -> dict[str, torch.Tensor]:
    """A copy of the adapter's tensors, as PEFT saves them."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def config_dict(peft_config) -> dict:
    """A PEFT config as its adapter_config.json would hold it (sets as sorted lists)."""
    import json

    return json.loads(json.dumps(peft_config.to_dict(), default=sorted))


def check_quant_available(method: str) -> None:
    """Quantized methods need bitsandbytes; say so before any model is loaded."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise PissaError(f"--method {method} quantizes the base model and needs bitsandbytes: "
                         "`pip install 'pissa[quant]'` (or `pip install bitsandbytes`)")


SFTRecipe = TrainRecipe  # the recipe's name before --stage dpo; both stages run through it
