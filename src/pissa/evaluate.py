"""Evaluation as in the paper: greedy generation, answer extraction, exact-match accuracy, and
perplexity of the reference responses on the same held-out set.

    examples = load_eval_examples("test.jsonl")            # question + reference answer per line
    result = evaluate(model, tokenizer, examples, EvalConfig(task="gsm8k"))
    result.accuracy, result.perplexity, result.records      # records: prompt, output, extracted, gold

Generation is batched with left padding (each batch is padded to its longest prompt; prompts are
sorted by length first so batches waste little padding), greedy, and stops at EOS. The vLLM
backend is used when installed and a GPU is present (`backend="auto"`), or when asked for.
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

from .answers import check_task, extract_answer, gold_answer, is_correct
from .errors import PissaError
from .evaldata import EvalExample, encode_prompt, encode_with_response

Progress = Callable[[int, int, str], None]
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


# --------------------------------------------------------------------------- generation


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (padding is masked, so any id works)."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if pad is not None:
            return pad
    return 0


def left_pad(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids, attention_mask), both (B, T), padded on the left."""
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def eos_ids(model, tokenizer) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's generation config EOS."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


def cut_at_eos(ids: list[int], stop: list[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in stop:
            return ids[:i]
    return ids


@torch.no_grad()
def generate_transformers(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, progress: Progress | None = None
) -> list[str]:
    """Greedy completions of token-id prompts, in the prompts' order."""
    from transformers import GenerationConfig

    stop = eos_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad_token_id(tokenizer),
        eos_token_id=stop or None,
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    outputs: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        input_ids, mask = left_pad([prompts[i] for i in rows], config.pad_token_id)
        generated = model.generate(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config
        )  # (B, T + new)
        for row, i in enumerate(rows):
            new = cut_at_eos(generated[row, input_ids.shape[1] :].tolist(), stop)
            outputs[i] = tokenizer.decode(new, skip_special_tokens=True)
        if progress:
            progress(len(outputs), len(prompts), "generating")
    return [outputs[i] for i in range(len(prompts))]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def generate_vllm(
    model_path: str, adapter_path: str | None, prompts: list[list[int]], max_new_tokens: int
) -> list[str]:
    """Greedy completions with vLLM (the adapter, if any, served as a LoRA request)."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError as e:
        raise PissaError("the vLLM backend needs vLLM: `pip install vllm` (GPU only), or pass --backend "
                         "transformers") from e
    lora = None
    kwargs = {}
    if adapter_path is not None:
        from .checkpoint.adapter_io import read_adapter_config

        config = read_adapter_config(adapter_path)
        ranks = [config.get("r", 8), *(config.get("rank_pattern") or {}).values()]
        kwargs = {"enable_lora": True, "max_lora_rank": max(ranks)}
        lora = LoRARequest("adapter", 1, str(adapter_path))
    llm = LLM(model=str(model_path), **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, lora_request=lora)
    return [r.outputs[0].text for r in results]


# --------------------------------------------------------------------------- perplexity


def right_pad(batch: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """(ids, labels) pairs -> input_ids, attention_mask, labels, each (B, T); labels -100 on padding."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)  # (B, T)
    for row, (ids, labs) in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
        labels[row, : len(labs)] = torch.tensor(labs)
    return input_ids, mask, labels


@torch.no_grad()
def perplexity(
    model, sequences: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, progress: Progress | None = None
) -> tuple[float, float, int]:
    """exp(mean NLL over every labelled token) of (input_ids, labels) pairs; labels -100 are skipped.

    Returns (perplexity, summed NLL, labelled-token count). Tokens are weighted equally across
    examples, as a training loss over the same tokens would be.
    """
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        input_ids, mask, labels = right_pad(sequences[start : start + batch_size], pad_id)
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
        ppl, _, _ = perplexity(model, sequences, config.batch_size, pad_token_id(tokenizer), progress)
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
    (folder / "eval.json").write_text(json.dumps({**meta, **result.summary()}, indent=2) + "\n")
    with open(folder / "predictions.jsonl", "w") as f:
        for record in result.records:
            f.write(json.dumps(record) + "\n")
