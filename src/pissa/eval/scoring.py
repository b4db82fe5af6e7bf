"""Evaluation as in the paper: greedy generation, answer extraction, exact-match accuracy, and
perplexity of the reference responses on the same held-out set.

    examples = load_eval_examples("test.jsonl")            # question + reference answer per line
    result = evaluate(model, tokenizer, examples, EvalConfig(task="gsm8k"))
    result.accuracy, result.perplexity, result.records      # records: prompt, output, extracted, gold

Generation (`eval.generate`) is greedy; the vLLM backend is used when installed and a GPU is present
(`backend="auto"`), or when asked for.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.tokens import PadCollator, pad_id
from ..errors import PissaError
from ..layout import EVAL_FILE, PREDICTIONS_FILE
from .answers import check_task, extract_answer, gold_answer, is_correct
from .data import EvalExample, encode_prompt, encode_with_response
from .generate import Progress, generate_transformers

BACKENDS = ("auto", "transformers", "vllm")


@dataclass
class EvalConfig:
    """How to evaluate; saved beside every result so it can be repeated."""

    task: str = field(default="gsm8k", metadata={"help": "Answer extraction: gsm8k, math or generic-exact."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation limit per example (tokens)."})
    batch_size: int = field(default=8, metadata={"help": "Prompts generated (and scored) together."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N examples."})
    max_length: int = field(default=1024, metadata={"help": "Perplexity: truncate prompt+response to this."})
    perplexity: bool = field(default=True, metadata={"help": "Also compute perplexity of the references."})
    backend: str = field(default="auto", metadata={"help": "auto (vLLM if installed with a GPU), transformers, vllm."})

    def __post_init__(self):
        check_task(self.task)
        for name in ("max_new_tokens", "batch_size", "max_length"):
            if getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise PissaError(f"{flag} must be > 0, got {getattr(self, name)}")
        if self.limit is not None and self.limit <= 0:
            raise PissaError(f"--limit must be > 0, got {self.limit}")
        if self.backend not in BACKENDS:
            raise PissaError(f"unknown --backend {self.backend!r}; choose one of: {', '.join(BACKENDS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    accuracy: float
    correct: int
    total: int
    perplexity: float | None
    records: list[dict]
    seconds: float
    backend: str

    def summary(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "records"}


# --------------------------------------------------------------------------- perplexity


@torch.no_grad()
def perplexity(
    model, sequences: list[tuple[list[int], list[int]]], batch_size: int, pad: int, progress: Progress | None = None
) -> tuple[float, float, int]:
    """exp(mean NLL over every labelled token) of (input_ids, labels) pairs; labels -100 are skipped.

    Returns (perplexity, summed NLL, labelled-token count). Tokens are weighted equally across
    examples, as a training loss over the same tokens would be.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = PadCollator(pad)([{"input_ids": ids, "labels": labels}
                                  for ids, labels in sequences[start : start + batch_size]])
        input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()  # (B, T, V)
        targets = labels[:, 1:].to(device)  # (B, T-1): token t is predicted from position t-1
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum")
        total_nll += nll.item()
        total_tokens += int((targets != -100).sum())
        if progress:
            progress(min(start + batch_size, len(sequences)), len(sequences), "perplexity")
    if total_tokens == 0:
        raise PissaError("no reference tokens to score for perplexity (every response was truncated away); "
                         "raise --max-length or pass --no-perplexity")
    return math.exp(total_nll / total_tokens), total_nll, total_tokens


# --------------------------------------------------------------------------- the loop


def score(outputs: list[str], examples: list[EvalExample], prompts: list[str], task: str) -> list[dict]:
    """Per-example records: prompt, output, extracted answer, gold answer, correct."""
    records = []
    for example, prompt, output in zip(examples, prompts, outputs, strict=True):
        extracted = extract_answer(output, task)
        gold = gold_answer(example.reference, task)
        records.append({
            "index": example.index,
            "prompt": prompt,
            "output": output,
            "extracted": extracted,
            "gold": gold,
            "correct": is_correct(extracted, gold),
        })
    return records


def evaluate(
    model,
    tokenizer,
    examples: list[EvalExample],
    config: EvalConfig,
    progress: Progress | None = None,
    generate: Callable[[list[list[int]]], list[str]] | None = None,
) -> EvalResult:
    """Generate for every example, extract and match answers, and score reference perplexity.

    `generate(prompt_ids) -> texts` replaces the transformers backend (the CLI passes vLLM's).
    """
    start = time.perf_counter()
    examples = examples[: config.limit] if config.limit else examples
    if not examples:
        raise PissaError("the evaluation set is empty; check --data (and --limit)")
    model.eval()
    prompt_ids = [encode_prompt(tokenizer, ex) for ex in examples]
    if generate is None:
        outputs = generate_transformers(
            model, tokenizer, prompt_ids, config.max_new_tokens, config.batch_size, progress
        )
    else:
        outputs = generate(prompt_ids)
    prompts = [tokenizer.decode(ids, skip_special_tokens=False) for ids in prompt_ids]
    records = score(outputs, examples, prompts, config.task)
    ppl = None
    if config.perplexity:
        sequences = [encode_with_response(tokenizer, ex, config.max_length) for ex in examples]
        ppl, _, _ = perplexity(model, sequences, config.batch_size, pad_id(tokenizer), progress)
    correct = sum(r["correct"] for r in records)
    return EvalResult(
        accuracy=correct / len(records),
        correct=correct,
        total=len(records),
        perplexity=ppl,
        records=records,
        seconds=time.perf_counter() - start,
        backend="transformers" if generate is None else "vllm",
    )


def write_results(folder: str | Path, result: EvalResult, meta: dict) -> None:
    """`eval.json` (metrics, config, what was evaluated) and `predictions.jsonl` (one line per example)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / EVAL_FILE).write_text(json.dumps({**meta, **result.summary()}, indent=2) + "\n")
    with open(folder / PREDICTIONS_FILE, "w") as f:
        for record in result.records:
            f.write(json.dumps(record) + "\n")
