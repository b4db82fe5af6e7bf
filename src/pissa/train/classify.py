"""`pissa train --task classify | image-classify`: the recipe on a classifier (`pissa.data.tasks`).

It is `TrainRecipe` (the methods registry, the on-the-fly or `--init` adapter, the run folder, logs, resume and
RunWriter's save) with a classifier's pieces in place of the causal LM's:

- the model is `AutoModelFor{Sequence,Image}Classification`. With `--model`, the classifier it starts from
  (the backbone plus a new head for the data's labels, drawn with --seed; a checkpoint whose head already has
  these labels keeps it) is written to RUN/base first and loaded from there: it is the run's original model,
  which a LoRA adapter applies to and a PiSSA adapter converts to (`pissa convert` / `merge`);
- the head (every top-level module outside the backbone, `init.heads`) is trained in full and saved in the
  adapter as PEFT's `modules_to_save`; the adapters go on the backbone's linear layers (and a ViT's Conv2d
  patch embedding), never on the head, and a 4-bit base keeps the head unquantized;
- the data are labelled records (`pissa.data.labels`, `pissa.data.images`), encoded once, batched by the
  task's collator, and trained with transformers' `Trainer` on the model's own cross-entropy (TRL has no
  classifier trainer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.labels import LabelSet
from ..data.tasks import get_task, task_of_config
from ..errors import PissaError
from ..init.heads import body_targets, head_modules
from ..layout import InitDir
from .recipe import TrainRecipe


@dataclass
class ClassifyData:
    """Encoded rows and what the run summary says about them."""

    records: list[dict]
    source: str
    labels: LabelSet
    inputs: str
    truncated: int

    def summary(self) -> dict:
        return {"examples": len(self.records), "dropped_too_long": 0, "truncated": self.truncated,
                "data_format": f"{self.inputs} / label", "labels": list(self.labels.names),
                "data_layout": f"{len(self.labels.names)} classes: {', '.join(self.labels.names[:10])}"}


class ClassifyRecipe(TrainRecipe):
    """Fine-tuning of a classifier: `setup()`, `train()`, `save()` as `TrainRecipe`."""

    def __init__(self, config, callbacks=(), progress=None):
        super().__init__(config, callbacks, progress)
        self.task = get_task(config.task)
        self.source_config = None  # transformers config of the model the run starts from
        self.labels: LabelSet | None = None
        self.head: list[str] = []  # modules trained in full (PEFT modules_to_save)
        self.body: list[str] = []  # default adapter targets

    def _source(self) -> str:
        from ..models import resolve_model

        return str(InitDir(Path(self.config.init)).residual) if self.config.init else resolve_model(self.config.model)

    def _load_processor(self):
        from ..models.load import read_config

        self.source_config = read_config(self._source())
        if self.config.init is not None and task_of_config(self.source_config) is not self.task:
            raise PissaError(f"--init {self.config.init} holds a {', '.join(self.source_config.architectures or [])}, "
                             f"not a {self.task.suffix.removeprefix('For')} model; for --task {self.task.name} "
                             "initialise on the fly with --model, or `pissa init` a classifier checkpoint")
        return self.task.processor(self._source(), self.source_config, "training")

    def _training_args(self):
        from transformers import TrainingArguments

        from .trainers import common_args

        args = common_args(TrainingArguments, self.config, str(self.run_dir.checkpoints))
        if self.task.inputs != "text":  # no tokens to count
            args["include_num_input_tokens_seen"] = "no"
        return TrainingArguments(**args, remove_unused_columns=False)

    def _load_data(self) -> ClassifyData:
        c = self.config
        data = self.task.read(c.data, c.limit, self.source_config)
        self.labels = LabelSet.of(data.labels, data.source)
        if c.init is not None:
            self._check_init_labels()
        rows, truncated = self.task.encode(data, self.tokenizer, self.labels, c.max_length)
        return ClassifyData(rows, data.source, self.labels, self.task.inputs, truncated)

    def _check_init_labels(self) -> None:
        trained = LabelSet.of_config(self.source_config)
        if trained.names != self.labels.names:
            raise PissaError(f"--init {self.config.init} has a head for labels {', '.join(trained.names)} but "
                             f"{self.config.data} has {', '.join(self.labels.names)}; initialise on the fly with "
                             "--model (a new head), or give data with the init's labels")

    # --- the model ---------------------------------------------------------------------------------

    def _model_spec(self) -> str:
        """RUN/base: written once (rank 0; kept on --resume), then what every method starts from."""
        from accelerate import PartialState

        from ..models import meta_model

        base = self.run_dir.base
        with PartialState().main_process_first():
            if PartialState().is_main_process and not base.is_dir():
                self._write_base(base)
        model = meta_model(base)
        self.head = self.head or head_modules(model)
        # bitsandbytes quantizes linear layers only: a 4-bit base keeps a Conv2d (a ViT's patch embedding) as it is
        conv = self.task.conv_targets and not self.method.quantized
        self.body = self.body or body_targets(model, self.head, conv)
        return str(base)

    def _write_base(self, base: Path) -> None:
        """The backbone with a head for the data's labels: a new one drawn with --seed, unless the checkpoint is a
        classifier whose head has exactly these labels (then it is kept)."""
        from ..io.atomic import atomic_output_dir

        source = self._source()
        keep = task_of_config(self.source_config) is self.task and \
            LabelSet.of_config(self.source_config).names == self.labels.names
        kwargs = {} if keep else {**self.labels.config_kwargs(), "ignore_mismatched_sizes": True}
        torch.manual_seed(self.config.seed)
        model = self.task.auto().from_pretrained(source, dtype="auto", **kwargs)
        if not keep and task_of_config(self.source_config) is self.task:  # a head for other labels: draw it anew
            redraw_(model, head_modules(model))
        with atomic_output_dir(base, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)

    def _load_model(self):
        if self.config.init is not None:
            model = super()._load_model()
            self.head = sorted(model.peft_config["default"].modules_to_save or [])
            return model
        return super()._load_model()

    def pissa_config(self):
        """The recipe's init config with the head as modules_to_save and the backbone's layers as targets."""
        config = super().pissa_config()
        return dataclasses.replace(config, targets=self.config.targets or self.body, modules_to_save=self.head)

    # --- training ----------------------------------------------------------------------------------

    def _trainer(self):
        from transformers import PrinterCallback, Trainer

        trainer = Trainer(model=self.model, args=self.args, train_dataset=self.data.records,
                          data_collator=self.task.collator(self.tokenizer), callbacks=self._callbacks())
        trainer.remove_callback(PrinterCallback)  # our logger and bar replace it
        return trainer


@torch.no_grad()
def redraw_(model, head: list[str]) -> None:
    """Initialise (in place) the `head` modules as transformers initialises a missing head; the flags that mark
    loaded weights as initialised (which its init functions skip) are cleared first."""
    for name in head:
        for module in getattr(model, name).modules():
            module._is_hf_initialized = False
            for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                tensor._is_hf_initialized = False
            model._init_weights(module)
