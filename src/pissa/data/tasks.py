"""Classification tasks as data: which transformers Auto class a task's model loads with, how its records are
read and encoded, what processes its inputs (a tokenizer or an image processor) and what batches them.
`pissa train --task` and `pissa eval` pick a task here; the causal-LM path (`causal-lm`, the default) is
the SFT/DPO recipe and is not a classifier task."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import PissaError
from .images import encode_images, image_processor, read_labelled_images
from .labels import LabelSet, encode_texts, read_labelled_texts

CAUSAL_LM = "causal-lm"


@dataclass(frozen=True)
class ClassifierTask:
    name: str  # the --task value
    help: str
    auto_class: str  # transformers Auto class of its models
    suffix: str  # what config.architectures of its models end with
    inputs: str  # "text" | "image"
    conv_targets: bool  # adapt Conv2d layers by default too (a ViT's patch embedding)

    def read(self, spec: str | Path, limit: int | None, hf_config):
        """The labelled records of `spec`; every record checked (labels, image files) before any model loads."""
        if self.inputs == "text":
            return read_labelled_texts(spec, limit)
        return read_labelled_images(spec, limit, hf_config.num_channels)

    def processor(self, folder: str | Path, hf_config, required_for: str):
        """The model's tokenizer, or its image processor (a default one when it has none)."""
        if self.inputs == "text":
            from ..models import load_tokenizer

            return load_tokenizer(folder, required_for=required_for)
        return image_processor(folder, hf_config)

    def encode(self, data, processor, label_set: LabelSet, max_length: int) -> tuple[list[dict], int]:
        """(rows the model takes, how many texts were truncated to `max_length` tokens)."""
        if self.inputs == "text":
            return encode_texts(data, processor, label_set, max_length)
        return encode_images(data, processor, label_set), 0

    def collator(self, processor) -> Callable:
        """Batches rows: text padded to the longest in the batch; images stacked."""
        from transformers import DataCollatorWithPadding, default_data_collator

        return DataCollatorWithPadding(processor) if self.inputs == "text" else default_data_collator

    def auto(self):
        import transformers

        return getattr(transformers, self.auto_class)


CLASSIFIER_TASKS: dict[str, ClassifierTask] = {t.name: t for t in (
    ClassifierTask("classify", "sequence classification: text (or text pairs) -> label, a new classifier head "
                   "trained in full", "AutoModelForSequenceClassification", "ForSequenceClassification", "text",
                   conv_targets=False),
    ClassifierTask("image-classify", "image classification: image -> label (a ViT: its patch embedding is a "
                   "Conv2d, adapted too)", "AutoModelForImageClassification", "ForImageClassification", "image",
                   conv_targets=True),
)}
TASK_NAMES = (CAUSAL_LM, *CLASSIFIER_TASKS)


def get_task(name: str) -> ClassifierTask | None:
    """The classifier task `name`, or None for the causal-LM path; refuses an unknown name."""
    if name == CAUSAL_LM:
        return None
    if name not in CLASSIFIER_TASKS:
        raise PissaError(f"unknown --task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    return CLASSIFIER_TASKS[name]


def task_of_config(hf_config) -> ClassifierTask | None:
    """The classifier task of a saved model, from its architecture; None for any other model."""
    for task in CLASSIFIER_TASKS.values():
        if any(a.endswith(task.suffix) for a in (hf_config.architectures or [])):
            return task
    return None
