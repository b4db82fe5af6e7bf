"""`pissa eval` of a classifier (a `pissa train --task classify | image-classify` run, its adapter, or any saved
sequence / image classifier): accuracy, macro F1 and Matthews correlation on labelled held-out records,
written atomically as

    OUT/eval.json          accuracy, f1, mcc, counts, the label set, what was evaluated and how
    OUT/predictions.jsonl  one line per example: index, gold, predicted, correct

The records are checked against the labels the head was trained on (the model's id2label) before any weight
is loaded: a label the head has no class for is refused with one line.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.labels import LabelSet
from ..data.tasks import ClassifierTask, task_of_config
from ..init.load import load_quantized_residual
from ..io.atomic import atomic_output_dir, check_output_dir
from ..layout import ADAPTER_DIR, EVAL_FILE, PREDICTIONS_FILE, RUN_EVAL_DIR
from ..models import load_model, resolve_model
from ..models.load import read_config
from .targets import (
    check_adapter_fits,
    check_finite_weights,
    check_no_recomputed_base,
    check_pissa_base,
    quantized_init_of,
)


@dataclass
class ClassifyResult:
    accuracy: float
    correct: int
    total: int
    f1: float  # macro F1 over the classes (for two classes, the mean of both classes' F1)
    mcc: float  # Matthews correlation (multi-class: Gorodkin's R_K)
    labels: list[str]
    records: list[dict]
    seconds: float
    task: str = "classify"
    perplexity: None = None  # what `pissa eval` prints for generation; a classifier has none
    backend: str = "transformers"

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "records"}


def confusion(predicted: torch.Tensor, gold: torch.Tensor, classes: int) -> torch.Tensor:
    """(classes, classes) counts: row = gold class, column = predicted class."""
    return torch.bincount(gold * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def scores(predicted: torch.Tensor, gold: torch.Tensor, classes: int) -> dict[str, float]:
    """Accuracy, macro F1 and Matthews correlation of class ids (N,) against gold ids (N,)."""
    C = confusion(predicted, gold, classes).double()  # (K, K)
    tp, support, chosen = C.diag(), C.sum(1), C.sum(0)  # (K,) each
    f1 = torch.where(support + chosen > 0, 2 * tp / (support + chosen).clamp(min=1), torch.ones_like(tp))
    n, correct = C.sum(), tp.sum()
    denominator = ((n * n - (chosen * chosen).sum()) * (n * n - (support * support).sum())).sqrt()
    mcc = ((correct * n - (chosen * support).sum()) / denominator).item() if denominator > 0 else 0.0
    return {"accuracy": (correct / n).item(), "f1": f1[support > 0].mean().item(), "mcc": mcc}


@torch.no_grad()
def predict(model, rows: list[dict], collator, batch_size: int, progress=None) -> torch.Tensor:
    """Class logits (N, K) of encoded rows, in batches."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(rows), batch_size):
        batch = collator([{k: v for k, v in r.items() if k != "labels"} for r in rows[start:start + batch_size]])
        out.append(model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu())  # (b, K)
        if progress:
            progress(min(start + batch_size, len(rows)), len(rows), "batch")
    return torch.cat(out)  # (N, K)


def classifier_task(model: str) -> ClassifierTask | None:
    """The classifier task of a local model folder (from its architecture); None for anything else."""
    path = Path(resolve_model(model))
    return task_of_config(read_config(path)) if (path / "config.json").is_file() else None


def load_classifier(target, dtype: str):
    """The classifier of `target` (eval.targets.Target) with its adapter applied, checked as `pissa eval` checks."""
    init = quantized_init_of(target.model)
    if init is not None:  # a `pissa init --quantize` residual loads in 4-bit, as it was trained
        model = load_quantized_residual(init, "cuda" if torch.cuda.is_available() else "cpu")
    else:
        model, _, _ = load_model(target.model, dtype, tokenizer=False)
    if target.adapter is not None:
        from peft import PeftModel

        check_adapter_fits(model, target.adapter, target.model)
        check_pissa_base(target)
        check_no_recomputed_base(target.adapter)
        model = PeftModel.from_pretrained(model, str(target.adapter))
    check_finite_weights(model, target)
    return model.eval()


def default_out(target, data: str, task: ClassifierTask) -> Path:
    label = Path(data.rstrip("/").replace(":", "-")).stem
    if target.adapter is not None:
        root = target.adapter.parent if target.adapter.name == ADAPTER_DIR else target.adapter
        return root / RUN_EVAL_DIR / f"{label}-{task.name}"
    if target.kind == "run":  # --method full: RUN/model
        return Path(target.model).parent / RUN_EVAL_DIR / f"{label}-{task.name}"
    return Path(f"eval-{Path(target.model).name}-{label}-{task.name}")


def run_classify_eval(target, task: ClassifierTask, data: str, config, out=None, overwrite=False, dtype="auto",
                      progress=None):
    """Evaluate a classifier target on labelled `data`; returns (ClassifyResult, out folder, target)."""
    start = time.perf_counter()
    out = check_output_dir(out or default_out(target, data, task), overwrite, inputs=[target.model, target.adapter,
                                                                                      data])
    hf_config = read_config(resolve_model(target.model))
    labels = LabelSet.of_config(hf_config)
    records = task.read(data, config.limit, hf_config)
    labels.ids(records.labels, records.source)  # a label the head has no class for: refused before any load
    processor = task.processor(target.adapter or resolve_model(target.model), hf_config, "evaluation")
    max_length = min(config.max_length, getattr(processor, "model_max_length", config.max_length))
    rows, _ = task.encode(records, processor, labels, max_length)
    model = load_classifier(target, dtype)
    predicted = predict(model, rows, task.collator(processor), config.batch_size, progress).argmax(-1)  # (N,)
    gold = torch.tensor([r["labels"] for r in rows])  # (N,)
    metrics = scores(predicted, gold, len(labels.names))
    lines = [{"index": i, "gold": labels.names[g], "predicted": labels.names[p], "correct": g == p}
             for i, (g, p) in enumerate(zip(gold.tolist(), predicted.tolist(), strict=True))]
    result = ClassifyResult(correct=int((predicted == gold).sum()), total=len(rows), labels=list(labels.names),
                            task=task.name,
                            records=lines, seconds=time.perf_counter() - start, **metrics)
    meta = {"model": target.model, "adapter": str(target.adapter) if target.adapter else None, "kind": target.kind,
            "data": data, "config": config.to_dict()}
    with atomic_output_dir(out, overwrite) as tmp:
        (tmp / EVAL_FILE).write_text(json.dumps({**result.summary(), **meta}, indent=2) + "\n")
        (tmp / PREDICTIONS_FILE).write_text("".join(json.dumps(r) + "\n" for r in lines))
    return result, out, target
